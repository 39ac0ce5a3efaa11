"""`sra-jax eval`: accuracy, selected fraction and attention FLOPs of a checkpoint on held-out problems.

Synthetic direct-answer problems are scored by teacher-forced exact match, which equals greedy decoding of the
answer (the answer follows the prompt, so greedy reproduces it iff each answer token is the argmax given the gold
prefix). The router selects deterministically (plain top-k, `key=None`), as at inference.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sra_jax.data import synthetic
from sra_jax.nn import attention_flops
from sra_jax.train import losses


@functools.partial(nnx.jit, static_argnames=("batch_rows",))
def _score(model, tokens, positions, loss_mask, batch_rows: int):
    logits, aux = model(tokens, positions)
    correct = losses.answer_correct(logits, tokens, loss_mask)
    dense, sparse = attention_flops(model.config, aux)
    layers = jnp.asarray(aux.sra_layers, jnp.int32)
    selected = aux.selected_fraction[layers].mean(0) if aux.sra_layers else jnp.ones((batch_rows,))
    return correct, selected, dense, sparse, aux.mask_density.mean(0)


def evaluate_synthetic(model: nnx.Module, batch: synthetic.SyntheticBatch, *, chunk: int = 128) -> dict[str, float]:
    """accuracy, selected_fraction (SRA layers), mask_density and attention FLOPs relative to dense (all layers)."""
    outputs = []
    for start in range(0, batch.tokens.shape[0], chunk):
        rows = slice(start, start + chunk)
        tokens = jnp.asarray(batch.tokens[rows])
        outputs.append(jax.device_get(_score(model, tokens, jnp.asarray(batch.positions[rows]),
                                             jnp.asarray(batch.loss_mask[rows]), tokens.shape[0])))
    correct, selected, dense, sparse, density = (np.concatenate(parts) for parts in zip(*outputs))
    return {
        "accuracy": float(correct.mean()),
        "selected_fraction": float(selected.mean()),
        "mask_density": float(density.mean()),
        "attention_flops_ratio": float(sparse.sum() / dense.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    from sra_jax.train import checkpoint, sharding
    from sra_jax.train.config import TrainConfig
    from sra_jax.train.data import SyntheticStream
    from sra_jax.train.step import create_trainer

    parser = argparse.ArgumentParser(prog="sra-jax eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the run's YAML config (as given to sra-jax train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: checkpoint.dir of the config)")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--size", type=int, help="number of problems (default data.eval_size)")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config, args.overrides)
    if config.data.task != "synthetic":
        print(f"sra-jax eval: data.task={config.data.task!r} is not supported yet; only 'synthetic'", file=sys.stderr)
        return 2
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    trainer, state = create_trainer(config, mesh)
    directory = args.checkpoint or config.checkpoint.dir
    if directory:
        with checkpoint.Checkpointer(directory, config.checkpoint) as manager:
            restored = manager.restore_latest(state)
        if restored is None:
            print(f"sra-jax eval: no checkpoint in {directory}", file=sys.stderr)
            return 1
        state = restored
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    metrics = evaluate_synthetic(trainer.model(state.params), stream.eval_batch(args.size, args.split))
    print({"step": int(state.step), "split": args.split, **{k: round(v, 4) for k, v in metrics.items()}})
    return 0
