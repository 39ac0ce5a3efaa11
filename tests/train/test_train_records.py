"""The user's own data end to end through the CLI: a tiny random Llama with a tokenizer.json in a hub cache
(`hf://org/tiny`) -> `sra-jax train` on a jsonl file (SL, routers only) -> `sra-jax train` continuing from that
checkpoint with SL + router RL on the same rows read by `datasets.load_dataset("json")` -> `sra-jax eval` grading
generated answers with data.grader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sra_jax.cli import main as cli
from sra_jax.convert.source import load_source, resolve_source
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import make_stream
from tests.user_sources import add_to_hub_cache, write_tiny_llama

ROWS = [
    {"q": "What is 12 plus 30?", "a": "42"},
    {"q": "Compute 3 + 4.", "a": "7"},
    {"messages": [{"role": "user", "content": "How many legs do 2 cats have?"},
                  {"role": "assistant", "content": "8"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 7 times 6"},
                  {"role": "assistant", "content": "The answer is 42."}]},
]
FAST = ["steps=2", "batch_size=2", "optim.warmup_steps=0", "log.dir=null", "log.progress=false",
        "checkpoint.async_save=false", "sra.critical_fraction=0.25", "sra.window=4", "sra.num_global=1",
        "sra.router_hidden=16", "data.seq_len=48", "data.prompt_field=q", "data.answer_field=a", "data.chat=true",
        "data.grader=numeric", "init.trainable=router"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """org/tiny in a hub cache of the test's own, huggingface_hub offline, datasets caching under tmp."""
    import datasets
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("user_data")
    add_to_hub_cache(root / "hub", "org/tiny", write_tiny_llama(root / "model"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_CACHE", str(root / "hub"))
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets_cache")
        yield root


@pytest.fixture(scope="module")
def runs(offline_hub):
    root = offline_hub
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    sl = ["-q", "train", *_sets(*FAST, "init.from=hf://org/tiny", "data.task=jsonl", f"data.path={data}",
                                 f"checkpoint.dir={root / 'sl'}")]
    assert cli(sl) == 0
    rl = ["-q", "train", *_sets(*FAST, f"init.from={root / 'sl'}", "loss.kind=sl+rl", "loss.group_size=2",
                                 "data.task=datasets", "data.path=json", f"data.data_files=[{data}]",
                                 f"checkpoint.dir={root / 'rl'}")]
    assert cli(rl) == 0
    return root, data


def test_training_on_jsonl_and_datasets_keeps_the_llama_and_moves_the_routers(runs):
    root, _ = runs
    _, _, source = load_source("hf://org/tiny")
    _, _, sl = load_source(root / "sl")
    _, _, rl = load_source(root / "rl")
    np.testing.assert_array_equal(np.asarray(rl.embed.embedding.get_value()),
                                  np.asarray(source.embed.embedding.get_value()))
    stored = resolve_source(root / "rl").train_config["data"]
    assert (stored["task"], stored["path"], stored["grader"]) == ("datasets", "json", "numeric")
    sl_routers = [np.asarray(x) for x in _routers(sl)]
    rl_routers = [np.asarray(x) for x in _routers(rl)]
    assert any(not np.array_equal(a, b) for a, b in zip(sl_routers, rl_routers))


def _routers(model):
    from flax import nnx

    from sra_jax.train.step import is_router_param

    return [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if is_router_param(p)]


def test_the_stream_tokenises_with_the_checkpoint_tokenizer_and_masks_the_answer(runs):
    root, data = runs
    config = TrainConfig.load(None, [*FAST, "init.from=hf://org/tiny", "data.task=jsonl", f"data.path={data}"])
    stream = make_stream(config)
    assert len(stream.examples) == len(ROWS) and stream.tokenizer.vocab_size == 300
    chat = stream.examples[3]
    assert stream.tokenizer.decode(chat.tokens[chat.loss_mask]) == "The answer is 42.<|end|>\n"
    batch = stream.batch(0)
    assert batch["tokens"].shape == (1, 2, 48) and batch["loss_mask"].any(axis=-1).all()


def test_eval_grades_generated_answers_with_the_run_grader(runs, tmp_path, capsys):
    root, data = runs
    argv = ["-q", "eval", "--checkpoint", str(root / "rl"), "--max-new-tokens", "4", "--batch-size", "4",
            "--output", str(tmp_path), "--name", "user"]
    assert cli(argv) == 0
    assert "datasets json (numeric grader): accuracy" in capsys.readouterr().out
    summary = json.loads((tmp_path / "user.summary.json").read_text())
    assert (summary["n"], summary["grader"], summary["task"]) == (len(ROWS), "numeric", "datasets")
    rows = [json.loads(line) for line in (tmp_path / "user.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["42", "7", "8", "The answer is 42."]
    assert rows[0]["prompt"].startswith("<s><|user|>\nWhat is 12 plus 30?<|end|>\n<|assistant|>\n")
    assert summary["correct"] == sum(r["correct"] for r in rows)


def test_bad_rows_stop_the_run_with_the_file_line_and_field(offline_hub, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"q": "no answer"}) + "\n")
    argv = ["-q", "train", *_sets(*FAST, "init.from=hf://org/tiny", "data.task=jsonl", f"data.path={bad}")]
    assert cli(argv) == 2
    assert f"{bad}:2: no field 'a' (data.answer_field)" in capsys.readouterr().err
    no_tokenizer = ["-q", "train", *_sets(*FAST, "data.task=jsonl", f"data.path={bad}")]
    assert cli(no_tokenizer) == 2
    assert "needs a tokenizer: data.tokenizer is null" in capsys.readouterr().err


def test_eval_on_a_hub_model_with_an_explicit_data_file(runs, tmp_path):
    _, data = runs
    argv = ["-q", "eval", "--checkpoint", "hf://org/tiny", "--task", "jsonl", "--data", str(data), "--grader", "exact",
            "--set", "data.prompt_field=q", "--set", "data.answer_field=a", "--limit", "2", "--max-new-tokens", "2",
            "--output", str(tmp_path), "--name", "hub"]
    assert cli(argv) == 0
    summary = json.loads((tmp_path / "hub.summary.json").read_text())
    assert (summary["n"], summary["grader"], summary["chat"]) == (2, "exact", False)
    assert Path(summary["tokenizer"]).name == "tokenizer.json"


def test_grpo_trains_on_jsonl_rows_graded_with_the_run_grader(runs, tmp_path):
    """GRPO from a hub checkpoint on the user's rows: rollouts decoded with the checkpoint's tokenizer, graded by
    data.grader; routers only, so the Llama stays bit-identical."""
    root, data = runs
    out = tmp_path / "grpo"
    argv = ["-q", "train", *_sets(*FAST, "init.from=hf://org/tiny", "loss.kind=grpo", "loss.group_size=2",
                                   "loss.grpo.max_new_tokens=4", "data.task=jsonl", f"data.path={data}",
                                   f"checkpoint.dir={out}")]
    assert cli(argv) == 0
    _, _, source = load_source("hf://org/tiny")
    _, _, trained = load_source(out)
    np.testing.assert_array_equal(np.asarray(trained.embed.embedding.get_value()),
                                  np.asarray(source.embed.embedding.get_value()))


def test_the_grpo_grader_of_records_drops_stop_ids_and_uses_data_grader(offline_hub):
    from sra_jax.data.text_tokenizer import load_tokenizer
    from sra_jax.train.lm_rl import answer_grader

    tokenizer = load_tokenizer("hf://org/tiny")
    stop = list(tokenizer.stop_ids)
    numeric = answer_grader("jsonl", tokenizer, grader="numeric")
    exact = answer_grader("jsonl", tokenizer, grader="exact")
    gold = tokenizer.encode("42") + stop
    assert numeric(tokenizer.encode("so 42.0") + stop, gold) == 1.0
    assert exact(tokenizer.encode("so 42.0"), gold) == 0.0 and exact(tokenizer.encode(" 42 "), gold) == 1.0
    assert numeric(tokenizer.encode("41"), gold) == 0.0
    with pytest.raises(ValueError, match="data.grader='nope'"):
        answer_grader("jsonl", tokenizer, grader="nope")
