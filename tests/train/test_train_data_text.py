"""GSM8K / MATH training stream (sra_jax.train.data.TextTaskStream) and 3 CPU steps of `sra-jax train` on GSM8K."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sra_jax.cli import main as sra_jax_main
from sra_jax.data import datasets as task_data
from sra_jax.train.config import DataConfig, TrainConfig
from sra_jax.train.data import TextTaskStream, make_stream

TINY = Path(__file__).with_name("gsm8k_tiny.yaml")


@pytest.fixture(scope="module")
def stream(data_dir) -> TextTaskStream:
    return TextTaskStream(DataConfig(task="gsm8k", form="cot", seq_len=192, seed=5, path=str(data_dir)),
                          batch_size=6, grad_accum=2)


@pytest.fixture(scope="module")
def gsm8k_train(data_dir):
    return task_data.load_task("gsm8k", data_dir / "gsm8k", "train")


def _rows(batch):
    tokens, positions, mask = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("tokens", "positions", "loss_mask"))
    return tokens, positions, mask


def test_rows_decode_to_the_source_text_and_the_loss_covers_exactly_the_solution(stream, gsm8k_train):
    batch = stream.batch(3)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 3, 192) for k in ("tokens", "positions", "loss_mask")}
    tokenizer = stream.tokenizer
    for row, (tokens, positions, mask) in enumerate(zip(*_rows(batch))):
        source = gsm8k_train[stream.source_index[stream.example_index(3 * 6 + row)]]
        prompt = task_data.format_prompt("gsm8k", source["question"], cot=True)
        target = task_data.format_target("gsm8k", source, cot=True)
        valid = positions >= 0
        length = int(valid.sum())
        assert valid[:length].all() and not valid[length:].any()  # right padding
        assert np.array_equal(positions[:length], np.arange(length))
        assert tokenizer.decode(tokens[valid]) == f"<|begin_of_text|>{prompt} {target}<|end_of_text|>"
        assert tokenizer.decode(tokens[mask]) == f" {target}<|end_of_text|>"
        assert tokenizer.decode(tokens[valid & ~mask]) == f"<|begin_of_text|>{prompt}"
        assert target.endswith(f"The answer is {source['answer']}.") and "<<" not in target
        assert not mask[~valid].any()


def test_direct_form_trains_on_the_answer_only(data_dir):
    direct = TextTaskStream(DataConfig(task="gsm8k", form="direct", seq_len=256, path=str(data_dir)), batch_size=2)
    tokens, _, mask = _rows(direct.batch(0))
    for row in range(2):
        assert direct.tokenizer.decode(tokens[row][mask[row]]).startswith(" The answer is ")


def test_batches_are_a_pure_function_of_the_step(stream, data_dir):
    fresh = TextTaskStream(stream.data, batch_size=6, grad_accum=2)
    later = fresh.batch(2000)  # epoch 1 first, then back to epoch 0: no hidden iterator state
    for step in (0, 1, 7):
        assert all(np.array_equal(fresh.batch(step)[k], stream.batch(step)[k]) for k in later)
    assert all(np.array_equal(later[k], stream.batch(2000)[k]) for k in later)
    other = TextTaskStream(dataclasses.replace(stream.data, seed=6), batch_size=6, grad_accum=2)
    assert not np.array_equal(other.batch(0)["tokens"], stream.batch(0)["tokens"])


def test_each_epoch_visits_every_kept_example_once_in_a_new_order(stream):
    n = len(stream.examples)
    first = [stream.example_index(g) for g in range(n)]
    second = [stream.example_index(g) for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second
    assert n + stream.skipped == 7473 and stream.skipped > 0  # examples over seq_len=192 tokens are left out
    assert max(len(e.tokens) for e in stream.examples) <= 192


def test_bad_data_config_is_named(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/gsm8k not found"):
        TextTaskStream(DataConfig(task="gsm8k", path=str(tmp_path / "nowhere")), batch_size=2)
    with pytest.raises(ValueError, match="data.task='tinystories' must be one of"):
        TrainConfig.from_dict({"data": {"task": "tinystories"}})
    with pytest.raises(ValueError, match="vocab_size=128 .*128256"):  # TrainConfig or make_stream says so
        make_stream(TrainConfig.from_dict({"data": {"task": "gsm8k", "path": str(data_dir)}}))
    with pytest.raises(ValueError, match="no gsm8k example fits"):
        TextTaskStream(DataConfig(task="gsm8k", seq_len=16, path=str(data_dir)), batch_size=2)
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):  # the shared data holds MATH500 (test) only
        TextTaskStream(DataConfig(task="math", seq_len=512, path=str(data_dir)), batch_size=2)
    with pytest.raises(ValueError, match="must divide evenly"):
        TextTaskStream(DataConfig(task="gsm8k", path=str(data_dir)), batch_size=3, grad_accum=2)


def test_math_stream_reads_a_train_jsonl(data_dir, tmp_path):
    (tmp_path / "math").mkdir()
    lines = (data_dir / "math" / "math500_test.jsonl").read_text().splitlines()[:12]
    (tmp_path / "math" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "llama3").symlink_to(data_dir / "llama3")
    config = TrainConfig.from_dict({"model": {"vocab_size": 128256, "max_position_embeddings": 2048},
                                    "data": {"task": "math", "form": "cot", "seq_len": 2048, "path": str(tmp_path)},
                                    "batch_size": 4})
    stream = make_stream(config)
    tokens, positions, mask = _rows(stream.batch(0))
    for row in range(4):
        source = json.loads(lines[stream.source_index[stream.example_index(row)]])
        assert stream.tokenizer.decode(tokens[row][mask[row]]) == f" {source['solution'].strip()}<|end_of_text|>"
        assert stream.tokenizer.decode(tokens[row][(positions[row] >= 0) & ~mask[row]]).endswith(
            f"Problem: {source['problem'].strip()}\nSolution:")


def test_sra_jax_train_runs_3_gsm8k_steps_and_resumes_at_the_saved_data_position(tmp_path, data_dir, capsys):
    run = ["train", "--config", str(TINY), "--set", f"data.path={data_dir}", "--set", f"checkpoint.dir={tmp_path / 'ck'}",
           "--set", f"log.dir={tmp_path / 'log'}"]
    assert sra_jax_main(run) == 0
    metrics = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    # Resume to step 4: the run must feed batch 3 of the stream (its token count identifies it). A longer schedule
    # than the checkpoint's is refused unless asked for.
    assert sra_jax_main([*run, "--set", "steps=4"]) == 2
    assert "steps (checkpoint 3, now 4)" in capsys.readouterr().err
    assert sra_jax_main([*run, "--set", "steps=4", "--set", "checkpoint.allow_config_change=true"]) == 0
    assert "resumed from" in capsys.readouterr().err
    metrics = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    stream = make_stream(TrainConfig.load(TINY, [f"data.path={data_dir}"]))
    counts = [int((stream.batch(s)["positions"] >= 0).sum()) for s in range(6)]
    assert [m["tokens"] for m in metrics] == counts[:4] and counts[3] not in counts[:3] + counts[4:]
    # The training checkpoint evaluates through `sra-jax eval --config` (model shape from the config).
    out = tmp_path / "eval"
    assert sra_jax_main(["eval", "--config", str(TINY), "--set", f"data.path={data_dir}", "--checkpoint",
                         str(tmp_path / "ck"), "--task", "gsm8k", "--shots", "1", "--limit", "2",
                         "--max-new-tokens", "4", "--data-dir", str(data_dir), "--output", str(out)]) == 0
    summary = json.loads((out / "gsm8k-1shot-direct.summary.json").read_text())
    assert summary["n"] == 2 and "step 4" in summary["checkpoint"]
