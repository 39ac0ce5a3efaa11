"""`KVCache`: keys, values, positions and SRA critical flags of every layer, for prefill + token-by-token decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Int

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn.decode import left_padded_layout


@struct.dataclass
class KVCache:
    """Fixed-size cache (static `max_len`, so decoding compiles once); a call writes its tokens at slot `index`.

    k, v           [layers, batch, max_len, kv_heads, head_dim]
    positions      [batch, max_len] int32, -1 marks an empty slot (never visible)
    critical       [layers, batch, max_len] bool, the SRA critical flag of each cached key
    threshold      [layers, batch] float32, router-score cut-off fixed at prefill (first call, index == 0): the k-th
                   largest score of the prompt; a later token is critical iff its score >= threshold
    index          [] int32, the next free slot (shared by the batch: pad prompts on the left)
    critical_slots [layers, batch, max_len] int32, each row's critical slots in ascending order (the first
                   num_critical entries; -1 after them in a cache built by `init`): the list the sparse decode kernel
                   reads. Kept in step with `critical` by every model call, which appends the slots it flags (a call
                   at index 0 starts the list afresh), so a decode step never rebuilds it from the flags.
    num_critical   [layers, batch] int32, the length of each row's list = critical[layer, row].sum()
    critical_capacity static: at most this many critical keys per layer and row (default max_len: no limit). It is
                   the static bound prefill attention over the cache gathers (`SRAMaskSpec.max_critical`); the SRA
                   layer enforces it by clearing, in slot order, critical flags that would exceed it. A capacity of
                   num_critical(prompt length) + (max_len - prompt length), as `sra_jax.generate` sets, never clears
                   one: a prefill from slot 0 flags at most num_critical(its length) tokens and each later token at
                   most itself.

    Rewriting `critical` by hand (tests, synthetic caches) needs `with_critical`, which rebuilds the lists.

    A call writes whatever positions the caller gives, so decode steps through the sparse decode kernel (which
    reads slots, not positions) check the left-padded layout it needs on the positions, at every step in every
    layer, behind a `lax.cond` (on a GPU the host then waits for the stream once per layer). A cache whose layout
    holds by construction skips both: `LeftPaddedKVCache`.
    """

    # Leaves are typed loosely so that pytree utilities may rebuild the cache with non-array leaves.
    k: Any
    v: Any
    positions: Any
    critical: Any
    threshold: Any
    index: Any
    critical_slots: Any
    num_critical: Any
    critical_capacity: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def init(
        cls,
        config: LlamaConfig,
        batch: int,
        max_len: int,
        dtype=jnp.float32,
        *,
        layout: str = "checked",
        critical_capacity: int | None = None,
    ) -> KVCache:
        """An empty cache. `layout` is "checked" (the only layout a cache that takes the caller's positions can
        have); a left-padded cache is built from its prompt lengths with `LeftPaddedKVCache.create`."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        if layout != "checked":
            raise ValueError(
                f"KVCache layout={layout!r}: a KVCache stores the positions its callers give, so it can only check a "
                f"layout (layout='checked'); build a cache whose left-padded layout holds by construction with "
                f"LeftPaddedKVCache.create(config, prompt_lengths, prompt_len=..., max_len=...)"
            )
        if critical_capacity is not None and (
            not isinstance(critical_capacity, int) or isinstance(critical_capacity, bool) or critical_capacity < 0
        ):
            raise ValueError(f"KVCache critical_capacity={critical_capacity!r} must be None or an integer >= 0")
        layers = config.num_hidden_layers
        shape = (layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            critical=jnp.zeros((layers, batch, max_len), bool),
            threshold=jnp.full((layers, batch), jnp.inf, jnp.float32),
            index=jnp.zeros((), jnp.int32),
            critical_slots=jnp.full((layers, batch, max_len), -1, jnp.int32),
            num_critical=jnp.zeros((layers, batch), jnp.int32),
            critical_capacity=None if critical_capacity is None or critical_capacity >= max_len else critical_capacity,
        )

    def with_critical(self, critical: Bool[Array, "layers b n"]) -> KVCache:
        """This cache with its critical flags replaced and the slot lists rebuilt from them (O(layers * b * n):
        for caches filled by hand, never needed between model calls)."""
        if critical.shape != self.critical.shape:
            raise ValueError(f"critical {critical.shape} must be [layers, batch, max_len] = {self.critical.shape}")
        slots, counts = critical_slot_lists(critical)
        return self.replace(critical=critical.astype(bool), critical_slots=slots, num_critical=counts)

    def append_critical(self, layer: int, critical: Bool[Array, "b s"]) -> KVCache:
        """Append the slots of this call's critical tokens (slots index .. index + s - 1) to `layer`'s lists, in
        ascending order after the ones already there (a call at index 0 starts the lists afresh). O(b * s): one
        scatter of the flagged slots, the other updates dropped; the lists stay ascending because `index` only
        grows between calls."""
        b, s = critical.shape
        index = self.index.astype(jnp.int32)
        count = jnp.where(index == 0, 0, self.num_critical[layer])
        rank = jnp.cumsum(critical, axis=1, dtype=jnp.int32) - 1
        target = jnp.where(critical, count[:, None] + rank, self.max_len)  # past the end: dropped
        slots = jnp.broadcast_to(index + jnp.arange(s, dtype=jnp.int32), (b, s))
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
        return self.replace(
            critical_slots=self.critical_slots.at[layer, rows, target].set(slots, mode="drop"),
            num_critical=self.num_critical.at[layer].set(count + critical.sum(1, dtype=jnp.int32)),
        )

    @property
    def capacity(self) -> int:
        """The static bound on critical keys per layer and row: `critical_capacity`, or max_len without one."""
        return self.max_len if self.critical_capacity is None else min(self.critical_capacity, self.max_len)

    def within_capacity(self, layer: int, critical: Bool[Array, "b s"]) -> Bool[Array, "b s"]:
        """`critical` of a call at `index` with the flags past `layer`'s capacity cleared (in slot order): the
        flags the cache can hold. Unchanged (no work) without a capacity below max_len."""
        if self.critical_capacity is None or self.critical_capacity >= self.max_len:
            return critical
        count = jnp.where(self.index == 0, 0, self.num_critical[layer])
        rank = jnp.cumsum(critical, axis=1, dtype=jnp.int32)  # 1-based rank among this call's flags
        return critical & (count[:, None] + rank <= self.critical_capacity)

    @property
    def layout(self) -> str:
        """Always "checked": decode steps verify the left-padded layout on the positions (see the class docstring)."""
        return "checked"

    def kernel_layout(self, lengths: Int[Array, ""]) -> tuple[Int[Array, " b"], Bool[Array, ""] | None]:
        """(kv_start, ok) for a decode step whose cache holds `lengths` slots: each row's first valid slot, and
        whether the positions have the left-padded layout the sparse decode kernel reads (checked here, at run
        time; see `sra_jax.nn.decode.left_padded_layout`)."""
        return left_padded_layout(self.positions, lengths)

    def next_positions(self, s: int) -> Int[Array, "b s"]:
        """Positions of the next `s` tokens when the caller gives none: index, index + 1, ... in every row."""
        return jnp.broadcast_to(self.index + jnp.arange(s, dtype=jnp.int32), (self.batch, s))

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]


@struct.dataclass
class LeftPaddedKVCache(KVCache):
    """A `KVCache` for prompts padded on the left, whose layout holds by construction: row i's prompt of
    prompt_lengths[i] tokens ends at slot prompt_len - 1, so slot j holds position j - kv_start[i] (kv_start =
    prompt_len - prompt_lengths) and slots before kv_start are empty. The cache writes these positions itself: a
    model call with this cache takes no `positions` (see `Llama.__call__`), so no call can break the layout, and
    decode steps run the sparse decode kernel with no layout check and no `lax.cond`.

    kv_start   [batch] int32, each row's first prompt slot (a new token in a slot before it is padding)
    """

    kv_start: Any = None

    @classmethod
    def create(
        cls,
        config: LlamaConfig,
        prompt_lengths: Int[Array, " b"] | Sequence[int],
        *,
        prompt_len: int,
        max_len: int,
        dtype=jnp.float32,
        critical_capacity: int | None = None,
    ) -> LeftPaddedKVCache:
        """An empty cache for prompts of `prompt_lengths` tokens left-padded to `prompt_len` (static) slots.
        A row of length 0 starts at the first slot after the prompt (its first token comes with the next call).
        Concrete lengths must lie in [0, prompt_len] (ValueError otherwise); traced ones are clipped to that range,
        which keeps the layout whatever they hold."""
        if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 0 <= prompt_len < max_len:
            raise ValueError(f"LeftPaddedKVCache prompt_len={prompt_len!r} must be an integer in [0, max_len={max_len})"
                             " (a row's first token needs a slot)")
        lengths = jnp.asarray(prompt_lengths)
        if lengths.ndim != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"prompt_lengths must be one integer per row, got shape {lengths.shape} {lengths.dtype}")
        if not isinstance(lengths, jax.core.Tracer):
            host = np.asarray(lengths)
            if host.size and (host.min() < 0 or host.max() > prompt_len):
                raise ValueError(f"prompt_lengths {host.tolist()} must lie in [0, prompt_len={prompt_len}]")
        base = KVCache.init(config, lengths.shape[0], max_len, dtype, critical_capacity=critical_capacity)
        kv_start = prompt_len - jnp.clip(lengths.astype(jnp.int32), 0, prompt_len)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(KVCache)}, kv_start=kv_start)

    @property
    def layout(self) -> str:
        """Always "left_padded": guaranteed by construction, never checked."""
        return "left_padded"

    def kernel_layout(self, lengths: Int[Array, ""]) -> tuple[Int[Array, " b"], None]:
        """(kv_start, None): the layout holds by construction, nothing to check."""
        return self.kv_start, None

    def next_positions(self, s: int) -> Int[Array, "b s"]:
        """Positions of the next `s` tokens, from their slots: slot - kv_start, -1 before kv_start (padding)."""
        slots = self.index + jnp.arange(s, dtype=jnp.int32)
        positions = slots[None, :] - self.kv_start[:, None]
        return jnp.where(positions >= 0, positions, -1)


def generation_capacity(sra: SRAConfig | None, prompt_len: int, max_len: int) -> int | None:
    """`critical_capacity` for a cache filled by one prefill of `prompt_len` tokens from slot 0, then tokens one
    call at a time up to `max_len`: num_critical(prompt_len) + (max_len - prompt_len). A true bound that never
    clears a flag: the prefill selects at most num_critical(its length) per row (top-k, Gumbel top-k, sparsemax's
    subset of the top-k, Bernoulli's cap), and each later token flags at most itself. None without SRA."""
    if sra is None:
        return None
    return min(max_len, sra.num_critical(prompt_len) + max_len - prompt_len)


def critical_slot_lists(critical: Bool[Array, "*lead n"]) -> tuple[Int[Array, "*lead n"], Int[Array, " *lead"]]:
    """(ascending critical slots of each row padded with -1 to the row length, number of critical slots): the
    lists `KVCache` keeps, built from the flags in one pass (a stable sort of the slots by "not critical")."""
    n = critical.shape[-1]
    slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), critical.shape)
    _, ordered = jax.lax.sort(((~critical).astype(jnp.int32), slots), is_stable=True, num_keys=1)
    counts = critical.sum(-1, dtype=jnp.int32)
    used = jnp.arange(n) < counts[..., None]
    return jnp.where(used, ordered, -1), counts


def forwarding_replace(own: Sequence[str]):
    """A `replace` for a cache that wraps a KVCache in its field `kv` (NSACache, DSACache): the fields named in `own`
    replace themselves, any other field (positions, index, ...) is the inner cache's, as `Llama` expects.
    flax.struct.dataclass installs a plain `replace`; assign this one over it."""

    def replace(self, **updates: Any):
        mine = {name: updates.pop(name) for name in ("kv", *own) if name in updates}
        kv = mine.pop("kv", self.kv)
        return dataclasses.replace(self, kv=kv.replace(**updates) if updates else kv, **mine)

    return replace
