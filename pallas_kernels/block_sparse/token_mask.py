"""The token-level visibility rule shared by the reference and every kernel (it runs on kernel tiles too)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Static part of the rule. j is visible to i iff both positions are >= 0, same segment (when segment ids
    are given), k_pos <= q_pos (causal), and, when `window` is set, one of: |q_pos - k_pos| < window (q - k when
    causal), k_pos < num_global, k_pos == q_pos, or j critical (and i critical, when query flags are given)."""

    causal: bool = True
    window: int | None = None
    num_global: int = 0
    has_segments: bool = False
    has_k_critical: bool = False
    has_q_critical: bool = False

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"{self.window=} must be >= 1 (it counts the token itself)")
        if self.num_global < 0:
            raise ValueError(f"{self.num_global=} must be >= 0")
        if self.has_q_critical and not self.has_k_critical:
            raise ValueError("q_critical needs k_critical")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_positions", "k_positions", "q_segment_ids", "k_segment_ids", "q_critical", "k_critical"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """Per-token int32 inputs of the rule (None where the rule does not use them); -1 positions are padding."""

    q_positions: Any  # [b, sq]
    k_positions: Any  # [b, sk]
    q_segment_ids: Any = None
    k_segment_ids: Any = None
    q_critical: Any = None
    k_critical: Any = None


def visible(rule: MaskRule, q_pos, k_pos, q_seg=None, k_seg=None, q_crit=None, k_crit=None):
    """Boolean visibility for broadcastable query columns ([..., q, 1]) and key rows ([..., 1, k])."""
    ok = (q_pos >= 0) & (k_pos >= 0)
    if rule.causal:
        ok = ok & (k_pos <= q_pos)
    if rule.has_segments:
        ok = ok & (q_seg == k_seg)
    if rule.window is not None:
        dist = q_pos - k_pos if rule.causal else jnp.abs(q_pos - k_pos)
        keep = (dist < rule.window) | (k_pos == q_pos)
        if rule.num_global:
            keep = keep | (k_pos < rule.num_global)
        if rule.has_k_critical:
            crit = k_crit != 0
            if rule.has_q_critical:
                crit = crit & (q_crit != 0)
            keep = keep | crit
        ok = ok & keep
    return ok


def token_mask(rule: MaskRule, tokens: TokenInfo):
    """Dense [b, q, k] visibility (reference and tests only)."""
    col = lambda x: None if x is None else x[:, :, None]
    row = lambda x: None if x is None else x[:, None, :]
    return visible(
        rule,
        col(tokens.q_positions),
        row(tokens.k_positions),
        col(tokens.q_segment_ids),
        row(tokens.k_segment_ids),
        col(tokens.q_critical),
        row(tokens.k_critical),
    )


def query_rows(tokens: TokenInfo, start, size: int) -> TokenInfo:
    """The tokens of query rows start .. start + size - 1 (start may be traced; size static), every key kept."""
    rows = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    return dataclasses.replace(
        tokens,
        q_positions=rows(tokens.q_positions),
        q_segment_ids=rows(tokens.q_segment_ids),
        q_critical=rows(tokens.q_critical),
    )


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
