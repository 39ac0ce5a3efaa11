"""Retrofit SRA onto an 8B-shaped Llama on one GPU: init from a Hugging Face folder -> router-only training with
remat -> export -> reload, with peak memory, step time and tokens/s, and the compiled memory of the same step with
`init.trainable: all` (AdamW over every parameter) for comparison.

    python experiments/retrofit_8b.py --work /dev/shm/retrofit --out benchmarks/results/retrofit-8b-DATE.json  # one H200
    python experiments/retrofit_8b.py --tiny --out /tmp/retrofit-tiny.json                     # CPU check, ~1 min

Steps (each row of the JSON is one): a random bf16 Llama 3 8B (`LlamaConfig()`) is built on the device and written
with `sra_jax.convert.save_hf` (a random model: the weights' values do not matter for memory or speed); `sra-jax
train` runs `--steps` router-only steps (init.from that folder, init.trainable=router, SL + teacher KL on packed
synthetic rows of `--seq-len` tokens, remat) and checkpoints the last one (the routers only: the frozen Llama is
referenced from the source, `sra_jax.train.frozen`); `sra-jax export` writes it back as a Hugging Face folder;
`load_hf` reloads that and the Llama tensors are checked bit-identical to the source. The
`trainable: all` comparison is `jit(train_step).lower(...).compile().memory_analysis()` on abstract inputs (nothing
is allocated), next to the same analysis of the router-only step. Everything is written under `--work` (default a
temporary folder), deleted at the end: two copies of the weights (source and export), ~32 GB at 8B, checked against
the free space first; on one GPU machine `/dev/shm` (RAM) is the fast folder to use. The JSON is rewritten after each
phase; the training row splits its time into setup (loading init.from), steps and checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sra_jax.config import LlamaConfig
from sra_jax.convert import load_hf, save_hf
from sra_jax.convert.export import export_hf
from sra_jax.convert.safetensors_io import SafetensorsReader
from sra_jax.nn import Llama
from sra_jax.train import sharding
from sra_jax.train.config import InitConfig, TrainConfig
from sra_jax.train.loop import run
from sra_jax.train.step import Batch, Trainer, TrainState, train_layout

SRA = {"critical_fraction": 0.125, "window": 256, "num_global": 4, "selection": "gumbel_topk", "router_hidden": 128}
TINY_SRA = {"critical_fraction": 0.25, "window": 8, "num_global": 1, "selection": "gumbel_topk", "router_hidden": 16}


def versions() -> dict[str, str]:
    import flax
    import jaxlib
    import orbax.checkpoint

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "orbax": orbax.checkpoint.__version__}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else int(stats.get("peak_bytes_in_use", 0))


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaConfig()  # Llama 3 8B


def write_source(config: LlamaConfig, path: Path, dtype) -> float:
    """A random Llama built directly on the device (no host copy), written as a Hugging Face folder; seconds."""
    start = time.perf_counter()
    model = nnx.jit(lambda: Llama(config, None, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))()
    save_hf(model, path)
    del model
    return time.perf_counter() - start


def compiled_memory(config: TrainConfig) -> dict[str, int]:
    """memory_analysis() of the compiled train step of `config` on abstract state and batch (nothing allocated)."""
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    layout = train_layout(config, mesh)
    abstract_params, abstract_opt = layout.abstract_params, layout.abstract_opt
    param_shardings, opt_shardings = layout.state_shardings.params, layout.state_shardings.opt_state
    replicated = sharding.replicated(mesh)
    batch_sh = layout.batch_shardings.tokens
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), layout.abstract_rest)
    trainer = Trainer(config, layout.graphdef, rest, layout.tx, mesh, layout.state_shardings, layout.batch_shardings)

    def specs(abstract, shardings):
        def spec(x, sh):
            if isinstance(x, nnx.Variable):
                value = x.get_value()
                return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        return jax.tree.map(spec, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))

    state = TrainState(params=specs(abstract_params, param_shardings), opt_state=specs(abstract_opt, opt_shardings),
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                       rng=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                        jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))))
    shape = (config.grad_accum, config.micro_batch_size, config.data.seq_len)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
    batch = Batch(tokens=ints, positions=ints, loss_mask=jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sh),
                  segment_ids=ints if config.data.pack else None)
    analysis = trainer.step_fn.lower(state, batch).compile().memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(analysis, f)) for f in fields if analysis is not None and hasattr(analysis, f)}
    if out:
        out["total_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                              + out.get("temp_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0))
    out["opt_state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_opt)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (CPU check)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, help="default 4096 (128 with --tiny)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots_saveable"])
    parser.add_argument("--attention-impl", help="default xla (reference with --tiny)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (128 if args.tiny else 4096)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    dtype_name = "float32" if args.tiny else "bfloat16"
    work = args.work or Path(tempfile.mkdtemp(prefix="retrofit8b-"))
    work.mkdir(parents=True, exist_ok=True)
    llama = model_config(args.tiny)
    rows: list[dict] = []
    record = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": dataclasses.asdict(llama), "dtype": dtype_name, "tiny": args.tiny, "work": str(work),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def done(row: dict) -> None:
        """Record a finished phase: the JSON is rewritten after each one, so a run cut short keeps its phases."""
        rows.append(row)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"[{time.perf_counter() - began:.0f} s] {json.dumps(row)}", flush=True)

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: Llama(llama, None, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)))))
    free = shutil.disk_usage(work).free
    if free < 2 * weight_bytes:
        raise ValueError(f"--work {work}: {free / 2**30:.1f} GiB free, the run writes 2 copies of the weights "
                         f"({2 * weight_bytes / 2**30:.1f} GiB); pick another folder with --work")
    try:
        src, ckpt, export = work / "src", work / "ckpt", work / "export"
        done({"phase": "write_source", "seconds": write_source(llama, src, dtype), "peak_bytes": peak_bytes()})

        overrides = {
            "sra": TINY_SRA if args.tiny else SRA,
            "init": {"from": str(src), "trainable": "router"},
            "loss": {"kind": "sl", "teacher_kl_weight": 0.1},
            "data": {"task": "synthetic", "seq_len": seq_len, "pack": True},
            "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
            "steps": args.steps, "batch_size": 1, "param_dtype": dtype_name, "compute_dtype": dtype_name,
            "remat": args.remat, "attention_impl": args.attention_impl or ("reference" if args.tiny else "xla"),
            "checkpoint": {"dir": str(ckpt), "every": args.steps, "keep": 1, "async_save": False},
            "log": {"dir": None, "progress": not args.tiny, "every": args.steps},
        }
        config = TrainConfig.from_dict(overrides)
        start = time.perf_counter()
        result = run(config)
        total = time.perf_counter() - start
        timed = result.history[1:] or result.history  # the first step includes compilation
        done({
            "phase": "train_router_only", "seconds": total, "steps": len(result.history), "seq_len": seq_len,
            "remat": args.remat, "step_time_s": float(np.median([h["step_time"] for h in timed])),
            "tokens_per_s": float(np.median([h["tokens_per_s"] for h in timed])),
            "padded_tokens_per_s": float(np.median([h["padded_tokens_per_s"] for h in timed])),
            "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
            "setup_s": result.seconds["setup"], "checkpoint_s": result.seconds["checkpoint"],
            "first_step_s": result.history[0]["step_time"], "step_times_s": [h["step_time"] for h in result.history],
            "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
            "peak_bytes": peak_bytes(),
        })
        del result
        start = time.perf_counter()
        export_hf(ckpt, export)
        done({"phase": "export", "seconds": time.perf_counter() - start, "peak_bytes": peak_bytes()})
        start = time.perf_counter()
        _, reloaded = load_hf(export)
        seconds = time.perf_counter() - start
        routers = sum(1 for p, _ in nnx.to_flat_state(nnx.state(reloaded, nnx.Param)) if "router" in p)
        del reloaded
        source, exported = SafetensorsReader(src), SafetensorsReader(export)
        identical = all(np.array_equal(source.get(name).view(np.uint8), exported.get(name).view(np.uint8))
                        for name in source.keys())  # bytes: bit for bit, and fast for bfloat16
        reload = {"phase": "reload", "seconds": seconds, "router_tensors": routers,
                  "llama_bit_identical_to_source": bool(identical), "peak_bytes": peak_bytes()}
        done(reload)
        for trainable in ("router", "all"):
            variant = dataclasses.replace(config, init=InitConfig(from_=None, trainable=trainable))
            done({"phase": f"compiled_step_{trainable}", **compiled_memory(variant)})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if reload["llama_bit_identical_to_source"] else 1


if __name__ == "__main__":
    sys.exit(main())
