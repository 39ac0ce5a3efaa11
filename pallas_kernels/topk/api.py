"""Public top-k gather attention: input checks, normalised arguments, backend choice, custom_vjp."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.topk import gpu, reference

BACKENDS = ("auto", "triton", "tpu", "reference")


@dataclasses.dataclass(frozen=True)
class TopkCall:
    """Static arguments of one call (hashable: the custom_vjp's non-differentiable argument)."""

    backend: str
    causal: bool
    sm_scale: float
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool

    def forward(self, q, k, v, idx, aux):
        if self.backend == "tpu":
            from pallas_kernels.topk import tpu  # Mosaic TPU imports only when that backend is used

            return tpu.forward(q, k, v, idx, *aux, sm_scale=self.sm_scale, block_k=self.block_k,
                               interpret=self.interpret)  # fmt: skip
        return gpu.forward(q, k, v, idx, *aux, **self._triton_kwargs())

    def backward(self, q, k, v, out, lse, do, idx, aux):
        if self.backend == "tpu":
            from pallas_kernels.topk import tpu

            return tpu.backward(q, k, v, out, lse, do, idx, *aux, sm_scale=self.sm_scale, block_k=self.block_k,
                                interpret=self.interpret)  # fmt: skip
        return gpu.backward(q, k, v, out, lse, do, idx, *aux, **self._triton_kwargs())

    def _triton_kwargs(self) -> dict:
        kw = dataclasses.asdict(self)
        del kw["backend"]
        return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, idx, aux, call: TopkCall):
    return call.forward(q, k, v, idx, aux)[0]


def _attention_fwd(q, k, v, idx, aux, call: TopkCall):
    out, lse = call.forward(q, k, v, idx, aux)
    return out, (q, k, v, idx, aux, out, lse)


def _attention_bwd(call: TopkCall, residuals, do):
    q, k, v, idx, aux, out, lse = residuals
    dq, dk, dv = call.backward(q, k, v, out, lse, do, idx, aux)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, indices, valid, backend, block_k):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [b, s, h, d]; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype {q.dtype} not supported (bf16, f16, f32)")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must match and share batch and head_dim with q {q.shape}")
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({hq})")
    if indices.ndim not in (3, 4) or indices.shape[:2] != (b, sq) or (indices.ndim == 4 and indices.shape[2] != hkv):
        raise ValueError(f"indices must be [b={b}, sq={sq}, k] or [b, sq, hkv={hkv}, k], got {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if valid is not None and valid.shape != indices.shape:
        raise ValueError(f"valid {valid.shape} must have the shape of indices {indices.shape}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"{block_k=} must be a power of two >= 16")


def _seq_arg(x, name, shape, fill):
    if x is None:
        return jnp.broadcast_to(jnp.asarray(fill, jnp.int32), shape)
    if x.shape != shape:
        raise ValueError(f"{name} {x.shape} must be {shape}")
    return x.astype(jnp.int32)


def topk_attention(
    q: Float[Array, "b sq hq d"],
    k: Float[Array, "b sk hkv d"],
    v: Float[Array, "b sk hkv d"],
    indices: Int[Array, "b sq k"] | Int[Array, "b sq hkv k"],
    *,
    valid: Bool[Array, "b sq k"] | Bool[Array, "b sq hkv k"] | None = None,
    causal: bool = True,
    q_positions: Int[Array, "b sq"] | None = None,
    k_positions: Int[Array, "b sk"] | None = None,
    segment_ids: Int[Array, "b sq"] | None = None,
    k_segment_ids: Int[Array, "b sk"] | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "b sq hq d"]:
    """Attention of each query over its own list of keys: query t attends to keys indices[t, :] (shared by all
    heads, [b, sq, k], or by the query heads of each GQA group, [b, sq, hkv, k]). A slot is empty when its index is
    negative or out of range or `valid` is False there, and invisible when the token rule fails: positions < 0 are
    padding, segment ids must match, and (causal) the key's position must not exceed the query's. Positions default
    to 0 .. s - 1 and segment ids to one segment (k_segment_ids to segment_ids when sq == sk). Lists must hold
    distinct keys, as a top-k does: the forward counts every slot, but a key repeated within one tile of `block_k`
    slots gets one of its dK/dV shares in interpret mode and in the TPU backward (a gather, add, write-back). Rows
    with no visible slot give zeros and zero gradients. Differentiable (custom_vjp: the backward scatters dK and dV to the listed keys).
    backend: "triton" (GPU Pallas), "tpu" (Mosaic TPU), "reference" (gathered jnp), "auto" (by platform);
    interpret=True runs the Triton / TPU kernels in interpret mode (CPU tests). num_warps / num_stages tune Triton."""
    _check(q, k, v, indices, valid, backend, block_k)
    b, sq, _, d = q.shape
    sk = k.shape[1]
    q_pos = _seq_arg(q_positions, "q_positions", (b, sq), jnp.arange(sq, dtype=jnp.int32))
    k_pos = _seq_arg(k_positions, "k_positions", (b, sk), jnp.arange(sk, dtype=jnp.int32))
    q_seg = _seq_arg(segment_ids, "segment_ids", (b, sq), 0)
    if k_segment_ids is None and segment_ids is not None:
        if sq != sk:
            raise ValueError(f"k_segment_ids is needed when segment_ids is given and sq ({sq}) != sk ({sk})")
        k_segment_ids = segment_ids
    k_seg = _seq_arg(k_segment_ids, "k_segment_ids", (b, sk), 0)
    idx = indices.astype(jnp.int32)
    if valid is not None:
        idx = jnp.where(valid, idx, -1)
    idx = idx[:, :, None] if idx.ndim == 3 else idx
    idx = jax.lax.stop_gradient(idx)
    scale = d**-0.5 if sm_scale is None else float(sm_scale)
    if backend == "auto":
        backend = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "tpu"}.get(
            jax.default_backend(), "reference"
        )
    if backend == "reference":
        return reference.topk_attention(q, k, v, idx, q_pos, k_pos, q_seg, k_seg, causal=causal, sm_scale=scale)
    idx = jnp.pad(idx, [(0, 0)] * 3 + [(0, -idx.shape[-1] % block_k)], constant_values=-1)
    call = TopkCall(backend, causal, scale, block_k, num_warps, num_stages, interpret)
    if backend == "tpu":  # the kernel reads the token rule's verdict per slot
        ok = reference.slot_visible(idx, q_pos, k_pos, q_seg, k_seg, causal=causal)
        return _attention(q, k, v, idx, (ok,), call)
    # Tiles after the last non-empty slot hold nothing: each program's loop stops there.
    last = jnp.max(jnp.where(idx >= 0, jnp.arange(idx.shape[-1]), -1), axis=-1)
    ntile = ((last + block_k) // block_k).astype(jnp.int32)
    return _attention(q, k, v, idx, (ntile, (q_pos, q_seg, k_pos, k_seg)), call)
