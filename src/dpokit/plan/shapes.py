"""A model's shape from its ``config.json`` alone: a local folder, the Hugging Face cache (never downloaded), or a
built-in table of common models. No weights are read.

The shape is what the memory planner needs: hidden size h, layers, query and key/value heads and their width,
MLP width I, vocabulary V, whether the head shares the embedding matrix, and the biases and extra norms that
make the parameter count exact (Qwen2's q/k/v biases, Gemma-2's four norms per layer, Qwen3's q/k norms).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dpokit.errors import ModelError

KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
"""Dense decoder-only transformers whose parameters the planner counts exactly."""


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0
    """Width of one attention head; 0 means hidden / heads."""
    qkv_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    logit_softcap: bool = False
    """Soft-capped logits (Gemma-2): dpokit's chunked head does not apply, the full logits are computed."""

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """heads x head_dim: the width of the query (and of the attention output)."""
        return self.heads * self.dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer, by the module names LoRA targets."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """Parameters of one decoder layer: the linears, Qwen2's q/k/v biases, the RMSNorm weights."""
        weights = sum(a * b for a, b in self.linears().values())
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        qk_norm = 2 * self.dim if self.qk_norm else 0
        return weights + bias + self.norms_per_layer * self.hidden + qk_norm

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, and the head unless it is tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def matmul_params(self) -> int:
        """Parameters that multiply activations per token (6N counts these): every linear and the head, not
        the embedding lookup or the norms."""
        return self.layers * sum(a * b for a, b in self.linears().values()) + self.vocab * self.hidden


def _shape(name: str, h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool,
           kind: str = "llama", head_dim: int = 0) -> Shape:
    extra: dict[str, Any] = {"qwen2": {"qkv_bias": True},
                             "gemma2": {"norms_per_layer": 4, "logit_softcap": True}}.get(kind, {})
    return Shape(name, h, layers, heads, kv, inter, vocab, tied, head_dim=head_dim, **extra)


BUILTIN = {s.name.lower(): s for s in (
    # Public config.json values of each model (hidden, layers, heads, kv heads, MLP width, vocabulary, tied).
    _shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True),
    _shape("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True),
    _shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
    _shape("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, False),
    _shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, "qwen2"),
    _shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, "qwen2"),
    _shape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, "qwen2"),
    _shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, "qwen2"),
    _shape("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False, "qwen2"),
    _shape("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False, "qwen2"),
    _shape("Qwen2.5-72B", 8192, 80, 64, 8, 29568, 152064, False, "qwen2"),
    _shape("Mistral-7B", 4096, 32, 32, 8, 14336, 32768, False),
    _shape("Gemma-2-2B", 2304, 26, 8, 4, 9216, 256000, True, "gemma2", head_dim=256),
    _shape("Gemma-2-9B", 3584, 42, 16, 8, 14336, 256000, True, "gemma2", head_dim=256),
    _shape("Gemma-2-27B", 4608, 46, 32, 16, 36864, 256000, True, "gemma2", head_dim=128),
    _shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True),
    _shape("SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True),
    _shape("SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, True),
)}

_ALIASES = {"llama-3-8b": "llama-3.1-8b", "meta-llama-3-8b": "llama-3.1-8b", "meta-llama-3.1-8b": "llama-3.1-8b",
            "llama-3-70b": "llama-3.1-70b", "meta-llama-3-70b": "llama-3.1-70b",
            "meta-llama-3.1-70b": "llama-3.1-70b", "llama-3.3-70b": "llama-3.1-70b",
            "mistral-7b-v0.3": "mistral-7b"}


def builtin(name: str) -> Shape | None:
    """The built-in shape of a hub id or name (``meta-llama/Llama-3.1-8B-Instruct`` -> Llama-3.1-8B,
    ``mistralai/Mistral-7B-Instruct-v0.3`` -> Mistral-7B): the last path part, case ignored, without
    -Instruct/-it/-chat (fine-tunes keep their base's shape)."""
    key = name.rstrip("/").split("/")[-1].lower()
    key = re.sub(r"-(instruct|it|chat)(?=-|$)", "", key)
    key = _ALIASES.get(key, key)
    shape = BUILTIN.get(key)
    return replace(shape, name=name) if shape else None


def from_config_json(config: dict[str, Any], name: str, where: str) -> Shape:
    """The shape in a ``config.json``; a model type the planner does not count is a one-line error."""
    kind = config.get("model_type", "")
    if "text_config" in config:  # a vision-language model: the planner counts its language model
        config, kind = config["text_config"], config["text_config"].get("model_type", kind)
    if kind not in KNOWN_TYPES:
        raise ModelError(f"{where}: model_type '{kind}' is not one the planner counts ({', '.join(KNOWN_TYPES)})")
    try:
        heads = int(config["num_attention_heads"])
        shape = Shape(
            name=name, hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            # transformers' defaults when the file leaves the key out: Gemma ties, the others do not.
            tied=bool(config.get("tie_word_embeddings", kind.startswith("gemma"))),
            head_dim=int(config.get("head_dim") or 0),
            qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
            norms_per_layer=4 if kind == "gemma2" else 2, qk_norm=kind == "qwen3",
            logit_softcap=config.get("final_logit_softcapping") not in (None, 0, 1.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: not a causal LM config ({exc})") from None
    return shape


def read_config_json(path: Path, name: str) -> Shape:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None
    return from_config_json(config, name, str(path))


def find_shape(name_or_path: str, revision: str | None = None, gguf_file: str | None = None,
               key: str = "model.name_or_path") -> tuple[Shape, str]:
    """(shape, where it came from) of a dpokit model name: ``tiny-random-llama``, ``smollm2`` (the embedded
    SmolLM2-135M), a local folder with config.json, a hub id already in the Hugging Face cache, or a model of
    the built-in table. Nothing is downloaded."""
    from dpokit.models.loading import EMBEDDED_NAME, TINY_NAME

    if name_or_path == TINY_NAME:
        return _tiny_shape(), "built in code (dpokit.models.source.tiny_model)"
    if name_or_path == EMBEDDED_NAME:
        return replace(BUILTIN["smollm2-135m"], name=EMBEDDED_NAME), "built-in table (SmolLM2-135M-Instruct)"
    if gguf_file is not None or name_or_path.endswith(".gguf"):
        raise ModelError(f"{key}: the planner reads config.json, not GGUF files; give the model's Hugging Face "
                         "folder or hub id")
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return read_config_json(path / "config.json", name_or_path), str(path / "config.json")
    cached = _hub_cache_config(name_or_path, revision)
    if cached is not None:
        return read_config_json(cached, name_or_path), f"Hugging Face cache ({cached})"
    shape = builtin(name_or_path)
    if shape is not None:
        return shape, "built-in table"
    raise ModelError(f"{key}: no config.json for '{name_or_path}' (not a local folder, not in the Hugging Face "
                     f"cache, not in the built-in table); fetch it with `hf download {name_or_path} config.json` "
                     "(no weights) or give a folder holding config.json")


def _hub_cache_config(repo_id: str, revision: str | None) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the hub library refuses to parse: not in the cache
        return None
    return Path(found) if isinstance(found, str) else None


def _tiny_shape() -> Shape:
    from dpokit.models.loading import tiny_model, tiny_tokenizer

    config = tiny_model(len(tiny_tokenizer())).config  # a 2-layer model: building it costs nothing
    return from_config_json(config.to_dict(), "tiny-random-llama", "tiny-random-llama")
