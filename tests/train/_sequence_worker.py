"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by the
caller): a model with one SRA and one dense layer, sequence-sharded against one device. Prints one JSON line.

argv[0] = "train": 5 train steps, unpacked (SRA + CE + router policy gradient; the `sra-jax train` CLI with
mesh.sequence=8, the step API on data=2 x sequence=4) and packed (fsdp=4 x sequence=2), each against one device.
argv[0] = "model": gradients, critical sets and selection log-probs of one batch (sequence=4 against one device),
greedy generation with a sequence-sharded KV cache (sequence=4) and `evaluate_synthetic` (data=2 x sequence=4)
against the unsharded ones.
Every run also reports how often (at trace time) each sequence-parallel function was chosen."""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from sra_jax.generate import generate
from sra_jax.ops import sequence_parallel as sp
from sra_jax.train import sharding
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import SyntheticStream
from sra_jax.train.step import build_model, create_trainer, loss_fn

OVERRIDES = [  # layer 0 is SRA (window 6 > the 8-way chunk of 6: a halo from two shards), layer 1 dense
    "model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.max_position_embeddings=64", "data.seq_len=48",
    "data.synthetic={min_hops: 1, max_hops: 2, min_distractors: 0, max_distractors: 2, value_range: 10, "
    "operand_max: 5, operators: '+-'}",
    "batch_size=4", "steps=5", "optim.warmup_steps=1",
    "sra={critical_fraction: 0.25, window: 7, num_global: 1, router_hidden: 8, layers: [0]}",
]
UNPACKED = [*OVERRIDES, "loss.kind=sl+rl", "loss.group_size=2"]
PACKED = [*OVERRIDES, "data.pack=true", "data.max_segments=4"]  # rows of 48 hold at most 2 problems
COUNTED = ("sra_attention_sequence_parallel", "dense_attention_sequence_parallel", "sharded_cache_attention",
           "sharded_topk_indices", "sharded_topk_log_prob")
calls: collections.Counter = collections.Counter()
gathered: set = set()  # the max_gathered slots sra_attention_sequence_parallel was given


def count_calls() -> None:
    """Wrap the module's sequence-parallel entry points (spec_attention and the router look them up there)."""
    for name in COUNTED:
        original = getattr(sp, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            if "max_gathered" in kwargs:
                gathered.add(kwargs["max_gathered"])
            return _original(*args, **kwargs)

        setattr(sp, name, counted)


def mesh_of(shape) -> jax.sharding.Mesh:
    return sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])


def train_losses(overrides: list[str], shape) -> dict:
    calls.clear()
    gathered.clear()
    config = TrainConfig.load(None, overrides)
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    trainer, state = create_trainer(config, mesh_of(shape))
    losses = []
    for step in range(config.steps):
        state, metrics = trainer.step_fn(state, trainer.put_batch(stream.batch(step)))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "calls": dict(calls), "max_gathered": sorted(gathered)}


def cli_losses(overrides: list[str]) -> dict:
    """`sra-jax train` (in this process) with mesh.sequence=8 on all 8 devices; the losses of metrics.jsonl."""
    from sra_jax.train.cli import main

    calls.clear()
    with tempfile.TemporaryDirectory() as tmp:
        args = [*overrides, "mesh.sequence=8", f"log.dir={tmp}", "log.every=1", "log.tensorboard=false",
                "log.progress=false"]
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([a for o in args for a in ("--set", o)])
        if code:
            raise SystemExit(f"sra-jax train exited with {code}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"losses": [row["loss"] for row in sorted(rows, key=lambda row: row["step"])], "calls": dict(calls)}


def probe(shape) -> dict:
    """d loss / d params, critical sets and selection log-probs of the first batch (the train step's loss)."""
    calls.clear()
    config = TrainConfig.load(None, UNPACKED)
    mesh = mesh_of(shape)
    trainer, state = create_trainer(config, mesh)
    batch = jax.tree.map(lambda x: x[0], trainer.put_batch(SyntheticStream(config.data, config.batch_size,
                                                                           config.grad_accum).batch(0)))
    key = jax.random.key(3)
    objective = functools.partial(loss_fn, graphdef=trainer.graphdef, rest=trainer.rest, loss=config.loss,
                                  has_sra=True, mesh=mesh)

    @jax.jit
    def run(params, tokens, positions, loss_mask):
        grads = jax.grad(lambda p: objective(p, tokens, positions, loss_mask, key, 0)[0])(params)
        with sp.sequence_sharding(mesh, batch_axes=sharding.BATCH_AXES):
            _, aux = trainer.model(params)(tokens, positions, key=key)
        return grads, aux.critical, aux.selection_log_prob

    grads, critical, log_prob = run(state.params, batch.tokens, batch.positions, batch.loss_mask)
    return {"grads": jax.tree.map(np.asarray, jax.tree.leaves(grads)), "critical": np.asarray(critical),
            "log_prob": np.asarray(log_prob), "calls": dict(calls)}


def compare_probes(reference: dict, sharded: dict) -> dict:
    """Largest gradient difference (and the largest gradient, for scale), critical-flag mismatches, log-prob gap."""
    pairs = list(zip(reference["grads"], sharded["grads"], strict=True))
    return {"grad_max_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
            "grad_max": max(float(np.max(np.abs(a))) for a, _ in pairs),
            "critical_mismatches": int(np.sum(reference["critical"] != sharded["critical"])),
            "critical_count": int(np.sum(reference["critical"])),
            "log_prob_max_diff": float(np.max(np.abs(reference["log_prob"] - sharded["log_prob"]))),
            "calls": sharded["calls"], "reference_calls": reference["calls"]}


def generation(shape) -> dict:
    calls.clear()
    config = TrainConfig.load(None, OVERRIDES)
    model = build_model(config)
    prompts = [[5, 9, 13, 2, 7], [11, 3, 8, 8, 1, 4, 6, 2, 9, 12, 10], [7]]  # bucket 16 + 8 new = 24 slots
    mesh = None if shape is None else mesh_of(shape)
    tokens = generate(model, prompts, max_new_tokens=8, mesh=mesh)
    return {"tokens": tokens, "calls": dict(calls)}


def evaluation(shape) -> dict:
    """`evaluate_synthetic` (the `sra-jax eval --task synthetic` forward pass) of a fresh model."""
    from sra_jax.train.evaluate import evaluate_synthetic

    calls.clear()
    config = TrainConfig.load(None, OVERRIDES)
    batch = SyntheticStream(config.data, config.batch_size, config.grad_accum).eval_batch(16, "test")
    metrics = evaluate_synthetic(build_model(config), batch, mesh=None if shape is None else mesh_of(shape))
    return {"metrics": metrics, "calls": dict(calls)}


def main(argv: list[str]) -> None:
    if len(jax.devices()) != 8:
        raise SystemExit(f"needs XLA_FLAGS=--xla_force_host_platform_device_count=8, got {jax.devices()}")
    count_calls()
    if argv[0] == "train":
        out = {"unpacked": {"1,1,1,1": train_losses(UNPACKED, (1, 1, 1, 1)), "cli,sequence=8": cli_losses(UNPACKED),
                            "2,1,1,4": train_losses(UNPACKED, (2, 1, 1, 4))},
               "packed": {"1,1,1,1": train_losses(PACKED, (1, 1, 1, 1)), "1,4,1,2": train_losses(PACKED, (1, 4, 1, 2))}}
    else:
        out = {"probe": compare_probes(probe((1, 1, 1, 1)), probe((1, 1, 1, 4))),
               "generate": {"unsharded": generation(None), "1,1,1,4": generation((1, 1, 1, 4))},
               "evaluate": {"unsharded": evaluation(None), "2,1,1,4": evaluation((2, 1, 1, 4))}}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
