"""Sparse decode benchmark on one GPU: the whole jitted decode op and its kernels, against the HBM copy and the
dense all-slots decode, both measured in the same process.

Shape (issue #4): 16 query heads, 8 kv heads, head_dim 128, bf16, window 1024, 4 global sinks, 10% critical slots
(sorted, as `jnp.nonzero(..., fill_value=-1)` gives), one new token per sequence.

Two times per row, each per decode call:
- e2e_us: `calls` decode calls unrolled in one jitted executable, each call's query the previous call's output (a
  data dependence, so the calls run one after another), each on its own cache copy and critical set (rotating over
  enough copies that L2 cannot serve a repeat); host dispatch is paid once per executable and divided by `calls`.
  This is every kernel of the op (index sort if any, decode, combine) and the gaps between them.
- kernel_us: device time of the kernels alone, summed from a jax.profiler trace of the same executable
  (GPU stream events, divided by the number of calls), with the decode kernel's share in decode_kernel_us.
Bytes: the K and V rows the new token can see, each once (`pallas_kernels.decode.decode_slots`); GB/s and the
fraction of the HBM copy (read + write bytes of a 1 GiB bf16 `x + 1`) follow from each time. A second peer,
`copy_same_bytes`, is the kernel time of an `x + 1` that reads and writes as many bytes as one sparse decode reads:
small kernels do not reach the 1 GiB copy's rate either, and this says by how much.

    python -m sra_jax.benchmarks.decode_bench --check --tune --out benchmarks/results/decode-bench-<date>.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from sra_jax.benchmarks.attention_bench import time_jax

HEADS, KV_HEADS, D, WINDOW, NUM_GLOBAL, CRITICAL = 16, 8, 128, 1024, 4, 0.1
KERNEL_KW: dict = {}  # {"interpret": True} for a CPU smoke run (--interpret)


def wall_ms(fn, *args, reps: int = 7, inner: int = 1) -> float:
    """Median over `reps` of the mean wall time of `inner` back-to-back calls, after two warm-up calls."""
    return time_jax(fn, *args, reps=reps, inner=inner)


def hbm_copy_gbps(num_bytes: int = 1 << 30) -> float:
    """Read + write bytes per second (GB/s) of a `num_bytes` (default 1 GiB) bf16 `x + 1`, ten calls back to back
    (dispatch hidden behind the device)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (num_bytes // 2,), jnp.bfloat16)
    ms = wall_ms(jax.jit(lambda x: x + 1), x, inner=10)
    return 2 * x.nbytes / ms / 1e6


def device_kernel_us(fn, *args, runs: int = 3) -> dict[str, float]:
    """Per-kernel device time (µs, summed over `runs` executions) from a jax.profiler trace of fn(*args)."""
    jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix="decode_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    per_line: dict[str, dict[str, float]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            sums = per_line.setdefault(line.name, collections.defaultdict(float))
            for ev in line.events:
                sums[ev.name] += ev.duration_ns / 1e3
    # Kernel launches sit on the stream lines; "XLA Ops" / "XLA Modules" lines repeat them at coarser grain.
    streams = {k: v for k, v in per_line.items() if k.lower().startswith("stream")}
    chosen = streams or {k: v for k, v in per_line.items() if "xla" not in k.lower()}
    total: dict[str, float] = collections.defaultdict(float)
    for sums in chosen.values():
        for name, us in sums.items():
            total[name] += us
    return dict(total)


def copy_same_bytes(nbytes: int, copies: int = 8) -> dict:
    """Kernel time of a bf16 `x + 1` reading and writing nbytes in all, from a profiler trace of `copies` of them."""
    xs = [jnp.full((nbytes // 4,), i, jnp.bfloat16) for i in range(copies)]
    us = sum(device_kernel_us(jax.jit(lambda xs: [x + 1 for x in xs]), xs, runs=2).values()) / (2 * copies)
    return {"op": "copy_same_bytes", "bytes_read_plus_written": nbytes, "kernel_us": us,
            "gbps": nbytes / us / 1e3 if us else None}  # no GPU trace (CPU smoke run): no time


def make_inputs(length: int, batch: int, calls: int, copies: int, capacity: int | None = None):
    """Queries per call, `copies` caches, sorted unique critical slots per call and row (-1 padding to
    `capacity`)."""
    ks = jax.random.split(jax.random.PRNGKey(length + batch), 4)
    q = jax.random.normal(ks[0], (calls, batch, 1, HEADS, D), jnp.bfloat16)
    # Separate arrays, not slices of one stacked array: a slice fed to a custom call can cost a copy.
    kc = [jax.random.normal(k, (batch, length, KV_HEADS, D), jnp.bfloat16) for k in jax.random.split(ks[1], copies)]
    vc = [jax.random.normal(k, (batch, length, KV_HEADS, D), jnp.bfloat16) for k in jax.random.split(ks[2], copies)]
    n_crit = int(CRITICAL * length)
    crit = []
    for k in jax.random.split(ks[3], calls):
        rows = jax.vmap(lambda k: jax.random.choice(k, length, (n_crit,), replace=False))(jax.random.split(k, batch))
        rows = jnp.sort(rows.astype(jnp.int32), axis=-1)
        if capacity is not None and capacity > n_crit:
            rows = jnp.pad(rows, ((0, 0), (0, capacity - n_crit)), constant_values=-1)
        crit.append(rows)
    return q, kc, vc, crit


def chain(op, calls: int, copies: int):
    """One executable of `calls` dependent decode calls: call i reads cache copy i % copies and critical set i."""

    def run(q, kc, vc, crit, lengths):
        x = q[0]
        for i in range(calls):
            x = op(x, kc[i % copies], vc[i % copies], crit[i], lengths)
        return x

    return jax.jit(run)


def sparse_op(**kw):
    def op(q, kc, vc, crit, lengths):
        return pk.sparse_decode_attention(
            q, kc, vc, lengths, window=WINDOW, num_global=NUM_GLOBAL, critical_indices=crit, backend="triton",
            **kw, **KERNEL_KW
        )

    return op


def counted_op(live: int, **kw):
    def op(q, kc, vc, crit, lengths):
        counts = jnp.full((q.shape[0],), live, jnp.int32)
        return sparse_op(critical_sorted=True, critical_counts=counts, **kw)(q, kc, vc, crit, lengths)

    return op


def dense_op(**kw):
    def op(q, kc, vc, crit, lengths):
        return pk.sparse_decode_attention(q, kc, vc, lengths, window=kc.shape[1], backend="triton", **kw, **KERNEL_KW)

    return op


def kv_bytes(lengths, crit, *, window: int, num_global: int) -> int:
    slots, _ = pk.decode.decode_slots(
        lengths, num_new=1, window=window, num_global=num_global, critical_indices=crit, tile=64
    )
    return int((slots >= 0).sum()) * KV_HEADS * D * 2 * 2


def bench_row(name, op, length, batch, copy_gbps, *, sparse=True, calls=16, capacity=None, profile=True):
    copies = 8 if batch == 1 else 2
    q, kc, vc, crit = make_inputs(length, batch, calls, copies, capacity)
    lengths = jnp.full((batch,), length, jnp.int32)
    fn = chain(op, calls, copies)
    args = (q, kc, vc, crit, lengths)
    row = {
        "op": "decode",
        "impl": name,
        "seq_len": length,
        "batch": batch,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": D,
        "dtype": "bfloat16",
        "window": WINDOW if sparse else length,
        "num_global": NUM_GLOBAL if sparse else 0,
        "critical_fraction": CRITICAL if sparse else 0.0,
        "critical_capacity": int(crit[0].shape[-1]) if sparse else 0,
        "calls_per_executable": calls,
        "hbm_copy_gbps": copy_gbps,
    }
    try:
        e2e_us = wall_ms(fn, *args) / calls * 1e3
        nbytes = (
            kv_bytes(lengths, crit[0], window=WINDOW, num_global=NUM_GLOBAL)
            if sparse
            else batch * length * KV_HEADS * D * 2 * 2
        )
        row.update(
            e2e_us=e2e_us,
            kv_bytes=nbytes,
            gbps_e2e=nbytes / e2e_us / 1e3,
            fraction_of_copy_e2e=nbytes / e2e_us / 1e3 / copy_gbps,
        )
        out = op(q[0], kc[0], vc[0], crit[0], lengths).astype(jnp.float32)
        kw = {"window": WINDOW, "num_global": NUM_GLOBAL, "critical_indices": crit[0]} if sparse else {"window": length}
        f32 = (x.astype(jnp.float32) for x in (q[0], kc[0], vc[0]))  # a bf16 reference rounds like the kernel
        ref = pk.reference.sparse_decode_attention(*f32, lengths, **kw)
        row["rel_err_vs_reference"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        if profile:
            runs = 2
            kernels = {k: v / (runs * calls) for k, v in device_kernel_us(fn, *args, runs=runs).items()}
            kernel_us = sum(kernels.values())
            decode_us = sum(v for k, v in kernels.items() if "sparse_decode" in k and "combine" not in k)
            row.update(
                kernel_us=kernel_us,
                decode_kernel_us=decode_us,
                gbps_kernel=nbytes / kernel_us / 1e3 if kernel_us else None,
                fraction_of_copy_kernel=nbytes / kernel_us / 1e3 / copy_gbps if kernel_us else None,
                fraction_of_copy_decode_kernel=nbytes / decode_us / 1e3 / copy_gbps if decode_us else None,
                kernels_us={k: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]},
            )
    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
        row["error"] = repr(e)[:800]
    return row


def header() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(), "versions": versions}


def variants(length: int, batch: int, tune: bool, only: list[str] | None = None) -> list[tuple]:
    """(impl name, op, sparse?, critical capacity) rows for one shape; `tune` adds the tuning variants (all of them,
    or those named in `only`, e.g. ["tile128", "warps4"])."""
    sorted_ = {"critical_sorted": True}
    rows = [
        ("sparse_sorted", sparse_op(**sorted_), True, None),
        ("sparse_unsorted_input_sort", sparse_op(), True, None),
        # A list of twice the live size, -1 padded: with critical_counts the padding is never visited.
        ("sparse_sorted_capacity2x_counts", counted_op(int(CRITICAL * length)), True, int(2 * CRITICAL * length)),
        ("dense_all_slots", dense_op(), False, None),
    ]
    if tune:
        extra = {"xla_combine": {"combine": "xla"}, "tile32": {"tile": 32}, "tile128": {"tile": 128},
                 "warps4": {"num_warps": 4}, "stages1": {"num_stages": 1}, "stages3": {"num_stages": 3},
                 "skip_empty": {"skip_empty": True}, "programs264": {"num_splits": -(-264 // (batch * KV_HEADS))},
                 "programs2048": {"num_splits": -(-2048 // (batch * KV_HEADS))}}
        rows += [(f"sparse_sorted_{k}", sparse_op(**sorted_, **kw), True, None) for k, kw in extra.items()
                 if only is None or k in only]
    return rows


def gpu_check(configs: int = 8) -> dict[str, float | str]:
    """Kernel vs reference on small random problems on the device: left padding, repeats, -1 entries, 1-4 new
    tokens, GQA 1/4/8, f32 and bf16 (relative errors; the f32 reference needs JAX_DEFAULT_MATMUL_PRECISION=highest
    to be more than TF32-accurate)."""
    rng = np.random.default_rng(0)
    errors: dict[str, float | str] = {}
    for n in range(configs):
        group, t, hkv, b, length = [1, 4, 8][n % 3], 1 + n % 4, 2, 3, 300
        d, dtype = (64, jnp.float32) if n % 2 else (128, jnp.bfloat16)
        lengths = rng.integers(t, length + 1, b)
        kv_start = np.minimum(rng.integers(0, 40, b), lengths - 1)
        crit = rng.integers(-1, length, (b, 50))
        crit[:, 30:] = -1
        crit[:, 5] = crit[:, 6]
        ks = jax.random.split(jax.random.PRNGKey(n), 3)
        q = jax.random.normal(ks[0], (b, t, group * hkv, d), dtype)
        kc, vc = (jax.random.normal(k, (b, length, hkv, d), dtype) for k in ks[1:])
        kw = dict(window=[1, 17, 64, 1000][n % 4], num_global=n % 3, critical_indices=jnp.asarray(crit, jnp.int32),
                  kv_start=jnp.asarray(kv_start, jnp.int32))
        f32 = [x.astype(jnp.float32) for x in (q, kc, vc)]
        ref = pk.sparse_decode_attention(*f32, jnp.asarray(lengths), backend="reference", **kw)
        for combine, tile in (("pallas", 16), ("xla", 64)):
            name = f"{n}_{combine}_tile{tile}_{jnp.dtype(dtype).name}"
            try:
                out = pk.sparse_decode_attention(q, kc, vc, jnp.asarray(lengths), backend="triton", combine=combine,
                                                 tile=tile, num_splits=1 + n % 5, **kw, **KERNEL_KW)
                errors[name] = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            except Exception as e:  # noqa: BLE001 - record, keep checking the others
                errors[name] = repr(e)[:600]
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode-bench.json"))
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--tune", action="store_true", help="also time tile / split / warp / stage / combine variants")
    p.add_argument("--only", nargs="*", default=None, help="with --tune: just these variants (e.g. tile128 warps4)")
    p.add_argument("--check", action="store_true", help="first compare kernel and reference on small problems")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke run; times meaningless)")
    p.add_argument("--check-configs", type=int, default=8)
    args = p.parse_args(argv)
    if args.interpret:
        KERNEL_KW["interpret"] = True
    rows: list[dict] = []

    def save(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**header(), "rows": rows}, indent=1))

    if args.check:
        save({"op": "gpu_correctness_vs_reference", "rel_err": gpu_check(args.check_configs)})
    copy = hbm_copy_gbps()
    save({"op": "hbm_copy", "gbps": copy})
    for length in args.lengths:
        for batch in args.batches:
            lengths = jnp.full((batch,), length, jnp.int32)
            crit = make_inputs(length, batch, 1, 1)[3][0]
            nbytes = kv_bytes(lengths, crit, window=WINDOW, num_global=NUM_GLOBAL)
            if not args.no_profile:
                save({**copy_same_bytes(nbytes), "seq_len": length, "batch": batch})
            for name, op, sparse, cap in variants(length, batch, args.tune, args.only):
                save(bench_row(name, op, length, batch, copy, sparse=sparse, capacity=cap, profile=not args.no_profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
