"""Per-rank peak memory of a dpokit DPO step, by part, from the model's shape and the run's config.

What each part is, for P parameters held in ``model.dtype`` (b_w bytes each), T positions per forward/backward
pass (``train.pass_tokens``, else the micro-batch at full length), W ranks:

- weights: P b_w (FSDP: / W). LoRA adds r (in + out) parameters per targeted linear, held in fp32 (peft's
  default for adapters). ``model.quantize: nf4`` holds every decoder linear weight of n values in
  about n/2 + n/64 bytes (``nf4_bytes``); embeddings, head, norms and biases stay in b_w.
- gradients: one per trainable parameter, in its dtype (FSDP: / W).
- optimizer states: AdamW keeps m and v (RMSprop one average) per trainable parameter in the parameter's dtype
  (torch's AdamW): with ``model.dtype: bfloat16`` they are bf16 and there is no fp32 master copy (FSDP: / W).
  ``adamw_8bit`` keeps each moment of a tensor of n >= 4096 values (a multiple of 256) as n codes, n/256 fp32
  block scales and a 256-entry fp32 map; smaller tensors keep both moments in their dtype (``moment_bytes``).
- reference: ``model``: a second copy of the weights (FSDP: / W; under FSDP2 mixed precision held in bf16,
  as training loads it: never updated, it needs no fp32 masters); ``adapter``: none (the policy with its
  adapters off); ``store``: none while training (log-probs read from disk).
- dequantized weight (nf4): each quantized linear dequantizes its weight in the compute dtype for the forward
  and again for the backward's input gradient, and frees it after the product: one weight, the largest, at a
  time (and autocast keeps no copy of it).
- autocast weight copies: under ``precision: bf16`` with fp32 weights every linear's weight is cast to bf16 for
  the forward and the copy is kept for the backward: 2 bytes x the layers' linear parameters, not sharded.
  None under FSDP2 mixed precision (``mixed``): the weights arrive from the all-gather already in bf16.
- activations: what autograd keeps for the backward, counted tensor by tensor from the Llama-family decoder
  layer (``layer_bytes``), times T and the layers; with ``train.gradient_checkpointing`` each layer keeps only
  its input and one layer is recomputed at a time.
- head: dpokit's log-prob head is chunked (``dpokit.models.logprobs``): at most ``DEFAULT_CHUNK`` positions x V
  logits at once, plus the head's weight gradient of each chunk; models with soft-capped logits take the plain
  path, T x V logits.
- communication: DDP keeps its gradient buckets, a second copy of the gradients; FSDP2 gathers the root
  (embeddings, head) for the whole step and one decoder layer at a time (plus the next, prefetched), and
  reduce-scatters one layer's gradients. Under mixed precision the gathers are bf16 (half of fp32's) and the
  reduce-scatter is fp32, into the fp32 gradient shards.
- offload (``distributed.offload: params``, FSDP2's ``CPUOffloadPolicy``): the sharded weights, their gradients,
  the optimizer states (the step runs on the CPU) and the reference's shards live in host memory; the GPU holds
  none of them, only what is gathered for compute (the whole root now: no shard of it is resident), the
  activations, the head and one layer's gradients before their reduce-scatter (``host_ram_training``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpokit.plan.shapes import Shape

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAPTER_BYTES = 4
"""peft creates the adapters in fp32 whatever the base's dtype (``autocast_adapter_dtype``)."""
OPTIMIZER_STATES = {"adamw": 2, "adamw_8bit": 2, "rmsprop": 1}
NF4_BLOCK, NF4_SCALE_GROUP = 64, 256
"""As ``dpokit.models.quantize`` (BLOCK, SCALE_GROUP): values per 4-bit block; block scales per double-quantization group."""
NF4_LEVELS = 16
"""The entries of the NF4 level table each quantized weight keeps (in the weight's dtype)."""
Q8_BLOCK, Q8_MIN = 256, 4096
"""torchao's 8-bit AdamW: values per block (one fp32 absmax each), and the fewest values a tensor needs for its
moments to be quantized (smaller ones, or any not a multiple of 256, keep them in the parameter's dtype)."""
Q8_MAP_BYTES = 256 * 4
"""Each quantized moment's own 256-entry fp32 code map."""
INDEX_BYTES_PER_POSITION = 8 * 6
"""int64 per position: input_ids, position_ids, segment ids, and per target token targets, pred_index, slot."""


@dataclass(frozen=True)
class Setup:
    """The settings of a run that memory depends on, resolved (``auto`` replaced by what a GPU runs)."""

    dtype: str
    precision: str
    """``fp32`` or ``bf16``: ``auto`` plans for a GPU, where it is bf16."""
    strategy: str
    """``single``, ``ddp`` or ``fsdp``."""
    world: int
    optimizer: str
    reference: str
    """``model``, ``adapter`` or ``store``."""
    lora_r: int | None
    lora_targets: tuple[str, ...]
    quantize: str
    """``none`` or ``nf4`` (the decoder's linear weights in 4 bits)."""
    checkpointing: bool
    attention: str
    """``sdpa``, ``eager`` or ``flex_attention``."""
    layout: str
    pass_tokens: int
    """Positions one forward/backward pass computes (its rows padded to ``row_length``)."""
    row_length: int
    passes_per_step: int
    chunk: int
    offload: bool = False
    """``distributed.offload: params`` under FSDP: shards, gradients and optimizer states on the host."""


# ----------------------------------------------------------------------------------------------- parameters

def lora_params(shape: Shape, setup: Setup) -> int:
    """r (in + out) per targeted linear of every layer (A is r x in, B is out x r)."""
    if setup.lora_r is None:
        return 0
    linears = shape.linears()
    return shape.layers * sum(setup.lora_r * (linears[n][0] + linears[n][1])
                              for n in setup.lora_targets if n in linears)


def trainable(shape: Shape, setup: Setup) -> tuple[int, int]:
    """(trainable parameters, bytes per trainable parameter)."""
    if setup.lora_r is not None:
        return lora_params(shape, setup), ADAPTER_BYTES
    return shape.params(), DTYPE_BYTES[setup.dtype]


def mixed(setup: Setup) -> bool:
    """FSDP2 mixed precision, as training runs ``precision: bf16`` under FSDP
    (``dpokit.training.distributed._fully_shard``): the shards stay in ``model.dtype``, FSDP casts them to bf16
    before each all-gather and reduces gradients in fp32."""
    return setup.strategy == "fsdp" and setup.precision == "bf16"


def gathered_bytes(setup: Setup) -> int:
    """Bytes per parameter of what FSDP gathers for compute: bf16 under mixed precision, else ``model.dtype``."""
    return 2 if mixed(setup) else DTYPE_BYTES[setup.dtype]


def shard(nbytes: float, setup: Setup) -> float:
    return nbytes / setup.world if setup.strategy == "fsdp" else nbytes


def nf4_bytes(n: int, b: int) -> int | None:
    """Bytes one weight of ``n`` values in ``b``-byte elements holds in NF4, as ``dpokit.models.quantize`` builds it:
    n/2 of 4-bit codes, n/64 int8 block scales, one factor per group of block scales (the largest divisor of
    the block count up to 256), the 16-level table and the scales' mean, these last in the weight's dtype (fp32:
    the n/2 + n/64 + 4 groups + 68 of ``dpokit.models.quantize.nf4_bytes``). A weight of one group (at most 256 blocks)
    holds more: torchao's factor is then a view of its per-block intermediate, whose storage of b n/64 bytes it
    keeps (measured; with several groups it is a copy of its own size). None for a weight left unquantized (n
    not a multiple of 64)."""
    if n % NF4_BLOCK:
        return None
    blocks = n // NF4_BLOCK
    group = max(d for d in range(1, min(NF4_SCALE_GROUP, blocks) + 1) if blocks % d == 0)
    factors = blocks if group == blocks else blocks // group
    return n // 2 + blocks + b * (factors + NF4_LEVELS + 1)


def base_weights(shape: Shape, setup: Setup) -> float:
    """The base model's weights: all in ``model.dtype``, or with nf4 each decoder linear weight in NF4."""
    b = DTYPE_BYTES[setup.dtype]
    if setup.quantize == "none":
        return shape.params() * b
    linears = [a * c for a, c in shape.linears().values()]
    packed = sum(n * b if nf4_bytes(n, b) is None else nf4_bytes(n, b) for n in linears)
    return shape.params() * b - shape.layers * (sum(linears) * b - packed)


def on_gpu(nbytes: float, setup: Setup) -> float:
    """A per-rank shard that lives on the GPU, or none of it when FSDP offloads it to the host."""
    return 0.0 if setup.offload else nbytes


def weights(shape: Shape, setup: Setup) -> float:
    return shard(base_weights(shape, setup) + lora_params(shape, setup) * ADAPTER_BYTES, setup)


def dequantized(shape: Shape, setup: Setup) -> float:
    """The one decoder weight an nf4 linear holds dequantized, in the compute dtype, while it multiplies."""
    if setup.quantize == "none":
        return 0.0
    return max(a * c for a, c in shape.linears().values()) * (4 if regime(setup) == "fp32" else 2)


def gradients(shape: Shape, setup: Setup) -> float:
    n, size = trainable(shape, setup)
    return shard(n * size, setup)


def trainable_tensors(shape: Shape, setup: Setup) -> list[int]:
    """The sizes of the trainable tensors, one entry each: the LoRA matrices A and B of every targeted linear, or
    every parameter of the model."""
    linears = shape.linears()
    if setup.lora_r is not None:
        r = setup.lora_r
        return shape.layers * [n for t in setup.lora_targets if t in linears for n in (r * linears[t][0],
                                                                                        r * linears[t][1])]
    layer = [a * c for a, c in linears.values()] + [shape.hidden] * shape.norms_per_layer
    layer += [shape.q_width, shape.kv_width, shape.kv_width] if shape.qkv_bias else []
    layer += [shape.dim, shape.dim] if shape.qk_norm else []
    root = [shape.vocab * shape.hidden] * (1 if shape.tied else 2) + [shape.hidden]
    return shape.layers * layer + root


def moment_bytes(n: int, size: int) -> float:
    """``adamw_8bit``'s two moments of a tensor of ``n`` values in ``size``-byte elements: quantized (codes, block
    scales, map) when torchao quantizes them, else in the parameter's dtype."""
    if n >= Q8_MIN and n % Q8_BLOCK == 0:
        return 2 * (n + 4 * (n // Q8_BLOCK) + Q8_MAP_BYTES)
    return 2 * n * size


def optimizer_states(shape: Shape, setup: Setup) -> float:
    n, size = trainable(shape, setup)
    if setup.optimizer == "adamw_8bit":
        return shard(sum(moment_bytes(t, size) for t in trainable_tensors(shape, setup)), setup)
    return shard(OPTIMIZER_STATES[setup.optimizer] * n * size, setup)


def reference(shape: Shape, setup: Setup) -> float:
    """A frozen copy of the weights (``reference.mode: model``). Under mixed precision FSDP loads its shards
    straight into bf16 (``Dist.wrap_frozen``): the dtype it would be gathered in anyway."""
    if setup.reference != "model":
        return 0.0
    return shard(shape.params() * (2 if mixed(setup) else DTYPE_BYTES[setup.dtype]), setup)


def autocast_copies(shape: Shape, setup: Setup) -> float:
    """bf16 copies of the fp32 linear weights that autocast makes in the forward and the backward reads."""
    if not (setup.precision == "bf16" and setup.dtype == "float32") or setup.quantize != "none" or mixed(setup):
        # mixed: FSDP gathers bf16 weights, autocast has nothing to cast; nf4: the dequantized weight is cast
        # inside the layer's own autograd function, not kept
        return 0.0
    per_layer = 2 * sum(a * b for a, b in shape.linears().values())
    return per_layer * (1 if setup.checkpointing else shape.layers)


# ------------------------------------------------------------------------------------------------ activations

def regime(setup: Setup) -> str:
    """``fp32``; ``bf16`` (bf16 weights, so bf16 activations; also FSDP2 mixed precision, whose gathered weights
    are bf16 whatever the shards hold); ``autocast`` (bf16 compute over fp32 weights)."""
    if setup.dtype == "bfloat16" or mixed(setup):
        return "bf16"
    return "autocast" if setup.precision == "bf16" else "fp32"


def layer_bytes(shape: Shape, setup: Setup) -> float:
    """Bytes one decoder layer keeps for the backward per position, tensor by tensor (Llama's layer in
    transformers; q = heads x head_dim, kv = the key/value width, repeated to q when the attention kernel
    takes a mask and no grouped heads: SDPA with dpokit's masks, eager):

    fp32:     input 4h + RMSNorm (x rsqrt, x w) 8h + attention q, k, v, output 4(2q + 2kv) + the key or value
              before its repeat 4kv' + output made contiguous 4q + residual 4h + RMSNorm 8h + MLP gate, up,
              silu, product 16I
    bf16:     input 2h + RMSNorm (fp32 input, bf16 normalized, output) 8h + 2(2q + 2kv) + 2kv' + 2q + 2h + 8h
              + 8I
    autocast: fp32 residual 4h + RMSNorm 8h + three bf16 casts of its output for q, k, v 6h + 2(2q + 2kv)
              + 2kv' + 2q + 4h + 8h + two casts for gate, up 4h + 8I
    (kv' the key/value width before any repeat.) SDPA given a boolean mask converts it to the compute dtype and
    keeps that copy for the backward, in every layer (``attention_scores``).
    """
    h, q, inter = shape.hidden, shape.q_width, shape.intermediate
    kv = shape.kv_width if setup.attention == "flex_attention" else q
    kind = regime(setup)
    if kind == "fp32":
        return 24 * h + 12 * q + 8 * kv + 4 * shape.kv_width + 16 * inter
    if kind == "bf16":
        return 20 * h + 6 * q + 4 * kv + 2 * shape.kv_width + 8 * inter
    return 34 * h + 6 * q + 4 * kv + 2 * shape.kv_width + 8 * inter


def residual_bytes(setup: Setup) -> int:
    """Bytes per position and hidden unit of the residual stream (fp32 under autocast over fp32 weights)."""
    return 2 if regime(setup) == "bf16" else 4


def attention_scores(shape: Shape, setup: Setup) -> float:
    """What one layer's attention keeps per pass beyond O(L) per row: eager, the (heads, L, L) probabilities of
    every row (the fp32 softmax output and its copy in the compute dtype); SDPA, its (rows, 1, L, L) copy of
    the boolean mask in the compute dtype; FlexAttention, nothing (its block mask is shared)."""
    rows = math.ceil(setup.pass_tokens / setup.row_length)
    compute = 4 if regime(setup) == "fp32" else 2
    if setup.attention == "eager":
        return rows * shape.heads * setup.row_length ** 2 * (4 + (0 if compute == 4 else compute))
    if setup.attention == "sdpa":
        return rows * setup.row_length ** 2 * compute
    return 0.0


def recomputed_layer(shape: Shape, setup: Setup) -> float:
    """One layer's saved tensors for a pass: what checkpointing recomputes at a time."""
    return layer_bytes(shape, setup) * setup.pass_tokens + attention_scores(shape, setup)


def activations(shape: Shape, setup: Setup, checkpointing: bool) -> float:
    """Activations of one pass: every layer's saved tensors (checkpointed: each layer's input, and one layer in
    full while it is recomputed), the final norm and the hidden states the head reads, the batch's index
    tensors and, for the packed layout, its (rows, L, L) boolean mask."""
    t, res = setup.pass_tokens, residual_bytes(setup)
    per_layer = recomputed_layer(shape, setup)
    layers = (shape.layers * res * shape.hidden * t + per_layer) if checkpointing else shape.layers * per_layer
    final = t * shape.hidden * (res + 8 + res)  # its input, its two saved products, the head's (M, h) gather
    rows = math.ceil(t / setup.row_length)
    mask = rows * setup.row_length ** 2 if setup.layout == "packed" and setup.attention != "flex_attention" else 0
    return layers + final + mask + t * INDEX_BYTES_PER_POSITION


def head(shape: Shape, setup: Setup) -> float:
    """The log-prob head at its largest, in the backward of one chunk: the chunk's fp32 logits turned into
    d loss / d logits (and their bf16 copy), its hidden-state gradient, and the head's weight gradient of the
    chunk beside the one being accumulated. Soft-capped logits take the plain path: T x V fp32 logits and
    their log-softmax, kept for the backward."""
    v, h = shape.vocab, shape.hidden
    if shape.logit_softcap:
        return 2 * 4 * setup.pass_tokens * v
    rows = min(setup.chunk, setup.pass_tokens)
    compute = 4 if regime(setup) == "fp32" else 2
    logits = rows * v * (4 + (0 if compute == 4 else 2)) + rows * h * compute
    head_trainable = setup.lora_r is None
    weight_grads = 2 * v * h * gathered_bytes(setup) if head_trainable else 0
    return logits + weight_grads


def communication(shape: Shape, setup: Setup) -> float:
    """DDP: the gradient buckets (a flat copy of every trainable gradient). FSDP2: the root's parameters
    gathered for the whole step (embeddings, tied or separate head, final norm), two decoder layers gathered
    (the one computing and the one prefetched), in ``gathered_bytes``, and one layer's full gradients before
    their reduce-scatter, in the reduce dtype (fp32 under mixed precision); offloaded, the whole root is
    gathered (its shard is on the host)."""
    if setup.strategy == "ddp":
        n, size = trainable(shape, setup)
        return n * size
    if setup.strategy != "fsdp":
        return 0.0
    b, reduce = gathered_bytes(setup), 4 if mixed(setup) else DTYPE_BYTES[setup.dtype]
    resident = 0.0 if setup.offload else 1 / setup.world  # this rank's shard of the root, counted in weights
    root = shape.root_params() * b * (1 - resident)
    return root + 2 * shape.layer_params() * b + shape.layer_params() * reduce


# --------------------------------------------------------------------------------------------------- the peak

@dataclass(frozen=True)
class Memory:
    """Bytes per rank of each part, and the peak: when parts are alive together."""

    weights: float
    gradients: float
    optimizer: float
    reference: float
    autocast_copies: float
    dequantized: float
    activations: float
    activations_checkpointed: float
    activations_full: float
    head: float
    communication: float
    peak: float
    peak_at: str


def memory(shape: Shape, setup: Setup) -> Memory:
    """Every part, and the peak of a step: the larger of (a) the start of a pass's backward, with its
    activations, the head's chunk and the gradients of the step's earlier passes (none when a step is one
    pass), and (b) the end of the backward, with every gradient and no activations."""
    full = activations(shape, setup, checkpointing=False)
    ckpt = activations(shape, setup, checkpointing=True)
    parts = dict(weights=on_gpu(weights(shape, setup), setup), gradients=on_gpu(gradients(shape, setup), setup),
                 optimizer=on_gpu(optimizer_states(shape, setup), setup),
                 reference=on_gpu(reference(shape, setup), setup),
                 autocast_copies=autocast_copies(shape, setup), dequantized=dequantized(shape, setup),
                 activations=ckpt if setup.checkpointing else full,
                 head=head(shape, setup), communication=communication(shape, setup))
    static = parts["weights"] + parts["optimizer"] + parts["reference"] + parts["communication"]
    earlier = parts["gradients"] if setup.passes_per_step > 1 else 0.0
    # Checkpointed, a layer is recomputed in full only after the head's backward is done: not both at once.
    overlap = min(recomputed_layer(shape, setup), parts["head"]) if setup.checkpointing else 0.0
    backward = static + parts["autocast_copies"] + parts["dequantized"] + parts["activations"] + parts["head"] - overlap + earlier
    end = static + parts["gradients"]
    at = "the start of the backward" + (" (earlier passes' gradients held)" if earlier else "")
    return Memory(**parts, activations_checkpointed=ckpt, activations_full=full,
                  peak=max(backward, end), peak_at=at if backward >= end else "the end of the backward")


# ------------------------------------------------------------------------------------------- loading and FLOPs

def host_ram_per_rank(shape: Shape, setup: Setup) -> float:
    """Host RAM while loading, per rank. Loaded whole (one process, DDP, or FSDP filling a reference store):
    the whole policy in ``model.dtype`` and a whole reference beside it (a copy of the policy for
    ``reference.mode: model``). Loaded sharded (``sharded_loading``): each rank reads only its rows of the
    weight files (``dpokit.models.sharded.materialize``), one tensor at a time, straight into its shards'
    storage on the GPU, so the host holds the largest tensor's rows for this rank; offloaded, the policy's and
    reference's shards stay on the host too."""
    b = DTYPE_BYTES[setup.dtype]
    if not sharded_loading(setup):
        copies = 2 if setup.reference == "model" else 1
        return copies * shape.params() * b
    largest = max([shape.vocab * shape.hidden] + [a * c for a, c in shape.linears().values()])
    read = math.ceil(largest / setup.world) * b
    return read + (weights(shape, setup) + reference(shape, setup) if setup.offload else 0.0)


def sharded_loading(setup: Setup) -> bool:
    """FSDP loads the policy and reference shard by shard (``training.setup``), except to fill a reference
    store, which needs a whole model."""
    return setup.strategy == "fsdp" and setup.reference != "store"


def host_ram_training(shape: Shape, setup: Setup) -> float:
    """Host RAM per rank for what offload keeps there while training: the weights' and reference's shards,
    the gradients and the optimizer states; none without offload."""
    if not setup.offload:
        return 0.0
    return weights(shape, setup) + reference(shape, setup) + gradients(shape, setup) + optimizer_states(shape, setup)


def flops_per_step(shape: Shape, setup: Setup, tokens: int, sequence: int) -> dict[str, float]:
    """Model FLOPs of one optimizer step over ``tokens`` positions in sequences of ``sequence`` tokens:
    training 6N per token (N: the parameters that multiply activations), 4N + 6N_adapters with LoRA (no
    weight gradients for the frozen base), the reference forward 2N per token (none from a store), and causal
    attention 2 L q s per token forward (QK^T and AV over s/2 earlier positions on average), 3x for training.
    Checkpointing recomputes each forward once more: counted apart (hardware, not model, FLOPs)."""
    n = shape.matmul_params()
    adapters = lora_params(shape, setup)
    train = (4 * n + 6 * adapters) if setup.lora_r is not None else 6 * n
    attention = 2 * shape.layers * shape.q_width * sequence
    ref = (2 * n + attention) if setup.reference != "store" else 0.0
    out = {"train": tokens * (train + 3 * attention), "reference": tokens * ref}
    out["recompute"] = tokens * (2 * n + attention) if setup.checkpointing else 0.0
    out["total"] = out["train"] + out["reference"]
    return out
