"""Observability: metrics to JSONL and TensorBoard (process 0 only), model FLOPs and MFU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, keyed by a substring of `device.device_kind`. CPU has no entry: MFU is not reported.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6 lite": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_flops(num_params: int, num_embed_params: int, positions: np.ndarray, *, num_layers: int, num_heads: int,
                head_dim: int, mask_density: float = 1.0, segment_ids: np.ndarray | None = None) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one batch, counting real tokens only (not padding).

    Matmuls: 6 * (non-embedding params) per token. Attention: 4 * head_dim * heads per visible (query, key) pair per
    layer in the forward pass, with causal pairs n (n + 1) / 2 per sequence scaled by the measured mask density.
    With `segment_ids` (packed rows) each segment is a sequence.
    """
    valid = (np.asarray(positions) >= 0).reshape(-1, positions.shape[-1])
    if segment_ids is None:
        lengths = valid.sum(-1).astype(np.float64)
    else:  # tokens per (row, segment id); padding (id 0) has no valid token
        ids = np.asarray(segment_ids).reshape(valid.shape).astype(np.int64)
        flat = np.arange(valid.shape[0])[:, None] * (valid.shape[1] + 1) + ids
        lengths = np.bincount(flat[valid], minlength=1).astype(np.float64)
    tokens = lengths.sum()
    pairs = (lengths * (lengths + 1) / 2).sum() * mask_density
    return float(6 * (num_params - num_embed_params) * tokens + 3 * 4 * head_dim * num_heads * num_layers * pairs)


class MetricsLogger:
    """Appends one JSON object per logged step to `dir/metrics.jsonl` (with "time", wall-clock Unix seconds) and
    mirrors scalars to TensorBoard; `config_yaml` (the resolved run config) is written to `dir/config.yaml`."""

    def __init__(self, directory: str | os.PathLike | None, *, tensorboard: bool = True, config_yaml: str | None = None):
        self.enabled = directory is not None and jax.process_index() == 0
        self.jsonl = None
        self.writer = None
        if not self.enabled:
            return
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if config_yaml is not None:
            (path / "config.yaml").write_text(config_yaml)
        self.jsonl = open(path / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(path / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items() if v is not None}}
        self.jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in record.items():
                if name != "step":
                    self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
