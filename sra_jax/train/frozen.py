"""Checkpoints of a router-only run hold what trains, and point at the frozen weights.

A run with `init.from` and `init.trainable: router` never changes the Llama's weights (they stay bit-identical to the
source), so with `checkpoint.frozen: reference` (the default) each checkpoint stores only the routers' parameters,
their optimizer state, the step and the RNG, and its `meta` item names the source (absolute path or hub name) and
its `fingerprint`. A resume reloads the frozen weights from `init.from` (refused when its fingerprint differs), and
`sra_jax.convert.source` does the same for `export`, `generate` and `eval`. For Llama 3 8B each checkpoint then
skips a 16 GB write and checksum. `checkpoint.frozen: copy` stores every parameter instead (a self-contained folder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from sra_jax.convert.source import HUB_PREFIX, fingerprint, resolve_source
from sra_jax.train.update import is_router_param


@dataclasses.dataclass(frozen=True)
class FrozenWeights:
    """Where the frozen (non-router) parameters of a run's checkpoints come from."""

    source: str  # an absolute folder or a hub name hf://org/name[@revision]
    fingerprint: str  # `sra_jax.convert.source.fingerprint` of it

    @property
    def meta(self) -> dict[str, str]:
        return {"source": self.source, "fingerprint": self.fingerprint, "stored": "router"}

    @staticmethod
    def slim(state: Any) -> Any:
        """`state` (a TrainState) with only the routers' parameters."""
        return state.replace(params=nnx.filter_state(state.params, is_router_param))

    @staticmethod
    def merge(restored: Any, full: Any) -> Any:
        """A restored slim state completed with the frozen parameters of `full` (a TrainState holding them)."""
        frozen = nnx.split_state(full.params, is_router_param, ...)[1]
        return restored.replace(params=nnx.merge_state(frozen, restored.params))


def frozen_weights(config) -> FrozenWeights | None:
    """The frozen-weight reference of a `TrainConfig`'s checkpoints, or None when they store every parameter
    (no init.from, init.trainable all, or checkpoint.frozen copy)."""
    if config.init.from_ is None or config.init.trainable != "router" or config.checkpoint.frozen != "reference":
        return None
    source = config.init.from_
    if not source.startswith(HUB_PREFIX):  # the step folder of a training checkpoint, not its run folder
        source = str(resolve_source(source).path.absolute())
    return FrozenWeights(source, fingerprint(source))


def mismatch(saved: dict[str, Any] | None, current: FrozenWeights | None) -> str | None:
    """Why a checkpoint whose meta holds `saved` (its "frozen" entry, None when it stores every parameter) cannot be
    restored by a run whose reference is `current`; None when it can."""
    if saved is None and current is None:
        return None
    if saved is None:
        return ("it stores every parameter, but this run's checkpoints store only the routers (set "
                "checkpoint.frozen=copy to resume it)")
    if current is None:
        return (f"it stores only the routers (the frozen weights come from {saved.get('source')}), but this run "
                f"stores every parameter (init.trainable=router with init.from and checkpoint.frozen=reference "
                f"resume it)")
    if saved.get("fingerprint") != current.fingerprint:
        return (f"its frozen weights came from {saved.get('source')} (fingerprint {saved.get('fingerprint')}), but "
                f"init.from={current.source} has fingerprint {current.fingerprint}: not the same weights")
    return None
