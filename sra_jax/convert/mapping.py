"""The one table between Hugging Face Llama tensor names and our `sra_jax.nn.Llama` parameter paths.

HF stores a linear layer's weight as `[out, in]` (torch's `x @ W.T`); ours is a Flax kernel `[in, out]`, so linear
weights are transposed and nothing else changes: our RoPE uses HF's `rotate_half` layout, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import re

from sra_jax.config import LlamaConfig

ParamPath = tuple[str | int, ...]

# Buffers that old checkpoints carry and that are recomputed from the config (transformers ignores them too).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    hf_name: str
    path: ParamPath
    hf_shape: tuple[int, ...]
    transpose: bool  # ours = hf.T

    @property
    def shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape


def path_str(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)


def param_specs(config: LlamaConfig) -> list[ParamSpec]:
    """Every tensor of a `LlamaForCausalLM` checkpoint for `config`, in transformers' state-dict order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    specs = [
        ParamSpec("model.embed_tokens.weight", ("embed", "embedding"), (config.vocab_size, hidden), False)
    ]
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        linear = {
            ("self_attn", "q_proj"): (("attn", "q_proj"), (q_width, hidden)),
            ("self_attn", "k_proj"): (("attn", "k_proj"), (kv_width, hidden)),
            ("self_attn", "v_proj"): (("attn", "v_proj"), (kv_width, hidden)),
            ("self_attn", "o_proj"): (("attn", "o_proj"), (hidden, q_width)),
            ("mlp", "gate_proj"): (("mlp", "gate_proj"), (inter, hidden)),
            ("mlp", "up_proj"): (("mlp", "up_proj"), (inter, hidden)),
            ("mlp", "down_proj"): (("mlp", "down_proj"), (hidden, inter)),
        }
        specs.append(
            ParamSpec(f"{hf}.input_layernorm.weight", (*ours, "input_norm", "scale"), (hidden,), False)
        )
        for (block, proj), (path, shape) in linear.items():
            specs.append(ParamSpec(f"{hf}.{block}.{proj}.weight", (*ours, *path, "kernel"), shape, True))
        specs.append(
            ParamSpec(
                f"{hf}.post_attention_layernorm.weight",
                (*ours, "post_attention_norm", "scale"),
                (hidden,),
                False,
            )
        )
    specs.append(ParamSpec("model.norm.weight", ("norm", "scale"), (hidden,), False))
    if not config.tie_word_embeddings:
        specs.append(ParamSpec("lm_head.weight", ("lm_head", "kernel"), (config.vocab_size, hidden), True))
    return specs
