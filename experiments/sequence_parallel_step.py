"""One device: the time of sequence-parallel SRA attention with S shards simulated (`mesh=None, shards=S`: the shards
run under `vmap` and the halo / gather collectives act across the mapped axis), against the same code with one
shard and against unsharded SRA attention (`attention(..., spec=..., impl=...)`), forward and forward + backward,
for each per-shard compute in `--per-shard` ("jnp": one query block at a time; "pallas": the block-sparse kernels
over each shard's key set, run once on the shards folded into the batch).
Then the model-level wiring: the loss and gradients of a Llama with one dense and one SRA layer (Gumbel top-k
selection), traced inside `sequence_sharding(None, shards=S, impl=per_shard)` (every attention layer and the
router's top-k and log-prob sequence-parallel, S shards simulated) against the same model unsharded (`impl`), and
the differences of loss and gradients between the two.

The critical set is a global top-k (the top ceil(alpha * N) of random router scores of the row, as the model's
selection), so `max_gathered = ceil(alpha * N) + num_global` (the row's bound) is exact. Medians over repeats after a compiling warm-up; the
sharded and unsharded outputs are compared (max abs difference in the record).

    python experiments/sequence_parallel_step.py --out PATH.json                 # GPU: 128k, 8 shards, Llama 3 8B heads
    python experiments/sequence_parallel_step.py --tiny --out /tmp/step.json     # CPU smoke (the test; kernels in
                                                                                 # interpret mode)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sra_jax.ops import sequence_parallel as sp
from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec

FULL = {"length": 128 * 1024, "shards": 8, "window": 1024, "num_global": 4, "heads": 32, "kv_heads": 8,
        "head_dim": 128, "dtype": "bfloat16", "impl": "pallas", "model_length": 32 * 1024, "hidden": 4096,
        "intermediate": 14336, "vocab": 8192, "per_shard": "jnp,pallas"}
TINY = {"length": 256, "shards": 4, "window": 16, "num_global": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
        "dtype": "float32", "impl": "reference", "model_length": 128, "hidden": 64, "intermediate": 128, "vocab": 256,
        "per_shard": "jnp,pallas"}


def global_topk(scores: jax.Array, alpha: float) -> tuple[jax.Array, int]:
    """Critical = the top ceil(alpha * n) scores of each row; returns (critical [b, n], that count)."""
    b, n = scores.shape
    count = math.ceil(alpha * n)
    _, top = jax.lax.top_k(scores, count)
    return jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], top].set(True), count


def timed(fn, *args, reps: int) -> tuple[float, float]:
    """(first call incl. compile, median of `reps` later calls), in ms."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times)


def per_shard_impls(config: dict) -> list[str]:
    """The per-shard computes to time (`--per-shard jnp,pallas`), each checked against `sp.IMPLS`."""
    impls = [name for name in config["per_shard"].split(",") if name]
    for name in impls:
        sp.resolve_impl(name)
    return impls


def model_rows(config: dict, alpha: float, reps: int) -> list[dict]:
    """Loss + gradients of a 2-layer Llama (layer 0 dense, layer 1 SRA) at `model_length`, unsharded against
    `shards` simulated sequence shards through the model-level wiring (`sp.sequence_sharding`), once per per-shard
    compute."""
    from flax import nnx

    from sra_jax.config import LlamaConfig, SRAConfig
    from sra_jax.nn import Llama
    from sra_jax.train.losses import cross_entropy

    llama = LlamaConfig(vocab_size=config["vocab"], hidden_size=config["hidden"],
                        intermediate_size=config["intermediate"], num_hidden_layers=2,
                        num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
                        head_dim=config["head_dim"], max_position_embeddings=config["model_length"])
    sra = SRAConfig(critical_fraction=alpha, window=config["window"], num_global=config["num_global"], layers=(1,))
    dtype = jnp.dtype(config["dtype"])
    model = Llama(llama, sra, rngs=nnx.Rngs(0), dtype=dtype, attention_impl=config["impl"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = config["model_length"]
    tokens = jax.random.randint(jax.random.key(1), (1, n), 0, config["vocab"])
    positions = jnp.arange(n, dtype=jnp.int32)[None]
    mask = jnp.ones((1, n), bool)

    def step(shards, per_shard):
        def loss(params):
            logits, _ = nnx.merge(graphdef, params, rest)(tokens, positions, key=jax.random.key(2))
            return cross_entropy(logits.astype(jnp.float32), tokens, mask)

        def run(params):
            # shards=1: the unsharded model
            with sp.sequence_sharding(None, shards=shards, impl=per_shard, interpret=config["interpret"]):
                return jax.value_and_grad(loss)(params)

        return jax.jit(run)

    rows, results = [], {}
    runs = [("model_step_unsharded", 1, None)] + [
        (f"model_step_sequence_parallel_{config['shards']}_shards_{impl}", config["shards"], impl)
        for impl in per_shard_impls(config)]
    for name, shards, per_shard in runs:
        try:
            fn = step(shards, per_shard)
            first, ms = timed(fn, params, reps=reps)
            results[name] = fn(params)
        except Exception as error:  # noqa: BLE001 - recorded in the row, and the exit code says so
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error)[:2000]}"})
        else:
            rows.append({"variant": name, "ms_fwdbwd": ms, "first_call_ms_fwdbwd": first, "model_length": n})
        print(json.dumps(rows[-1]), flush=True)
    if "model_step_unsharded" in results:
        loss_a, grads_a = results["model_step_unsharded"]
        for row in rows[1:]:
            if row["variant"] not in results:
                continue
            loss_b, grads_b = results[row["variant"]]
            diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                     for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b))]
            row.update(loss=float(loss_b), loss_abs_diff_vs_unsharded=float(jnp.abs(loss_a - loss_b)),
                       grad_max_abs_diff_vs_unsharded=max(diffs),
                       grad_max_abs=max(float(jnp.max(jnp.abs(g.astype(jnp.float32))))
                                        for g in jax.tree.leaves(grads_a)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--interpret", action="store_true",
                        help="per-shard kernels in interpret mode (set by --tiny: kernels on a CPU)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    config = dict(TINY if args.tiny else FULL)
    config.update({name: getattr(args, name) for name in FULL if getattr(args, name) is not None})
    config["interpret"] = bool(args.interpret or args.tiny)
    b, n, shards = 1, config["length"], config["shards"]
    dtype = jnp.dtype(config["dtype"])
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, n, config["heads"], config["head_dim"]), dtype)
    k = jax.random.normal(keys[1], (b, n, config["kv_heads"], config["head_dim"]), dtype)
    v = jax.random.normal(keys[2], (b, n, config["kv_heads"], config["head_dim"]), dtype)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    critical, count = global_topk(jax.random.normal(keys[3], (b, n)), args.alpha)
    rule = {"window": config["window"], "num_global": config["num_global"]}
    max_gathered = min(n, count + config["num_global"])

    def sharded(parts, per_shard):
        def run(q, k, v):
            return sp.sra_attention_sequence_parallel(q, k, v, positions, critical, shards=parts,
                                                      max_gathered=max_gathered, max_critical=count, impl=per_shard,
                                                      interpret=config["interpret"], **rule)
        return run

    def unsharded(q, k, v):
        spec = SRAMaskSpec.create(positions, critical, max_critical=count, **rule)
        return attention(q, k, v, spec=spec, impl=config["impl"])

    variants = {}
    for impl in per_shard_impls(config):
        variants[f"sequence_parallel_{shards}_shards_{impl}"] = sharded(shards, impl)
        variants[f"sequence_parallel_1_shard_{impl}"] = sharded(1, impl)
    variants[f"unsharded_{config['impl']}"] = unsharded
    rows, outputs = [], {}
    for name, fn in variants.items():
        forward = jax.jit(fn)
        backward = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
        try:  # one variant running out of memory still leaves the others' rows
            compile_fwd, ms_fwd = timed(forward, q, k, v, reps=args.reps)
            outputs[name] = forward(q, k, v)
            compile_bwd, ms_fwdbwd = timed(backward, q, k, v, reps=args.reps)
        except Exception as error:  # noqa: BLE001 - recorded in the row, and the exit code says so
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error)[:2000]}"})
        else:
            rows.append({"variant": name, "ms_fwd": ms_fwd, "ms_fwdbwd": ms_fwdbwd, "first_call_ms_fwd": compile_fwd,
                         "first_call_ms_fwdbwd": compile_bwd})
        print(json.dumps(rows[-1]), flush=True)
    rows += model_rows(config, args.alpha, args.reps)
    reference = outputs.get(f"unsharded_{config['impl']}")
    for row in rows:
        if reference is not None and row["variant"] in outputs:
            difference = outputs[row["variant"]].astype(jnp.float32) - reference.astype(jnp.float32)
            row["max_abs_diff_vs_unsharded"] = float(jnp.max(jnp.abs(difference)))
    record = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
              "versions": {"jax": jax.__version__}, "config": config, "alpha": args.alpha, "critical_per_row": count,
              "max_gathered": max_gathered, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
