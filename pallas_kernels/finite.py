"""Non-finite keys and values that a row cannot see never reach its output, on every attention path.

In a fused kernel a masked key still enters the P @ V product with weight exactly 0, and 0 * NaN = NaN (in the
backward, dS = P * (dP - D) and dQ = dS @ K do the same), so one NaN key in a visited tile would poison rows that
cannot see it. `exclude_nonfinite_keys` makes every path exact without touching the kernels: keys whose k or v
holds a non-finite value are zeroed before the call, and the rows that *can* see one of them (they would be NaN
in exact arithmetic) are set to NaN afterwards. Which rows see one is the same attention run with q = k = 0 and
v = the bad-key indicator: every visible key then has weight 1 / (number visible), so a row's output is > 0 iff
it sees a bad key; it runs only when a bad key exists (`lax.cond`). Cost when all keys are finite: one
element-wise pass over k and v and the conditional's predicate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def exclude_nonfinite_keys(
    attend: Callable[[Array, Array, Array], Array],
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
) -> Float[Array, "b sq hq d"]:
    """attend(q, k, v) (a masked attention, GQA q [b, sq, hq, d] over k/v [b, sk, hkv, d]) in which a key with a
    non-finite k or v reaches exactly the rows that can see it (they give NaN), and no other row."""
    bad = ~(jnp.isfinite(k) & jnp.isfinite(v)).all(-1, keepdims=True)  # [b, sk, hkv, 1]
    out = attend(q, jnp.where(bad, jnp.zeros((), k.dtype), k), jnp.where(bad, jnp.zeros((), v.dtype), v))

    def rows_that_see_a_bad_key():
        zeros_q, zeros_k = jnp.zeros_like(q), jnp.zeros_like(k)
        share = attend(zeros_q, zeros_k, jnp.broadcast_to(bad, v.shape).astype(v.dtype))
        return jax.lax.stop_gradient(share > 0)

    # zeros_like keeps `out`'s varying manual axes (inside shard_map both branches must carry the same ones).
    seen = jax.lax.cond(jnp.any(bad), rows_that_see_a_bad_key, lambda: jnp.zeros_like(out, dtype=bool))
    return jnp.where(seen, jnp.asarray(jnp.nan, out.dtype), out)
