"""Run in a subprocess with 8 fake CPU devices: 5 train steps on several meshes; prints JSON losses and specs.

argv: mode ("dense", "sra" or "packed"), then meshes as "data,fsdp,tensor"."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from sra_jax.train import sharding
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import SyntheticStream
from sra_jax.train.step import create_trainer

OVERRIDES = [  # compile time dominates (~22 s per mesh): one layer (SRA applies to it) halves the model's part
    "model.num_hidden_layers=1", "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=4",
    "model.num_key_value_heads=2", "model.max_position_embeddings=64", "data.seq_len=48",
    "data.synthetic={min_hops: 1, max_hops: 2, min_distractors: 0, max_distractors: 2, value_range: 10, "
    "operand_max: 5, operators: '+-'}",
    "batch_size=16", "grad_accum=2", "steps=5", "optim.warmup_steps=1",
]


def main(argv: list[str]) -> None:
    sra = argv[0] == "sra"
    meshes = [tuple(int(x) for x in m.split(",")) for m in argv[1:]]
    overrides = OVERRIDES + (["sra={critical_fraction: 0.25, window: 8, num_global: 1, router_hidden: 16}",
                              "loss.kind=sl+rl", "loss.group_size=2"] if sra else [])
    if argv[0] == "packed":  # dense, several examples per row with segment ids
        overrides = [*overrides, "data.pack=true"]
    config = TrainConfig.load(None, overrides)
    stream = SyntheticStream(config.data, config.batch_size, config.grad_accum)
    out = {}
    for shape in [(1, 1, 1), *meshes]:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = sharding.make_mesh(shape, devices)
        trainer, state = create_trainer(config, mesh)
        losses = []
        for step in range(config.steps):
            state, metrics = trainer.step_fn(state, trainer.put_batch(stream.batch(step)))
            losses.append(float(metrics["loss"]))
        specs = {jax.tree_util.keystr(path): str(leaf.sharding.spec)
                 for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
        mu_specs = {jax.tree_util.keystr(path): str(leaf.sharding.spec)
                    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)}
        out[",".join(map(str, shape))] = {"losses": losses, "specs": specs, "opt_specs": mu_specs}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
