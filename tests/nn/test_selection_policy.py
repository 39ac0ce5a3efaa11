"""Selection policies are looked up by name: the registry's errors, the built-in modes' properties, and a policy
registered by a user driving a model end to end (forward pass and KV-cache decoding)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from conftest import forward, make_model, random_tokens

from sra_jax.config import SRAConfig
from sra_jax.nn import KVCache
from sra_jax.ops.selection_policy import (
    Bernoulli,
    GumbelTopK,
    SelectionPolicy,
    Sparsemax,
    check_segment_support,
    get_selection_policy,
    register_selection_policy,
    selection_policy_names,
)
from sra_jax.train.config import TrainConfig

BUILT_IN = ("bernoulli", "gumbel_topk", "sparsemax", "topk")


@dataclasses.dataclass(frozen=True)
class LowestScores(SelectionPolicy):
    """A user's mode: the k_row lowest router scores are critical (top-k of the negated scores), and a decoded
    token is critical iff its score is at most the k_row-th lowest prompt score. No packed rows."""

    @property
    def supports_segments(self) -> bool:
        return False

    def select(self, logits, k, *, valid, key=None, tau=1.0, hard=True, k_max=None):
        return super().select(-logits, k, valid=valid, key=key, tau=tau, hard=hard, k_max=k_max)

    def threshold(self, logits, k, *, valid, k_max=None, prefill, stored):
        return -super().threshold(-logits, k, valid=valid, k_max=k_max, prefill=prefill, stored=-stored)

    def decoded_critical(self, logits, threshold):
        return logits <= threshold[:, None]


USER_MODE = "test_lowest_scores"
if USER_MODE not in selection_policy_names():  # the module may be imported twice by pytest's collection
    register_selection_policy(USER_MODE, LowestScores())


def test_the_built_in_modes_are_registered_with_their_packed_row_support():
    assert set(BUILT_IN) <= set(selection_policy_names())
    assert type(get_selection_policy("topk")) is SelectionPolicy
    assert isinstance(get_selection_policy("gumbel_topk"), GumbelTopK)
    assert isinstance(get_selection_policy("sparsemax"), Sparsemax)
    assert isinstance(get_selection_policy("bernoulli"), Bernoulli)
    support = {name: get_selection_policy(name).supports_segments for name in BUILT_IN}
    assert support == {"bernoulli": False, "gumbel_topk": True, "sparsemax": False, "topk": True}


def test_an_unknown_mode_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown selection policy 'argmax'; known: .*'bernoulli'.*'topk'"):
        get_selection_policy("argmax")
    with pytest.raises(ValueError, match=r"SRAConfig.selection='argmax' must be one of .*'gumbel_topk'.*register"):
        SRAConfig(selection="argmax")


def test_registering_checks_the_name_the_object_and_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_selection_policy("topk", SelectionPolicy())
    with pytest.raises(ValueError, match="SelectionPolicy instance"):
        register_selection_policy("test_not_a_policy", object())
    with pytest.raises(ValueError, match="non-empty string"):
        register_selection_policy("", SelectionPolicy())
    assert register_selection_policy("topk", get_selection_policy("topk"), replace=True) is get_selection_policy("topk")


def test_packed_rows_ask_the_policy_whether_it_selects_per_segment():
    check_segment_support("gumbel_topk", "packed")  # no error
    with pytest.raises(ValueError, match=rf"packed: .*'gumbel_topk', 'topk' do, not '{USER_MODE}'"):
        check_segment_support(USER_MODE, "packed")
    overrides = ["data.pack=true", f"sra={{selection: {USER_MODE}}}"]
    with pytest.raises(ValueError, match=rf"data\.pack=true cannot train with sra\.selection='{USER_MODE}'"):
        TrainConfig.load(None, overrides)


def test_a_registered_policy_drives_the_model_forward_and_decoding():
    """SRAConfig(selection=USER_MODE): the layers' critical sets are the lowest router scores of each row (by the
    scores the model reports), and decoding flags exactly the tokens at or below the stored threshold."""
    sra = SRAConfig(critical_fraction=0.25, window=2, num_global=1, router_hidden=8, selection=USER_MODE)
    model = make_model(sra)
    tokens = random_tokens(2, 12, seed=4)
    _, aux = forward(model, tokens)
    logits, critical = np.asarray(aux.router_logits), np.asarray(aux.critical)
    k = sra.num_critical(12)
    for layer in range(2):
        for row in range(2):
            lowest = np.argsort(logits[layer, row], kind="stable")[:k]
            assert set(np.flatnonzero(critical[layer, row])) == set(lowest.tolist())

    cache = KVCache.init(model.config, 2, 14)
    _, aux = forward(model, tokens[:, :10], None, cache)
    threshold = np.asarray(aux.cache.threshold)
    prompt = np.asarray(aux.router_logits)
    np.testing.assert_array_equal(threshold, np.sort(prompt, axis=-1)[..., sra.num_critical(10) - 1])
    _, aux = forward(model, tokens[:, 10:12], None, aux.cache)
    decoded = np.asarray(aux.router_logits) <= threshold[..., None]
    np.testing.assert_array_equal(np.asarray(aux.critical), decoded)
    np.testing.assert_array_equal(np.asarray(aux.cache.critical)[:, :, 10:12], decoded)


def test_a_policy_looked_up_by_name_selects_like_the_config_helpers():
    """`sra_jax.nn.select` is the registered policy applied with the config's tau and hard."""
    from sra_jax.nn import critical_counts, select

    sra = SRAConfig(critical_fraction=0.3, selection="sparsemax", tau=0.5)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9)), jnp.float32)
    valid = jnp.ones((2, 9), bool).at[1, 7:].set(False)
    k_rows = critical_counts(sra, valid)
    want = get_selection_policy("sparsemax").select(logits, k_rows, valid=valid, tau=0.5, k_max=3)
    got = select(logits, k_rows, sra, valid=valid, k_max=3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    tied=st.booleans(),
    name=st.sampled_from(("topk", "gumbel_topk", "sparsemax", "bernoulli")),
)
def test_the_threshold_read_off_the_selection_is_the_prefill_threshold(seed, n, tied, name):
    """`selected_threshold` (one masked min over the selected scores for the deterministic top-k) gives the same
    bits as `threshold` (its own top-k), with ties, padding, per-row counts (0 included) and all-padding rows;
    at prefill and for a later call (the stored one)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, n)).astype(np.float32)
    if tied:
        logits = np.round(logits)
    valid = rng.random((4, n)) < 0.7
    valid[0] = False
    k_rows = jnp.asarray(rng.integers(0, n + 1, size=4), jnp.int32)
    logits, valid = jnp.asarray(logits), jnp.asarray(valid)
    policy = get_selection_policy(name)
    chosen = policy.select(logits, k_rows, valid=valid, k_max=n)
    stored = jnp.asarray(rng.normal(size=4), jnp.float32)
    for prefill in (jnp.asarray(True), jnp.asarray(False)):
        want = policy.threshold(logits, k_rows, valid=valid, k_max=n, prefill=prefill, stored=stored)
        got = policy.selected_threshold(logits, chosen, k_rows, valid=valid, k_max=n, prefill=prefill, stored=stored)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
