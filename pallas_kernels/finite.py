"""Non-finite keys and values that a row cannot see never reach its output, on every attention path.

In a fused kernel a masked key still enters the P @ V product with weight exactly 0, and 0 * NaN = NaN (in the
backward, dS = P * (dP - D) and dQ = dS @ K do the same), so one NaN key in a visited tile would poison rows that
cannot see it. `exclude_nonfinite_keys` makes every path exact without touching the kernels: keys whose k or v
holds a non-finite value are zeroed before the one attention call, and the rows that *can* see one of them (they
would be NaN in exact arithmetic) are set to NaN afterwards. Which rows see one comes from the caller's
visibility rule (the same rule the attention evaluates: its mask a block of query rows at a time, or the caller's
own search, e.g. over the key slots a gather visits), never from the attention itself: the program holds one
attention, and the row search runs only when a bad key exists (`lax.cond`). Cost when all keys are finite: one
element-wise pass over k and v and the conditional's predicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Most mask elements (as float32 for the count) one block of query rows builds in the row search: 2^25, 128 MiB.
_ROW_SEARCH_ELEMENTS = 1 << 25

# visible(start, size): bool [b, size, sk] or [b, heads, size, sk] (heads dividing hq): which keys query rows
# start .. start + size - 1 see (start a traced int32 with start + size <= sq, size static).
VisibleRows = Callable[[Int[Array, ""], int], Bool[Array, "..."]]


def exclude_nonfinite_keys(
    attend: Callable[[Array, Array, Array], Array],
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    visible: VisibleRows | None = None,
    *,
    sees: Callable[[Bool[Array, "b sk hkv"]], Bool[Array, "b sq hq"]] | None = None,
) -> Float[Array, "b sq hq d"]:
    """attend(q, k, v) (a masked attention, GQA q [b, sq, hq, d] over k/v [b, sk, hkv, d]) in which a key with a
    non-finite k or v reaches exactly the rows that can see it (they give NaN), and no other row. The attention's
    visibility is given as exactly one of `visible` (its mask a block of query rows at a time, see `VisibleRows`;
    searched by `rows_seeing`) or `sees` (flagged keys [b, sk, hkv] -> the rows and query heads that see one)."""
    if (visible is None) == (sees is None):
        raise ValueError("give exactly one of visible= and sees= (the attention's visibility)")
    if sees is None:
        sees = lambda flagged: rows_seeing(visible, flagged, q.shape[1], q.shape[2])
    bad = ~(jnp.isfinite(k) & jnp.isfinite(v)).all(-1)  # [b, sk, hkv]
    zero = lambda x: jnp.where(bad[..., None], jnp.zeros((), x.dtype), x)
    out = attend(q, zero(k), zero(v))
    # zeros_like keeps `out`'s varying manual axes (inside shard_map both branches must carry the same ones).
    none = jnp.zeros_like(out[..., 0], dtype=bool)
    seen = jax.lax.cond(jnp.any(bad), lambda: jax.lax.stop_gradient(sees(bad)) | none, lambda: none)
    return jnp.where(seen[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def rows_seeing(visible: VisibleRows, keys: Bool[Array, "b sk hkv"], sq: int, hq: int) -> Bool[Array, "b sq hq"]:
    """Per query row and query head: does the row see one of the flagged `keys` (per kv head) under `visible`.
    Built a block of rows at a time (at most `_ROW_SEARCH_ELEMENTS` mask elements), as a count: visible @ keys."""
    b, sk, hkv = keys.shape
    heads = jax.eval_shape(lambda: visible(jnp.int32(0), 1)).shape
    mask_heads = 1 if len(heads) == 3 else heads[1]
    if hq % mask_heads or hq % hkv:
        raise ValueError(f"visible's heads ({mask_heads}) and kv heads ({hkv}) must divide query heads ({hq})")
    # Heads at which both the mask and the key flags are constant: lcm(mask heads, kv heads), a divisor of hq.
    level = hkv if mask_heads == 1 else math.lcm(mask_heads, hkv)
    per_row = b * sk * (1 if mask_heads == 1 else level)
    size = max(1, min(sq, _ROW_SEARCH_ELEMENTS // per_row))
    flags = keys.astype(jnp.float32)
    if mask_heads > 1:
        flags = jnp.repeat(flags, level // hkv, axis=-1)  # [b, sk, level]

    def block(start):
        mask = visible(start, size)
        if mask_heads == 1:
            mask = jnp.broadcast_to(mask.reshape(mask.shape[0], size, sk), (b, size, sk))
            count = jnp.einsum("bqk,bkh->bqh", mask.astype(jnp.float32), flags)
        else:
            mask = jnp.repeat(jnp.broadcast_to(mask, (b, mask_heads, size, sk)), level // mask_heads, axis=1)
            count = jnp.einsum("bhqk,bkh->bqh", mask.astype(jnp.float32), flags)
        return count > 0  # [b, size, level]

    n = -(-sq // size)
    if n == 1:
        seen = block(jnp.int32(0))
    else:
        # The last block starts at sq - size (it overlaps the one before; both write the same rows).
        def body(i, seen):
            start = jnp.minimum(i * size, sq - size).astype(jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(seen, block(start), start, axis=1)

        seen = jax.lax.fori_loop(0, n, body, jnp.zeros((b, sq, level), bool))
    return jnp.repeat(seen, hq // level, axis=-1)
