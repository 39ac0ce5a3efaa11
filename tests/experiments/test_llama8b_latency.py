"""`experiments/llama8b_latency.py --tiny` end to end on CPU: the same code path as the H100 run (torch model with
random weights -> our parameter tree through the converter's table and DLPack -> dense and SRA `Llama`, prefill with
a KV cache, a jitted decode loop, transformers prefill + eager decode), with the torch side on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("llama8b_latency", ROOT / "experiments" / "llama8b_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record(tmp_path_factory, module) -> dict:
    out = tmp_path_factory.mktemp("latency")
    # float32 so the sanity row can be held to a tight tolerance: it checks the weight conversion, not bf16 noise.
    args = ["--tiny", "--dtype", "float32", "--lengths", "24", "--reps", "1", "--decode-steps", "2", "--out-dir", str(out)]
    assert module.main(args) == 0
    (path,) = out.glob("llama8b-latency-tiny-*.json")
    assert (out / path.name.replace(".json", ".md")).is_file()
    return json.loads(path.read_text())


def test_same_weights_give_the_same_dense_logits(record):
    sanity = record["rows"][0]
    assert sanity["phase"].startswith("sanity")
    # float32 on both sides, 2 layers: only summation order differs (measured ~2e-7); 1e-5 leaves 50x headroom and
    # still fails on any mapping mistake (a missing transpose or a rope mismatch gives errors of order 1).
    assert sanity["rel_err"] < 1e-5
    assert sanity["argmax_agreement"] == 1.0


PEERS = {"transformers dense (sdpa, eager)", "sra_jax dense (xla)", "sra_jax SRA (pallas)"}
FORCED = {"sra_jax SRA forced scattered (pallas)", "sra_jax SRA forced clustered (pallas)",
          "sra_jax SRA clustered (pallas)"}


def test_every_implementation_has_finite_prefill_and_decode_rows(record):
    rows = [r for r in record["rows"] if "impl" in r]
    assert not [r for r in rows if "error" in r]
    assert {r["impl"] for r in rows} == PEERS | FORCED
    for impl in PEERS:
        (pre,) = [r for r in rows if r["impl"] == impl and r["phase"] == "prefill"]
        decodes = {r["batch"]: r for r in rows if r["impl"] == impl and r["phase"] == "decode"}
        assert sorted(decodes) == [1, 8]  # --tiny decodes at batch 8 too, at every length
        assert pre["context"] == 24 and pre["batch"] == 1
        assert math.isfinite(pre["ms"]) and pre["ms"] > 0
        for dec in decodes.values():
            assert dec["context"] == 24
            assert math.isfinite(dec["ms_per_token"]) and dec["ms_per_token"] > 0 and dec["steps"] == 2


def test_forced_critical_rows_use_the_routers_count_in_their_pattern(record, module):
    for impl in FORCED:
        (row,) = [r for r in record["rows"] if r.get("impl") == impl]
        assert row["phase"] == "prefill" and math.isfinite(row["ms"])
        assert row["selected_fraction"] == pytest.approx(3 / 24)  # forced: the router's top-k count, k = 3
    clustered = np.asarray(module.forced_critical("clustered", 2, 4096, 410, run=128, seed=0))
    scattered = np.asarray(module.forced_critical("scattered", 2, 4096, 410, run=128, seed=0))
    for flags in (clustered, scattered):
        assert flags.shape == (2, 1, 4096) and (flags.sum(-1) == 410).all() and (flags[0] == flags[1]).all()
    runs = lambda f: int(np.sum(np.diff(f.astype(int), prepend=0) == 1))
    assert runs(clustered[0, 0]) == 4  # ceil(410 / 128) runs of consecutive tokens
    assert runs(scattered[0, 0]) > 300  # uniform draws rarely touch


def test_tile_cache_repeats_every_field_of_the_batch_one_cache(module):
    import jax.numpy as jnp

    from sra_jax.config import LlamaConfig
    from sra_jax.nn import LeftPaddedKVCache

    cache = LeftPaddedKVCache.create(LlamaConfig.tiny(), jnp.array([5]), prompt_len=6, max_len=9, critical_capacity=4)
    cache = cache.replace(k=cache.k + jnp.arange(9.0)[None, None, :, None, None], index=jnp.int32(6))
    wide = module.tile_cache(cache, 3)
    assert wide.batch == 3 and wide.critical_capacity == 4 and int(wide.index) == 6
    for name in ("k", "v", "positions", "critical", "threshold", "critical_slots", "num_critical", "kv_start"):
        one, three = np.asarray(getattr(cache, name)), np.asarray(getattr(wide, name))
        axis = module.CACHE_BATCH_AXIS[name]
        np.testing.assert_array_equal(three, np.repeat(one, 3, axis=axis))


def test_sra_row_reports_its_selection_and_densities(record):
    (sra,) = [r for r in record["rows"] if r.get("impl") == "sra_jax SRA (pallas)" and r["phase"] == "prefill"]
    assert sra["selected_fraction"] == pytest.approx(3 / 24)  # k = ceil(0.1 * 24) = 3 critical tokens per layer
    # With window 64 > 24 tokens every causal pair is in the window: SRA is dense here, and says so.
    assert sra["mask_density"] == pytest.approx(1.0)
    assert sra["block_density"] == pytest.approx(1.0)
    assert record["sra"]["window"] == 64 and record["sra"]["num_global"] == 4
    assert record["device"] and record["date"] and {"jax", "torch", "transformers"} <= set(record["versions"])


def test_weight_read_floor_is_measured_in_the_same_run(record):
    (floor,) = [r for r in record["rows"] if r["phase"].startswith("weight-read floor")]
    model = record["model"]
    hidden, inter, vocab, layers = (model[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                       "num_hidden_layers"))
    kv = model["num_key_value_heads"] * model["head_dim"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    params = layers * per_layer + vocab * hidden * (1 if model["tie_word_embeddings"] else 2) + hidden
    assert floor["weight_bytes"] == 4 * params  # float32, every parameter of the dense model
    assert floor["copy_gbps"] > 0 and floor["floor_ms_per_token"] == pytest.approx(
        floor["weight_bytes"] / floor["copy_gbps"] / 1e6)


def test_zeroed_router_scores_pick_the_first_tokens(module):
    import jax.numpy as jnp
    from flax import nnx

    from sra_jax.config import LlamaConfig, SRAConfig
    from sra_jax.nn import Llama

    sra = SRAConfig(critical_fraction=0.25, window=2, num_global=1, router_hidden=8)
    model = Llama(LlamaConfig.tiny(), sra, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    _, aux = nnx.merge(graph, module.zero_router_scores(state))(tokens)
    want = np.zeros((2, 16), bool)
    want[:, :4] = True  # k = ceil(0.25 * 16) = 4: ties go to the lowest indices
    assert (np.asarray(aux.router_logits) == 0).all()
    np.testing.assert_array_equal(np.asarray(aux.critical), np.broadcast_to(want, aux.critical.shape))
    _, own = model(tokens)
    assert not (np.asarray(own.critical) == np.broadcast_to(want, own.critical.shape)).all()  # the router's own
