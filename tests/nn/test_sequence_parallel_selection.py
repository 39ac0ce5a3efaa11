"""The model-level sequence-parallel wiring on one device (`sequence_sharding(None, shards=S)`: S shards simulated
under vmap, the collectives across the mapped axis): the router's selection, log-prob and its gradient, and
`ops.attention.attention(spec=...)` for SRA, dense and KV-cache specs, equal the unsharded results. The multi-device
runs of the same wiring are in tests/train/test_train_sequence.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.config import SRAConfig
from sra_jax.nn.router import critical_counts, select
from sra_jax.ops import sequence_parallel as sp
from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec

B, N = 3, 32
# float32 Plackett-Luce log-probs of ~8 draws among 32 (O(30)) and attention outputs of O(1): the sharded code sums
# the same terms in another order (psum of shifted exp-sums, halo | chunk | gathered keys), a few ulps each.
TOL = 1e-4


def simulated(shards: int):
    return sp.sequence_sharding(None, shards=shards)


@pytest.fixture(scope="module")
def rows():
    # ties (scores rounded to halves), a row with left padding, a row with one valid token
    logits = jnp.round(jax.random.normal(jax.random.key(0), (B, N)) * 2) / 2
    positions = np.tile(np.arange(N), (B, 1))
    positions[1, :11] = -1
    positions[1, 11:] = np.arange(N - 11)
    positions[2, 1:] = -1
    return logits, jnp.asarray(positions)


@pytest.mark.parametrize(("selection", "shards"), [("topk", 4), ("gumbel_topk", 8)])
def test_router_selection_under_simulated_shards_is_identical(rows, selection, shards):
    logits, positions = rows
    sra = SRAConfig(critical_fraction=0.25, window=4, num_global=1, selection=selection)
    valid = positions >= 0
    k_rows = critical_counts(sra, valid)
    key = jax.random.key(5) if selection == "gumbel_topk" else None

    def run(logits):
        chosen = select(logits, k_rows, sra, valid=valid, key=key, k_max=sra.num_critical(N))
        return chosen.log_prob.sum(), chosen

    (expect_lp, expect), expect_grad = jax.value_and_grad(run, has_aux=True)(logits)

    def sharded(logits):
        with simulated(shards):
            return run(logits)

    (got_lp, got), got_grad = jax.jit(jax.value_and_grad(sharded, has_aux=True))(logits)
    assert bool(jnp.all(got.critical == expect.critical)) and int(expect.critical.sum()) > 0
    assert bool(jnp.all(got.gate == expect.gate))
    assert float(jnp.max(jnp.abs(got.log_prob - expect.log_prob))) <= TOL
    assert float(jnp.max(jnp.abs(got_grad - expect_grad))) <= TOL


def test_attention_with_a_spec_under_simulated_shards_equals_the_reference(rows):
    _, positions = rows
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (B, N, 4, 8))
    k = jax.random.normal(keys[1], (B, N, 2, 8))
    v = jax.random.normal(keys[2], (B, N, 2, 8))
    critical = jax.random.bernoulli(keys[3], 0.25, (B, N)) & (positions >= 0)
    specs = {
        "sra": SRAMaskSpec.create(positions, critical, window=5, num_global=2, max_critical=N),
        "dense": SRAMaskSpec.create(positions, jnp.zeros_like(critical), window=2**30, num_global=0, max_critical=0),
        # decode step: the last position of each row as the query over the whole row as a cache
        "cache": SRAMaskSpec.create(positions[:, -1:], critical[:, -1:], window=5, num_global=2, queries="all",
                                    k_positions=positions, k_critical=critical),
    }
    for name, spec in specs.items():
        query = q[:, -1:] if name == "cache" else q
        expect = attention(query, k, v, spec=spec, impl="reference")

        def sharded(query, k, v, spec=spec):
            with simulated(4):
                return attention(query, k, v, spec=spec, impl="reference")

        got = jax.jit(sharded)(query, k, v)
        assert float(jnp.max(jnp.abs(got - expect))) <= TOL, name
    with simulated(5):  # 5 does not divide 32: the unsharded path
        assert sp.spec_attention(q, k, v, specs["sra"]) is None
