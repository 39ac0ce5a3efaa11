"""Public block-sparse attention: input checks, padding to the block, backend choice, custom_vjp."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse import gpu, mosaic, mosaic_common, reference
from pallas_kernels.block_sparse.dispatch import BACKENDS, KernelCall, pack_fields, pad_seq, resolve_backend
from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import TokenInfo, make_rule_and_tokens, query_rows, token_mask
from pallas_kernels.finite import exclude_nonfinite_keys


def _forward(q, k, v, layout, q_tok, k_tok, st: KernelCall):
    kernels, kwargs = st.kernels()
    return kernels.forward(q, k, v, layout, q_tok, k_tok, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, layout, q_tok, k_tok, st: KernelCall):
    return _forward(q, k, v, layout, q_tok, k_tok, st)[0]


def _attention_fwd(q, k, v, layout, q_tok, k_tok, st: KernelCall):
    out, lse = _forward(q, k, v, layout, q_tok, k_tok, st)
    return out, (q, k, v, layout, q_tok, k_tok, out, lse)


def _attention_bwd(st: KernelCall, residuals, do):
    q, k, v, layout, q_tok, k_tok, out, lse = residuals
    kernels, kwargs = st.kernels()
    dq, dk, dv = kernels.backward(q, k, v, out, lse, do, layout, q_tok, k_tok, **kwargs)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, layout: BlockLayout, backend: str):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [b, s, h, d]; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype {q.dtype} not supported (bf16, f16, f32)")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must match")
    b, sq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} must share batch and head_dim with q {q.shape}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
    if hq % layout.num_heads:
        raise ValueError(f"layout heads ({layout.num_heads}) must divide query heads ({hq})")
    if layout.kv_indices.shape[0] != b:
        raise ValueError(f"layout batch ({layout.kv_indices.shape[0]}) must equal q batch ({b})")
    nq, nk = -(-sq // layout.block_q), -(-k.shape[1] // layout.block_k)
    if (layout.num_q_blocks, layout.num_k_blocks) != (nq, nk):
        raise ValueError(
            f"layout has {layout.num_q_blocks}x{layout.num_k_blocks} blocks, the inputs need "
            f"{nq}x{nk} (blocks {layout.block_q}x{layout.block_k})"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    if backend in ("triton", "mosaic_gpu", "tpu") and (d < 16 or d & (d - 1)):
        raise ValueError(f"head_dim {d} must be a power of two >= 16 for the Pallas kernels")


def block_sparse_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    layout: BlockLayout,
    *,
    causal: bool = True,
    window: int | None = None,
    num_global: int = 0,
    q_positions: Int[Array, "b sq"] | None = None,
    k_positions: Int[Array, "b sk"] | None = None,
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
    q_critical: Bool[Array, "b sq"] | Int[Array, "b sq"] | None = None,
    k_critical: Bool[Array, "b sk"] | Int[Array, "b sk"] | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    config: gpu.GpuConfig | None = None,
    interpret: bool = False,
    mosaic_config: mosaic_common.MosaicConfig | None = None,
) -> Float[Array, "b sq hq d"]:
    """Attention over the blocks the layout visits, with exact token masking inside them (see MaskRule: causal,
    window, num_global, segment ids, critical flags; positions < 0 are padding). q [b, sq, hq, d], k/v
    [b, sk, hkv, d] (GQA). Rows with nothing visible give zeros and zero gradients. Differentiable (custom_vjp).
    backend: "triton" (GPU Pallas), "mosaic_gpu" (Hopper forward and backward on Mosaic GPU), "tpu" (Mosaic
    TPU), "reference" (dense jnp), "auto" (by platform and measurement, see `resolve_backend`);
    interpret=True runs the Triton/TPU kernels in interpret mode (CPU tests)."""
    _check(q, k, v, layout, backend)
    backend = resolve_backend(backend, q, layout, mosaic_config)
    rule, tokens = make_rule_and_tokens(
        q,
        k,
        causal=causal,
        window=window,
        num_global=num_global,
        q_positions=q_positions,
        k_positions=k_positions,
        segment_ids=segment_ids,
        k_segment_ids=k_segment_ids,
        q_critical=q_critical,
        k_critical=k_critical,
    )
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if backend == "reference":
        return reference.masked_attention(q, k, v, reference.layout_token_mask(layout, rule, tokens), scale)
    sq, sk = q.shape[1], k.shape[1]
    q_tok, q_fields = pack_fields(
        {
            "pos": pad_seq(tokens.q_positions, layout.block_q, -1),
            "seg": _opt_pad(tokens.q_segment_ids, layout.block_q),
            "crit": _opt_pad(tokens.q_critical, layout.block_q),
        }
    )
    k_tok, k_fields = pack_fields(
        {
            "pos": pad_seq(tokens.k_positions, layout.block_k, -1),
            "seg": _opt_pad(tokens.k_segment_ids, layout.block_k),
            "crit": _opt_pad(tokens.k_critical, layout.block_k),
        }
    )
    if sq % layout.block_q or sk % layout.block_k:
        # Padded tail tokens sit inside the last blocks: no block may skip the token mask.
        layout = dataclasses.replace(
            layout, kv_full=jnp.zeros_like(layout.kv_full), q_full=jnp.zeros_like(layout.q_full)
        )
    if backend == "mosaic_gpu":
        reason = mosaic.unsupported_reason(
            q.shape, q.dtype, layout, mosaic_config or mosaic_common.MosaicConfig(), max(q_tok.shape[1], k_tok.shape[1])
        )
        if reason:
            raise ValueError(f"mosaic_gpu backend: {reason}")
    st = KernelCall(rule, scale, (q_fields, k_fields), backend, config or gpu.GpuConfig(), interpret, mosaic_config)
    out = exclude_nonfinite_keys(
        lambda q, k, v: _attention(q, k, v, layout, q_tok, k_tok, st),
        pad_seq(q, layout.block_q, 0),
        pad_seq(k, layout.block_k, 0),
        pad_seq(v, layout.block_k, 0),
        functools.partial(_visible_rows, layout, rule, _padded_tokens(tokens, layout)),
    )
    return out[:, :sq]


def _padded_tokens(tokens: TokenInfo, layout: BlockLayout) -> TokenInfo:
    """The rule's tokens padded to the blocks (padding positions are -1: never visible)."""
    pad_q = lambda x, fill=0: None if x is None else pad_seq(x, layout.block_q, fill)
    pad_k = lambda x, fill=0: None if x is None else pad_seq(x, layout.block_k, fill)
    return TokenInfo(
        pad_q(tokens.q_positions, -1), pad_k(tokens.k_positions, -1), pad_q(tokens.q_segment_ids),
        pad_k(tokens.k_segment_ids), pad_q(tokens.q_critical), pad_k(tokens.k_critical),
    )


def _visible_rows(layout: BlockLayout, rule, tokens: TokenInfo, start, size: int):
    """[b, h, size, sk] what the kernels see for query rows start .. start + size - 1 (padded): the layout's
    visited blocks and the token rule (`pallas_kernels.finite`'s row search)."""
    visited, _ = layout.to_block_mask()  # [b, h, nq, nk]
    blocks = (start + jnp.arange(size)) // layout.block_q
    rows = jnp.repeat(jnp.take(visited, blocks, axis=2), layout.block_k, axis=3)  # [b, h, size, nk * block_k]
    return rows & token_mask(rule, query_rows(tokens, start, size))[:, None]


def _opt_pad(x, block):
    return None if x is None else pad_seq(x, block, 0)
