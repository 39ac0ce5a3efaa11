"""The per-shard Pallas kernels of sequence-parallel SRA and dense layers (`impl="pallas"`, interpret mode on CPU)
against the unsharded reference and the per-shard jnp path, values and gradients.

The multi-device checks run in one subprocess with 8 fake CPU devices (`_sequence_parallel_worker.py pallas
pallas_hypothesis`, ~55 s: interpret mode is slow, so the shapes are tiny and hypothesis draws 4 examples); the
wiring's choice and non-finite keys through `attention(spec=..., impl="pallas")` with simulated shards (`mesh=None`:
the halo and the gather under vmap, the kernels on the shards folded into the batch; values and gradients against
the unsharded reference) run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from sra_jax.ops import sequence_parallel as sp
from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec
from tests.ops.test_sequence_parallel import REPO, WORKER, load_worker

# float32: the kernels sum the same terms as the reference in another order (online softmax over key blocks, the
# halo / chunk / gathered keys in one set), a few ulp times the number of keys for O(1) values and gradients.
ATTENTION_TOL = 1e-4


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(WORKER), "pallas", "pallas_hypothesis"], check=False, env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shards", [4, 8])
def test_per_shard_kernels_equal_the_reference_and_the_jnp_path(results, shards):
    assert results[f"pallas_value_and_grads_{shards}_shards"] <= ATTENTION_TOL
    assert results[f"pallas_vs_jnp_{shards}_shards"] <= ATTENTION_TOL


@pytest.mark.parametrize("packing", ["packed", "unpacked"])
def test_per_shard_compact_kernels_with_the_rows_critical_bound(results, packing):
    """max_critical given, compact=True: band, (unpacked) globals and critical queries x critical keys per shard."""
    assert results[f"pallas_compact_{packing}_4_shards"] <= ATTENTION_TOL


def test_per_shard_kernels_with_the_batch_sharded_too(results):
    assert results["pallas_value_and_grads_data_2_sequence_4"] <= ATTENTION_TOL


def test_per_shard_kernels_where_one_shard_owns_every_critical_key_and_a_row_has_none(results):
    assert results["pallas_one_shard_bound"] < 16  # the compact buffer, not the all-gather of every slot
    assert results["pallas_one_shard_8_shards"] <= ATTENTION_TOL


def test_below_the_bound_the_kernels_drop_the_critical_key_the_jnp_path_drops(results):
    assert results["pallas_too_small_vs_reference"] > 1e-2
    assert results["pallas_too_small_vs_jnp"] <= ATTENTION_TOL


@pytest.mark.parametrize("packing", ["packed", "unpacked"])
def test_dense_layers_through_the_kernels_equal_causal_attention(results, packing):
    assert results[f"pallas_dense_{packing}_4_shards"] <= ATTENTION_TOL


def test_random_packings_and_critical_sets_through_the_kernels_match_the_jnp_path(results):
    assert results["pallas_hypothesis_examples"] == 4
    assert results["pallas_hypothesis_4_shards"] <= ATTENTION_TOL


def test_the_per_shard_impl_follows_the_attention_impl_unless_the_context_names_one():
    assert sp.resolve_impl("jnp") == "jnp" and sp.resolve_impl("pallas") == "pallas"
    assert sp.resolve_impl("auto") == ("jnp" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match=r"impl \('triton'\) must be one of \('auto', 'jnp', 'pallas'\)"):
        sp.resolve_impl("triton")
    with pytest.raises(ValueError, match=r"impl \('kernel'\)"), sp.sequence_sharding(None, shards=2, impl="kernel"):
        pass
    q, k, v, positions, critical = (jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)),
                                    jnp.arange(8)[None], jnp.zeros((1, 8), bool))
    with pytest.raises(ValueError, match=r"compact=True needs max_critical"):
        sp.sra_attention_sequence_parallel(q, k, v, positions, critical, window=2, num_global=0, shards=2,
                                           impl="pallas", compact=True)
    with pytest.raises(ValueError, match=r"max_critical \(-1\) must be None or an integer >= 0"):
        sp.sra_attention_sequence_parallel(q, k, v, positions, critical, window=2, num_global=0, shards=2,
                                           impl="pallas", max_critical=-1)
    with sp.sequence_sharding(None, shards=2) as active:
        assert active.per_shard("pallas") == "auto" and active.per_shard("reference") == "jnp"
        assert active.per_shard("gather") == "jnp"
    with sp.sequence_sharding(None, shards=2, impl="pallas", interpret=True) as active:
        assert active.per_shard("reference") == "pallas" and active.interpret


def test_nonfinite_keys_reach_only_the_rows_that_see_them_through_the_kernels():
    """NaN k and -inf v at a non-critical key (row 0, second shard) and inf in a padding slot's v (row 1), through
    `attention(spec=..., impl="pallas")` under `sequence_sharding(None, shards=4, impl="pallas", interpret=True)`:
    SRA and dense specs give the unsharded outputs, NaN exactly where the unsharded path has NaN, and finite
    unsharded gradients where no loss term sees a bad key."""
    worker = load_worker()
    q, k, v, positions, critical, segments = worker.pallas_inputs(0, [([5, 13, 21], 3, False), ([9, 17], 4, True)],
                                                                  0.25)
    critical = critical.at[0, 9].set(False)
    bad_k, bad_v = k.at[0, 9].set(jnp.nan), v.at[0, 9].set(-jnp.inf).at[1, 0].set(jnp.inf)
    specs = {"sra": SRAMaskSpec.create(positions, critical, window=3, num_global=worker.NUM_GLOBAL,
                                       segment_ids=segments, queries="critical"),
             "dense": SRAMaskSpec.create(positions, critical, window=2**30, num_global=0, max_critical=0,
                                         segment_ids=segments)}
    for name, spec in specs.items():
        def run(q, k, v, spec=spec):
            return attention(q, k, v, spec=spec, impl="reference")

        def sharded(q, k, v, spec=spec):
            with sp.sequence_sharding(None, shards=4, impl="pallas", interpret=True):
                return attention(q, k, v, spec=spec, impl="pallas")

        expect, got = run(q, bad_k, bad_v), sharded(q, bad_k, bad_v)
        seen = np.isnan(np.asarray(expect))
        assert seen[0].any() and not seen[0].all() and not seen[1].any(), name
        np.testing.assert_array_equal(np.isnan(np.asarray(got)), seen)
        np.testing.assert_allclose(np.where(seen, 0.0, got), np.where(seen, 0.0, expect), atol=ATTENTION_TOL)
        clean = jnp.asarray(~seen)

        def loss(fn, q, k, v, clean=clean):
            return jnp.sum(jnp.where(clean, fn(q, k, v), 0.0) ** 2)

        grads = [jax.grad(partial(loss, fn), (0, 1, 2))(q, bad_k, bad_v) for fn in (run, sharded)]
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads[1]), name
        assert worker.biggest(*grads) <= ATTENTION_TOL, name
