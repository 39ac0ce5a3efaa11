"""First-call cost of the Llama prefill and decode step, dense vs SRA: trace, lower, compile and execute separately.

The functions measured are exactly the ones `experiments/llama8b_latency.py` times (`jax_functions`: a jitted prefill
into a fresh `LeftPaddedKVCache` with `logits_to_keep=1`, and a jitted `lax.fori_loop` of decode steps on the donated
cache), built on an abstract model (`nnx.eval_shape`: no weights until something runs). For each (model, phase,
context) one fresh worker process (so no jit or lowering cache carries over between rows) records:

- `trace_s` (`jax.jit(f).trace`), `lower_s` (`.lower(lowering_platforms=(platform,))`), `compile_s` (`.compile()`)
  and `execute_s` (one call of the compiled program on materialised weights, until ready); `first_call_s` is their
  sum, what the first call of the jitted function pays;
- the lowered module: StableHLO characters, ops in the text and ops after inlining every `func.call` (what XLA
  compiles), kernel calls (Pallas Triton / Mosaic GPU / Mosaic TPU custom calls) in the text and executed after
  inlining, distinct kernel configurations (each is one kernel compilation), and sort / while / case ops;
- the largest array type in the module (weights, KV cache and every intermediate value): a 128k prefill that
  built [b, s, vocab] logits or a [q, k] mask would show it here, before any device runs it;
- after compiling: sort ops and constants of at least `context` elements left in the optimised program
  (`compiled_stats`: a position-derived statistic or layout that XLA constant-folded leaves one per layer), and, from
  a worker's stderr, how many single constant folds XLA's slow-operation alarm reported (over 1 s each);
- per-layer trace and lower seconds: the same model traced and lowered (in its own worker) at `--layers-small`
  layers too, the difference divided by the difference in layers (at the first length).

`--lower-for cuda` on a CPU host lowers for the GPU without one (as the kernel tests do for Pallas Triton): trace and
lower only, with `jax.default_backend()` reporting "gpu" and cuDNN's version / compute-capability probes answering
for an H200 (cuDNN 9.10, sm_90), so the dense model lowers its cuDNN calls and the SRA model its Triton kernels.
Mosaic GPU kernels need a device to lower, so there `auto` lowers Triton kernels (the compact path SRA prefill takes
resolves to Triton on an H200 too). Compile and execute need the real platform.

    python experiments/compile_time.py --preset tiny --out /tmp/ct.json                  # CPU: every stage, tiny
    python experiments/compile_time.py --preset llama8b --lower-for cuda --out /tmp/x.json   # CPU host: 8B, lowering
    python experiments/compile_time.py --preset llama8b --out benchmarks/results/compile-time-h200-DATE.json   # GPU
    python experiments/compile_time.py --preset llama8b --layers 4 --lengths 32768 --phases prefill --no-execute \
        --out /tmp/c.json                         # CPU host: compile seconds of a 4-layer 8B-width prefill
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sra_jax.config import LlamaConfig, SRAConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ("dense", "sra")
PHASES = ("prefill", "decode")
# Custom-call targets that are kernels compiled or planned per distinct configuration (Pallas Triton, Mosaic GPU,
# Mosaic TPU, cuDNN fused attention).
KERNEL_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "tpu_custom_call", "__cudnn$")


def _latency_module():
    """experiments/llama8b_latency.py (the functions measured here are the ones it times)."""
    spec = importlib.util.spec_from_file_location("llama8b_latency", HERE / "llama8b_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_config(preset: str, layers: int | None) -> LlamaConfig:
    latency = _latency_module()
    config = {"tiny": latency.tiny_config, "llama8b": latency.llama8b_config}[preset]()
    if preset == "tiny":  # 4 layers (tiny has 2) so the per-layer slope has two points apart
        config = dataclasses.replace(config, num_hidden_layers=4)
    return config if layers is None else dataclasses.replace(config, num_hidden_layers=layers)


@contextlib.contextmanager
def pretend_cuda():
    """Lower for CUDA on a host without a GPU: the platform probes answer as on an H200 with cuDNN 9.10."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
        mock.patch.object(cudnn, "check_cudnn_version", lambda: 91000),
        mock.patch.object(cudnn, "check_compute_capability", lambda capability: float(capability) <= 9.0),
        mock.patch.object(cudnn, "is_cuda_compute_capability_equal", lambda capability: capability == "9.0"),
    ):
        yield


# ------------------------------------------------------------------------------------------- the lowered module
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w$.-]+)\(", re.M)
_OP = re.compile(r'^\s*(?:%[^=]+= )?"?((?:stablehlo|chlo|mhlo|func|sdy)\.[a-z_]+)', re.M)
_CALL = re.compile(r"(?:func\.)?call @([\w$.-]+)\(")
_CUSTOM = re.compile(r"stablehlo\.custom_call @([\w$.-]+)\((.*)$", re.M)
_SSA = re.compile(r"%[\w#:.-]+")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_BITS = {"pred": 8, "i1": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "i8": 8, "ui8": 8, "i16": 16, "i32": 32,
         "ui32": 32, "i64": 64, "ui64": 64}


def largest_tensor(text: str) -> dict:
    """The largest array type in the module (an argument, result or intermediate value): a lower bound on the
    biggest single allocation, e.g. [b, s, vocab] logits or a [q, k] mask would show here."""
    best, best_type = 0, None
    for dims, dtype in set(_TENSOR.findall(text)):
        n = 1
        for d in filter(None, dims.split("x")):
            n *= int(d)
        size = n * _BITS.get(dtype, 32) // 8
        if size > best:
            best, best_type = size, f"tensor<{dims}{dtype}>"
    return {"largest_tensor": best_type, "largest_tensor_gib": best / 2**30}


def module_stats(text: str) -> dict:
    """Op, call and kernel counts of a lowered StableHLO module; `inlined_*` count what XLA compiles once every
    `func.call` is inlined (a function called n times counts n times)."""
    starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)] + [(len(text), None)]
    funcs = {}
    for (start, name), (end, _) in zip(starts, starts[1:], strict=False):
        body = text[start:end]
        ops = collections.Counter(_OP.findall(body))
        ops.pop("func.func", None)
        kernels = [(target, _SSA.sub("%", rest)) for target, rest in _CUSTOM.findall(body)
                   if any(target.startswith(t) for t in KERNEL_TARGETS)]
        funcs[name] = (ops, collections.Counter(_CALL.findall(body)), kernels)

    def expand(name, seen=()):
        """(op counter, executed kernel count) of `name` with its callees inlined."""
        ops, calls, kernels = funcs[name]
        total, executed = collections.Counter(ops), len(kernels)
        for callee, n in calls.items():
            if callee in funcs and callee not in seen:
                sub, sub_kernels = expand(callee, (*seen, name))
                for op, count in sub.items():
                    total[op] += n * count
                executed += n * sub_kernels
        return total, executed

    main = "main" if "main" in funcs else next(iter(funcs))
    inlined, executed = expand(main)
    in_text = collections.Counter()
    for ops, _, _ in funcs.values():
        in_text.update(ops)
    kernels = [k for _, _, ks in funcs.values() for k in ks]
    return {
        "stablehlo_chars": len(text),
        "functions": len(funcs),
        "ops_in_text": sum(in_text.values()),
        "inlined_ops": sum(inlined.values()),
        "kernel_calls_in_text": len(kernels),
        "kernel_calls_executed": executed,
        "distinct_kernels": len({hashlib.sha1(f"{t}|{c}".encode()).hexdigest() for t, c in kernels}),
        "kernel_targets": dict(collections.Counter(t for t, _ in kernels)),
        "inlined_sort": inlined["stablehlo.sort"],
        "inlined_while": inlined["stablehlo.while"],
        "inlined_case": inlined["stablehlo.case"],
        "inlined_custom_call": inlined["stablehlo.custom_call"],
        "top_inlined_ops": dict(inlined.most_common(8)),
        **largest_tensor(text),
    }


# ------------------------------------------------------------------------------------------------ one worker
def build(config: LlamaConfig, model: str, dense_impl: str, sra_impl: str, dtype):
    from sra_jax.nn import Llama

    sra = SRAConfig(critical_fraction=0.1) if model == "sra" else None
    impl = sra_impl if model == "sra" else dense_impl
    return nnx.eval_shape(lambda: Llama(config, sra, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                        attention_impl=impl))


def stage_times(config, model, phase, context, batch, *, decode_steps, lower_for, dense_impl, sra_impl, dtype,
                compile):
    """(row of stage seconds and module stats, compiled program and its abstract arguments or None)."""
    abstract = build(config, model, dense_impl, sra_impl, dtype)
    max_len = context + decode_steps * 2
    state, prefill, decode = _latency_module().jax_functions(abstract, max_len, decode_steps)
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    if phase == "prefill":
        fn, args = prefill, (state, tokens)
    else:
        token, cache, _ = jax.eval_shape(prefill, state, tokens)
        fn, args = decode, (state, token, cache)
    row = {}
    start = time.perf_counter()
    traced = fn.trace(*args)
    row["trace_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower(lowering_platforms=(lower_for,))
    row["lower_s"] = time.perf_counter() - start
    row.update(module_stats(lowered.as_text()))
    if not compile:
        return row, None
    start = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_stats(compiled.as_text(), context))
    return row, (compiled, args)


_CONSTANT = re.compile(r"= (\w+\[[\d,]*\])[^=]*? constant\(")


def compiled_stats(text: str, context: int) -> dict:
    """What XLA left in the optimised program: sort ops, and constants of at least `context` elements. A statistic,
    mask or layout that XLA evaluated while compiling (constant folding, because the prefill's positions are
    compile-time constants) leaves its result as such a constant, one per layer; the cache's positions, which the
    program returns, are one."""
    large = collections.Counter()
    for array in _CONSTANT.findall(text):
        n = 1
        for d in filter(None, array[array.index("[") + 1:-1].split(",")):
            n *= int(d)
        if n >= context:
            large[array] += 1
    return {"compiled_sort": len(re.findall(r"\bsort\(", text)), "compiled_large_constants": sum(large.values()),
            "compiled_large_constant_types": dict(large)}


def materialise(args, seed: int):
    """Concrete arguments for the compiled program: small random floats, zero integers and flags (a decode step
    then reads an empty cache: the program and its cost to start are the same)."""
    leaves, treedef = jax.tree.flatten(args)

    @jax.jit
    def make():
        key = jax.random.key(seed)
        out = []
        for i, leaf in enumerate(leaves):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                out.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)).astype(leaf.dtype))
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return out

    return jax.tree.unflatten(treedef, make())


def worker(job: dict) -> dict:
    config = preset_config(job["preset"], job.get("layers"))
    compile = job["lower_for"] == job["platform"] and not job.get("lower_only")
    execute = compile and not job.get("no_execute")
    where = pretend_cuda() if job["lower_for"] == "cuda" and job["platform"] != "cuda" else contextlib.nullcontext()
    with where:
        row, program = stage_times(
            config, job["model"], job["phase"], job["context"], job["batch"], decode_steps=job["decode_steps"],
            lower_for=job["lower_for"], dense_impl=job["dense_impl"], sra_impl=job["sra_impl"],
            dtype=jnp.dtype(job["dtype"]), compile=compile,
        )
    row["layers"] = config.num_hidden_layers
    if program is not None and execute:
        compiled, args = program
        concrete = materialise(args, seed=0)
        jax.block_until_ready(concrete)
        start = time.perf_counter()
        jax.block_until_ready(compiled(*concrete))
        row["execute_s"] = time.perf_counter() - start
        row["first_call_s"] = row["trace_s"] + row["lower_s"] + row["compile_s"] + row["execute_s"]
    return row


# ----------------------------------------------------------------------------------------------------- driver
def versions() -> dict[str, str]:
    import flax
    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__}


def run_job(job: dict, in_process: bool) -> dict:
    if in_process:
        return worker(job)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode:
        return {"error": (done.stderr or done.stdout)[-3000:]}
    # XLA's slow-operation alarm: one constant-folded instruction took over a second of compile time
    slow = done.stderr.count("Constant folding an instruction is taking")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "slow_constant_folds": slow}


def markdown(record: dict) -> str:
    lines = [
        f"# First-call cost, dense vs SRA ({record['preset']}, lowered for {record['lowered_for']})",
        "",
        f"device `{record['device']}` ({record['platform']}), {record['date']}, {record['versions']}",
        "",
        "| model | phase | context | trace s | lower s | compile s | execute s | first call s | trace s/layer | "
        "StableHLO MB | inlined ops | kernels run / distinct | large constants / slow folds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda r, k, spec=".2f": format(r[k], spec) if k in r else "-"
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['phase']} | {r['context']} | error: {r['error'][-200:]!r} |")
            continue
        lines.append(
            f"| {r['model']} | {r['phase']} | {r['context']} | {fmt(r, 'trace_s')} | {fmt(r, 'lower_s')} | "
            f"{fmt(r, 'compile_s')} | {fmt(r, 'execute_s')} | {fmt(r, 'first_call_s')} | "
            f"{fmt(r, 'trace_s_per_layer', '.3f')} | {r['stablehlo_chars'] / 1e6:.2f} | {r['inlined_ops']} | "
            f"{r['kernel_calls_executed']} / {r['distinct_kernels']} | "
            f"{r.get('compiled_large_constants', '-')} / {r.get('slow_constant_folds', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=("tiny", "llama8b"), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--layers-small", type=int, default=2, help="second layer count for the per-layer slope "
                        "(trace + lower only, at the first length; 0: skip)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--lower-for", choices=("cpu", "cuda", "tpu"), default=None,
                        help="platform to lower for (default: this device's); another one means trace + lower only")
    parser.add_argument("--sra-impl", default="pallas")
    parser.add_argument("--dense-impl", default=None, help="default: cudnn when lowering for cuda, else xla")
    parser.add_argument("--in-process", action="store_true", help="no worker processes (caches then carry over)")
    parser.add_argument("--no-execute", action="store_true", help="trace, lower and compile only (no weights are "
                        "materialised: compile seconds of a model too large for this device's memory)")
    parser.add_argument("--out", type=Path, required=False, help="JSON record (a .md table is written next to it)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=float))
        return 0
    if args.out is None:
        parser.error("--out is required")
    here = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    lower_for = args.lower_for or here
    lengths = args.lengths or ([32] if args.preset == "tiny" else [4096])
    if any(n < 2 for n in lengths):
        parser.error(f"--lengths must be >= 2, got {lengths}")
    layers = preset_config(args.preset, args.layers).num_hidden_layers
    layers_small = args.layers_small if 0 < args.layers_small < layers else None
    base = dict(preset=args.preset, layers=args.layers, batch=args.batch,
                decode_steps=args.decode_steps, dtype=args.dtype, lower_for=lower_for, platform=here,
                no_execute=args.no_execute, sra_impl=args.sra_impl, dense_impl=args.dense_impl or ("cudnn" if lower_for == "cuda" else "xla"))
    record = {
        "what": "first-call cost (trace / lower / compile / execute) of the Llama prefill and decode step, dense vs "
                "SRA (the functions experiments/llama8b_latency.py times)",
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "platform": here,
        "lowered_for": lower_for,
        "stages": ("trace, lower (no device to compile for)" if lower_for != here
                   else "trace, lower, compile" if args.no_execute else "trace, lower, compile, execute"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": preset_config(args.preset, args.layers).to_hf(),
        "sra": {"critical_fraction": 0.1, "defaults": "SRAConfig (window, num_global, queries)"},
        "settings": base,
        # a persistent compilation cache would turn compile_s into a cache read: recorded, off by default
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for context in lengths:
        for phase in args.phases:
            for model in args.models:
                job = dict(base, model=model, phase=phase, context=context)
                row = {"model": model, "phase": phase, "context": context, "batch": args.batch,
                       **run_job(job, args.in_process)}
                # the per-layer slope (first length only): the same job at fewer layers
                if layers_small and context == lengths[0] and "error" not in row:
                    small = run_job(dict(job, layers=layers_small, lower_only=True), args.in_process)
                    if "error" not in small:
                        span = row["layers"] - small["layers"]
                        row["layers_small"] = small["layers"]
                        row["trace_s_per_layer"] = (row["trace_s"] - small["trace_s"]) / span
                        row["lower_s_per_layer"] = (row["lower_s"] - small["lower_s"]) / span
                record["rows"].append(row)
                print(json.dumps(row, default=float)[:400], flush=True)
                args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
