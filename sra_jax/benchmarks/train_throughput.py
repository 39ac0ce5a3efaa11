"""Training throughput of the real trainer: tokens/s, step time, model TFLOP/s and MFU for dense and SRA models.

    python -m sra_jax.benchmarks.train_throughput --config gpu_synthetic \\
        --variant "dense: sra=null" --variant "sra:" --steps 10 --out benchmarks/results/train-throughput-DATE.json

Each `--variant "NAME: key=value; key=value"` adds TrainConfig overrides on top of `--config` / `--set`. Keys
`bench.*` configure the measurement itself: `bench.data` (`synthetic`: the task's batches; `random`: random tokens
filling every position; `packed`: random tokens in rows packed with whole documents of random lengths, with segment
ids, which needs data.pack=true), `bench.mode` (`step`: the compiled train step alone; `loop`: the whole
`sra_jax.train.loop.run`, data generation, logging and all), `bench.loop=PATH` (time another loop module, a file
defining `run`, e.g. an older version), `bench.profile=yes` (with `--profile DIR`: trace a few steps after the
timed ones and summarise GPU kernel time by kind).

What is timed (mode `step`): the trainer of `sra_jax.train.step.create_trainer` on the mesh of `mesh`, compiled once,
then `--warmup` steps, then `--steps` steps dispatched back to back over batches already on the device, with ONE host
sync at the end (`jax.block_until_ready`). Step time = wall time / steps.

FLOPs that count ("model FLOPs", as in the PaLM MFU definition): 6 x (non-embedding parameters) per token plus causal
attention, 12 x head_dim x heads x layers per visible (query, key) pair (forward 4, backward 8), with the measured
SRA mask density; only non-padding tokens count (`mfu`). `mfu_with_padding` counts every position, i.e. what the
hardware computes on a padded batch. Peak: the device's dense bf16 tensor-core FLOP/s (`sra_jax.train.metrics.
PEAK_FLOPS`: H100 SXM and H200 989 TFLOP/s). XLA's own count (`compiled.cost_analysis()["flops"]`, per device, all
ops, padding included, masked-out attention included) is reported beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np

PROFILE_STEPS = 3
BENCH_KEYS = {"bench.data": ("synthetic", "random", "packed"), "bench.mode": ("step", "loop"), "bench.profile": ("yes", "no")}


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """`"NAME: k=v; k=v"` -> (name, TrainConfig overrides, bench options)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"variant {text!r} must look like 'NAME: key=value; key=value'")
    overrides, bench = [], {}
    for item in (part.strip() for part in rest.split(";")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant {name!r}: {item!r} must look like key=value")
        key = key.strip()
        if key.startswith("bench."):
            if key == "bench.loop":
                bench[key] = value.strip()
                continue
            if key not in BENCH_KEYS or value.strip() not in BENCH_KEYS[key]:
                raise ValueError(f"variant {name!r}: {item!r}; bench options are {BENCH_KEYS} and bench.loop=PATH")
            bench[key] = value.strip()
        else:
            overrides.append(f"{key}={value}")
    return name.strip(), overrides, bench


def random_batch(config, seed: int) -> dict[str, np.ndarray]:
    """Random tokens filling every position of this process's rows (no padding); loss on every token."""
    rows = config.micro_batch_size // jax.process_count()
    shape = (config.grad_accum, rows, config.data.seq_len)
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        "positions": np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, bool),
    }


def random_packed_batch(config, seed: int) -> dict[str, np.ndarray]:
    """Random tokens in rows filled by whole documents of random lengths (seq_len/16 .. seq_len/4 tokens, the last
    one cut to fit; the data.max_segments-th document of a row takes the rest of it): segment ids 1, 2, ... per row,
    positions restarting at 0 in each document, no padding, loss on every token."""
    rows = config.micro_batch_size // jax.process_count()
    shape = (config.grad_accum, rows, config.data.seq_len)
    seq = shape[-1]
    rng = np.random.default_rng(seed)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for index in np.ndindex(shape[:2]):
        start, doc = 0, 1
        while start < seq:
            n = min(seq - start, int(rng.integers(max(1, seq // 16), max(2, seq // 4) + 1)))
            if doc == config.data.max_segments:
                n = seq - start
            segment_ids[index][start:start + n] = doc
            positions[index][start:start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    return {
        "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        "positions": positions,
        "loss_mask": np.ones(shape, bool),
        "segment_ids": segment_ids,
    }


def model_flops(config, num_params: int, positions: np.ndarray, mask_density: float, *, padding: bool,
                segment_ids: np.ndarray | None = None) -> float:
    """Model FLOPs of one global batch (see the module docstring); `padding=True` counts every position (one
    sequence per row). With `segment_ids` (packed rows) each document's causal pairs count."""
    from sra_jax.train.metrics import train_flops

    if padding:
        positions, segment_ids = np.broadcast_to(np.arange(positions.shape[-1]), positions.shape), None
    m = config.model
    return train_flops(num_params, m.vocab_size * m.hidden_size, positions, num_layers=m.num_hidden_layers,
                       num_heads=m.num_attention_heads, head_dim=m.head_dim, mask_density=mask_density,
                       segment_ids=segment_ids) * jax.process_count()


def xla_flops(compiled) -> float | None:
    """FLOPs XLA counts for the compiled step (a dict in new jax, a list of dicts in older ones)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops)


def temp_memory_gb(compiled) -> float | None:
    """Scratch memory of the compiled step (activations kept for the backward pass, etc.)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def peak_memory_gb() -> float | None:
    """The process's peak device memory so far (over all variants run before, too)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def time_step(config, bench: dict[str, str], *, steps: int, warmup: int, profile: Path | None) -> dict[str, Any]:
    """The compiled train step on batches already on the device; one host sync at the end."""
    from sra_jax.train import sharding
    from sra_jax.train.loop import make_stream
    from sra_jax.train.metrics import count_params
    from sra_jax.train.step import create_trainer

    data = bench.get("bench.data", "synthetic")
    if (data == "packed") != config.data.pack and data != "synthetic":
        raise ValueError(f"bench.data={data} needs data.pack={str(data == 'packed').lower()} (packed rows carry "
                         "segment ids, which the trainer expects exactly when data.pack is on)")
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    trainer, state = create_trainer(config, mesh)
    num_params = count_params(state.params)
    distinct = min(steps, 4)
    began = time.perf_counter()
    if data == "random":
        arrays = [random_batch(config, i) for i in range(distinct)]
    elif data == "packed":
        arrays = [random_packed_batch(config, i) for i in range(distinct)]
    else:
        stream = make_stream(config)
        arrays = [stream.batch(i) for i in range(distinct)]
    host_batch_s = (time.perf_counter() - began) / distinct
    batches = [trainer.put_batch(a) for a in arrays]
    began = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - began
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % distinct])
    jax.block_until_ready((state, metrics) if warmup else state)
    began = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % distinct])
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - began
    if profile is not None:  # after the timed steps, so the profiler's overhead never enters the numbers
        profile.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(profile), create_perfetto_trace=True):
            for i in range(PROFILE_STEPS):
                state, metrics = compiled(state, batches[i % distinct])
            jax.block_until_ready((state, metrics))
    host = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
    valid = [float((a["positions"] >= 0).sum()) * jax.process_count() for a in arrays]
    per_step_tokens = float(np.mean([valid[i % distinct] for i in range(steps)]))
    flops = np.mean([model_flops(config, num_params, arrays[i % distinct]["positions"], host["mask_density"],
                                 padding=False, segment_ids=arrays[i % distinct].get("segment_ids"))
                     for i in range(steps)])
    flops_padded = model_flops(config, num_params, arrays[0]["positions"], host["mask_density"], padding=True)
    all_positions = float(arrays[0]["positions"].size) * jax.process_count()
    return dict(
        num_params=num_params, step_time_s=wall / steps, tokens_per_step=per_step_tokens,
        positions_per_step=all_positions, valid_fraction=per_step_tokens / all_positions,
        tokens_per_s=per_step_tokens * steps / wall, positions_per_s=all_positions * steps / wall,
        model_flops_per_step=float(flops), model_flops_per_step_with_padding=float(flops_padded),
        xla_flops_per_step_per_device=xla_flops(compiled), compile_s=compile_s, host_batch_s=host_batch_s,
        loss=host["loss"], skipped=host["skipped"], mask_density=host["mask_density"],
        selected_fraction=host["selected_fraction"], peak_memory_gb=peak_memory_gb(),
        step_temp_memory_gb=temp_memory_gb(compiled),
    )


def load_loop(path: str | None):
    if path is None:
        from sra_jax.train import loop

        return loop
    spec = importlib.util.spec_from_file_location("bench_loop", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def time_loop(config, bench: dict[str, str], *, steps: int, warmup: int) -> dict[str, Any]:
    """`loop.run` for warmup + steps steps; the rate over the last `steps` (from the per-step callbacks)."""
    import dataclasses

    from sra_jax.train.config import LogConfig

    if bench.get("bench.data", "synthetic") != "synthetic":
        raise ValueError("bench.mode=loop trains on the configured data; bench.data=random needs bench.mode=step")
    loop = load_loop(bench.get("bench.loop"))
    config = dataclasses.replace(config, steps=warmup + steps, log=LogConfig(dir=None, progress=False),
                                 checkpoint=dataclasses.replace(config.checkpoint, dir=None))
    seen: list[tuple[int, float, float]] = []
    began = time.perf_counter()
    result = loop.run(config, on_step=lambda step, m: seen.append((step, time.perf_counter(), m["tokens"])))
    total = time.perf_counter() - began
    timed = [s for s in seen if s[0] > warmup]
    first = next(t for step, t, _ in seen if step == warmup)
    wall = timed[-1][1] - first
    tokens = sum(tok for _, _, tok in timed)
    last = result.history[-1]
    return dict(step_time_s=wall / len(timed), tokens_per_s=tokens / wall, tokens_per_step=tokens / len(timed),
                loop_reported_step_time_s=float(np.mean([h["step_time"] for h in result.history[warmup:]])),
                loop_reported_mfu=last.get("mfu"), run_wall_s=total, loss=last["loss"],
                mask_density=last["mask_density"], selected_fraction=last["selected_fraction"],
                peak_memory_gb=peak_memory_gb())


def summarize_trace(directory: Path, top: int = 12) -> dict[str, Any] | None:
    """GPU kernel time by kind from the perfetto trace jax.profiler wrote (None without a GPU track)."""
    files = sorted(directory.rglob("*.trace.json.gz")) or sorted(directory.rglob("perfetto_trace.json.gz"))
    if not files:
        return None
    events = json.loads(gzip.open(files[-1]).read())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "gpu" in name.lower() and "host" not in name.lower()}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    # Kernels sit on the "Stream #..." lines; the "XLA Ops" / "XLA Modules" lines repeat the same time per HLO op.
    streams = {key for key, name in threads.items() if name.lower().startswith("stream")}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e
               and (not streams or (e["pid"], e.get("tid")) in streams)]
    if not kernels:
        return None
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e["name"]] += e["dur"] / 1e3
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in by_name.items():
        low = name.lower()
        if any(s in low for s in ("flash", "fmha", "cudnn", "attention")):
            kind = "attention"
        elif any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "dot")):
            kind = "matmul"
        elif any(s in low for s in ("memcpy", "memset", "copy")):
            kind = "copy"
        elif any(s in low for s in ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather")):
            kind = "collective"
        else:
            kind = "other (fusions, elementwise, reductions)"
        kinds[kind] += ms
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = sum(by_name.values())
    return dict(steps=PROFILE_STEPS, span_ms=(end - start) / 1e3, kernel_ms=busy, by_kind_ms=dict(kinds),
                top_kernels_ms=dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:top]))


def versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
            "flax": flax.__version__, "optax": optax.__version__, "python": platform.python_version()}


def append_row(path: Path, row: dict[str, Any], device: str) -> None:
    """Add `row` to the {"device", "date", "versions", "rows"} record at `path` (created when missing)."""
    record = {"device": device, "date": str(datetime.date.today()), "versions": versions(), "rows": []}
    if path.exists():
        record = json.loads(path.read_text())
    record["rows"].append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sra_jax.benchmarks.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TrainConfig YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME: k=v; k=v'",
                        help="a configuration to time (repeatable); default: one variant with no extra overrides")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--profile", type=Path, help=f"after the timed steps, trace {PROFILE_STEPS} more with "
                        "jax.profiler into PROFILE/NAME and summarise the GPU kernel time by kind")
    parser.add_argument("--label", default="", help="stored in every row (e.g. the XLA flags of this process)")
    parser.add_argument("--out", type=Path, help="JSON file; rows are appended when it exists")
    args = parser.parse_args(argv)

    from sra_jax.train.config import TrainConfig
    from sra_jax.train.metrics import peak_flops_per_device

    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    variants = [parse_variant(v) for v in args.variant] or [("default", [], {})]
    configs = [(name, TrainConfig.load(args.config, [*args.overrides, *extra]), bench)
               for name, extra, bench in variants]  # every config validated before anything runs
    peak = peak_flops_per_device()
    device = jax.devices()[0].device_kind
    rows = []
    for name, config, bench in configs:
        mode = bench.get("bench.mode", "step")
        wants_profile = args.profile is not None and mode == "step" and bench.get("bench.profile") == "yes"
        profile = args.profile / name if wants_profile else None
        row: dict[str, Any] = dict(
            name=name, label=args.label, mode=mode, data=bench.get("bench.data", "synthetic"),
            loop=bench.get("bench.loop", "sra_jax.train.loop") if mode == "loop" else None,
            devices=jax.device_count(), device=device, mesh=list(config.mesh.resolve(jax.device_count())),
            sra=config.sra is not None, attention_impl=config.attention_impl, compute_dtype=config.compute_dtype,
            param_dtype=config.param_dtype, batch_size=config.batch_size, grad_accum=config.grad_accum,
            seq_len=config.data.seq_len, hidden=config.model.hidden_size, layers=config.model.num_hidden_layers,
            heads=config.model.num_attention_heads, kv_heads=config.model.num_key_value_heads,
            intermediate=config.model.intermediate_size, vocab=config.model.vocab_size,
            critical_fraction=None if config.sra is None else config.sra.critical_fraction,
            xla_flags=os.environ.get("XLA_FLAGS", ""), peak_flops_per_device=peak, steps=args.steps,
            warmup=args.warmup,
        )
        try:
            if mode == "loop":
                row.update(time_loop(config, bench, steps=args.steps, warmup=args.warmup))
            else:
                row.update(time_step(config, bench, steps=args.steps, warmup=args.warmup, profile=profile))
        except Exception as error:  # noqa: BLE001 - one failing variant (e.g. out of memory) must not lose the rest
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        if "model_flops_per_step" in row:
            row["model_tflops_per_s"] = row["model_flops_per_step"] / row["step_time_s"] / 1e12
            if peak is not None:
                row["mfu"] = row["model_flops_per_step"] / row["step_time_s"] / (peak * jax.device_count())
                row["mfu_with_padding"] = (row["model_flops_per_step_with_padding"] / row["step_time_s"]
                                           / (peak * jax.device_count()))
            if row.get("xla_flops_per_step_per_device"):
                row["xla_over_model_flops"] = (row["xla_flops_per_step_per_device"] * jax.device_count()
                                               / row["model_flops_per_step"])
        if profile is not None:
            row["profile"] = summarize_trace(profile)
        rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("name", "step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu", "mfu_with_padding",
                          "xla_over_model_flops", "compile_s", "step_temp_memory_gb", "num_params", "loss", "error")}
        print(json.dumps(shown), flush=True)
        if args.out is not None:  # after every variant, so a run cut short keeps what it measured
            append_row(args.out, row, device)
        jax.clear_caches()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
