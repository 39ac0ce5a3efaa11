"""Token masks and block layouts for Sparse Reasoning Attention.

Every mask is boolean `[b, q, k]`: True where query i may attend key j. Masks are built from positions, not
array indices, so padding (position < 0), packed sequences (segment ids) and KV caches (keys at their own
positions) all follow one rule. The SRA rule (DESIGN.md): j is visible to i iff same segment,
0 <= k_pos[j] <= q_pos[i], and (q_pos[i] - k_pos[j] < window, or k_pos[j] < num_global, or
(k_critical[j] and (q_critical[i] or queries == "all"))).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

QUERIES = ("critical", "all")


# Everything here is jitted: eagerly, each small op would compile on its own for every new shape (~10x slower).


def _keys(q_positions: Array, k_positions: Array | None) -> tuple[Array, Array]:
    """Query and key positions as `[b, q, 1]` and `[b, 1, k]` for pairwise comparison."""
    k_positions = q_positions if k_positions is None else k_positions
    if k_positions.shape[0] != q_positions.shape[0]:
        raise ValueError(f"key positions batch ({k_positions.shape[0]}) must equal query batch ({q_positions.shape[0]})")
    return q_positions[:, :, None], k_positions[:, None, :]


@jax.jit
def causal_mask(
    q_positions: Int[Array, "b q"], k_positions: Int[Array, "b k"] | None = None
) -> Bool[Array, "b q k"]:
    """0 <= k_pos[j] <= q_pos[i]: causal by position; padding keys (and so padding query rows) see nothing."""
    qi, kj = _keys(q_positions, k_positions)
    return (kj >= 0) & (kj <= qi)


@partial(jax.jit, static_argnames=("window",))
def window_mask(
    q_positions: Int[Array, "b q"], window: int, k_positions: Int[Array, "b k"] | None = None
) -> Bool[Array, "b q k"]:
    """Causal keys at distance < window (the token itself included)."""
    _check_window(window)
    qi, kj = _keys(q_positions, k_positions)
    return causal_mask(q_positions, k_positions) & (qi - kj < window)


@partial(jax.jit, static_argnames=("num_global",))
def global_mask(
    q_positions: Int[Array, "b q"], num_global: int, k_positions: Int[Array, "b k"] | None = None
) -> Bool[Array, "b q k"]:
    """Causal keys among the first `num_global` positions (attention sinks)."""
    _check_num_global(num_global)
    _, kj = _keys(q_positions, k_positions)
    return causal_mask(q_positions, k_positions) & (kj < num_global)


@partial(jax.jit, static_argnames=("stride",))
def strided_mask(
    q_positions: Int[Array, "b q"], stride: int, k_positions: Int[Array, "b k"] | None = None
) -> Bool[Array, "b q k"]:
    """Causal keys whose distance is a multiple of `stride` (Sparse Transformer's strided pattern)."""
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride ({stride!r}) must be an integer >= 1")
    qi, kj = _keys(q_positions, k_positions)
    return causal_mask(q_positions, k_positions) & ((qi - kj) % stride == 0)


@partial(jax.jit, static_argnames=("num_random",))
def random_mask(
    key: PRNGKeyArray,
    q_positions: Int[Array, "b q"],
    num_random: int,
    k_positions: Int[Array, "b k"] | None = None,
) -> Bool[Array, "b q k"]:
    """Each query sees `num_random` causal keys drawn uniformly without replacement (BigBird's random part)."""
    if not isinstance(num_random, int) or num_random < 0:
        raise ValueError(f"num_random ({num_random!r}) must be an integer >= 0")
    causal = causal_mask(q_positions, k_positions)
    if num_random == 0:
        return jnp.zeros_like(causal)
    num_keys = causal.shape[-1]
    scores = jnp.where(causal, jax.random.uniform(key, causal.shape), -1.0)
    _, picked = jax.lax.top_k(scores, min(num_random, num_keys))
    chosen = jnp.any(picked[..., None] == jnp.arange(num_keys), axis=-2)
    return chosen & causal


@jax.jit
def segment_mask(
    q_segment_ids: Int[Array, "b q"], k_segment_ids: Int[Array, "b k"] | None = None
) -> Bool[Array, "b q k"]:
    """Query and key belong to the same packed sequence."""
    qi, kj = _keys(q_segment_ids, k_segment_ids)
    return qi == kj


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window ({window!r}) must be an integer >= 1 (it includes the token itself)")


def _check_num_global(num_global: int) -> None:
    if not isinstance(num_global, int) or isinstance(num_global, bool) or num_global < 0:
        raise ValueError(f"num_global ({num_global!r}) must be an integer >= 0")


@dataclasses.dataclass(frozen=True)
class SRARule:
    """Which keys a query sees, as one static, hashable value: the window (the token itself included), the global
    sinks (first `num_global` positions), which queries see distant critical keys (`queries`), and `max_critical`,
    a static bound on the critical keys of a row (the compact and `gather` paths gather that many; None means "as
    many as there are keys"). The per-token inputs (positions, flags, segments) live in `SRAMaskSpec`."""

    window: int
    num_global: int = 0
    queries: str = "critical"
    max_critical: int | None = None

    def __post_init__(self):
        _check_window(self.window)
        _check_num_global(self.num_global)
        if self.queries not in QUERIES:
            raise ValueError(f"queries ({self.queries!r}) must be one of {QUERIES}")
        if self.max_critical is not None and (
            not isinstance(self.max_critical, int) or isinstance(self.max_critical, bool) or self.max_critical < 0
        ):
            raise ValueError(f"max_critical ({self.max_critical!r}) must be None or an integer >= 0")


@dataclasses.dataclass(frozen=True)
class SRAMaskSpec:
    """Everything an attention implementation needs to evaluate the SRA rule without an `[q, k]` mask.

    Arrays are pytree leaves; `rule` (an `SRARule`: window, num_global, queries, max_critical) and
    `keys_are_queries` are static. `keys_are_queries` says key slot i holds query i (self-attention without a
    cache), which lets `gather` find each query's own key without a search. Build it with `SRAMaskSpec.create`.
    """

    q_positions: Int[Array, "b q"]
    k_positions: Int[Array, "b k"]
    q_critical: Bool[Array, "b q"]
    k_critical: Bool[Array, "b k"]
    q_segment_ids: Int[Array, "b q"] | None
    k_segment_ids: Int[Array, "b k"] | None
    rule: SRARule
    keys_are_queries: bool = False

    @classmethod
    def create(
        cls,
        positions: Int[Array, "b q"],
        critical: Bool[Array, "b q"],
        *,
        rule: SRARule | None = None,
        window: int | None = None,
        num_global: int | None = None,
        queries: str | None = None,
        segment_ids: Int[Array, "b q"] | None = None,
        k_positions: Int[Array, "b k"] | None = None,
        k_critical: Bool[Array, "b k"] | None = None,
        k_segment_ids: Int[Array, "b k"] | None = None,
        max_critical: int | None = None,
    ) -> SRAMaskSpec:
        """Validate the arguments of `sra_mask` and bundle them; keys default to the queries. The rule is `rule`,
        or built from `window`, `num_global`, `queries` (default "critical") and `max_critical` (give one or the
        other)."""
        if rule is None:
            rule = SRARule(window, num_global, "critical" if queries is None else queries, max_critical)
        elif (window, num_global, queries, max_critical) != (None, None, None, None):
            raise ValueError("give rule= or window= / num_global= / queries= / max_critical=, not both")
        keys_are_queries = k_positions is None
        if keys_are_queries:
            if k_critical is not None or k_segment_ids is not None:
                raise ValueError("k_critical / k_segment_ids need k_positions (keys default to the queries)")
            k_positions, k_critical, k_segment_ids = positions, critical, segment_ids
        elif k_critical is None:
            raise ValueError("k_positions given without k_critical: say which keys are critical")
        if (segment_ids is None) != (k_segment_ids is None):
            raise ValueError("segment ids must be given for both queries and keys, or for neither")
        if critical.shape != positions.shape:
            raise ValueError(f"critical shape {critical.shape} must equal positions shape {positions.shape}")
        if k_critical.shape != k_positions.shape:
            raise ValueError(f"k_critical shape {k_critical.shape} must equal k_positions shape {k_positions.shape}")
        if k_positions.shape[0] != positions.shape[0]:
            raise ValueError(f"key batch ({k_positions.shape[0]}) must equal query batch ({positions.shape[0]})")
        return cls(
            q_positions=positions,
            k_positions=k_positions,
            q_critical=critical,
            k_critical=k_critical,
            q_segment_ids=segment_ids,
            k_segment_ids=k_segment_ids,
            rule=rule,
            keys_are_queries=keys_are_queries,
        )

    @property
    def window(self) -> int:
        return self.rule.window

    @property
    def num_global(self) -> int:
        return self.rule.num_global

    @property
    def queries(self) -> str:
        return self.rule.queries

    @property
    def max_critical(self) -> int | None:
        return self.rule.max_critical

    @property
    def shape(self) -> tuple[int, int, int]:
        """(batch, queries, keys) of the mask this spec describes."""
        return (*self.q_positions.shape, self.k_positions.shape[1])

    def query_rows(self, start: int | Int[Array, ""], size: int) -> SRAMaskSpec:
        """The spec of query rows start .. start + size - 1 over every key (start may be traced; size static)."""
        rows = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
        return dataclasses.replace(
            self, q_positions=rows(self.q_positions), q_critical=rows(self.q_critical),
            q_segment_ids=rows(self.q_segment_ids), keys_are_queries=False,
        )

    def at_run_time(self) -> SRAMaskSpec:
        """This spec with its positions and segment ids behind an optimization barrier (`at_run_time`), so masks,
        layouts and statistics derived from them are computed when the program runs, never constant-folded by
        XLA (the critical flags are run-time values already). Values are unchanged."""
        q_positions, k_positions, q_segment_ids, k_segment_ids = at_run_time(
            (self.q_positions, self.k_positions, self.q_segment_ids, self.k_segment_ids)
        )
        return dataclasses.replace(self, q_positions=q_positions, k_positions=k_positions,
                                   q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)

    @jax.jit
    def dense_mask(self) -> Bool[Array, "b q k"]:
        """What full causal attention would see: same segment and 0 <= k_pos <= q_pos."""
        mask = causal_mask(self.q_positions, self.k_positions)
        if self.q_segment_ids is not None:
            mask &= segment_mask(self.q_segment_ids, self.k_segment_ids)
        return mask

    @jax.jit
    def to_mask(self) -> Bool[Array, "b q k"]:
        """The SRA token mask."""
        qi, kj = _keys(self.q_positions, self.k_positions)
        critical_queries = self.q_critical[:, :, None] | (self.queries == "all")
        allowed = (qi - kj < self.window) | (kj < self.num_global) | (self.k_critical[:, None, :] & critical_queries)
        return self.dense_mask() & allowed

    @jax.jit
    def density(self) -> Float[Array, " b"]:
        """Visible pairs / causal pairs, per batch row."""
        return mask_density(self.to_mask(), self.dense_mask())


jax.tree_util.register_dataclass(
    SRAMaskSpec,
    data_fields=["q_positions", "k_positions", "q_critical", "k_critical", "q_segment_ids", "k_segment_ids"],
    meta_fields=["rule", "keys_are_queries"],
)


def sra_mask(
    positions: Int[Array, "b q"],
    critical: Bool[Array, "b q"],
    *,
    window: int,
    num_global: int,
    queries: str = "critical",
    segment_ids: Int[Array, "b q"] | None = None,
    k_positions: Int[Array, "b k"] | None = None,
    k_critical: Bool[Array, "b k"] | None = None,
    k_segment_ids: Int[Array, "b k"] | None = None,
) -> Bool[Array, "b q k"]:
    """The SRA token mask (module docstring). Keys default to the queries; a valid query always sees itself."""
    return SRAMaskSpec.create(
        positions,
        critical,
        window=window,
        num_global=num_global,
        queries=queries,
        segment_ids=segment_ids,
        k_positions=k_positions,
        k_critical=k_critical,
        k_segment_ids=k_segment_ids,
    ).to_mask()


@partial(jax.jit, static_argnames=("block_q", "block_k"))
def to_block_layout(mask: Bool[Array, "*lead q k"], block_q: int, block_k: int) -> Bool[Array, "*lead nq nk"]:
    """Block (I, J) is True iff any token pair in it is visible; ragged tail blocks are padded with False.

    Works with `[b, q, k]` or `[b, h, q, k]` masks (any leading axes).
    """
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{name} ({block!r}) must be an integer >= 1")
    *lead, num_q, num_k = mask.shape
    nq, nk = -(-num_q // block_q), -(-num_k // block_k)
    pad = [(0, 0)] * len(lead) + [(0, nq * block_q - num_q), (0, nk * block_k - num_k)]
    blocks = jnp.pad(mask, pad).reshape(*lead, nq, block_q, nk, block_k)
    return jnp.any(blocks, axis=(-3, -1))


def mask_density(
    mask: Bool[Array, "b *h q k"], causal: Bool[Array, "b *h q k"] | None = None
) -> Float[Array, " b"]:
    """Visible pairs / causal pairs per batch row. `causal` defaults to causal by index (the last query sees
    every key, as with a KV cache); rows without causal pairs report density 0."""
    if causal is None:
        num_q, num_k = mask.shape[-2:]
        causal = jnp.broadcast_to(jnp.asarray(np.tril(np.ones((num_q, num_k), bool), num_k - num_q)), mask.shape)
    axes = tuple(range(1, mask.ndim))
    visible = jnp.sum(mask & causal, axis=axes, dtype=jnp.float32)
    total = jnp.sum(causal, axis=axes, dtype=jnp.float32)
    return visible / jnp.maximum(total, 1.0)


def at_run_time(tree: PyTree[Array | None]) -> PyTree[Array | None]:
    """`tree`'s arrays unchanged, behind an optimization barrier: XLA cannot constant-fold through it, so what is
    derived from them is computed when the program runs. Positions are compile-time constants in a prefill whose
    positions come from its shape (`arange`, a fresh cache's slots); without the barrier XLA evaluates every
    position-derived statistic or layout (sorts, binary searches, cumulative sums over 32k+ slots) in its
    slow constant-folding interpreter, once per layer, which costs seconds of compile time each."""
    return jax.lax.optimization_barrier(tree)


def _sort_keys(segments: Int[Array, "b k"], positions: Int[Array, "b k"], keep: Bool[Array, "b k"],
               flags: Bool[Array, "b k"]):
    """((segment, position) of the kept keys sorted lexicographically per row, dropped keys last; the running
    count of `flags` along that order, [b, k + 1] from 0: entry i counts the flagged keys among the first i).

    The sort holds positions and segments only (the flags follow by its permutation), so the layers of a model,
    whose keys share positions but not flags, share one sort once XLA eliminates the common subexpressions."""
    top = jnp.iinfo(jnp.int32).max
    seg = jnp.where(keep, segments.astype(jnp.int32), top)
    pos = jnp.where(keep, positions.astype(jnp.int32), top)
    order = jax.lax.broadcasted_iota(jnp.int32, seg.shape, 1)
    seg, pos, order = jax.lax.sort((seg, pos, order), dimension=1, num_keys=2)  # stable: ties keep slot order
    flags = jnp.take_along_axis((keep & flags).astype(jnp.int32), order, axis=1, mode="promise_in_bounds")
    running = jnp.cumsum(jnp.pad(flags, ((0, 0), (1, 0))), axis=1, dtype=jnp.int32)
    return (seg, pos), running


def _count_below(sorted_keys, segment: Int[Array, "b t"], position: Int[Array, "b t"]) -> Int[Array, "b t"]:
    """Per target: how many sorted keys have (segment, position) < (segment_t, position_t), by binary search in a
    `fori_loop` (ceil(log2(k + 1)) rounds of one gather each, so O(t log k) and no [t, k] array)."""
    seg_keys, pos_keys = sorted_keys
    n = seg_keys.shape[1]

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        at = jnp.minimum(mid, n - 1)
        s_mid = jnp.take_along_axis(seg_keys, at, axis=1, mode="promise_in_bounds")  # 0 <= at < n
        p_mid = jnp.take_along_axis(pos_keys, at, axis=1, mode="promise_in_bounds")
        below = (s_mid < segment) | ((s_mid == segment) & (p_mid < position))
        open_ = lo < hi
        return jnp.where(open_ & below, mid + 1, lo), jnp.where(open_ & ~below, mid, hi)

    start = (jnp.zeros(segment.shape, jnp.int32), jnp.full(segment.shape, n, jnp.int32))
    return jax.lax.fori_loop(0, max(1, int(n).bit_length()), step, start)[0]


def _range_counts(keys, segment: Int[Array, "b q"], bounds: list[Array]) -> list[Array]:
    """`_count_below` of every bound in one search (targets stacked along the query axis)."""
    num_q = segment.shape[1]
    stacked = _count_below(keys, jnp.tile(segment, (1, len(bounds))), jnp.concatenate(bounds, axis=1))
    return [stacked[:, i * num_q:(i + 1) * num_q] for i in range(len(bounds))]


@jax.jit
def visible_pair_counts(spec: SRAMaskSpec) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
    """(causal pairs, visible pairs) per batch row: `spec.dense_mask().sum((1, 2))` and `spec.to_mask().sum((1, 2))`
    computed from counts, in O((q + k) log k) time and memory, never an `[q, k]` array.

    For a valid query at position p (segment g) the visible keys are the disjoint union of: keys of g at positions
    [a, p] with a = max(0, p - window + 1) (the window), keys of g at [0, min(num_global, a) - 1] (globals not
    already in the window), and, when the query takes critical keys, critical keys of g at [num_global, a - 1].
    Each term is a range count over the row's keys sorted once by (segment, position) (the critical term reads the
    running count of critical keys at the ranks the search finds); positions may be any integers (duplicates and
    gaps included), exactly as the mask evaluates them.
    """
    # Positions at run time: constants in a prefill, they would make XLA evaluate the sort and searches of every
    # layer while compiling (seconds each at 32k).
    spec = spec.at_run_time()
    b, num_q = spec.q_positions.shape
    zeros_q = jnp.zeros((b, num_q), jnp.int32)
    zeros_k = jnp.zeros(spec.k_positions.shape, jnp.int32)
    q_seg = zeros_q if spec.q_segment_ids is None else spec.q_segment_ids.astype(jnp.int32)
    k_seg = zeros_k if spec.k_segment_ids is None else spec.k_segment_ids.astype(jnp.int32)
    p = spec.q_positions.astype(jnp.int32)
    keys, critical_below = _sort_keys(k_seg, spec.k_positions, spec.k_positions >= 0, spec.k_critical)

    valid_q = p >= 0
    a = jnp.maximum(p - (spec.window - 1), 0)
    g = jnp.minimum(spec.num_global, a)
    # Keys of the query's segment at positions [lo, hi] = below(hi + 1) - below(lo), all bounds in one search; the
    # critical ones below a bound are the running critical count at the bound's rank (0 <= rank <= k).
    below_0, below_a, below_g, below_end, below_num_global = _range_counts(
        keys, q_seg, [zeros_q, a, g, p + 1, jnp.full_like(p, spec.num_global)]
    )
    at_rank = lambda rank: jnp.take_along_axis(critical_below, rank, axis=1, mode="promise_in_bounds")
    crit_g, crit_a = at_rank(below_num_global), at_rank(below_a)
    causal = jnp.where(valid_q, below_end - below_0, 0)
    window = below_end - below_a  # [a, p]
    globals_ = below_g - below_0  # [0, min(num_global, a) - 1]
    takes_critical = spec.q_critical | (spec.queries == "all")
    crit = jnp.where(takes_critical & (spec.num_global < a), crit_a - crit_g, 0)  # critical keys at [num_global, a - 1]
    visible = jnp.where(valid_q, window + globals_ + crit, 0)
    return causal.sum(-1, dtype=jnp.float32), visible.sum(-1, dtype=jnp.float32)
