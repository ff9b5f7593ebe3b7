"""A Bradley-Terry reward model (``dpokit rm``), and a trained one as a reward function.

The DPO paper's RLHF baseline (Section 3, Eq. 2; InstructGPT, arXiv 2203.02155, Eq. 1) fits a scalar reward
r_phi(x, y) to preference pairs by maximum likelihood under the Bradley-Terry model
p(y_w > y_l | x) = sigma(r_phi(x, y_w) - r_phi(x, y_l)). Here r_phi is the policy's backbone with a linear
"score" head: a ``*ForSequenceClassification`` model (``num_labels = 1``) built from the causal LM dpokit loads
(hub id, folder, GGUF, tiny random model), backbone weights copied, head drawn from ``train.seed``.

The reward of (x, y) is the head's output at the position ``AutoModelForSequenceClassification`` itself reads:
the rightmost token of the row that is not ``config.pad_token_id`` (transformers 5.x,
``GenericForSequenceClassification.forward``). ``RewardModule`` calls that very forward on padded rows, so the
exported ``final/`` scores exactly what was trained. Rows are always padded (one per prompt + response): in the
packed layout several responses share a row, and the model's reading rule would pick only the last of them.

Training reuses everything of ``dpokit train`` (data, loop, checkpoints, exact resume, torchrun, precision) as the
``rm`` kind of training (``RM``, registered in ``dpokit.training.kinds``); this module holds what differs: building
the model, the forward, the loss, and the trained model as a reward (``load_reward_model``, used by
``dpokit.rewards.get_reward``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.data.batch import collate_responses, collate_tokenized, regroup, to_device
from dpokit.data.formats import Text
from dpokit.data.tokenize import Encoded, encode_rows, token_rules
from dpokit.errors import DpokitError, ModelError
from dpokit.models.loading import (
    Models,
    ModelSource,
    apply_lora,
    disable_dropout,
    load_models,
    load_tokenizer,
)
from dpokit.models.source import seeded_model
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.metrics import RewardModelStats
from dpokit.training.step import KindSpec, PassOutput, Run, Task, pairs_of_step

if TYPE_CHECKING:
    from dpokit.config import Config


# -------------------------------------------------------------------------------------------------- the loss

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each preference under the Bradley-Terry model (DPO paper Eq. 2;
    InstructGPT Eq. 1):

        loss = -log sigma(r(x, y_w) - r(x, y_l))

    ``logsigmoid`` keeps it finite for any margin (about |margin| for a large wrong one). At a zero margin the
    loss is ln 2; d loss / d r_w = -sigma(r_l - r_w) < 0, so a gradient step raises the chosen reward and lowers
    the rejected one. Shapes: (G,), (G,) -> (G,).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


# ------------------------------------------------------------------------------------------------- the model

class RewardModule(nn.Module):
    """``batch -> rewards`` of a padded batch, one fp32 scalar per row, as one module call (DDP and FSDP act
    through hooks on it, like ``dpokit.training.distributed.LogpsModule``). The model is called exactly as plain
    transformers calls it, so the reward is read where ``AutoModelForSequenceClassification`` reads it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits  # (R, 1)
        return logits[:, 0].float()  # (R,)


def score_head_name(model: nn.Module) -> str:
    """The attribute holding the classification head (``score`` for Llama, Qwen, Mistral, GPT-2...): the child
    that is not the backbone."""
    names = [name for name, child in model.named_children() if child is not model.base_model]
    if len(names) != 1:
        raise ModelError(f"{type(model).__name__}: expected one head beside the backbone, found {names}")
    return names[0]


def reward_model_from_causal(lm: nn.Module, pad_token_id: int, seed: int) -> nn.Module:
    """The ``*ForSequenceClassification`` (one label) of ``lm``'s architecture: its config, ``pad_token_id`` set
    (where the reward is read depends on it), the backbone's weights copied from ``lm``, the score head drawn
    from ``seed`` (``seeded_model``: the caller's random stream is not consumed)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_token_id, None

    def build(cfg: Any) -> nn.Module:
        return AutoModelForSequenceClassification.from_config(
            cfg, attn_implementation=lm.config._attn_implementation)

    try:
        model = seeded_model(build, config, seed)
    except ValueError:
        raise ModelError(f"model.name_or_path: {type(lm).__name__} has no sequence-classification "
                         "(reward model) class in transformers") from None
    model.to(dtype=next(lm.parameters()).dtype)
    try:
        model.base_model.load_state_dict(lm.base_model.state_dict())
    except RuntimeError as exc:
        raise ModelError(f"model.name_or_path: the backbone of {type(lm).__name__} does not fit "
                         f"{type(model).__name__} ({str(exc).splitlines()[0]})") from None
    return model


def load_reward_models(cfg: Config, reference: str) -> Models:
    """The ``rm`` task's models: the policy loaded as ``dpokit train`` loads it, turned into a reward model
    (``reward_model_from_causal``), dropout off when configured, then LoRA adapters (peft ``SEQ_CLS``) with the
    score head trained whole. No reference: a reward model has none (``reference`` is ignored)."""
    models = load_models(cfg.model.model_copy(update={"lora": None}), reference="never")
    tokenizer = models.tokenizer
    policy = reward_model_from_causal(models.policy, tokenizer.pad_token_id, cfg.train.seed)
    if cfg.model.disable_dropout:
        disable_dropout(policy)
    policy.train()
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg.model.lora, task_type="SEQ_CLS", modules_to_save=[score_head_name(policy)])
    return replace(models, policy=policy, reference=None)  # the causal LM is dropped with ``models``


def where_reward_is_read(models: Models) -> str | None:
    """The note a tokenizer that pads with its end token deserves (``KindSpec.remark``)."""
    tokenizer = models.tokenizer
    if tokenizer.pad_token_id not in (tokenizer.eos_token_id, token_rules(tokenizer).eot_id):
        return None
    return (f"the tokenizer pads with its end token (id {tokenizer.pad_token_id}): the reward is read at the last "
            "token before the response's end token, as AutoModelForSequenceClassification reads it")


# ------------------------------------------------------------------------------------------- the training pass

def pair_rewards(model: nn.Module, items: Sequence[Any], pad_id: int, device: torch.device,
                 autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """r(x, y_w) and r(x, y_l) of each pair, shapes (G,) each, and the padded batch they came from."""
    batch = to_device(collate_tokenized(items, pad_id, layout="padded"), device)
    with autocast():
        rewards = model(batch)  # (2G,): one row per response
    grouped = regroup(rewards, batch)  # (G, 2), chosen first
    return grouped[:, 0], grouped[:, 1], batch


def reward_forward(run: Run, items: list[Any]) -> PassOutput:
    """The ``rm`` kind's pass: the Bradley-Terry loss summed over the pass's pairs."""
    chosen, rejected, batch = pair_rewards(run.model, items, run.tokenizer.pad_token_id, run.device, run.autocast)
    losses = bradley_terry_loss(chosen, rejected)
    return PassOutput(losses.sum(), lambda stats: stats.add(losses, chosen, rejected, batch["tokens"]), batch)


RM = register_kind(Kind(
    name="rm", command="rm", title="dpokit rm",
    # Padded rows only: the reward is read at a row's end.
    spec=KindSpec("rm", needs_reference=False, evaluates=True, load=load_reward_models, module=RewardModule,
                  layouts=("padded",), remark=where_reward_is_read),
    task=Task(reward_forward, pairs_of_step, RewardModelStats)))
"""``dpokit rm``: a Bradley-Terry reward model, averaged over every pair of the step."""


# --------------------------------------------------------------------------------------- a trained model as reward

class RewardModelScorer:
    """A trained reward model as a reward function: ``scorer(prompt, response) -> float`` and
    ``scorer.batch(prompts, responses) -> list[float]``.

    Rows are tokenized exactly as in training (``encode_rows`` with the run's ``max_length`` and
    ``max_prompt_length``: BOS/end-token rules, chat template, truncation); a prompt is a string or a list of
    chat messages (then a string response is the assistant's turn). Scored in fp32, in eval mode, without
    gradients, ``batch_size`` rows at a time, longest first (less padding; a row's reward does not depend on
    its neighbours beyond float round-off).
    """

    accepts_messages = True
    """Callers that hold chat prompts as message lists may pass them as they are (``dpokit ppo`` does)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, max_prompt_length: int,
                 device: torch.device, name: str, batch_size: int = 16):
        self.module = RewardModule(model.float().to(device)).eval()
        self.tokenizer, self.device, self.name, self.batch_size = tokenizer, device, name, batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.rules = token_rules(tokenizer)

    def encode(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[tuple[list[int], list[int]]]:
        """(prompt_ids, response_ids) of each row, as training tokenizes them."""
        if len(prompts) != len(responses):
            raise DpokitError(f"reward '{self.name}': {len(prompts)} prompts but {len(responses)} responses")
        rows = [(p, [[{"role": "assistant", "content": r}] if isinstance(p, list) and isinstance(r, str) else r])
                for p, r in zip(prompts, responses)]
        encoded = encode_rows(rows, self.tokenizer, self.max_length, self.max_prompt_length, rules=self.rules)
        out = []
        for i, row in enumerate(encoded):
            if not isinstance(row, Encoded):  # a drop reason; max_prompt_length < max_length leaves room
                raise DpokitError(f"reward '{self.name}': sample {i} cannot be tokenized ({row})")
            out.append((row.prompt_ids, row.responses_ids[0]))
        return out

    @torch.no_grad()
    def batch(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        rows = self.encode(prompts, responses)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        rewards = [0.0] * len(rows)
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = to_device(collate_responses([rows[i] for i in chunk], pad_id, layout="padded"), self.device)
            for i, value in zip(chunk, self.module(batch).tolist()):
                rewards[i] = value
        return rewards

    def __call__(self, prompt: Text, response: Text) -> float:
        return self.batch([prompt], [response])[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DpokitError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}


def reward_model_folder(path: Path, spec: str) -> tuple[Path, Path | None]:
    """(model folder, the run's config.yaml or None) for a reward-model run directory (its ``final/``) or a
    Hugging Face folder of a ``*ForSequenceClassification`` with one label; anything else is a one-line
    ``DpokitError`` saying what it is instead."""
    run_config = path / "config.yaml" if (path / "config.yaml").is_file() else None
    folder = path
    if run_config is not None and not (path / "config.json").is_file():
        folder = path / "final"
        if not (folder / "config.json").is_file():
            raise DpokitError(f"reward '{spec}': the run has no final/ model yet (finish or resume its training)")
    elif (path.parent / "config.yaml").is_file() and path.name == "final":
        run_config = path.parent / "config.yaml"  # RUN_DIR/final: tokenized with the run's lengths
    if not (folder / "config.json").is_file():
        raise DpokitError(f"reward '{spec}': not a reward-model run directory or model folder (no config.json)")
    config = _read_json(folder / "config.json")
    architecture = (config.get("architectures") or ["?"])[0]
    if not str(architecture).endswith("ForSequenceClassification"):
        what = " (a policy, e.g. of dpokit train or sft)" if "CausalLM" in str(architecture) else ""
        raise DpokitError(f"reward '{spec}': {folder} holds {architecture}{what}, not a reward model (a "
                          "*ForSequenceClassification with one label; train one with dpokit rm)")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise DpokitError(f"reward '{spec}': {folder} is a classifier with {labels} labels; a reward model has 1")
    return folder, run_config


def load_reward_model(spec: str | Path, device: str | torch.device | None = None,
                      batch_size: int = 16) -> RewardModelScorer:
    """The reward function of a trained reward model: ``spec`` is an ``rm`` run directory (its ``final/`` is
    loaded, rows tokenized with the run's ``data.max_length`` / ``data.max_prompt_length``) or a Hugging Face
    folder of a ``*ForSequenceClassification`` with one label (dpokit's default lengths unless it is a run's
    ``final/``). ``device``: default CUDA when available, else CPU. Loaded once per folder and weights file
    (a retrained folder is loaded again)."""
    path = Path(spec).expanduser()
    folder, run_config = reward_model_folder(path, str(spec))
    stamps = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(folder.glob("*.safetensors")))
    chosen = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    return _load_cached(str(folder.resolve()), str(run_config) if run_config else None, stamps, str(chosen),
                        batch_size, str(spec))


@lru_cache(maxsize=4)
def _load_cached(folder: str, run_config: str | None, stamps: tuple[Any, ...], device: str, batch_size: int,
                 name: str) -> RewardModelScorer:
    from transformers import AutoModelForSequenceClassification

    from dpokit.config import DataConfig, load_config

    data = load_config(run_config).data if run_config else DataConfig()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable folders
        raise DpokitError(f"reward '{name}': cannot load {folder} ({str(exc).splitlines()[0]})") from None
    tokenizer = load_tokenizer(ModelSource("folder", folder))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModelScorer(model, tokenizer, data.max_length, data.max_prompt_length, torch.device(device),
                             name, batch_size)
