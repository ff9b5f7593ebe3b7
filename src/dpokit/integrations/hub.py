"""Hub-ready model folders: the model card ``README.md`` and ``generation_config.json`` of every ``final/``, and
``dpokit export RUN_DIR --to DIR``. Nothing here touches the network; publishing is the Hub's own tools' job
(``hf upload ORG/NAME FOLDER``, huggingface_hub's CLI).

The card's YAML front matter is what the Hub reads (``base_model``, ``library_name``, ``license``, ``tags``,
``datasets``, ``pipeline_tag``); dpokit keeps its own facts about the run under ``dpokit:`` there too, so the card
can be rendered again later (after ``dpokit eval``) with the training machine's description intact. The body says
how the model was trained (loss and beta, data rows kept and dropped, steps, precision, hardware), the final
held-out metrics and, once ``dpokit eval`` ran, reward, KL and win rate; then a quick start that runs as it is
(the Hub id or folder filled in), the framework versions it was trained with, and for DPO the paper to cite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import DpokitError
from dpokit.io import publish_dir, staging_dir, write_text, writing

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
               chat: bool = False, versions: dict[str, str] | None = None) -> str:
    """The model card of a run's model (``final/``, or checkpoint ``step``): YAML metadata and a body.
    ``chat``: the tokenizer has a chat template (the quick start sends messages); ``versions``: the framework
    versions the run recorded (default: this process's)."""
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
    meta["pipeline_tag"] = "text-classification" if task == "rm" else "text-generation"
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
    lines += _use_lines(task, chat)
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


def hub_files(run_dir: Path, task: str, step: int | None = None, machine: str | None = "here",
              versions: dict[str, str] | None = None) -> Any:
    """What ``export_hf`` adds to a staged model folder of this run: the card and, for a language model, the
    generation config. ``machine``: the training hardware in words (default: this process's, ``hardware()``);
    ``versions``: the training's framework versions (default: this process's)."""

    def add(folder: Path, model: Any, tokenizer: Any) -> None:
        if task != "rm":
            write_generation_config(model, tokenizer, folder)
        described = hardware() if machine == "here" else machine
        (folder / CARD).write_text(model_card(run_dir, task, described, step, chat=has_chat_template(folder),
                                              versions=versions), encoding="utf-8")

    return add


def refresh_card(run_dir: Path) -> None:
    """Render ``final/README.md`` again (after ``dpokit eval``), keeping the training facts it recorded."""
    card = run_dir / "final" / CARD
    if not card.is_file():
        return
    facts = front_matter(card.read_text(encoding="utf-8")).get("dpokit") or {}
    write_text(card, model_card(run_dir, facts.get("task", "dpo"), facts.get("hardware"),
                                chat=has_chat_template(card.parent), versions=facts.get("versions")))


# ----------------------------------------------------------------------------------------------------- export

def export_run(run_dir: str | Path, to: str | Path, checkpoint: str | None = None) -> Path:
    """``dpokit export``: ``final/`` (or ``checkpoints/step-N``, LoRA merged) of a run as a Hub-ready folder at
    ``to``, which must not exist or be empty."""
    from dpokit.training.resume import is_run_dir

    run_dir, target = Path(run_dir), Path(to)
    if not is_run_dir(run_dir):
        raise DpokitError(f"{run_dir}: not a run directory (no config.yaml)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DpokitError(f"--to: {target} exists and is not an empty folder")
    if target.resolve() == (run_dir / "final").resolve():
        raise DpokitError("--to: that is the run's own final/")
    if checkpoint is None:
        return _copy_final(run_dir, target)
    return _export_checkpoint(run_dir, target, checkpoint)


def _copy_final(run_dir: Path, target: Path) -> Path:
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise DpokitError(f"{run_dir}: no final/ model folder (has the run finished? --checkpoint step-N exports "
                          "a checkpoint)")
    facts = front_matter((final / CARD).read_text(encoding="utf-8")).get("dpokit", {}) \
        if (final / CARD).is_file() else {}
    task = facts.get("task") or _task_of(run_dir)
    if target.exists():
        target.rmdir()  # empty (checked): the staged copy is renamed into its place
    with writing(target, "model folder"):
        tmp = staging_dir(target)
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        (tmp / CARD).write_text(model_card(run_dir, task, facts.get("hardware"), chat=has_chat_template(tmp),
                                           versions=facts.get("versions")), encoding="utf-8")
        if task != "rm" and not (tmp / "generation_config.json").is_file():
            from transformers import AutoTokenizer, GenerationConfig

            tokenizer = AutoTokenizer.from_pretrained(tmp)
            holder = type("Holder", (), {"generation_config": GenerationConfig.from_pretrained(tmp)
                                         if (tmp / "generation_config.json").is_file() else None})()
            write_generation_config(holder, tokenizer, tmp)
        return publish_dir(tmp, target)


def _task_of(run_dir: Path) -> str:
    from dpokit.training.checkpoint import list_checkpoints, read_trainer_state

    for path in reversed(list_checkpoints(run_dir)):
        try:
            return str(read_trainer_state(path).get("task", "dpo"))
        except (OSError, ValueError):
            continue
    return "dpo"


def _export_checkpoint(run_dir: Path, target: Path, checkpoint: str) -> Path:
    from dpokit.config import load_config
    from dpokit.models.loading import apply_lora, load_model, load_tokenizer, resolve
    from dpokit.models.quantize import round_trip
    from dpokit.training.checkpoint import (
        export_hf,
        is_sharded,
        load_weights_into,
        policy_weights,
        read_trainer_state,
        verify_checkpoint,
    )

    if not re.fullmatch(r"step-\d+", checkpoint):
        raise DpokitError(f"--checkpoint: expected step-N, got '{checkpoint}'")
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_dir():
        raise DpokitError(f"--checkpoint: {path} not found")
    problem = verify_checkpoint(path)
    if problem:
        raise DpokitError(f"--checkpoint: {path} is not complete ({problem})")
    if is_sharded(path):
        raise DpokitError(f"--checkpoint: {path} is sharded (FSDP); export the run's final/ instead")
    task = str(read_trainer_state(path).get("task", "dpo"))
    if task == "rm":
        raise DpokitError("--checkpoint: a reward model's checkpoint cannot be exported; export final/ instead")
    cfg = load_config(run_dir / "config.yaml")
    m = cfg.model
    source = resolve(m.name_or_path, m.gguf_file, m.revision)
    tokenizer = load_tokenizer(source, m.trust_remote_code)
    model = load_model(source, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                       attn_implementation=m.attn_implementation, vocab_size=len(tokenizer))
    round_trip(model, m.quantize)  # QLoRA: the adapters were trained on the NF4 values of the base
    if m.lora is not None:
        model = apply_lora(model, m.lora)
    load_weights_into(model, path, policy_weights(path))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    final_card = run_dir / "final" / CARD  # the training machine, as final/ recorded it
    facts = front_matter(final_card.read_text(encoding="utf-8")).get("dpokit") or {} if final_card.is_file() else {}
    if target.exists():
        target.rmdir()
    return export_hf(model, tokenizer, target,
                     add=hub_files(run_dir, task, step=int(checkpoint[5:]), machine=facts.get("hardware"),
                                   versions=facts.get("versions")))
