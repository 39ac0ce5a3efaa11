"""`attention(..., impl="pallas")`: SRA specs and masks translated into the block-sparse Pallas kernels.

A `SRAMaskSpec` becomes a block layout built straight from the SRA rule (window band + global blocks + blocks
holding critical keys) plus the same rule evaluated per token inside the visited blocks, so the result is exact.
The kernels evaluate rules, not arbitrary tables: a bare boolean `mask` runs the dense reference instead.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

import pallas_kernels


def _block(length: int, block: int) -> int:
    """The kernel block, shrunk (to a power of two >= 16) for short sequences so they are not padded to 128."""
    return min(block, max(16, 1 << max(length - 1, 1).bit_length()))


def pallas_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    *,
    spec=None,
    mask: Bool[Array, "b sq sk"] | Bool[Array, "b hq sq sk"] | None = None,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b sq hq d"]:
    """Exactly one of `spec` (an `sra_jax.ops.masks.SRAMaskSpec`) or `mask`, or neither (causal by index, the
    queries being the last sq keys). backend as in `pallas_kernels.block_sparse_attention` ("auto": the Triton
    kernels on GPU, Mosaic on TPU, the dense reference elsewhere)."""
    if spec is not None and mask is not None:
        raise ValueError("give spec or mask, not both")
    sq, sk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if mask is not None:
        return pallas_kernels.reference.masked_attention(
            q, k, v, mask if mask.ndim == 4 else mask[:, None], scale
        )
    bq, bk = _block(sq, block_q), _block(sk, block_k)
    if spec is None:
        b = q.shape[0]
        q_positions = jnp.broadcast_to(jnp.arange(sk - sq, sk, dtype=jnp.int32), (b, sq))
        k_positions = jnp.broadcast_to(jnp.arange(sk, dtype=jnp.int32), (b, sk))
        layout = pallas_kernels.sra_layout(q_positions, k_positions, block_q=bq, block_k=bk)
        return pallas_kernels.block_sparse_attention(
            q,
            k,
            v,
            layout,
            q_positions=q_positions,
            k_positions=k_positions,
            sm_scale=scale,
            backend=backend,
            interpret=interpret,
        )
    q_critical = spec.q_critical if spec.queries == "critical" else None
    rule = {
        "causal": True,
        "window": spec.window,
        "num_global": spec.num_global,
        "k_critical": spec.k_critical,
        "q_critical": q_critical,
        "segment_ids": spec.q_segment_ids,
        "k_segment_ids": spec.k_segment_ids,
    }
    layout = pallas_kernels.sra_layout(spec.q_positions, spec.k_positions, block_q=bq, block_k=bk, **rule)
    return pallas_kernels.block_sparse_attention(
        q,
        k,
        v,
        layout,
        q_positions=spec.q_positions,
        k_positions=spec.k_positions,
        sm_scale=scale,
        backend=backend,
        interpret=interpret,
        **rule,
    )
