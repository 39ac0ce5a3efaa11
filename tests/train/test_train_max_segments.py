"""data.max_segments: the packer closes a row at that many examples, and the train step passes it to the model as
a static bound, so packed SRA rows take the compact (gathered critical keys) path with unchanged loss and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sra_jax.data.packing import first_fit
from sra_jax.nn import selector
from sra_jax.train import sharding
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import make_stream
from sra_jax.train.step import create_trainer, loss_fn

from train_helpers import TINY

PACKED = [*TINY, "data.pack=true"]


@given(st.lists(st.integers(1, 16), min_size=1, max_size=60), st.integers(1, 6))
def test_first_fit_never_puts_more_than_max_items_in_a_row(lengths, max_items):
    rows = first_fit(np.array(lengths), 16, max_items)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))  # every item exactly once
    for row in rows:
        assert 1 <= len(row) <= max_items and sum(lengths[i] for i in row) <= 16
        assert list(row) == sorted(row)
    if max_items >= len(lengths):  # a bound that never binds changes nothing
        assert [r.tolist() for r in rows] == [r.tolist() for r in first_fit(np.array(lengths), 16)]


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "true", "many"])
def test_bad_max_segments_is_a_one_line_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"data\.max_segments=") as err:
        TrainConfig.load(None, [*PACKED, f"data.max_segments={value}"])
    assert "\n" not in str(err.value)


def test_packed_stream_respects_max_segments():
    config = TrainConfig.load(None, [*PACKED, "data.max_segments=1"])
    seg = make_stream(config).batch(0)["segment_ids"]
    assert seg.max() == 1  # the bound binds: the same data packs 2 examples a row without it
    assert make_stream(TrainConfig.load(None, PACKED)).batch(0)["segment_ids"].max() > 1


@pytest.fixture(scope="module")
def packed_sra():
    config = TrainConfig.load(None, [*PACKED, "data.max_segments=4",
                                     "sra={selection: topk, critical_fraction: 0.25, window: 2}"])
    trainer, state = create_trainer(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    return config, trainer, state, make_stream(config).batch(0)


def test_packed_step_with_the_bound_takes_the_compact_path_with_the_same_loss_and_gradients(packed_sra, monkeypatch):
    config, trainer, state, arrays = packed_sra
    seq = config.data.seq_len
    bounds = []
    original = selector.critical_bound
    monkeypatch.setattr(selector, "critical_bound", lambda *a: bounds.append(original(*a)) or bounds[-1])
    graphdef, rest = trainer.graphdef, trainer.rest
    micro = {k: jnp.asarray(v[0]) for k, v in arrays.items()}

    def run(max_segments):
        fn = functools.partial(loss_fn, graphdef=graphdef, rest=rest, loss=config.loss, has_sra=True, mesh=None,
                               max_segments=max_segments)
        grad = jax.value_and_grad(fn, has_aux=True)
        return grad(state.params, micro["tokens"], micro["positions"], micro["loss_mask"], jax.random.key(0), 0,
                    micro["segment_ids"])

    (loss_plain, _), grads_plain = run(None)
    assert bounds and set(bounds) == {seq}  # without the bound every key may be critical: the plain layout
    bounds.clear()
    (loss_bound, _), grads_bound = run(config.data.max_segments)
    assert bounds and set(bounds) == {config.sra.num_critical(seq) + 4} and bounds[0] < seq  # the compact path
    # Same selection, same pairs: only the order of float32 sums differs between the two layouts.
    np.testing.assert_allclose(float(loss_bound), float(loss_plain), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_bound), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_the_trainer_passes_data_max_segments_to_the_model(packed_sra, monkeypatch):
    config, trainer, state, arrays = packed_sra
    bounds = []
    original = selector.critical_bound
    monkeypatch.setattr(selector, "critical_bound", lambda *a: bounds.append(a[-1]) or original(*a))
    trainer.step_fn.lower(state, trainer.put_batch(arrays))
    assert bounds and set(bounds) == {config.data.max_segments}


@pytest.mark.parametrize("bound", [1, 3])
def test_train_throughput_packed_rows_respect_max_segments(bound):
    from sra_jax.benchmarks import train_throughput

    config = TrainConfig.load(None, [*PACKED, "data.seq_len=256", "model.max_position_embeddings=256",
                                     f"data.max_segments={bound}"])
    batch = train_throughput.random_packed_batch(config, seed=0)
    assert batch["segment_ids"].max() == bound and batch["segment_ids"].min() == 1  # no padding, the bound binds


def test_a_batch_over_the_bound_is_refused(packed_sra):
    config, trainer, _, arrays = packed_sra
    over = {k: v.copy() for k, v in arrays.items()}
    seq = over["segment_ids"].shape[-1]
    over["segment_ids"][0, 0] = np.arange(seq) // (seq // 8) + 1  # 8 segments in one row, bound 4
    over["positions"][0, 0] = np.arange(seq) % (seq // 8)
    with pytest.raises(ValueError, match=r"data\.max_segments=4, but a packed row of the batch holds 8 segments"):
        trainer.put_batch(over)
