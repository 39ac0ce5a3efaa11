"""Public block-sparse attention: input checks, padding to the block, backend choice, custom_vjp."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse import gpu, mosaic
from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import MaskRule, TokenInfo

BACKENDS = ("auto", "triton", "mosaic_gpu", "tpu", "reference")


def make_rule_and_tokens(
    q,
    k,
    *,
    causal,
    window,
    num_global,
    q_positions,
    k_positions,
    segment_ids,
    k_segment_ids,
    q_critical,
    k_critical,
) -> tuple[MaskRule, TokenInfo]:
    """Defaults: keys are the queries when the lengths match (positions 0..s-1); otherwise the queries are the
    last sq positions of the keys (chunked prefill)."""
    b, sq = q.shape[:2]
    sk = k.shape[1]
    if k_positions is None:
        k_positions = (
            q_positions
            if (q_positions is not None and sq == sk)
            else jnp.broadcast_to(jnp.arange(sk, dtype=jnp.int32), (b, sk))
        )
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(sk - sq, sk, dtype=jnp.int32), (b, sq))
    if k_segment_ids is None and segment_ids is not None:
        if sq != sk:
            raise ValueError(f"k_segment_ids is needed when query ({sq}) and key ({sk}) lengths differ")
        k_segment_ids = segment_ids
    if q_critical is not None and k_critical is None:
        if sq != sk:
            raise ValueError("k_critical is needed when query and key lengths differ")
        k_critical = q_critical
    as_int = lambda x: None if x is None else jnp.asarray(x).astype(jnp.int32)
    rule = MaskRule(
        causal=causal,
        window=window,
        num_global=num_global,
        has_segments=segment_ids is not None,
        has_k_critical=k_critical is not None,
        has_q_critical=q_critical is not None,
    )
    tokens = TokenInfo(
        as_int(q_positions),
        as_int(k_positions),
        as_int(segment_ids),
        as_int(k_segment_ids),
        as_int(q_critical),
        as_int(k_critical),
    )
    return rule, tokens


def _pack(fields: dict[str, Array | None]) -> tuple[Array, tuple[str, ...]]:
    """Stack the present token fields into [b, F, s] int32, F padded to a power of two (Triton block shapes)."""
    names = tuple(n for n, x in fields.items() if x is not None)
    arrays = [fields[n] for n in names]
    while len(arrays) & (len(arrays) - 1):
        arrays.append(jnp.zeros_like(arrays[0]))
    return jnp.stack(arrays, axis=1), names


@dataclasses.dataclass(frozen=True)
class _Static:
    rule: MaskRule
    sm_scale: float
    fields: tuple[tuple[str, ...], tuple[str, ...]]
    backend: str
    config: gpu.GpuConfig
    interpret: bool
    mosaic_config: mosaic.MosaicConfig | None = None

    def kernels(self):
        """The backend's kernel module and the keyword arguments the kernels share."""
        kwargs = dict(rule=self.rule, sm_scale=self.sm_scale, fields=self.fields, interpret=self.interpret)
        if self.backend == "triton":
            return gpu, {**kwargs, "config": self.config}
        if self.backend == "mosaic_gpu":  # Mosaic GPU forward; mosaic.backward: Mosaic GPU, else Triton
            return mosaic, {**kwargs, "config": self.config, "mosaic_config": self.mosaic_config}
        from pallas_kernels.block_sparse import tpu  # Mosaic TPU imports only when that backend is used

        return tpu, kwargs


def _forward(q, k, v, layout, q_tok, k_tok, st: _Static):
    kernels, kwargs = st.kernels()
    return kernels.forward(q, k, v, layout, q_tok, k_tok, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, layout, q_tok, k_tok, st: _Static):
    return _forward(q, k, v, layout, q_tok, k_tok, st)[0]


def _attention_fwd(q, k, v, layout, q_tok, k_tok, st: _Static):
    out, lse = _forward(q, k, v, layout, q_tok, k_tok, st)
    return out, (q, k, v, layout, q_tok, k_tok, out, lse)


def _attention_bwd(st: _Static, residuals, do):
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


# What `auto` runs on a Hopper GPU when the Mosaic GPU forward supports the inputs (set from the measurements in
# benchmarks/results/attention-mgpu-2026-11-23.json and attention-mgpu-bwd-2026-11-23.json: with it `auto` also runs
# the Mosaic GPU backward).
AUTO_GPU_FORWARD = "mosaic_gpu"


def resolve_backend(backend: str, q=None, layout: BlockLayout | None = None, mosaic_config=None) -> str:
    """`auto`: reference on CPU, tpu on TPU; on GPU `AUTO_GPU_FORWARD` when Mosaic GPU is available (sm_90+)
    and supports these inputs (bf16/f16, head_dim % 64, 128-row query blocks), else triton."""
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda"):
        if (
            AUTO_GPU_FORWARD == "mosaic_gpu"
            and q is not None
            and layout is not None
            and mosaic.available()
            # 4 token fields: the most the packing can produce, so `auto` never picks a kernel that then fails
            and mosaic.unsupported_reason(q.shape, q.dtype, layout, mosaic_config or mosaic.MosaicConfig(), 4)
            is None
        ):
            return "mosaic_gpu"
        return "triton"
    return {"tpu": "tpu"}.get(platform, "reference")


def _pad_seq(x: Array, block: int, fill) -> Array:
    pad = -x.shape[1] % block
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


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
    mosaic_config: mosaic.MosaicConfig | None = None,
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
        from pallas_kernels import reference

        return reference.masked_attention(q, k, v, reference.layout_token_mask(layout, rule, tokens), scale)
    sq, sk = q.shape[1], k.shape[1]
    q_tok, q_fields = _pack(
        {
            "pos": _pad_seq(tokens.q_positions, layout.block_q, -1),
            "seg": _opt_pad(tokens.q_segment_ids, layout.block_q),
            "crit": _opt_pad(tokens.q_critical, layout.block_q),
        }
    )
    k_tok, k_fields = _pack(
        {
            "pos": _pad_seq(tokens.k_positions, layout.block_k, -1),
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
            q.shape, q.dtype, layout, mosaic_config or mosaic.MosaicConfig(), max(q_tok.shape[1], k_tok.shape[1])
        )
        if reason:
            raise ValueError(f"mosaic_gpu backend: {reason}")
    st = _Static(rule, scale, (q_fields, k_fields), backend, config or gpu.GpuConfig(), interpret, mosaic_config)
    out = _attention(
        _pad_seq(q, layout.block_q, 0),
        _pad_seq(k, layout.block_k, 0),
        _pad_seq(v, layout.block_k, 0),
        layout,
        q_tok,
        k_tok,
        st,
    )
    return out[:, :sq]


def _opt_pad(x, block):
    return None if x is None else _pad_seq(x, block, 0)
