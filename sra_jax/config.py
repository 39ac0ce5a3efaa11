"""Typed, frozen configs: `LlamaConfig` (Hugging Face Llama 3 fields) and `SRAConfig` (sparse attention).

Each validates itself in `__post_init__` and names the offending field in its error. `TrainConfig` lives in
`sra_jax.train.config` beside the code that consumes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from sra_jax.ops.selection_policy import selection_policy_names

# Keys of a Hugging Face config.json without which the model shape is unknown (no Llama-3-8B defaults assumed).
_HF_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Keys a Llama config.json may carry that this model ignores safely (bookkeeping, generation defaults).
_HF_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "pretraining_tp",
        "hidden_act",
        "attention_dropout",
        "pad_token_id",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "max_length",
        "do_sample",
        "temperature",
        "top_p",
        "num_beams",
        "layer_types",
        "rope_parameters",
        "sra",
        "tokenizer_class",
    }
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (`rope_type: llama3`); other rope types are rejected."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"  # validated in __post_init__ (a Literal would fail before the clear error)

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; only 'llama3' is")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_scaling needs 0 < low_freq_factor ({self.low_freq_factor}) "
                f"< high_freq_factor ({self.high_freq_factor})"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"rope_scaling.original_max_position_embeddings={self.original_max_position_embeddings} must be > 0"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        if d is None:
            return None
        d = dict(d)
        rope_type = d.pop("rope_type", d.pop("type", None))
        if rope_type in (None, "default"):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"rope_scaling has keys this model cannot represent: {sorted(unknown)}")
        return cls(rope_type=rope_type, **d)

    def to_hf(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Every field of a Llama 3 / 3.1 / 3.2 `config.json` that changes the computation."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | list[int] | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be a positive even integer (RoPE pairs)")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta={self.rope_theta} must be > 0")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps} must be > 0")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face `config.json` dict; rejects what this model cannot represent."""
        d = dict(d)
        missing = [k for k in _HF_REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}: the model's shape cannot be guessed")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json model_type={model_type!r}: only 'llama' checkpoints are supported")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if any(a != "LlamaForCausalLM" for a in archs):
            raise ValueError(f"config.json architectures={archs!r}: only LlamaForCausalLM is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.pop(flag, False):
                raise ValueError(f"config.json {flag}=true: this Llama implementation has no biases")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config.json pretraining_tp={d['pretraining_tp']}: only 1 is supported")
        # transformers >= 5 may carry the rope settings in `rope_parameters` instead.
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):
            d.setdefault("rope_theta", rope_params.get("rope_theta", cls.rope_theta))
            if rope_params.get("rope_type", "default") not in ("default", None):
                d.setdefault("rope_scaling", {k: v for k, v in rope_params.items() if k != "rope_theta"})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - _HF_IGNORED_KEYS
        if unknown:
            raise ValueError(f"config.json has keys this model cannot represent: {sorted(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["rope_scaling"] = RopeScaling.from_hf(d.get("rope_scaling"))
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' `LlamaConfig` reads."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
        )
        return out

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A few-thousand-parameter config for tests and CPU demos."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
        )
        base.update(overrides)
        return cls(**base)


def _check_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name}={value!r} must be an integer >= 1")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Native Sparse Attention layers (`sra_jax.nn.NSAAttention`): compression pool of `block` keys with `stride`,
    top-`top_n` selected blocks of `block_sel` keys per query token (shared by a GQA group), a sliding `window`;
    `selected_backend` is the `ops.nsa.nsa_selected` implementation of the selected-blocks branch ("auto",
    "reference", "gather", "pallas"; as `DSAConfig.impl`)."""

    block: int = 32
    stride: int = 16
    block_sel: int = 64
    top_n: int = 16
    window: int = 512
    selected_backend: str = "auto"

    def __post_init__(self):
        _check_positive("NSAConfig", block=self.block, stride=self.stride, block_sel=self.block_sel,
                        top_n=self.top_n, window=self.window)  # fmt: skip
        if self.stride > self.block:
            raise ValueError(f"NSAConfig.stride={self.stride} must be <= block={self.block}")
        if self.selected_backend not in ("auto", "reference", "gather", "pallas"):
            raise ValueError(f"NSAConfig.selected_backend={self.selected_backend!r} must be one of 'auto', "
                             f"'reference', 'gather', 'pallas'")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """DeepSeek Sparse Attention layers (`sra_jax.nn.DSAAttention`): a lightning indexer of `indexer_heads` x
    `indexer_dim` picks each query's `top_k` keys; `impl` is the `ops.dsa.dsa_attention` implementation and
    `indexer_loss` ("selected" or "dense") the indexer's KL loss. `indexer_topk` is the `ops.dsa.indexer_top_k`
    implementation ("threshold" over query chunks of `indexer_query_chunk`, None: sized by the sequence; "sort"
    streaming over key blocks of `indexer_block_k`)."""

    top_k: int = 2048
    indexer_heads: int = 4
    indexer_dim: int = 64
    block_q: int = 64
    indexer_block_k: int = 1024
    indexer_loss: str = "selected"
    impl: str = "auto"
    indexer_topk: str = "threshold"
    indexer_query_chunk: int | None = None

    def __post_init__(self):
        if self.indexer_query_chunk is not None:
            _check_positive("DSAConfig", indexer_query_chunk=self.indexer_query_chunk)
        _check_positive("DSAConfig", top_k=self.top_k, indexer_heads=self.indexer_heads,
                        indexer_dim=self.indexer_dim, block_q=self.block_q, indexer_block_k=self.indexer_block_k)  # fmt: skip
        if self.indexer_loss not in ("selected", "dense"):
            raise ValueError(f"DSAConfig.indexer_loss={self.indexer_loss!r} must be 'selected' or 'dense'")


ATTENTION_KINDS = ("sra", "nsa", "dsa")


@dataclasses.dataclass(frozen=True)
class SRAConfig:
    """Sparse Reasoning Attention settings (see DESIGN.md, "SRA mask semantics").

    critical_fraction: fraction of tokens the router keeps as critical (k = ceil(fraction * n), at least 1); for
        selection="bernoulli" it is the cap k_max (the router decides how many, at most k_max).
    window: each query sees the `window` most recent positions, itself included.
    num_global: the first `num_global` positions are visible to every query (attention sinks).
    tau: Gumbel-softmax temperature of the relaxed top-k in training (bernoulli: p = sigmoid(logit / tau)).
    hard: straight-through hard mask (forward exact top-k, backward through the soft relaxation).
    selection: how the router's scores become a critical set, the name of a registered selection policy
        (`sra_jax.ops.selection_policy`): "gumbel_topk" (sampled top-k, k fixed), "topk", "sparsemax", or
        "bernoulli" (each token critical with probability sigmoid(logit / tau), capped at k; deterministic
        logit > 0 without a key).
    mask: "dynamic" selects per layer; "static" selects once (first SRA layer) and reuses it in every layer.
    queries: "critical" lets only critical queries see distant critical keys; "all" lets every query.
    layers: indices of layers that use SRA; None means all layers.
    router_hidden: width of the router MLP (0 means a single linear scorer).
    attention: what the layers in `layers` run: "sra" (SparseReasoningAttention with a router), "nsa"
        (NSAAttention, settings in `nsa`) or "dsa" (DSAAttention, settings in `dsa`). The SRA-only fields above do
        not apply to nsa/dsa layers.
    nsa, dsa: NSAConfig / DSAConfig (a dict, as read from JSON, is accepted).
    """

    critical_fraction: float = 0.1
    window: int = 64
    num_global: int = 4
    tau: float = 1.0
    hard: bool = True
    # Plain `str` / `Sequence` so the runtime type checker lets __post_init__ give the clearer error.
    selection: str = "gumbel_topk"
    mask: str = "dynamic"
    queries: str = "critical"
    layers: Sequence[int] | None = None
    router_hidden: int = 64
    attention: str = "sra"
    nsa: NSAConfig | dict[str, Any] = dataclasses.field(default_factory=NSAConfig)
    dsa: DSAConfig | dict[str, Any] = dataclasses.field(default_factory=DSAConfig)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"SRAConfig.attention={self.attention!r} must be one of {ATTENTION_KINDS}")
        for name, cls in (("nsa", NSAConfig), ("dsa", DSAConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ValueError(f"SRAConfig.{name}={value!r} must be a {cls.__name__} or a dict of its fields")
        if not 0.0 < self.critical_fraction <= 1.0:
            raise ValueError(f"SRAConfig.critical_fraction={self.critical_fraction} must be in (0, 1]")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SRAConfig.window={self.window!r} must be an integer >= 1 (it includes the token itself)")
        if not isinstance(self.num_global, int) or self.num_global < 0:
            raise ValueError(f"SRAConfig.num_global={self.num_global!r} must be an integer >= 0")
        if self.tau <= 0:
            raise ValueError(f"SRAConfig.tau={self.tau} must be > 0")
        if self.selection not in selection_policy_names():
            raise ValueError(
                f"SRAConfig.selection={self.selection!r} must be one of {selection_policy_names()} (the registered "
                f"selection policies; add one with sra_jax.ops.selection_policy.register_selection_policy)"
            )
        if self.mask not in ("dynamic", "static"):
            raise ValueError(f"SRAConfig.mask={self.mask!r} must be 'dynamic' or 'static'")
        if self.queries not in ("critical", "all"):
            raise ValueError(f"SRAConfig.queries={self.queries!r} must be 'critical' or 'all'")
        if self.router_hidden < 0:
            raise ValueError(f"SRAConfig.router_hidden={self.router_hidden} must be >= 0")
        if self.layers is not None:
            layers = tuple(self.layers)
            if any((not isinstance(i, int)) or i < 0 for i in layers):
                raise ValueError(f"SRAConfig.layers={self.layers!r} must be non-negative layer indices")
            object.__setattr__(self, "layers", layers)

    def num_critical(self, seq_len: int) -> int:
        """k for a sequence of `seq_len` tokens: ceil(critical_fraction * seq_len), clamped to [1, seq_len]."""
        # The epsilon keeps 0.1 * 100 (= 10.000000000000002 in floating point) at 10.
        return max(1, min(seq_len, math.ceil(self.critical_fraction * seq_len - 1e-9)))

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers
