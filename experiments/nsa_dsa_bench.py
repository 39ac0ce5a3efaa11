"""NSA selected-blocks and DSA top-k attention, forward+backward, against dense attention (cuDNN on GPU).

GPU (H200, about 2 minutes):
    python experiments/nsa_dsa_bench.py --out benchmarks/results/nsa-dsa-<date>.json
CPU smoke test (tiny):
    python experiments/nsa_dsa_bench.py --seq 256 --block 16 --top-n 4 --window 32 --top-k 32 --heads 4 \
        --kv-heads 1 --head-dim 16 --dense-impl xla --kernel-backend reference --dtype float32 --out /tmp/x.json

Rows (benchmarks record format: device, date, versions, rows): the NSA selected-blocks branch on
`pallas_kernels.block_sparse_attention` with a per-kv-head top-n layout (first block, own block and random causal
blocks up to top-n, as the selection would produce), the NSA sliding-window branch on the same kernel, DSA
attention over random causal top-k keys with the gather implementation (the indexer is not timed), and dense causal
attention. Each: median milliseconds of the jitted forward and forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sra_jax.ops import dsa, nsa


def _time(f, *args, reps: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def _fb(fn):
    fwd = jax.jit(fn)
    fwdbwd = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
    return fwd, fwdbwd


def nsa_block_mask(key, s: int, block: int, top_n: int, kv_heads: int) -> jax.Array:
    nb = -(-s // block)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    score = jax.random.uniform(key, (1, kv_heads, nb, nb))
    score = jnp.where((j == 0) | (j == i), 2.0, jnp.where(j <= i, score, -1.0))
    vals, idx = jax.lax.top_k(score, min(top_n, nb))
    return (jax.nn.one_hot(idx, nb, dtype=jnp.bool_) & (vals >= 0)[..., None]).any(-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2048)
    ap.add_argument("--dsa-block-q", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dense-impl", default="cudnn", help="jax.nn.dot_product_attention implementation (cudnn, xla)")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.heads % a.kv_heads:
        raise ValueError(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    dt = jnp.dtype(a.dtype)
    s, hq, hkv, d = a.seq, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (1, s, hq, d), dt)
    k = jax.random.normal(ks[1], (1, s, hkv, d), dt)
    v = jax.random.normal(ks[2], (1, s, hkv, d), dt)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    base = dict(seq_len=s, batch=1, heads=hq, kv_heads=hkv, head_dim=d, dtype=a.dtype)
    rows = []

    def add(name, fn, **extra):
        fwd, fb = _fb(fn)
        rows.append(
            {
                "op": name,
                **base,
                **extra,
                "ms_fwd": _time(fwd, q, k, v, reps=a.reps),
                "ms_fwdbwd": _time(fb, q, k, v, reps=a.reps),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    impl = None if a.dense_impl == "xla" else a.dense_impl
    add(
        "dense_causal",
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl),
        impl=a.dense_impl,
        density=1.0,
    )
    bm = nsa_block_mask(ks[3], s, a.block, a.top_n, hkv)
    add(
        "nsa_selected",
        lambda q, k, v: nsa.nsa_selected_kernel(q, k, v, bm, pos, block_sel=a.block, backend=a.kernel_backend),
        impl=f"block_sparse:{a.kernel_backend}",
        block=a.block,
        top_n=a.top_n,
    )
    nb = -(-s // a.block)
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    band = jnp.asarray((j <= i) & ((i - j) * a.block < a.window + a.block))[None]
    wlay = nsa.custom_block_layout(band, block_q=a.block, block_k=a.block, seq_q=s, seq_k=s)
    from pallas_kernels import block_sparse_attention

    add(
        "nsa_window",
        lambda q, k, v: block_sparse_attention(
            q, k, v, wlay, causal=True, window=a.window, q_positions=pos, k_positions=pos, backend=a.kernel_backend
        ),
        impl=f"block_sparse:{a.kernel_backend}",
        window=a.window,
    )
    # random causal top-k keys: key t's slot r holds a uniformly drawn earlier key (duplicates masked by validity)
    kk = min(a.top_k, s)
    u = jax.random.uniform(ks[4], (1, s, kk))
    idx = jnp.floor(u * (pos[..., None] + 1)).astype(jnp.int32)
    valid = jnp.arange(kk)[None, None] <= pos[..., None]
    add(
        "dsa_gather",
        lambda q, k, v: dsa.dsa_attention_gather(q, k, v, idx, valid, pos, block_q=a.dsa_block_q),
        impl="gather_jnp",
        top_k=kk,
    )
    dense = rows[0]
    for r in rows[1:]:
        r["speedup_fwd_vs_dense"] = dense["ms_fwd"] / r["ms_fwd"]
        r["speedup_fwdbwd_vs_dense"] = dense["ms_fwdbwd"] / r["ms_fwdbwd"]
    rec = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.date.today().isoformat(),
        "versions": {"jax": jax.__version__},
        "rows": rows,
    }
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
