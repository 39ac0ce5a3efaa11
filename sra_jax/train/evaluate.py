"""`sra-jax eval`: accuracy of a checkpoint on held-out synthetic problems, few-shot GSM8K / MATH, or the user's own
prompt / answer data.

GSM8K / MATH (`--task gsm8k|math`): see sra_jax.evals.text_tasks (few-shot prompts, greedy KV-cache generation,
grading, a JSONL of every problem and a summary JSON). jsonl / datasets (`--task jsonl|datasets`, or a training
checkpoint of a run on such data): the data section of the run (`--config`, else the checkpoint's stored config;
`--data` replaces data.path) read by sra_jax.data.records, each prompt completed greedily and graded by data.grader
(`--grader` overrides it), with the same results files.

Synthetic direct-answer problems are scored by teacher-forced exact match, which equals greedy decoding of the
answer (the answer follows the prompt, so greedy reproduces it iff each answer token is the argmax given the gold
prefix). The router selects deterministically (plain top-k, `key=None`), as at inference.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import logging
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sra_jax.data import synthetic
from sra_jax.train.config import RECORD_TASKS
from sra_jax.nn import attention_flops
from sra_jax.ops import sequence_parallel
from sra_jax.train import losses
from sra_jax.train.sharding import BATCH_AXES

_logger = logging.getLogger(__name__)


@functools.partial(nnx.jit, static_argnames=("batch_rows", "mesh"))
def _score(model, tokens, positions, loss_mask, batch_rows: int, mesh=None):
    with sequence_parallel.sequence_sharding(mesh, batch_axes=BATCH_AXES):  # no-op unless mesh.sequence > 1
        logits, aux = model(tokens, positions)
    correct = losses.answer_correct(logits, tokens, loss_mask)
    dense, sparse = attention_flops(model.config, aux)
    layers = jnp.asarray(aux.sra_layers, jnp.int32)
    selected = aux.selected_fraction[layers].mean(0) if aux.sra_layers else jnp.ones((batch_rows,))
    return correct, selected, dense, sparse, aux.mask_density.mean(0)


def evaluate_synthetic(model: nnx.Module, batch: synthetic.SyntheticBatch, *, chunk: int = 128,
                       mesh=None) -> dict[str, float]:
    """accuracy, selected_fraction (SRA layers), mask_density and attention FLOPs relative to dense (all layers).
    A `mesh` with a "sequence" axis of size > 1 runs the forward pass sequence-parallel."""
    outputs = []
    for start in range(0, batch.tokens.shape[0], chunk):
        rows = slice(start, start + chunk)
        tokens = jnp.asarray(batch.tokens[rows])
        outputs.append(jax.device_get(_score(model, tokens, jnp.asarray(batch.positions[rows]),
                                             jnp.asarray(batch.loss_mask[rows]), tokens.shape[0], mesh)))
    correct, selected, dense, sparse, density = (np.concatenate(parts) for parts in zip(*outputs))
    return {
        "accuracy": float(correct.mean()),
        "selected_fraction": float(selected.mean()),
        "mask_density": float(density.mean()),
        "attention_flops_ratio": float(sparse.sum() / dense.sum()),
    }


def _default_data_dir() -> Path:
    return Path(os.environ.get("SRA_JAX_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _load_model(args, parser: argparse.ArgumentParser):
    """A converted checkpoint (orbax or Hugging Face directory), or a training checkpoint when --config is given."""
    if args.config is None:
        from sra_jax.convert.source import describe, load_source, resolve_source

        if args.checkpoint is None:
            parser.error("--checkpoint is required for gsm8k / math (or give --config for a training checkpoint)")
        source = resolve_source(args.checkpoint)
        return load_source(source, attention_impl=args.attention_impl)[2], describe(source)
    from sra_jax.train import checkpoint, sharding
    from sra_jax.train.frozen import frozen_weights
    from sra_jax.train.config import TrainConfig
    from sra_jax.train.step import create_trainer

    config = TrainConfig.load(args.config, args.overrides)
    trainer, state = create_trainer(config, sharding.make_mesh(config.mesh.resolve(jax.device_count())))
    directory = args.checkpoint or config.checkpoint.dir
    if not directory:
        parser.error("give --checkpoint or checkpoint.dir in the config")
    with checkpoint.Checkpointer(directory, config.checkpoint, frozen=frozen_weights(config)) as manager:
        restored = manager.restore_latest(state)
    if restored is None:
        raise FileNotFoundError(f"no training checkpoint in {directory}")
    return trainer.model(restored.params), f"{directory} (step {int(restored.step)})"


def _evaluate_items(args, parser, items, tokenizer, *, label: str, name: str, grader: str | None,
                    summary_fields: dict) -> int:
    """Complete and grade `items` with the model of `args`, write `<output>/<name>.jsonl` and `.summary.json` (with
    `summary_fields`)."""
    from sra_jax.evals import text_tasks

    model, checkpoint_name = _load_model(args, parser)
    completer = text_tasks.ModelCompleter(model, tokenizer, args.task, max_new_tokens=args.max_new_tokens,
                                          chunk=args.chunk)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        _logger.info("%d/%d problems, %.0f s", done, total, time.perf_counter() - started)

    records, summary = text_tasks.evaluate(args.task, items, completer.__call__, batch_size=args.batch_size,
                                           progress=progress, grader=grader)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    summary = {
        **summary, **summary_fields, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        **completer.sra_summary(), "checkpoint": str(checkpoint_name), "parameters": params,
        "model": model.config.to_hf() if hasattr(model.config, "to_hf") else None,
        "sra": dataclasses.asdict(model.sra) if getattr(model, "sra", None) is not None else None,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    output = Path(args.output)
    text_tasks.write_results(records, summary, output / f"{name}.jsonl", output / f"{name}.summary.json")
    low, high = summary["ci95_wilson"]
    print(f"{label}: accuracy {summary['accuracy']:.4f} "
          f"({summary['correct']}/{summary['n']}, Wilson 95% CI [{low:.4f}, {high:.4f}]), "
          f"{summary['generated_tokens']} tokens in {summary['wall_time_s']:.1f}s -> {output / name}.*")
    return 0


def evaluate_text(args, parser: argparse.ArgumentParser) -> int:
    """Few-shot GSM8K / MATH: generate, grade, write `<output>/<name>.jsonl` and `<name>.summary.json`."""
    from sra_jax.data.text_tokenizer import load_tokenizer, model_tokenizer
    from sra_jax.evals import text_tasks

    data_dir = Path(args.data_dir) if args.data_dir else _default_data_dir()
    items, shot_source = text_tasks.load_items(args.task, data_dir, shots=args.shots, cot=args.cot, seed=args.seed,
                                               limit=args.limit)
    own = model_tokenizer(args.checkpoint) if args.checkpoint and args.config is None else None
    tokenizer_path = args.tokenizer or own or data_dir / "llama3" / "tokenizer.model"
    tokenizer = load_tokenizer(tokenizer_path)
    form = "cot" if args.cot else "direct"
    return _evaluate_items(
        args, parser, items, tokenizer, grader=None, name=args.name or f"{args.task}-{args.shots}shot-{form}",
        label=f"{args.task} {args.shots}-shot {'CoT' if args.cot else 'direct'}",
        summary_fields={"split": "test", "shots": args.shots, "cot": args.cot, "shot_seed": args.seed,
                        "shot_source": shot_source, "data_dir": str(data_dir), "tokenizer": str(tokenizer_path)})


def _run_data(args):
    """The DataConfig of `--config` (with `--set`), else of the training checkpoint's stored run config, else None."""
    from sra_jax.convert.source import resolve_source
    from sra_jax.train.config import TrainConfig

    if args.config is not None:
        return TrainConfig.load(args.config, args.overrides).data
    if args.checkpoint is not None:
        source = resolve_source(args.checkpoint)
        if source.kind == "train":
            return TrainConfig.from_dict({k: v for k, v in source.train_config.items() if k != "init"}).data
    return None


def evaluate_records(args, parser: argparse.ArgumentParser) -> int:
    """The user's jsonl / datasets examples (sra_jax.data.records): complete each prompt, grade with data.grader."""
    from sra_jax.data import records
    from sra_jax.data.text_tokenizer import load_tokenizer, model_tokenizer
    from sra_jax.evals import text_tasks
    from sra_jax.train.data import load_records

    from sra_jax.train.config import TrainConfig

    data = _run_data(args)
    changes = {"task": args.task, **({"path": args.data} if args.data else {}),
               **({"grader": args.grader} if args.grader else {})}
    if data is None:  # no run config: the defaults, the --set data.* keys (field names, chat, ...), then --data
        if not args.data:
            parser.error(f"--task {args.task} needs --data (or --config / a training checkpoint whose run read it)")
        data = TrainConfig.load(None, [f"data.task={args.task}", f"data.path={args.data}", *args.overrides]).data
    elif args.overrides and args.config is None:
        parser.error("--set needs --config or no training checkpoint (a training checkpoint is evaluated with its "
                     "stored run config; --data, --grader and --tokenizer replace its data settings)")
    data = dataclasses.replace(data, **changes)
    tokenizer_path = args.tokenizer or data.tokenizer or (model_tokenizer(args.checkpoint) if args.checkpoint else None)
    if tokenizer_path is None:
        parser.error("no tokenizer: give --tokenizer (a tokenizer.json / tokenizer.model, or a folder holding one)")
    tokenizer = load_tokenizer(tokenizer_path)
    rows = load_records(data)
    if args.limit is not None:
        if args.limit < 1:
            parser.error(f"--limit {args.limit} must be >= 1")
        rows = rows[: args.limit]
    items = [text_tasks.EvalItem(id=row.where, question=row.prompt if row.prompt is not None else row.messages[-1]["content"],
                                 gold=row.answer, prompt=records.prompt_text(row, tokenizer, chat=data.chat),
                                 prompt_ids=tuple(records.prompt_ids(row, tokenizer, chat=data.chat)))
             for row in rows]
    name = args.name or f"{args.task}-{Path(data.path).stem}-{data.grader}"
    return _evaluate_items(args, parser, items, tokenizer, grader=data.grader, name=name,
                           label=f"{args.task} {data.path} ({data.grader} grader)",
                           summary_fields={"data_path": data.path, "chat": data.chat,
                                           "tokenizer": str(tokenizer_path)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra-jax eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the run's YAML config (as given to sra-jax train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", help="a training checkpoint folder (or step folder; with --config, default "
                        "checkpoint.dir), a converted orbax or Hugging Face Llama directory, or hf://org/name "
                        "(local huggingface_hub cache)")
    parser.add_argument("--task", choices=["synthetic", "gsm8k", "math", *RECORD_TASKS],
                        help="default: data.task of --config or of the training checkpoint's run (else synthetic)")
    parser.add_argument("--data", help="jsonl / datasets: the examples (replaces data.path: a .jsonl file, or the "
                        "datasets.load_dataset path)")
    parser.add_argument("--grader", choices=["exact", "numeric", "math"],
                        help="jsonl / datasets: how answers are graded (default data.grader)")
    parser.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model, a folder holding one, or hf://org/name "
                        "(default: jsonl / datasets: data.tokenizer, else the checkpoint's own; gsm8k / math: the "
                        "checkpoint's own, else <data-dir>/llama3/tokenizer.model)")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="synthetic only")
    parser.add_argument("--size", type=int, help="synthetic: number of problems (default data.eval_size)")
    parser.add_argument("--shots", type=int, default=8, help="gsm8k / math: few-shot examples per prompt")
    parser.add_argument("--cot", action="store_true", help="gsm8k / math: shots show worked solutions")
    parser.add_argument("--limit", type=int, help="gsm8k / math: only the first N test problems")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32, help="decode steps between host stop-string checks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shot selection")
    parser.add_argument("--attention-impl", default="reference", choices=["reference", "gather", "xla", "cudnn", "pallas"],
                        help="attention of a converted checkpoint (a training checkpoint uses its config's)")
    parser.add_argument("--data-dir", help="folder with gsm8k/, math/, llama3/ (default $SRA_JAX_DATA or "
                        "../shared/data beside the checkout)")
    parser.add_argument("--output", default="eval-results", help="folder for the results files")
    parser.add_argument("--name", help="file stem of the results (default TASK-Nshot-cot|direct)")
    args = parser.parse_args(argv)
    task = args.task
    if task is None:
        task = "synthetic" if args.config is None else _config_task(args.config, args.overrides)
        if args.config is None and args.checkpoint is not None:
            data = _run_data(args)
            task = data.task if data is not None else task
    if task in RECORD_TASKS:
        args.task = task
        if args.batch_size < 1 or args.max_new_tokens < 1 or args.chunk < 1:
            parser.error("need --batch-size >= 1, --max-new-tokens >= 1, --chunk >= 1")
        return evaluate_records(args, parser)
    if task != "synthetic":
        args.task = task
        if args.shots < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or args.chunk < 1:
            parser.error("need --shots >= 0, --batch-size >= 1, --max-new-tokens >= 1, --chunk >= 1")
        try:
            return evaluate_text(args, parser)
        except (FileNotFoundError, ValueError) as error:
            print(f"sra-jax eval: {error}", file=sys.stderr)
            return 1
    return evaluate_synthetic_checkpoint(args)


def _config_task(path: str, overrides: list[str]) -> str:
    from sra_jax.train.config import TrainConfig

    return TrainConfig.load(path, overrides).data.task


def evaluate_synthetic_checkpoint(args) -> int:
    from sra_jax.train import checkpoint, sharding
    from sra_jax.train.frozen import frozen_weights
    from sra_jax.train.config import TrainConfig
    from sra_jax.train.data import SyntheticStream
    from sra_jax.train.step import create_trainer

    if args.config is None and args.checkpoint is not None:
        return _evaluate_synthetic_source(args)
    config = TrainConfig.load(args.config, args.overrides)
    if config.data.task != "synthetic":
        print(f"sra-jax eval: --task synthetic needs data.task=synthetic, the config has {config.data.task!r}",
              file=sys.stderr)
        return 2
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    trainer, state = create_trainer(config, mesh)
    directory = args.checkpoint or config.checkpoint.dir
    if directory:
        with checkpoint.Checkpointer(directory, config.checkpoint, frozen=frozen_weights(config)) as manager:
            restored = manager.restore_latest(state)
        if restored is None:
            print(f"sra-jax eval: no checkpoint in {directory}", file=sys.stderr)
            return 1
        state = restored
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    metrics = evaluate_synthetic(trainer.model(state.params), stream.eval_batch(args.size, args.split), mesh=mesh)
    print({"step": int(state.step), "split": args.split, **{k: round(v, 4) for k, v in metrics.items()}})
    return 0


def _evaluate_synthetic_source(args) -> int:
    """`--checkpoint` without `--config`: a training checkpoint folder (or step folder), evaluated with the data
    settings of its stored run config."""
    from sra_jax.convert.source import load_source, resolve_source
    from sra_jax.train.config import TrainConfig
    from sra_jax.train.data import SyntheticStream

    try:
        source = resolve_source(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"sra-jax eval: {error}", file=sys.stderr)
        return 1
    if source.kind != "train":
        print(f"sra-jax eval: --task synthetic on {args.checkpoint} (not a training checkpoint) needs --config for "
              f"the task's settings", file=sys.stderr)
        return 2
    if args.overrides:
        print("sra-jax eval: --set needs --config (a training checkpoint alone is evaluated with its stored run "
              "config)", file=sys.stderr)
        return 2
    config = TrainConfig.from_saved(source.train_config)
    if config.data.task != "synthetic":
        print(f"sra-jax eval: --task synthetic needs data.task=synthetic, the run has {config.data.task!r}",
              file=sys.stderr)
        return 2
    _, _, model = load_source(source, attention_impl=config.attention_impl)
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    metrics = evaluate_synthetic(model, stream.eval_batch(args.size, args.split))
    print({"step": source.step, "split": args.split, **{k: round(v, 4) for k, v in metrics.items()}})
    return 0
