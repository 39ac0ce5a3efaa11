"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the caller, before jax
starts): every sequence-parallel op against its unsharded reference. Prints one JSON object {check name: largest
absolute difference (or a count of mismatches)} on its last line. Importing it has no side effects (the tests reuse
its inputs in-process).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sra_jax.ops import selection
from sra_jax.ops import sequence_parallel as sp
from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec

B, N, HQ, HKV, D = 2, 32, 4, 2, 8
NUM_GLOBAL = 2


def sequence_mesh(shards: int):
    return jax.make_mesh((shards,), ("sequence",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:shards])


def packed_row(cuts: list[int], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions and segment ids of one row: segments split at `cuts`, positions restarting at 0 in each, and `pad`
    padding slots (position -1) on the left or the right."""
    length = N - pad
    starts = sorted({0, *(c for c in cuts if 0 < c < length)})
    segment = np.searchsorted(starts, np.arange(length), side="right") - 1
    position = np.arange(length) - np.asarray(starts)[segment]
    pad_pos, pad_seg = np.full(pad, -1), np.full(pad, -1)
    if left:
        return np.concatenate([pad_pos, position]), np.concatenate([pad_seg, segment])
    return np.concatenate([position, pad_pos]), np.concatenate([segment, pad_seg])


def inputs(seed: int, rows: list[tuple[list[int], int, bool]], critical_rate: float):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, N, HQ, D))
    k = jax.random.normal(keys[1], (B, N, HKV, D))
    v = jax.random.normal(keys[2], (B, N, HKV, D))
    positions, segments = (jnp.asarray(np.stack(x)) for x in zip(*(packed_row(*row) for row in rows)))
    critical = jax.random.bernoulli(keys[3], critical_rate, (B, N)) & (positions >= 0)
    return q, k, v, positions, critical, segments


def reference(q, k, v, positions, critical, segments, window, queries):
    spec = SRAMaskSpec.create(positions, critical, window=window, num_global=NUM_GLOBAL, queries=queries,
                              segment_ids=segments)
    return attention(q, k, v, spec=spec, impl="reference")


def sharded(q, k, v, positions, critical, segments, window, queries, mesh, max_gathered=None, block_q=None,
            shards=None):
    return sp.sra_attention_sequence_parallel(q, k, v, positions, critical, segments, window=window,
                                              num_global=NUM_GLOBAL, queries=queries, mesh=mesh, shards=shards,
                                              max_gathered=max_gathered, block_q=block_q)


def value_and_grads(fn, q, k, v):
    """The output and the gradients of a fixed random projection of it, w.r.t. q, k and v."""
    weights = jax.random.normal(jax.random.key(7), q.shape)
    return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights), (0, 1, 2))(q, k, v)


def biggest(a, b) -> float:
    """Largest |a - b| over matching leaves; NaN anywhere gives NaN (which fails every tolerance)."""
    return float(jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])))


def check_attention(results: dict) -> None:
    """Fixed case per mesh: packed rows crossing shard edges, left / right padding, window 6 (at 8 shards the
    chunk is 4, so the halo spans two shards), window blocks smaller than the halo, GQA; forward and gradients."""
    rows = [([5, 13, 21], 3, False), ([9, 17], 4, True)]
    q, k, v, positions, critical, segments = inputs(0, rows, 0.25)
    window = 6
    for shards, queries, block_q in ((2, "critical", 4), (4, "all", 2), (8, "critical", None)):
        mesh = sequence_mesh(shards)
        def expect_fn(q, k, v, queries=queries):
            return reference(q, k, v, positions, critical, segments, window, queries)

        def got_fn(q, k, v, queries=queries, mesh=mesh, block_q=block_q):
            return sharded(q, k, v, positions, critical, segments, window, queries, mesh, block_q=block_q)

        expect, got = value_and_grads(expect_fn, q, k, v), value_and_grads(got_fn, q, k, v)
        results[f"attention_value_and_grads_{shards}_shards"] = biggest(expect, got)
    # the batch sharded too: a (data 2, sequence 4) mesh, as training will combine them
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), (jax.sharding.AxisType.Auto,) * 2)
    expect = value_and_grads(lambda q, k, v: reference(q, k, v, positions, critical, segments, window, "all"), q, k, v)
    got = value_and_grads(lambda q, k, v: sp.sra_attention_sequence_parallel(
        q, k, v, positions, critical, segments, window=window, num_global=NUM_GLOBAL, queries="all", mesh=mesh,
        batch_axis="data", block_q=2), q, k, v)
    results["attention_value_and_grads_data_2_sequence_4"] = biggest(expect, got)
    # the tightest exact bound on the row's gathered keys (not the default, the row) gives the same output
    mesh = sequence_mesh(4)
    bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=window, num_global=NUM_GLOBAL)))
    expect = reference(q, k, v, positions, critical, segments, window, "all")
    got = sharded(q, k, v, positions, critical, segments, window, "all", mesh, max_gathered=bound)
    results["attention_tight_max_gathered_4_shards"] = biggest(expect, got)
    too_small = sharded(q, k, v, positions, critical, segments, window, "all", mesh, max_gathered=bound - 1)
    results["attention_too_small_max_gathered_differs"] = biggest(expect, too_small)


def check_attention_spread(results: dict) -> None:
    """The compact gather at 8 shards (chunk 4) with the tightest bound, values and gradients, where the critical
    keys sit: all on one shard (row 0: slots 12..15, shard 3, with packed segments crossing shard edges), on no
    shard (row 1: none, only the globals of its long segments are gathered), and spread over every shard."""
    rows = [([5, 13, 21], 0, False), ([9, 17], 4, True)]
    q, k, v, positions, _, segments = inputs(3, rows, 0.0)
    slot = jnp.arange(N)
    placements = {"one_shard": jnp.stack([(slot >= 12) & (slot < 16), jnp.zeros(N, bool)]),
                  "every_shard": jnp.stack([slot % 3 == 1, slot % 4 == 2])}
    mesh = sequence_mesh(8)
    window = 3
    for name, critical in placements.items():
        critical &= positions >= 0
        bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=window, num_global=NUM_GLOBAL)))
        expect = value_and_grads(
            lambda q, k, v, c=critical: reference(q, k, v, positions, c, segments, window, "all"), q, k, v)
        got = value_and_grads(lambda q, k, v, c=critical, bound=bound: sharded(
            q, k, v, positions, c, segments, window, "all", mesh, max_gathered=bound, block_q=2), q, k, v)
        results[f"attention_{name}_8_shards"] = biggest(expect, got)
        results[f"attention_{name}_bound"] = bound


def check_attention_hypothesis(results: dict) -> None:
    """Random lengths, packings, critical sets, windows, queries, window blocks and gather bounds (the row, or the
    tightest exact one) at 4 shards (one shape)."""
    mesh = sequence_mesh(4)
    worst = []

    row = st.tuples(st.lists(st.integers(1, N - 1), max_size=4), st.integers(0, N // 2), st.booleans())

    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(rows=st.lists(row, min_size=B, max_size=B), rate=st.sampled_from([0.0, 0.2, 0.6]),
           window=st.sampled_from([1, 3, 11]), queries=st.sampled_from(["critical", "all"]),
           block_q=st.sampled_from([2, 8]), tight=st.booleans(), seed=st.integers(0, 2**16))
    def run(rows, rate, window, queries, block_q, tight, seed):
        q, k, v, positions, critical, segments = inputs(seed, rows, rate)
        expect = reference(q, k, v, positions, critical, segments, window, queries)
        bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=window, num_global=NUM_GLOBAL)))
        got = sharded(q, k, v, positions, critical, segments, window, queries, mesh, block_q=block_q,
                      max_gathered=max(1, bound) if tight else None)
        worst.append(biggest(expect, got))

    run()
    results["attention_hypothesis_4_shards"] = max(worst)
    results["attention_hypothesis_examples"] = len(worst)


def check_selection(results: dict) -> None:
    """Top-k with ties, invalid slots and per-row k over 4 and 8 shards; the Plackett-Luce log-prob and its grad."""
    keys = jax.random.split(jax.random.key(1), 3)
    logits = jnp.round(jax.random.normal(keys[0], (3, N)) * 2) / 2  # coarse values: many ties
    valid = jax.random.bernoulli(keys[1], 0.7, (3, N))
    per_row = jnp.array([3, 0, 9])
    scores = logits + jax.random.gumbel(keys[2], logits.shape)  # what gumbel_topk_indices perturbs with
    cases = {"k5": (5, None), "per_row_k": (per_row, 12), "k_all": (N, None)}
    for shards, names in ((4, ("k5", "per_row_k", "k_all")), (8, ("per_row_k",))):
        mesh = sequence_mesh(shards)
        for name in names:
            k, k_max = cases[name]
            got = sp.sharded_topk_indices(logits, k, valid=valid, k_max=k_max, mesh=mesh)
            expect = selection.topk_mask(logits, k, valid=valid, k_max=k_max)
            mismatch = jnp.sum(sp.sharded_topk_mask(got, N, valid=valid) != expect)
            results[f"topk_mask_mismatches_{name}_{shards}_shards"] = int(mismatch)
            drawn = selection.gumbel_topk_indices(logits, k, key=keys[2], valid=valid, k_max=k_max)
            got = sp.sharded_topk_indices(scores, k, valid=valid, k_max=k_max, mesh=mesh)
            results[f"gumbel_indices_mismatches_{name}_{shards}_shards"] = int(jnp.sum(got != drawn))
            counts = None if k_max is None else k

            def expect_lp(x, drawn=drawn, counts=counts):
                return selection.topk_log_prob(x, drawn, valid=valid, k=counts)

            def got_lp(x, drawn=drawn, counts=counts, mesh=mesh):
                return sp.sharded_topk_log_prob(x, drawn, valid=valid, k=counts, mesh=mesh)

            results[f"log_prob_{name}_{shards}_shards"] = biggest(expect_lp(logits), got_lp(logits))
            results[f"log_prob_grad_{name}_{shards}_shards"] = biggest(
                jax.grad(lambda x: jnp.sum(expect_lp(x) * jnp.arange(1.0, 4.0)))(logits),
                jax.grad(lambda x: jnp.sum(got_lp(x) * jnp.arange(1.0, 4.0)))(logits))


def check_decode(results: dict) -> None:
    """Two decode queries over a cache of 32 slots sharded 4 ways: a left-padded row and a row still filling."""
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (B, 2, HQ, D))
    k_cache = jax.random.normal(keys[1], (B, N, HKV, D))
    v_cache = jax.random.normal(keys[2], (B, N, HKV, D))
    slot = jnp.arange(N)
    k_positions = jnp.stack([jnp.where(slot >= 7, slot - 7, -1), jnp.where(slot < 20, slot, -1)])
    k_critical = jax.random.bernoulli(keys[3], 0.3, (B, N)) & (k_positions >= 0)
    q_positions = jnp.array([[23, 24], [18, 19]])
    q_critical = jnp.array([[True, False], [False, True]])
    mesh = sequence_mesh(4)
    for queries in ("critical", "all"):
        spec = SRAMaskSpec.create(q_positions, q_critical, window=5, num_global=NUM_GLOBAL, queries=queries,
                                  k_positions=k_positions, k_critical=k_critical)
        expect = attention(q, k_cache, v_cache, spec=spec, impl="reference")
        got = sp.sharded_cache_attention(q, k_cache, v_cache, q_positions, q_critical, k_positions, k_critical,
                                         window=5, num_global=NUM_GLOBAL, queries=queries, mesh=mesh)
        results[f"decode_{queries}_4_shards"] = biggest(expect, got)


# The Pallas kernels need a power-of-two head_dim >= 16; interpret mode is slow, so the Pallas checks use few shapes.
PALLAS_D = 16


def pallas_inputs(seed: int, rows: list[tuple[list[int], int, bool]], critical_rate: float):
    """`inputs` with head_dim PALLAS_D (q, k, v drawn at that width)."""
    q, k, v, positions, critical, segments = inputs(seed, rows, critical_rate)
    keys = jax.random.split(jax.random.key(seed + 100), 3)
    q, k, v = (jax.random.normal(key, (*x.shape[:-1], PALLAS_D)) for key, x in zip(keys, (q, k, v)))
    return q, k, v, positions, critical, segments


def pallas_sharded(q, k, v, positions, critical, segments, window, queries, mesh, max_gathered=None, shards=None,
                   batch_axis=None, max_critical=None, compact=None):
    """The per-shard Pallas kernels in interpret mode."""
    return sp.sra_attention_sequence_parallel(q, k, v, positions, critical, segments, window=window,
                                              num_global=NUM_GLOBAL, queries=queries, mesh=mesh, shards=shards,
                                              max_gathered=max_gathered, batch_axis=batch_axis, impl="pallas",
                                              interpret=True, max_critical=max_critical, compact=compact)


def check_pallas(results: dict) -> None:
    """Per-shard Pallas kernels (interpret mode) under shard_map against the unsharded reference and the jnp path,
    values and gradients: packed rows and padding crossing shard edges, GQA, a halo spanning two shards (8 shards,
    chunk 4, window 6), queries critical / all, a (data 2, sequence 4) mesh, a row with no critical key and a shard
    owning every critical key at the tightest bound, and the dense all-gather layers."""
    rows = [([5, 13, 21], 3, False), ([9, 17], 4, True)]
    q, k, v, positions, critical, segments = pallas_inputs(0, rows, 0.25)
    for shards, queries, window in ((4, "critical", 6), (8, "all", 6)):
        mesh = sequence_mesh(shards)
        expect = value_and_grads(
            lambda q, k, v, qs=queries, w=window: reference(q, k, v, positions, critical, segments, w, qs), q, k, v)
        got = value_and_grads(lambda q, k, v, qs=queries, w=window, m=mesh: pallas_sharded(
            q, k, v, positions, critical, segments, w, qs, m), q, k, v)
        jnp_path = value_and_grads(lambda q, k, v, qs=queries, w=window, m=mesh: sharded(
            q, k, v, positions, critical, segments, w, qs, m), q, k, v)
        results[f"pallas_value_and_grads_{shards}_shards"] = biggest(expect, got)
        results[f"pallas_vs_jnp_{shards}_shards"] = biggest(jnp_path, got)
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), (jax.sharding.AxisType.Auto,) * 2)
    expect = value_and_grads(lambda q, k, v: reference(q, k, v, positions, critical, segments, 3, "critical"), q, k, v)
    got = value_and_grads(lambda q, k, v: pallas_sharded(q, k, v, positions, critical, segments, 3, "critical", mesh,
                                                         batch_axis="data"), q, k, v)
    results["pallas_value_and_grads_data_2_sequence_4"] = biggest(expect, got)
    # with the rows' critical bound, the compact kernels per shard (band, critical queries x critical keys): packed
    # rows; unpacked rows (one padded sequence each) add the globals part
    unpacked = pallas_inputs(5, [([], 3, False), ([], 6, True)], 0.25)
    cases = (("packed", "critical", (q, k, v, positions, critical, segments)),
             ("unpacked", "all", (*unpacked[:5], None)))
    for name, queries, (q, k, v, positions, critical, segment_ids) in cases:
        most = int(jnp.max(jnp.sum(critical, axis=1)))
        spec = SRAMaskSpec.create(positions, critical, window=3, num_global=NUM_GLOBAL, queries=queries,
                                  segment_ids=segment_ids)
        expect = value_and_grads(lambda q, k, v, spec=spec: attention(q, k, v, spec=spec, impl="reference"), q, k, v)
        got = value_and_grads(lambda q, k, v, p=positions, c=critical, s=segment_ids, qs=queries, m=most:
                              pallas_sharded(q, k, v, p, c, s, 3, qs, sequence_mesh(4), max_critical=m,
                                             compact=True), q, k, v)
        results[f"pallas_compact_{name}_4_shards"] = biggest(expect, got)
    q, k, v, positions, critical, segments = pallas_inputs(0, rows, 0.25)
    # one gathered slot short of the tightest bound: the kernels drop the same critical key as the jnp path
    bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=3, num_global=NUM_GLOBAL)))
    got = pallas_sharded(q, k, v, positions, critical, segments, 3, "all", mesh4 := sequence_mesh(4),
                         max_gathered=bound - 1)
    results["pallas_too_small_vs_jnp"] = biggest(
        sharded(q, k, v, positions, critical, segments, 3, "all", mesh4, max_gathered=bound - 1), got)
    results["pallas_too_small_vs_reference"] = biggest(
        reference(q, k, v, positions, critical, segments, 3, "all"), got)
    # row 0: every critical key on shard 3 of 8; row 1: none (only its globals are gathered); tightest bound
    q, k, v, positions, _, segments = pallas_inputs(3, [([5, 13, 21], 0, False), ([9, 17], 4, True)], 0.0)
    slot = jnp.arange(N)
    critical = jnp.stack([(slot >= 12) & (slot < 16), jnp.zeros(N, bool)]) & (positions >= 0)
    bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=3, num_global=NUM_GLOBAL)))
    expect = value_and_grads(lambda q, k, v: reference(q, k, v, positions, critical, segments, 3, "all"), q, k, v)
    got = value_and_grads(lambda q, k, v: pallas_sharded(q, k, v, positions, critical, segments, 3, "all",
                                                         sequence_mesh(8), max_gathered=bound), q, k, v)
    results["pallas_one_shard_bound"] = bound
    results["pallas_one_shard_8_shards"] = biggest(expect, got)
    for name, segment_ids in (("packed", segments), ("unpacked", None)):
        mask = SRAMaskSpec.create(positions, critical, window=1, num_global=0, segment_ids=segment_ids).dense_mask()
        expect = value_and_grads(lambda q, k, v, mask=mask: attention(q, k, v, mask=mask, impl="reference"), q, k, v)
        got = value_and_grads(lambda q, k, v, s=segment_ids: sp.dense_attention_sequence_parallel(
            q, k, v, positions, s, mesh=sequence_mesh(4), impl="pallas", interpret=True), q, k, v)
        results[f"pallas_dense_{name}_4_shards"] = biggest(expect, got)


def check_pallas_hypothesis(results: dict) -> None:
    """Random lengths, packings, critical sets, windows, queries and gather bounds (the row or the tightest) at 4
    shards, the per-shard kernels against the jnp path (values); few examples, interpret mode is slow."""
    mesh = sequence_mesh(4)
    worst = []
    row = st.tuples(st.lists(st.integers(1, N - 1), max_size=3), st.integers(0, N // 2), st.booleans())

    @settings(max_examples=4, deadline=None, derandomize=True, database=None)
    @given(rows=st.lists(row, min_size=B, max_size=B), rate=st.sampled_from([0.0, 0.3]),
           window=st.sampled_from([1, 5, 11]), queries=st.sampled_from(["critical", "all"]), tight=st.booleans(),
           seed=st.integers(0, 2**16))
    def run(rows, rate, window, queries, tight, seed):
        q, k, v, positions, critical, segments = pallas_inputs(seed, rows, rate)
        bound = int(jnp.max(sp.gathered_per_row(positions, critical, window=window, num_global=NUM_GLOBAL)))
        max_gathered = max(1, bound) if tight else None
        expect = sharded(q, k, v, positions, critical, segments, window, queries, mesh, max_gathered=max_gathered)
        got = pallas_sharded(q, k, v, positions, critical, segments, window, queries, mesh, max_gathered=max_gathered)
        worst.append(biggest(expect, got))

    run()
    results["pallas_hypothesis_4_shards"] = max(worst)
    results["pallas_hypothesis_examples"] = len(worst)


def main(checks: list[str]) -> None:
    if len(jax.devices()) != 8:
        raise SystemExit(f"needs XLA_FLAGS=--xla_force_host_platform_device_count=8, got {jax.devices()}")
    results: dict = {}
    for name in checks:
        globals()[f"check_{name}"](results)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or ["attention", "attention_spread", "attention_hypothesis", "selection", "decode"])
