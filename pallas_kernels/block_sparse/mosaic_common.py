"""What the Mosaic GPU forward (`mosaic.py`) and backward (`mosaic_bwd.py`) share: the config, the shared-memory
limit, the lazy Mosaic GPU import and the token rule on tiles.

Mosaic GPU is imported lazily (`loadload_plgpu()`), so this module imports on any jax/jaxlib (CPU included).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from pallas_kernels.block_sparse.token_mask import MaskRule

LOG2E = math.log2(math.e)
NEG = -1e30
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Forward: block_q query rows per compute warpgroup (a CTA covers 2 * block_q rows); block_kv keys per
    pipeline step (divides the layout's block_k); stages: shared-memory ring depth for K/V.
    Backward (`mosaic_bwd.py`): backward="mosaic" (Mosaic GPU dQ and dK/dV kernels) or "triton" (the Triton
    kernels of gpu.py); dq_block_kv keys per dQ step, dkv_block_q queries per dK/dV step, bwd_stages ring depth."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    backward: str = "mosaic"
    dq_block_kv: int = 128  # 128 vs 64: 22.60 vs 22.78 ms backward at S=32k, 100% (mgpu-bwd run 2)
    dkv_block_q: int = 64
    bwd_stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q}: a compute warpgroup owns exactly 64 rows (one wgmma M)")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")
        if self.backward not in ("mosaic", "triton"):
            raise ValueError(f"backward={self.backward!r} must be 'mosaic' or 'triton'")
        for name in ("dq_block_kv", "dkv_block_q"):
            if getattr(self, name) not in (64, 128):
                raise ValueError(f"{name}={getattr(self, name)} must be 64 or 128")
        if self.bwd_stages < 2:
            raise ValueError(f"bwd_stages={self.bwd_stages} must be >= 2")

    @property
    def rows_per_cta(self) -> int:
        return COMPUTE_WGS * self.block_q

    def smem_bytes(self, head_dim: int, itemsize: int, num_fields: int) -> int:
        qo = COMPUTE_WGS * self.block_q * head_dim * itemsize
        kv = 2 * self.stages * self.block_kv * head_dim * itemsize
        tokens = 4 * (self.stages * num_fields * self.block_kv + COMPUTE_WGS * num_fields * self.block_q)
        return qo + kv + tokens + 4 * COMPUTE_WGS * self.block_q


SMEM_LIMIT = 227 * 1024


def available() -> bool:
    """Mosaic GPU importable and a Hopper-or-newer CUDA device present."""
    try:
        load_plgpu()
        dev = jax.devices()[0]
    except Exception:  # noqa: BLE001 - any import/backend failure means "not available"
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    try:
        return cc is not None and float(cc) >= 9.0
    except (TypeError, ValueError):
        return False


def load_plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415 - lazy: jaxlib may lack it

    return plgpu


def tile_visible(rule: MaskRule, qp, kp, qs=None, ks=None, qc=None, kc=None):
    """The token rule of `token_mask.visible` on same-shaped tiles, written with the element-wise ops that
    Mosaic GPU lowers (no abs, no implicit broadcasting of differently-shaped operands)."""
    ok = (qp >= 0) & (kp >= 0)
    if rule.causal:
        ok = ok & (kp <= qp)
    if rule.has_segments:
        ok = ok & (qs == ks)
    if rule.window is not None:
        dist = qp - kp
        near = dist < rule.window
        if not rule.causal:
            near = near & (kp - qp < rule.window)
        keep = near | (kp == qp)
        if rule.num_global:
            keep = keep | (kp < rule.num_global)
        if rule.has_k_critical:
            crit = kc != 0
            if rule.has_q_critical:
                crit = crit & (qc != 0)
            keep = keep | crit
        ok = ok & keep
    return ok
