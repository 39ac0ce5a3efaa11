"""Sequence-parallel SRA ops against their unsharded references, on 8 fake CPU devices.

The device count must be set before jax starts, and other tests share this process, so every multi-device check runs
in one subprocess (`_sequence_parallel_worker.py`, ~30 s) that reports the largest difference per check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.ops import selection
from sra_jax.ops import sequence_parallel as sp

WORKER = Path(__file__).with_name("_sequence_parallel_worker.py")
REPO = Path(__file__).resolve().parents[2]

# float32 attention: the sharded path sums the same terms in another order (halo | chunk | gathered keys), so
# outputs and gradients of O(1) values agree to a few ulp times the number of keys, far below 1e-4.
ATTENTION_TOL = 1e-4
# Plackett-Luce log-probs of 32 items are O(10): the psum of shifted exp-sums reorders a float32 logsumexp.
LOG_PROB_TOL = 1e-4


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(WORKER)], check=False, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_sharded_attention_and_its_gradients_equal_the_reference(results, shards):
    assert results[f"attention_value_and_grads_{shards}_shards"] <= ATTENTION_TOL


def test_a_batch_sharded_over_data_too_gives_the_same_values_and_gradients(results):
    assert results["attention_value_and_grads_data_2_sequence_4"] <= ATTENTION_TOL


def test_the_tightest_gather_bound_is_exact_and_one_less_is_not(results):
    assert results["attention_tight_max_gathered_4_shards"] <= ATTENTION_TOL
    assert results["attention_too_small_max_gathered_differs"] > 1e-2


@pytest.mark.parametrize("where", ["one_shard", "every_shard"])
def test_the_compact_gather_is_exact_wherever_the_critical_keys_sit(results, where):
    """One shard owns every critical key of a row (the other row has none), or every shard owns some: a buffer of
    the row's tightest bound, filled at per-shard offsets, gives the reference's values and gradients."""
    assert results[f"attention_{where}_bound"] < 16  # the compact buffer, not the all-gather of every slot
    assert results[f"attention_{where}_8_shards"] <= ATTENTION_TOL


def test_random_packings_paddings_and_critical_sets_match_the_reference(results):
    assert results["attention_hypothesis_examples"] == 10
    assert results["attention_hypothesis_4_shards"] <= ATTENTION_TOL


SELECTION_CASES = [(4, "k5"), (4, "per_row_k"), (4, "k_all"), (8, "per_row_k")]


@pytest.mark.parametrize(("shards", "k"), SELECTION_CASES)
def test_sharded_topk_is_identical_to_the_unsharded_selection(results, shards, k):
    assert results[f"topk_mask_mismatches_{k}_{shards}_shards"] == 0
    assert results[f"gumbel_indices_mismatches_{k}_{shards}_shards"] == 0


@pytest.mark.parametrize(("shards", "k"), SELECTION_CASES)
def test_sharded_plackett_luce_log_prob_and_gradient_match(results, shards, k):
    assert results[f"log_prob_{k}_{shards}_shards"] <= LOG_PROB_TOL
    assert results[f"log_prob_grad_{k}_{shards}_shards"] <= LOG_PROB_TOL


@pytest.mark.parametrize("queries", ["critical", "all"])
def test_decode_over_a_sequence_sharded_cache_matches_the_whole_cache(results, queries):
    assert results[f"decode_{queries}_4_shards"] <= ATTENTION_TOL


def load_worker():
    spec = importlib.util.spec_from_file_location("sequence_parallel_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulated_shards_on_one_device_equal_the_reference():
    """mesh=None runs the shards under vmap on this one device (how one GPU times the sharded program)."""
    worker = load_worker()
    q, k, v, positions, critical, segments = worker.inputs(0, [([5, 13, 21], 3, False), ([9, 17], 4, True)], 0.25)
    expect = worker.value_and_grads(
        lambda q, k, v: worker.reference(q, k, v, positions, critical, segments, 6, "critical"), q, k, v)
    got = worker.value_and_grads(
        lambda q, k, v: worker.sharded(q, k, v, positions, critical, segments, 6, "critical", None, block_q=2,
                                       shards=4), q, k, v)
    assert worker.biggest(expect, got) <= ATTENTION_TOL
    logits = jnp.round(jax.random.normal(jax.random.key(1), (3, 32)) * 2) / 2
    counts = jnp.array([3, 0, 9])
    drawn = sp.sharded_topk_indices(logits, counts, k_max=12, shards=8)
    assert bool(jnp.all(sp.sharded_topk_mask(drawn, 32) == selection.topk_mask(logits, counts, k_max=12)))
    assert worker.biggest(sp.sharded_topk_log_prob(logits, drawn, k=counts, shards=8),
                          selection.topk_log_prob(logits, drawn, k=counts)) <= LOG_PROB_TOL


# Argument checks run before anything is traced, so one CPU device is enough.


@pytest.fixture(scope="module")
def one_device_mesh():
    return jax.make_mesh((1,), ("sequence",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])


def attention_args(n=8):
    q = jnp.zeros((1, n, 2, 4))
    k = jnp.zeros((1, n, 1, 4))
    return q, k, k, jnp.arange(n)[None], jnp.zeros((1, n), bool)


def test_bad_arguments_are_named(one_device_mesh):
    with pytest.raises(ValueError, match=r"axis \('seq'\) is not an axis of the mesh"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=2, num_global=0, mesh=one_device_mesh, axis="seq")
    with pytest.raises(ValueError, match=r"max_gathered \(9\) must be an integer in \[1, row length 8\]"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=2, num_global=0, mesh=one_device_mesh,
                                           max_gathered=9)
    with pytest.raises(ValueError, match=r"block_q \(3\) must be a positive divisor of the chunk length \(8\)"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=2, num_global=0, mesh=one_device_mesh, block_q=3)
    with pytest.raises(ValueError, match=r"window \(0\)"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=0, num_global=0, mesh=one_device_mesh)
    with pytest.raises(ValueError, match=r"batch_axis \('sequence'\)"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=2, num_global=0, mesh=one_device_mesh,
                                           batch_axis="sequence")
    with pytest.raises(ValueError, match=r"k \(9\) must be in \[1, n\]"):
        sp.sharded_topk_indices(jnp.zeros((1, 8)), 9, mesh=one_device_mesh)
    with pytest.raises(ValueError, match=r"without a mesh, shards \(None\) must be an integer >= 1"):
        sp.sharded_cache_attention(*attention_args()[:3], jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool),
                                   jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool), window=2, num_global=0)
    with pytest.raises(ValueError, match=r"shards \(2\) must be left out or equal the mesh's 'sequence' size \(1\)"):
        sp.sharded_topk_indices(jnp.zeros((1, 8)), 2, mesh=one_device_mesh, shards=2)
    explicit = jax.make_mesh((1,), ("sequence",), (jax.sharding.AxisType.Explicit,), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="must all be AxisType.Auto"):
        sp.sharded_topk_log_prob(jnp.zeros((1, 8)), jnp.zeros((1, 2), jnp.int32), mesh=explicit)


def test_a_length_that_does_not_split_evenly_is_refused():
    mesh = jax.sharding.AbstractMesh((3,), ("sequence",), (jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"sequence length \(8\) must be divisible by the 3 shards"):
        sp.sra_attention_sequence_parallel(*attention_args(), window=2, num_global=0, mesh=mesh)


def test_gathered_per_row_counts_critical_and_global_keys_seen_from_beyond_the_window():
    positions = jnp.array([[-1, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    critical = jnp.array([[True, False, True, False, False, False, True, True], [False, True, False, False, True,
                                                                                  False, False, True]])
    counts = sp.gathered_per_row(positions, critical, window=2, num_global=1)
    # row 0: the globals (position 0) of both sequences and critical position 1 of the first (position 3 follows
    # 2 later); the second sequence's critical positions 1, 2 are its last: no query lies 2 beyond them.
    # row 1: the global and critical positions 1, 4 (position 7 is the last). Padding never counts.
    assert counts.tolist() == [3, 3]


def test_dense_context_parallel_attention_and_its_gradients_equal_causal_attention():
    """All-gather context parallelism (simulated shards on one device) against dense causal attention, packed rows
    crossing shard edges and padding included; one row without segment ids."""
    from sra_jax.ops.attention import attention
    from sra_jax.ops.masks import SRAMaskSpec

    worker = load_worker()
    q, k, v, positions, critical, segments = worker.inputs(0, [([5, 13, 21], 3, False), ([9, 17], 4, True)], 0.25)
    for segment_ids in (segments, None):
        mask = SRAMaskSpec.create(positions, critical, window=1, num_global=0, segment_ids=segment_ids).dense_mask()
        expect = worker.value_and_grads(
            lambda q, k, v, mask=mask: attention(q, k, v, mask=mask, impl="reference"), q, k, v)
        for shards, block_q in ((4, 2), (8, None)):
            got = worker.value_and_grads(
                lambda q, k, v, shards=shards, block_q=block_q, segment_ids=segment_ids:
                sp.dense_attention_sequence_parallel(q, k, v, positions, segment_ids, shards=shards, block_q=block_q),
                q, k, v)
            assert worker.biggest(expect, got) <= ATTENTION_TOL, (shards, segment_ids is None)


def test_sequence_sharding_is_a_no_op_without_a_sequence_axis_of_size_above_one(one_device_mesh):
    from sra_jax.ops.masks import SRAMaskSpec

    q, k, v, positions, critical = attention_args()
    spec = SRAMaskSpec.create(positions, critical, window=2, num_global=0)
    assert sp.spec_attention(q, k, v, spec) is None  # no context
    for mesh in (None, one_device_mesh, jax.make_mesh((1,), ("data",), (jax.sharding.AxisType.Auto,),
                                                      devices=jax.devices()[:1])):
        with sp.sequence_sharding(mesh) as active:
            assert active is None and sp.active_sequence_sharding() is None
            assert sp.spec_attention(q, k, v, spec) is None
    with pytest.raises(ValueError, match=r"batch_axis \(\('data', 'nope'\)\)"):
        sp.dense_attention_sequence_parallel(q, k, v, positions, mesh=one_device_mesh, batch_axis=("data", "nope"))
    with pytest.raises(ValueError, match=r"block_q \(3\)"):
        sp.dense_attention_sequence_parallel(q, k, v, positions, shards=2, block_q=3)


def test_nonfinite_keys_reach_only_the_rows_that_see_them_under_sequence_sharding():
    """NaN k and -inf v at a non-critical key (slot 9 of row 0, in the second shard: only the queries whose window
    holds it can see it) and inf in a padding slot's v (row 1): through `attention(spec=...)` with 4 simulated
    shards, SRA (packed rows) and dense specs give the unsharded outputs, NaN exactly where the unsharded path
    gives NaN, and clean gradients where no loss term sees a bad key."""
    from sra_jax.ops.attention import attention
    from sra_jax.ops.masks import SRAMaskSpec

    worker = load_worker()
    q, k, v, positions, critical, segments = worker.inputs(0, [([5, 13, 21], 3, False), ([9, 17], 4, True)], 0.25)
    critical = critical.at[0, 9].set(False)
    bad_k, bad_v = k.at[0, 9].set(jnp.nan), v.at[0, 9].set(-jnp.inf).at[1, 0].set(jnp.inf)  # row 1 slot 0: padding
    specs = {"sra": SRAMaskSpec.create(positions, critical, window=3, num_global=worker.NUM_GLOBAL,
                                       segment_ids=segments, queries="all"),
             "dense": SRAMaskSpec.create(positions, critical, window=2**30, num_global=0, max_critical=0,
                                         segment_ids=segments)}
    for name, spec in specs.items():
        def run(q, k, v, spec=spec):
            return attention(q, k, v, spec=spec, impl="reference")

        def sharded(q, k, v, spec=spec):
            with sp.sequence_sharding(None, shards=4):
                return attention(q, k, v, spec=spec, impl="reference")

        expect, got = run(q, bad_k, bad_v), sharded(q, bad_k, bad_v)
        seen = np.isnan(np.asarray(expect))
        assert seen[0].any() and not seen[0].all() and not seen[1].any(), name
        np.testing.assert_array_equal(np.isnan(np.asarray(got)), seen)
        np.testing.assert_allclose(np.where(seen, 0.0, got), np.where(seen, 0.0, expect), atol=ATTENTION_TOL)
        clean = jnp.asarray(~seen)  # a loss over the rows that see no bad key has finite, unsharded gradients

        def loss(fn, q, k, v, clean=clean):
            return jnp.sum(jnp.where(clean, fn(q, k, v), 0.0) ** 2)

        grads = [jax.grad(partial(loss, fn), (0, 1, 2))(q, bad_k, bad_v) for fn in (run, sharded)]
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads[1]), name
        assert worker.biggest(*grads) <= ATTENTION_TOL, name
