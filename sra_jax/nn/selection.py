"""An SRA layer's critical set from its router scores under an `SRAConfig`: per-row counts, and the config's
selection policy (`sra_jax.ops.selection_policy`) applied with the config's k, tau and hard settings.

How the router gets a gradient: the attention mask is boolean, so the selection cannot reach the loss through it.
Instead each SRA layer multiplies the values of its current tokens by `1 + gate - stop_gradient(gate)`, where `gate`
is the (straight-through) selection value of that token. The factor is exactly 1 in the forward pass (outputs are
bit-identical to the ungated model), and d loss / d gate_j = sum_i,h attn[h, i, j] * <d loss / d out[h, i], v[h, j]>:
how much the layer output would change if key j contributed more. Through the straight-through estimator of
`gumbel_topk` (or sparsemax's Jacobian) this reaches the router logits. Plain top-k has no such path (its gate is a
constant 0/1); train it with the policy gradient on `ModelAux.selection_log_prob` instead. The Bernoulli mode's
gate is the binary-concrete relaxation sigmoid(logit / tau + logistic noise) with the same straight-through trick.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sra_jax.config import SRAConfig
from sra_jax.ops.selection import decode_threshold
from sra_jax.ops.selection_policy import Selection, check_segment_support, get_selection_policy

__all__ = [
    "Selection",
    "count_table",
    "critical_counts",
    "decode_threshold",
    "forced_selection",
    "segment_select",
    "select",
]

_SEGMENTS = "per-segment selection (packed rows, segment_ids given)"


def critical_counts(sra: SRAConfig, valid: Bool[Array, "b s"]) -> Int[Array, " b"]:
    """k_row of each row: `sra.num_critical(valid tokens of the row)` (ceil(critical_fraction * valid), clamped to
    [1, valid]), 0 for a row with no valid token. Padding never inflates k. Exactly SRAConfig.num_critical's rounding:
    a table of it over 0..s (float64, as the config computes) is indexed by the valid count."""
    return count_table(sra, valid.shape[-1])[valid.sum(-1)]


def count_table(sra: SRAConfig, n: int) -> Int[Array, " m"]:
    """`sra.num_critical(length)` for every length 0..n (0 for length 0): the count of a row or packed segment.
    One concrete array per (critical_fraction, n), so every layer of a traced model shares one constant."""
    return _count_table(float(sra.critical_fraction), int(n))


@functools.lru_cache(maxsize=64)
def _count_table(critical_fraction: float, n: int) -> Int[Array, " m"]:
    counts = np.arange(n + 1)
    # Same float64 arithmetic as SRAConfig.num_critical (the tests compare the two on every count).
    table = np.clip(np.ceil(critical_fraction * counts - 1e-9), 1, np.maximum(counts, 1)).astype(np.int32)
    table[0] = 0
    with jax.ensure_compile_time_eval():
        return jnp.asarray(table)


def select(
    logits: Float[Array, "b s"],
    k: int | Int[Array, " b"],
    sra: SRAConfig,
    *,
    valid: Bool[Array, "b s"],
    key: jax.Array | None = None,
    tau: float | Float[Array, ""] | None = None,
    k_max: int | None = None,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Selection:
    """Critical set of k tokens per row from router `logits` (only `valid` tokens can be chosen) by the policy of
    `sra.selection` (see `sra_jax.ops.selection_policy`). `k` is an int, or per-row counts (e.g.
    `critical_counts(sra, valid)`) under the static bound `k_max` (default s); the log-prob then counts only each
    row's own k_row draws. `tau` (may be traced, so annealing it does not recompile) defaults to sra.tau.

    `segment_ids` (packed rows): each segment selects num_critical(its valid tokens) of its own tokens instead (`k`
    and `k_max` are then unused), see `segment_select`.
    """
    tau = sra.tau if tau is None else tau
    if segment_ids is not None:
        return segment_select(logits, segment_ids, sra, valid=valid, key=key, tau=tau)
    policy = get_selection_policy(sra.selection)
    return policy.select(logits, k, valid=valid, key=key, tau=tau, hard=sra.hard, k_max=k_max)


def segment_select(
    logits: Float[Array, "b s"],
    segment_ids: Int[Array, "b s"],
    sra: SRAConfig,
    *,
    valid: Bool[Array, "b s"],
    key: jax.Array | None = None,
    tau: float | Float[Array, ""] | None = None,
) -> Selection:
    """Per-segment selection for packed rows: segment g of a row selects k_g = sra.num_critical(its valid tokens) of
    its own tokens, ranked only against them, exactly as if its example ran alone in its row. The log-prob of a row
    is the sum over its segments. ValueError for a policy without `supports_segments`."""
    check_segment_support(sra.selection, _SEGMENTS)
    tau = sra.tau if tau is None else tau
    counts = count_table(sra, logits.shape[-1])
    policy = get_selection_policy(sra.selection)
    return policy.segment_select(logits, segment_ids, counts, valid=valid, key=key, tau=tau, hard=sra.hard)


def forced_selection(
    logits: Float[Array, "b s"],
    critical: Bool[Array, "b s"],
    k: int,
    *,
    valid: Bool[Array, "b s"],
    sra: SRAConfig | None = None,
    tau: float | Float[Array, ""] | None = None,
    segment_ids: Int[Array, "b s"] | None = None,
) -> Selection:
    """A caller-given critical set (static masks, RL replay, tests), with the log-prob of `sra.selection`'s policy
    (`SelectionPolicy.log_prob`, cap k; the top-k policy's Plackett-Luce log-prob without `sra`). With `segment_ids`
    (packed rows): the sum over segments of each segment's own log-prob."""
    critical = critical & valid
    policy = get_selection_policy("topk" if sra is None else sra.selection)
    if segment_ids is not None:
        if sra is not None:
            check_segment_support(sra.selection, _SEGMENTS)
        log_prob = policy.segment_log_prob(logits, critical, segment_ids, valid=valid)
    else:
        tau = (1.0 if sra is None else sra.tau) if tau is None else tau
        log_prob = policy.log_prob(logits, critical, min(k, logits.shape[-1]), valid=valid, tau=tau)
    return Selection(critical, critical.astype(jnp.float32), log_prob)
