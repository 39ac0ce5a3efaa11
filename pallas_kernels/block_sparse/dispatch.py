"""What the block-sparse entry points share: the backend choice, the kernel call description, token-field packing
and sequence padding (`api.block_sparse_attention` and `compact.sra_compact_attention` both use them)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array

from pallas_kernels.block_sparse import gpu, mosaic, mosaic_common
from pallas_kernels.block_sparse.layout import BlockLayout
from pallas_kernels.block_sparse.token_mask import MaskRule

BACKENDS = ("auto", "triton", "mosaic_gpu", "tpu", "reference")


def pack_fields(fields: dict[str, Array | None]) -> tuple[Array, tuple[str, ...]]:
    """Stack the present token fields into [b, F, s] int32, F padded to a power of two (Triton block shapes)."""
    names = tuple(n for n, x in fields.items() if x is not None)
    arrays = [fields[n] for n in names]
    while len(arrays) & (len(arrays) - 1):
        arrays.append(jnp.zeros_like(arrays[0]))
    return jnp.stack(arrays, axis=1), names


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """Static description of one block-sparse kernel call: the rule, scale, packed token field names, backend
    and its configs. Hashable (it is a nondiff argument of the custom_vjp)."""

    rule: MaskRule
    sm_scale: float
    fields: tuple[tuple[str, ...], tuple[str, ...]]
    backend: str
    config: gpu.GpuConfig
    interpret: bool
    mosaic_config: mosaic_common.MosaicConfig | None = None

    def kernels(self):
        """The backend's kernel module and the keyword arguments the kernels share."""
        kwargs = dict(rule=self.rule, sm_scale=self.sm_scale, fields=self.fields, interpret=self.interpret)
        if self.backend == "triton":
            return gpu, {**kwargs, "config": self.config}
        if self.backend == "mosaic_gpu":  # Mosaic GPU forward; mosaic.backward: Mosaic GPU, else Triton
            return mosaic, {**kwargs, "config": self.config, "mosaic_config": self.mosaic_config}
        from pallas_kernels.block_sparse import tpu  # Mosaic TPU imports only when that backend is used

        return tpu, kwargs


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
            and mosaic_common.available()
            # 4 token fields: the most the packing can produce, so `auto` never picks a kernel that then fails
            and mosaic.unsupported_reason(q.shape, q.dtype, layout, mosaic_config or mosaic_common.MosaicConfig(), 4)
            is None
        ):
            return "mosaic_gpu"
        return "triton"
    return {"tpu": "tpu"}.get(platform, "reference")


def pad_seq(x: Array, block: int, fill) -> Array:
    """x [b, s, ...] padded along s to a multiple of `block` with `fill`."""
    pad = -x.shape[1] % block
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
