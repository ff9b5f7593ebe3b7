"""Typed, validated, documented configuration.

A config is a YAML file plus dotted ``key=value`` overrides (``train.lr=5e-7``). Every field below carries its
meaning in the docstring under it; an unknown key, a wrong type or an out-of-range value is a ``ConfigError``
naming the key. The fully resolved config is saved into the run directory as ``config.yaml``.

The sections of a run are here, but ``data:`` (:class:`~dpokit.data.config.DataConfig`, in the data layer);
how a tree is read, overridden, validated and saved is ``dpokit.config_base``; both are imported back here.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from dpokit.config_base import (  # noqa: F401  (re-exported: dpokit.config is where a run's config is built)
    NEUTRAL,
    Section,
    apply_overrides,
    flatten,
    format_error,
    parse_override,
    read_yaml_tree,
    save_config,
    set_dotted,
    set_tree,
    validate_tree,
)
from dpokit.data.config import DataConfig
from dpokit.errors import ConfigError  # noqa: F401  (re-exported)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or ``all-linear``."""


class ModelConfig(Section):
    name_or_path: str = "smollm2"
    """Policy: a hub id, a local Hugging Face folder, a folder or path holding a GGUF file, ``smollm2`` (the
    embedded SmolLM2-135M-Instruct) or ``tiny-random-llama`` (a tiny random model built in code, for tests)."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside ``name_or_path`` (a folder), e.g. ``model.Q4_1.gguf``."""
    ref_name_or_path: str | None = None
    """Reference model; defaults to the policy's starting weights (the usual DPO setup: pi_ref = pi_SFT)."""
    ref_gguf_file: str | None = None
    """GGUF file name inside ``ref_name_or_path``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when loading from the hub."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the weights are held in. Mixed precision is ``train.precision``."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the checkpoint."""
    disable_dropout: bool = True
    """Set every dropout probability to zero in policy and reference (the log-ratios are otherwise noisy)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field("auto", json_schema_extra=NEUTRAL)
    """Attention kernel; all give the same numbers within float tolerance. ``auto`` (resolved at the start of a
    run and written into its config.yaml): on CUDA, FlexAttention for the packed layout and SDPA otherwise; on
    a CPU, whichever of SDPA and eager measured faster at the run's precision (``dpokit env`` shows it)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters (peft) instead of all weights; ``final/`` gets the merged weights."""
    freeze_vision: bool = True
    """A vision-language model's encoder stays fixed (tiny ones: ``tiny-random-llava``; docs/vision.md)."""
    quantize: Literal["none", "nf4"] = "none"
    """``nf4`` (QLoRA): hold the frozen base's decoder Linear weights in 4-bit NormalFloat (about 4.1 bits a
    weight; embeddings, LM head and norms stay in ``dtype``) while the LoRA adapters train in ``dtype``. Needs
    ``model.lora`` and ``reference.mode: adapter``; ``final/`` holds the dequantized base with the adapters
    merged. Needs torchao: ``pip install -c constraints.txt -e '.[qlora]'`` (see ``dpokit.models.quantize``)."""


class LossConfig(Section):
    name: str = "sigmoid"
    """Preference loss, a name in ``dpokit.losses.LOSSES`` (see the loss table in docs/losses.md)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the KL penalty toward the reference (the paper's beta); reward = beta * log-ratio."""
    label_smoothing: float | None = None
    """Label smoothing eps: the assumed label-flip rate of ``cdpo`` and ``robust`` (required, in [0, 0.5)) and
    of ``aot`` and ``aot_unpaired`` (in [0, 0.5), default 0); the mass the target of ``exo_pair`` gives the
    rejected response (in (0, 0.5), default 1e-3; 0 is refused, it makes EXO's loss infinite)."""
    gamma: float | None = None
    """Target reward margin of ``simpo``."""
    alpha: float | None = None
    """Weight of the chosen-response NLL term of ``rpo``."""
    reference_free: bool | None = None
    """``sigmoid`` only: treat the reference log-probs as zero."""
    discopop_tau: float | None = None
    """Temperature tau of ``discopop``'s switch between its logistic and exponential terms (default 0.05)."""
    f_divergence: str | None = None
    """The divergence toward the reference of ``f_dpo`` (required there): ``reverse_kl`` (DPO), ``forward_kl``,
    ``js_divergence`` or ``alpha_divergence``."""
    f_alpha_divergence_coef: float | None = None
    """TRL's coefficient c of ``f_dpo`` with ``f_divergence: alpha_divergence``, f'(u) = (u^(c-1) - 1) / (c - 1)
    (>= 0, default 0.5 as TRL 1.x; 0 is forward KL, 1 reverse KL; the paper's alpha is 1 - c)."""
    desirable_weight: float | None = None
    """``kto``: weight lambda_D of the losses of desirable examples (label true), default 1.0."""
    undesirable_weight: float | None = None
    """``kto``: weight lambda_U of the losses of undesirable examples (label false), default 1.0."""
    ld_alpha: float | None = Field(None, ge=0, le=1)
    """LD-DPO (Liu et al. 2024), with any loss: in policy and reference log-probs, the tokens of a response past
    the shorter response's length count alpha times (in [0, 1]; 1 is the plain loss). Needs a live reference
    (``reference.mode: model`` or ``adapter``): the store keeps whole-response sums."""
    use_weighting: bool = False
    """WPO (Zhou et al. 2024), with any pairwise loss: each pair's loss is multiplied by
    min(1, w(y_w) * w(y_l)), w from the policy's own per-token probabilities (length-normalized, no gradient),
    so pairs the policy would itself generate count more."""
    weights: dict[str, float] | None = None
    """Combine several losses, e.g. ``{sigmoid: 1.0, rpo: 0.5}``; replaces ``name``."""

    def params(self) -> dict[str, Any]:
        """The variant-specific parameters that were set (None means 'not given')."""
        keys = ("label_smoothing", "gamma", "alpha", "reference_free", "discopop_tau", "f_divergence",
                "f_alpha_divergence_coef", "desirable_weight", "undesirable_weight")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class TrainConfig(Section):
    lr: float = Field(5e-7, gt=0)
    """Peak learning rate (the paper: 1e-6 with RMSprop)."""
    batch_size: int = Field(8, ge=1)
    """Preference pairs per micro-batch (per process)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step. The loss is normalized by the pairs of the whole step, so
    batch 8 x accum 1 and batch 1 x accum 8 give the same update."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train; when unset, ``epochs`` passes over the data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when ``max_steps`` is unset."""
    seed: int = 0
    """Seed for data order and initialization of anything random."""
    optimizer: Literal["adamw", "adamw_8bit", "rmsprop"] = "adamw"
    """``adamw`` (torch AdamW), ``adamw_8bit`` (AdamW with block-wise 8-bit moments: a quarter of the state's
    memory; torchao, ``pip install -c constraints.txt -e '.[qlora]'``; see ``dpokit.training.optim8bit``) or ``rmsprop`` (the paper's
    choice)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW) or L2 penalty (RMSprop)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps (the paper: 150)."""
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    """Warmup as a fraction of the run's optimizer steps instead: ceil(ratio x total steps), transformers' rule
    (TRL's ``warmup_ratio``). Exclusive with ``warmup_steps``."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup: constant, linear decay to 0, or cosine decay to 0."""
    max_grad_norm: float | None = Field(10.0, gt=0)
    """Clip the global gradient norm to this value; unset disables clipping."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``bf16`` runs forward and backward under bfloat16 autocast. ``auto`` (resolved at the start of a run and
    written into its config.yaml) is bf16 only where it is native, CUDA with bf16 or a CPU with AVX512_BF16 or
    AMX confirmed by a measured matmul probe, and fp32 elsewhere: CPUs without them emulate bf16 at a fraction
    of fp32's speed. An explicit ``bf16`` where it is slow runs with a warning giving the measured ratio."""
    layout: Literal["packed", "padded"] = Field("packed", json_schema_extra=NEUTRAL)
    """Batch layout. ``packed``: the prompt is computed once for chosen and rejected and pairs are packed into
    rows with a block attention mask (few padded positions). ``padded``: one padded row per prompt+response,
    the plain layout. Both give the same log-probs (tested)."""
    pack_length: int = Field(0, ge=0, json_schema_extra=NEUTRAL)
    """``packed`` rows hold up to max(pack_length, longest pair) tokens; 0 packs to the longest pair of the
    micro-batch, which keeps the attention work per token close to that of unpacked rows."""
    pass_tokens: int = Field(0, ge=0, json_schema_extra=NEUTRAL)
    """Cut each micro-batch into forward/backward passes of at most this many computed positions (a pair
    longer than that gets a pass of its own); their gradients add up to the micro-batch's, so the result is
    the same while activation memory shrinks with the pass. 0: one pass per micro-batch."""
    compile: bool = Field(False, json_schema_extra=NEUTRAL)
    """Compile each decoder layer with ``torch.compile`` (dynamic shapes; the first steps are slower while it
    compiles). State-dict names are unchanged, so checkpoints and export work as without it."""
    gradient_checkpointing: bool = Field(False, json_schema_extra=NEUTRAL)
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    shuffle: bool = True
    """Shuffle the training pairs every epoch (seeded)."""
    log_every: int = Field(1, ge=1, json_schema_extra=NEUTRAL)
    """Write a metrics row every this many optimizer steps."""
    save_every: int | None = Field(None, ge=1, json_schema_extra=NEUTRAL)
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int | None = Field(None, ge=1, json_schema_extra=NEUTRAL)
    """Keep only this many newest complete checkpoints (older ones are removed once a newer one is complete)."""
    resume: Literal["never", "auto"] = Field("never", json_schema_extra=NEUTRAL)
    """``auto``: continue from the newest complete checkpoint in ``run_dir`` when there is one (same as
    ``dpokit train --resume``)."""
    max_skipped_steps: int = Field(10, ge=1, json_schema_extra=NEUTRAL)
    """Stop after this many consecutive steps whose loss or gradients were not finite (each is skipped)."""
    progress: bool = Field(True, json_schema_extra=NEUTRAL)
    """Show a progress bar on an interactive terminal (a line every ~10% otherwise)."""

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("warmup_ratio: give warmup_steps or warmup_ratio, not both")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps: ``warmup_steps``, or ceil(``warmup_ratio`` x
        ``total_steps``) as transformers' ``get_warmup_steps`` rounds it."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)


class EvalConfig(Section):
    every: int | None = Field(None, ge=1, json_schema_extra=NEUTRAL)
    """Evaluate on ``data.eval`` every this many optimizer steps (and at the end when ``data.eval`` is set)."""
    batch_size: int = Field(8, ge=1, json_schema_extra=NEUTRAL)
    """Pairs per evaluation batch."""


class ReferenceSyncConfig(Section):
    """TR-DPO (Gorbatovski et al. 2024): every ``every`` optimizer steps, pi_ref <- alpha * pi + (1 - alpha) *
    pi_ref, weight by weight. TRL's ``ref_model_sync_steps`` and ``ref_model_mixup_alpha``; their defaults."""

    every: int = Field(512, ge=1)
    """Optimizer steps between updates of the reference (the paper's tau)."""
    alpha: float = Field(0.6, ge=0, le=1)
    """Weight of the policy in the update: 1 is the hard update (pi_ref becomes pi), below 1 the soft one,
    0 never changes pi_ref."""


class ReferenceConfig(Section):
    mode: Literal["model", "adapter", "store"] = "model"
    """Where reference log-probs come from: ``model`` (a frozen copy in memory), ``adapter`` (with LoRA: the
    policy with its adapters disabled, no copy), ``store`` (computed once before training, kept on disk and
    reused by every run on the same reference, data and settings; no reference model in memory while
    training)."""
    store_dir: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Folder of the reference log-prob store; default ``$DPOKIT_CACHE/refstore`` (``~/.cache/dpokit``)."""
    batch_size: int = Field(16, ge=1, json_schema_extra=NEUTRAL)
    """Pairs (groups) per forward pass when precomputing the store. Part of the store's key: in bf16 the shape
    of a batch can change the last bits of its log-probs."""
    sync: ReferenceSyncConfig | None = None
    """Update the reference from the policy during training (TR-DPO), e.g. ``{every: 64, alpha: 0.6}``; needs
    ``mode: model`` (the reference's weights become checkpoint state), full fine-tuning and one process or DDP."""


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp"] = Field("ddp", json_schema_extra=NEUTRAL)
    """How the policy is spread over the processes of a ``torchrun`` launch (a plain ``dpokit train`` is one
    process and uses neither): ``ddp`` keeps a full copy of policy, reference and optimizer state on every
    process and averages gradients; ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer) shards the weights,
    gradients and optimizer state of policy and reference across the processes, for models whose training
    state does not fit on one device. Both give the same result as one process with the same global batch."""
    timeout_s: float = Field(300.0, gt=0, json_schema_extra=NEUTRAL)
    """Seconds a process waits in a collective (all-reduce, barrier) before giving up, so a rank that died or
    hangs ends the run with an error instead of a hang. Must exceed the longest work one rank does alone
    (rank 0 writing a checkpoint of a DDP run)."""
    offload: Literal["none", "optimizer", "params"] = Field("none", json_schema_extra=NEUTRAL)
    """With ``strategy: fsdp``, ``params`` keeps each process's shards of the weights and their gradients in
    host memory (FSDP2's ``CPUOffloadPolicy``): they are copied to the GPU for each layer's forward and
    backward, and AdamW's step and its state stay on the CPU. GPU memory then holds activations and one
    layer's gathered weights; each step moves the weights over PCIe twice. ``optimizer`` (only the
    optimizer's state on the CPU, the weights on the GPU) is not offered: FSDP2 has no such mode, and
    emulating it copies every shard each step, which is what ``params`` does anyway."""


class PpoConfig(Section):
    """``dpokit ppo``: RLHF with PPO (Ziegler et al. 2019, Ouyang et al. 2022). Each step samples responses to
    ``rollout_prompts`` prompts of ``data.train`` from pi, scores them with ``reward``, and makes ``epochs``
    passes of clipped PPO updates over them in optimizer steps of ``train.batch_size`` x ``train.grad_accum``
    x processes responses. The value head shares the policy's trunk (see ``dpokit.methods.ppo``)."""

    reward: str | None = None
    """What a response is worth: ``sentiment``, ``length``, ``module:function``, ``file.py:function``, or the
    RUN_DIR (or ``final/`` folder) of a ``dpokit rm`` reward model. Required unless ``judge_url`` is set."""
    judge_url: str | None = None
    """Reward from an LLM judge instead (an OpenAI-compatible endpoint, e.g. ``http://host:8000/v1``): each
    response against the chosen response of its prompt in ``data.train`` (a preference file), 1 win, 0.5 tie,
    0 loss (``dpokit.rewards.judge.JudgeReward``). Exclusive with ``reward``."""
    judge_model: str | None = None
    """The model name the judge endpoint serves (required with ``judge_url``)."""
    judge_key_env: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Environment variable holding the judge's API key; unset sends none."""
    rollout_prompts: int = Field(32, ge=1)
    """Prompts sampled per PPO step, over every process (one response each)."""
    epochs: int = Field(4, ge=1)
    """Passes over each step's samples."""
    max_new_tokens: int = Field(32, ge=1)
    """Response tokens at most (EOS included)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature T of the rollouts; PPO scores pi, pi_old and pi_ref at the same T (it trains the
    tempered policy softmax(logits / T); docs/rlhf.md)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts: only 1 (the full softmax) is supported; < 1 is refused."""
    kl_coef: float = Field(0.05, ge=0)
    """beta of the per-token KL penalty -beta * (log pi - log pi_ref); the initial value when ``kl_target``
    is set."""
    kl_target: float | None = Field(None, gt=0)
    """Adaptive KL control (Ziegler et al. 2019): steer ``kl_coef`` so that KL(pi || pi_ref) per response
    approaches this many nats; unset keeps ``kl_coef`` fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Responses over which the adaptive controller moves ``kl_coef`` by at most +-20%."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token estimator of the KL penalty: ``k1`` = log pi - log pi_ref (unbiased, the usual RLHF
    penalty), ``k3`` = exp(-k1) - 1 + k1 (unbiased value, never negative, but a biased gradient as a reward:
    docs/rlhf.md). Logged as ``kl_penalty``; ``kl`` is always the summed k1."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the per-token rewards."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 0 is one-step TD, 1 is the Monte Carlo return."""
    clip: float = Field(0.2, gt=0)
    """Clip range of the probability ratio in the policy loss."""
    value_clip: float = Field(0.2, gt=0)
    """Clip range of the value change in the value loss."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss beside the policy loss (they share the trunk)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the step's samples before GAE (advantages are always whitened)."""
    eval_max_prompts: int | None = Field(64, ge=1, json_schema_extra=NEUTRAL)
    """Held-out prompts (``data.eval``) sampled at each evaluation; null: all."""


class OnlineConfig(Section):
    """Online and semi-online DPO (``dpokit train`` with ``reward`` or ``judge_url`` set; ``dpokit.methods.online``).
    Each step samples ``samples_per_prompt`` responses to each of train.batch_size x train.grad_accum x
    processes prompts of ``data.train`` from the policy as it was at the last refresh, every ``sync_every``
    steps, scores them with ``reward``, pairs them (``pairs``; ties dropped and counted) and trains on the
    pairs with the configured preference loss against pi_ref (``loss``, ``reference``)."""

    reward: str | None = None
    """What a response is worth: ``sentiment``, ``length``, ``module:function``, ``file.py:function``, or the
    RUN_DIR (or ``final/`` folder) of a ``dpokit rm`` reward model. Setting it (or ``judge_url``) makes
    ``dpokit train`` online."""
    judge_url: str | None = None
    """Reward from an LLM judge instead (an OpenAI-compatible endpoint): each response against the chosen
    response of its prompt in ``data.train`` (a preference file), 1 win, 0.5 tie, 0 loss. Exclusive with
    ``reward``."""
    judge_model: str | None = None
    """The model name the judge endpoint serves (required with ``judge_url``)."""
    judge_key_env: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Environment variable holding the judge's API key; unset sends none."""
    sync_every: int = Field(1, ge=1)
    """The generator is the policy as it was at the start of step 1, 1 + s, 1 + 2s, ... (s = this): 1 is fully
    online (every step samples the current weights), larger is semi-online (arXiv 2506.21495): the responses of
    the s steps are sampled together, in one batched generation call at the refresh. With s > 1,
    ``train.save_every`` must be a multiple of s, so every checkpoint ends just before a refresh and the
    generator's weights need not be saved."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses sampled per prompt (k); pairs are formed among them."""
    pairs: Literal["best_worst", "all"] = "best_worst"
    """``best_worst``: one pair per prompt, its highest- against its lowest-scored response; ``all``: every
    pair of responses whose scores differ (up to k(k-1)/2 per prompt)."""
    min_margin: float = Field(0.0, ge=0)
    """A pair whose scores differ by this much or less is a tie: dropped and counted (``online/ties``)."""
    max_new_tokens: int = Field(64, ge=1)
    """Response tokens sampled at most (EOS included); a response cut here has no end token and is trained
    as sampled."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the training samples and the held-out reward; 1 samples the generator itself.
    The held-out KL always draws from the policy itself (temperature 1, top_p 1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the training samples and the held-out reward; 1 samples the generator itself."""
    eval_max_prompts: int | None = Field(64, ge=1, json_schema_extra=NEUTRAL)
    """Held-out prompts (``data.eval``) sampled at each evaluation; null: all."""


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""Experiment trackers ``log.report_to`` can name, the one list of them: each name is also the package module the
tracker needs and the optional extra that installs it (``dpokit.integrations.trackers``: ``KINDS``,
``install_line``)."""


class LogConfig(Section):
    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=list, json_schema_extra=NEUTRAL)
    """Experiment trackers that receive every metrics row (the names of ``metrics.jsonl``, which is always
    written), the warnings and the resolved config, from rank 0: ``tensorboard`` (event files in
    RUN_DIR/tensorboard), ``wandb``, ``mlflow`` (``$MLFLOW_TRACKING_URI``, else RUN_DIR/mlruns), ``trackio``. A
    tracker that fails warns once and is dropped; training goes on."""
    run_name: str | None = Field(None, json_schema_extra=NEUTRAL)
    """The run's name in the trackers (default: the run directory's name)."""
    project: str = Field("dpokit", json_schema_extra=NEUTRAL)
    """Project (W&B, Trackio) or experiment (MLflow) the run is filed under."""
    tags: list[str] = Field(default_factory=list, json_schema_extra=NEUTRAL)
    """Tags of the run (W&B and MLflow tags; TensorBoard and Trackio record them with the config)."""


class Config(Section):
    run_dir: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/ are written here."""
    overwrite: bool = Field(False, json_schema_extra=NEUTRAL)
    """Replace the artifacts of an earlier run in ``run_dir`` instead of refusing to start."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    reference: ReferenceConfig = ReferenceConfig()
    distributed: DistributedConfig = DistributedConfig()
    ppo: PpoConfig = PpoConfig()
    online: OnlineConfig = OnlineConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _loss_is_known(self) -> Config:
        from dpokit.losses import check_training_setup, trained_kind, validate_loss_config
        from dpokit.models.quantize import check_quantize

        validate_loss_config(self.loss)
        check_training_setup(self.loss, grad_accum=self.train.grad_accum, pass_tokens=self.train.pass_tokens,
                             world=1, online=bool(self.online.reward or self.online.judge_url))
        if self.loss.ld_alpha is not None and self.reference.mode == "store":
            raise ValueError("loss.ld_alpha: the reference store keeps whole-response log-probs, not LD-DPO's split "
                             "at the shorter response's length; use reference.mode: model (or adapter with LoRA)")
        if self.loss.use_weighting and trained_kind(self.loss) == "listwise":
            raise ValueError(f"loss.use_weighting: WPO weighs pairs; the listwise loss {self.loss.name} takes "
                             "rankings, use a pairwise loss")
        self._reference_sync_fits()
        if trained_kind(self.loss) == "unpaired":
            if self.reference.mode == "store":
                raise ValueError("loss.name: kto scores mismatched prompt/completion pairs the reference store does "
                                 "not hold; use reference.mode: model (or adapter with LoRA)")
            for key in ("ld_alpha", "use_weighting"):
                if getattr(self.loss, key) not in (None, False):
                    raise ValueError(f"loss.{key}: works on pairs; loss kto takes single responses, remove it")
            if self.online.reward or self.online.judge_url:
                raise ValueError("loss.name: kto trains on a file of labelled responses, not online DPO's pairs")
        check_quantize(self)
        if self.reference.mode == "adapter" and self.model.lora is None:
            raise ValueError("reference.mode: 'adapter' needs model.lora (the reference is the policy with its "
                             "adapters disabled)")
        if self.distributed.offload != "none" and self.distributed.strategy != "fsdp":
            raise ValueError(f"distributed.offload: '{self.distributed.offload}' needs distributed.strategy: fsdp")
        if self.distributed.offload == "optimizer":
            raise ValueError("distributed.offload: 'optimizer' is not supported (FSDP2 offloads the weights with "
                             "their optimizer state); use 'params'")
        if self.distributed.strategy == "fsdp" and self.model.lora is not None:
            raise ValueError("distributed.strategy: 'fsdp' with model.lora is not supported; use 'ddp' (LoRA "
                             "adapters are small, a copy per process costs little)")
        return self


    def _reference_sync_fits(self) -> None:
        if self.reference.sync is None:
            return
        if self.reference.mode != "model":
            why = ("a store holds fixed log-probs" if self.reference.mode == "store" else
                   "the adapter reference is the policy's base weights, shared with the policy")
            raise ValueError(f"reference.sync: needs reference.mode: model (a reference model to update); "
                             f"{why}")
        if self.model.lora is not None:
            raise ValueError("reference.sync: with model.lora the policy's weights are base + adapter; train "
                             "without model.lora to update the reference from the policy")
        if self.distributed.strategy == "fsdp":
            raise ValueError("reference.sync: not supported with distributed.strategy: fsdp; use ddp")
        if self.online.reward or self.online.judge_url:
            raise ValueError("reference.sync: online DPO does not update its reference; remove one of them")


def load_config(source: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None,
                **kwargs: Any) -> Config:
    """Build a validated Config from a YAML path, a dict or a Config, then apply overrides.

    ``overrides`` are ``key=value`` strings (the CLI's); ``kwargs`` are dotted keys with ``__`` or ``.``
    separators given from Python, e.g. ``load_config("c.yaml", train__lr=1e-6)``.
    """
    name = "config"
    if source is None:
        tree: dict[str, Any] = {}
    elif isinstance(source, Config):
        tree = set_tree(source)  # so that model_fields_set still means "the user set it"
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)  # overrides are set into nested sections: never the caller's
    else:
        name = str(source)
        tree = read_yaml_tree(source)
    return validate_tree(Config, apply_overrides(tree, overrides, **kwargs), name)


def result_neutral_keys(model: type[BaseModel] | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the fields marked ``NEUTRAL`` in ``Config`` (or ``model``), sections searched through."""
    keys: set[str] = set()
    for name, info in (model or Config).model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("result_neutral"):
            keys.add(key)
            continue
        for section in _sections_of(info.annotation):
            keys |= result_neutral_keys(section, f"{key}.")
    return frozenset(keys)


def _sections_of(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds (``LoraConfig | None`` holds ``LoraConfig``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]


def result_settings(tree: dict[str, Any]) -> dict[str, Any]:
    """The settings of a dumped config (whole, or some of its sections) that change a run's result, as dotted
    keys: everything not marked ``NEUTRAL``."""
    neutral = result_neutral_keys()
    return {k: v for k, v in flatten(tree).items()
            if not any(k == n or k.startswith(f"{n}.") for n in neutral)}
