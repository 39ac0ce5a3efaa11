"""`Router`: scores every token of an SRA layer (the layer's selection policy turns the scores into its critical
set, see `sra_jax.nn.selection`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from sra_jax.nn.layers import linear
# The selection functions live in sra_jax.nn.selection; these names stay importable from the router module.
from sra_jax.nn.selection import (  # noqa: F401
    Selection,
    count_table,
    critical_counts,
    decode_threshold,
    forced_selection,
    segment_select,
    select,
)


class Router(nnx.Module):
    """Token scorer: Linear(hidden, router_hidden) -> silu -> Linear(router_hidden, 1), or one Linear if router_hidden=0.

    It reads the layer's RMS-normed input and always computes in float32, so that top-k ties and the decode threshold
    do not depend on the model's compute dtype. Parameters: `hidden.kernel` [hidden, router_hidden]
    ("embed", "router_hidden"), `hidden.bias` [router_hidden] ("router_hidden",), `score.kernel` [router_hidden, 1]
    ("router_hidden", None); with router_hidden=0 only `score.kernel` [hidden, 1] ("embed", None).
    """

    def __init__(self, hidden_size: int, router_hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.router_hidden = router_hidden
        kw = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        if router_hidden:
            self.hidden = linear(hidden_size, router_hidden, ("embed", "router_hidden"), use_bias=True, **kw)
            self.score = linear(router_hidden, 1, ("router_hidden", None), **kw)
        else:
            self.hidden = None
            self.score = linear(hidden_size, 1, ("embed", None), **kw)

    def __call__(self, x: Float[Array, "b s d"]) -> Float[Array, "b s"]:
        h = x.astype(jnp.float32)
        if self.hidden is not None:
            h = jax.nn.silu(self.hidden(h))
        return self.score(h)[..., 0]

    def flops_per_token(self) -> int:
        """Multiply-adds counted as 2 FLOPs, plus the bias add and activation of the hidden layer."""
        if self.router_hidden:
            return 2 * self.hidden_size * self.router_hidden + 2 * self.router_hidden + 2 * self.router_hidden
        return 2 * self.hidden_size
