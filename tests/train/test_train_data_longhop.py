"""`data.task: longhop` in a TrainConfig: the section parses, the stream yields the task's rows, mistakes are named."""

from __future__ import annotations

import numpy as np
import pytest

from sra_jax.data import longhop
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import LonghopStream, make_stream

SECTION = {"context_len": 40, "longer_context_len": 64, "min_hops": 1, "max_hops": 2, "num_vars": 16,
           "value_range": 8, "operand_max": 2, "extra_test_hops": 1}


def config(**data) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"vocab_size": 64, "max_position_embeddings": 128},
        "data": {"task": "longhop", "seq_len": 42, "longhop": SECTION, **data},
        "batch_size": 4, "grad_accum": 2,
    })


def test_longhop_stream_batches_are_the_task_rows():
    cfg = config()
    stream = make_stream(cfg)
    assert isinstance(stream, LonghopStream)
    batch = stream.batch(3)
    assert batch["tokens"].shape == (2, 2, 42)
    expected = longhop.make_example(cfg.data.longhop, "train", 0, 3 * 4 + 1)  # step 3, micro-batch 0, row 1
    assert np.array_equal(batch["tokens"][0, 1, :40], expected.prompt)
    assert batch["loss_mask"][0, 1].sum() == 2  # the answer and eos
    assert np.array_equal(stream.batch(3)["tokens"], batch["tokens"])
    held_out = stream.eval_batch(4, "longer")
    assert held_out.tokens.shape == (4, 66) and held_out.oracle.any(axis=1).all()


def test_longhop_config_mistakes_are_named():
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig.from_dict({"model": {"vocab_size": 32}, "data": {"task": "longhop", "longhop": SECTION}})
    with pytest.raises(ValueError, match="data.seq_len"):
        make_stream(config(seq_len=40))
    with pytest.raises(ValueError, match="data.pack"):
        config(pack=True)
    with pytest.raises(ValueError, match="num_vars"):
        config(longhop={**SECTION, "num_vars": 4})
