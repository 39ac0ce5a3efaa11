"""Compact (gathered critical tokens) SRA attention vs the plain block-sparse layout vs cuDNN dense causal.

One process, same inputs: B1 H16 (kv 8) D128 bf16, 10% scattered critical tokens, forward and forward+backward.
Layouts, gathers and merges are built inside the timed jitted function (that is what the model pays).
Writes {"device", "date", "versions", "rows"} to --out and prints one line per row.

    python -m sra_jax.benchmarks.compact_bench --out benchmarks/results/attention-compact-2026-11-23.json
    python -m sra_jax.benchmarks.compact_bench --smoke   # CPU: tiny shapes, reference backend
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.block_sparse.compact import compact_indices
from sra_jax.benchmarks.timing import fwd_bwd, time_call


def _spec(key, s, fraction, batch=1):
    """Positions 0..s-1 and `fraction * s` critical tokens drawn uniformly (scattered, as a random router)."""
    n_crit = int(round(fraction * s))
    perm = jax.vmap(lambda k: jax.random.permutation(k, s))(jax.random.split(key, batch))
    critical = jnp.zeros((batch, s), bool).at[jnp.arange(batch)[:, None], perm[:, :n_crit]].set(True)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (batch, s))
    return positions, critical, n_crit


def _impls(positions, critical, *, window, num_global, queries, max_critical, backend):
    q_crit = critical if queries == "critical" else None

    def compact(q, k, v):
        return pk.sra_compact_attention(
            q, k, v, q_positions=positions, k_positions=positions, q_critical=critical, k_critical=critical,
            window=window, num_global=num_global, queries=queries, max_critical=max_critical, backend=backend,
        )

    def block_sparse(q, k, v):
        layout = pk.sra_layout(
            positions, block_q=128, block_k=128, window=window, num_global=num_global,
            k_critical=critical, q_critical=q_crit,
        )
        return pk.block_sparse_attention(
            q, k, v, layout, window=window, num_global=num_global, q_positions=positions,
            k_positions=positions, k_critical=critical, q_critical=q_crit, backend=backend,
        )

    return {"compact": compact, "block_sparse": block_sparse}


def _dense(impl):
    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    return f


def _densities(positions, critical, *, window, num_global, queries, max_critical):
    """Visited blocks / causal 128x128 blocks: plain layout, and compact (band + compact grid, in 128^2 units)."""
    s = positions.shape[1]
    n = -(-s // 128)
    causal = n * (n + 1) / 2
    q_crit = critical if queries == "critical" else None
    plain = pk.sra_layout(
        positions, block_q=128, block_k=128, window=window, num_global=num_global, k_critical=critical,
        q_critical=q_crit,
    )
    band = pk.sra_layout(positions, block_q=128, block_k=128, window=window)  # globals: a dense N x G part
    width = -(-max_critical // 128) * 128
    k_idx = compact_indices(critical & (positions >= num_global), width)
    ck = jnp.take_along_axis(positions, jnp.minimum(k_idx, s - 1), axis=1)
    ck = jnp.where(k_idx < s, ck + window, -1)
    if queries == "critical":
        q_idx = compact_indices(critical, width)
        cq = jnp.where(q_idx < s, jnp.take_along_axis(positions, jnp.minimum(q_idx, s - 1), axis=1), -1)
    else:
        cq = positions
    grid = pk.sra_layout(cq, ck, block_q=128, block_k=128)
    plain_d = float(plain.kv_counts.sum() / causal)
    compact_d = float((band.kv_counts.sum() + grid.kv_counts.sum()) / causal)
    return {"block_sparse": plain_d, "compact": compact_d}


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def correctness(backend, s, heads, kv_heads, d, dtype, window, num_global):
    """compact (backend, dtype) vs the dense f32 reference of the full rule, forward and the three gradients."""
    from pallas_kernels.reference import masked_attention

    rows = []
    key = jax.random.PRNGKey(7)
    positions, critical, n_crit = _spec(key, s, 0.1)
    kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(8), 4)
    q = jax.random.normal(kq, (1, s, heads, d), dtype)
    k = jax.random.normal(kk, (1, s, kv_heads, d), dtype)
    v = jax.random.normal(kv, (1, s, kv_heads, d), dtype)
    w = jax.random.normal(kw, q.shape, jnp.float32)
    for queries in ("critical", "all"):
        pq, pk_ = positions[:, :, None], positions[:, None, :]
        crit = critical[:, None, :] & (critical[:, :, None] if queries == "critical" else True)
        mask = (pk_ <= pq) & ((pq - pk_ < window) | (pk_ < num_global) | crit)
        f = _impls(positions, critical, window=window, num_global=num_global, queries=queries,
                   max_critical=n_crit, backend=backend)["compact"]
        loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()  # noqa: B023 - called in this iteration
        ref_loss = lambda q, k, v: (masked_attention(q, k, v, mask[:, None], d**-0.5) * w).sum()  # noqa: B023 - called in this iteration
        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        f32 = lambda x: x.astype(jnp.float32)
        ref = jax.jit(lambda q, k, v: masked_attention(q, k, v, mask[:, None], d**-0.5))(f32(q), f32(k), f32(v))  # noqa: B023 - called in this iteration
        ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(f32(q), f32(k), f32(v))
        row = {"op": "correctness", "impl": "compact", "queries": queries, "seq_len": s, "window": window,
               "num_global": num_global, "dtype": str(jnp.dtype(dtype)), "rel_err_out": _rel(f32(out), ref)}
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            row[f"rel_err_{name}"] = _rel(f32(g), r)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--windows", type=int, nargs="+", default=[1024, 64])
    p.add_argument("--queries", nargs="+", default=["critical", "all"])
    p.add_argument("--num-global", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--block-sparse-seq", type=int, nargs="*", default=None,
                   help="time the plain block-sparse layout only at these lengths (default: all)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dense", default="cudnn", help="jax.nn.dot_product_attention implementation")
    p.add_argument("--check-seq", type=int, default=2048, help="correctness check length (0: skip)")
    p.add_argument("--deadline-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: reference backend, xla dense")
    p.add_argument("--out", default=None)
    p.add_argument("--run-label", default="", help="stored in every timing row")
    a = p.parse_args(argv)
    if a.smoke:
        a.seq_lens, a.windows, a.heads, a.kv_heads, a.head_dim = [256], [32], 2, 1, 16
        a.iters, a.backend, a.dense, a.check_seq = 2, "reference", "xla", 128
    start = time.perf_counter()
    dtype = jnp.bfloat16
    rows = []
    record = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__},
        "rows": rows,
    }

    def flush():
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(record, fh, indent=1)

    if a.check_seq:
        rows += correctness(a.backend, a.check_seq, a.heads, a.kv_heads, a.head_dim, dtype, 64, a.num_global)
        flush()
    for s in a.seq_lens:
        kq, kk, kv, kd, kc = jax.random.split(jax.random.PRNGKey(s), 5)
        q = jax.random.normal(kq, (1, s, a.heads, a.head_dim), dtype)
        k = jax.random.normal(kk, (1, s, a.kv_heads, a.head_dim), dtype)
        v = jax.random.normal(kv, (1, s, a.kv_heads, a.head_dim), dtype)
        do = jax.random.normal(kd, q.shape, dtype)
        positions, critical, n_crit = _spec(kc, s, a.fraction)
        base = {"seq_len": s, "batch": 1, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                "dtype": "bfloat16"}
        dense = _dense(a.dense)
        ms_f = time_call(jax.jit(dense), (q, k, v), a.iters)[0]
        ms_fb = time_call(jax.jit(fwd_bwd(dense)), (q, k, v, do), a.iters)[0]
        ref_row = {"op": "attention", "impl": f"{a.dense}_dense_causal", **base, "density": 1.0,
                   "ms_fwd": ms_f, "ms_fwdbwd": ms_fb, "speedup_fwd_vs_cudnn": 1.0, "speedup_fwdbwd_vs_cudnn": 1.0,
                   "run": a.run_label}
        rows.append(ref_row)
        print(json.dumps(ref_row), flush=True)
        flush()
        for window in a.windows:
            for queries in a.queries:
                if time.perf_counter() - start > a.deadline_s:
                    print("deadline reached, stopping", flush=True)
                    return 0
                kw = dict(window=window, num_global=a.num_global, queries=queries, max_critical=n_crit)
                dens = _densities(positions, critical, **kw)
                for name, f in _impls(positions, critical, backend=a.backend, **kw).items():
                    if name == "block_sparse" and a.block_sparse_seq is not None and s not in a.block_sparse_seq:
                        continue
                    ms_f = time_call(jax.jit(f), (q, k, v), a.iters)[0]
                    ms_fb = time_call(jax.jit(fwd_bwd(f)), (q, k, v, do), a.iters)[0]
                    row = {"op": "sra_attention", "impl": name, **base, **kw, "critical_fraction": a.fraction,
                           "density": dens[name], "ms_fwd": ms_f, "ms_fwdbwd": ms_fb,
                           "speedup_fwd_vs_cudnn": ref_row["ms_fwd"] / ms_f,
                           "speedup_fwdbwd_vs_cudnn": ref_row["ms_fwdbwd"] / ms_fb,
                           "run": a.run_label}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    flush()
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
