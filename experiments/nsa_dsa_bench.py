"""NSA selected-blocks and DSA top-k attention, forward+backward, against dense attention (cuDNN on GPU).

GPU (H200, about 4 minutes):
    python experiments/nsa_dsa_bench.py --out benchmarks/results/nsa-dsa-<date>.json
GPU, the indexer top-k rows only (H200, about 1 minute):
    python experiments/nsa_dsa_bench.py --only-indexer-topk --out benchmarks/results/dsa-topk-<date>.json
CPU smoke test (tiny):
    python experiments/nsa_dsa_bench.py --seq 256 --block 16 --top-n 4 --window 32 --top-k 32 --heads 4 \
        --kv-heads 1 --head-dim 16 --dense-impl xla --kernel-backend reference --dsa-backend reference \
        --dtype float32 --copy-mib 16 --out /tmp/x.json

Rows (benchmarks record format: device, date, versions, rows): the NSA selected-blocks branch
(`ops.nsa.nsa_selected` impl="pallas": `pallas_kernels.topk_attention` over each token's listed keys) with a
per-token, per-kv-head top-n selection (first block, own block and random causal blocks up to top-n, as the selection
would produce), one row per `--topk-configs` entry, each with its output and gradient errors against the jnp gather
(`ops.dsa.dsa_attention_gather`, when --kv-heads is 1: its lists are shared by all heads), the NSA sliding-window
branch on `pallas_kernels.block_sparse_attention`, DSA
attention over random causal top-k keys with the jnp gather and with the Pallas top-k kernel
(`pallas_kernels.topk_attention`, one row per `--topk-configs` entry, each with its output and gradient errors
against the gather), the whole DSA attention (`dsa_select_attend`: the indexer top-k of each `--indexer-topk` entry,
then the kernel with the first `--topk-configs` tuning), and dense causal attention: median milliseconds of the
jitted forward and forward+backward. Then the indexer top-k at this length (`ops.dsa.indexer_top_k`, forward only,
one `dsa_indexer_topk` row per `--indexer-topk` entry: "sort" streams over key blocks, "threshold:<bits>" is the
sort-free radix select; each row after the first carries the fraction of queries whose selected keys differ from the
first's) and DSA decode of one token over a cache of `--seq` slots (`ops.dsa.dsa_decode`: indexer, top-k, attention
over k gathered keys) with the kernel and the jnp gather, beside dense decode over the whole cache; the decode rows
carry `hbm_floor_ms`, the bytes decode must read (the indexer keys, and K and V of the k selected keys) over the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
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


def nsa_selection(key, s: int, block: int, top_n: int, kv_heads: int) -> jax.Array:
    """A per-token selection [1, s, kv_heads, n] as `ops.nsa.select_blocks` makes one: first and own block, random
    causal blocks up to top_n (`ops.nsa.top_blocks` of random importance)."""
    nb = -(-s // block)
    imp = jax.random.uniform(key, (1, kv_heads, s, nb))
    blocks = nsa.top_blocks(imp, (jnp.arange(s, dtype=jnp.int32) // block)[None, None, :], top_n)
    return jnp.moveaxis(blocks, 1, 2)


def _nsa_kernel(q, k, v, *, blocks, pos, block, backend, **tuning):
    return nsa.nsa_selected(q, k, v, blocks, pos, block_sel=block, impl="pallas", backend=backend, **tuning)


def _dsa_kernel(q, k, v, idx, valid, *, pos, backend, **tuning):
    return dsa.dsa_attention(q, k, v, idx, valid, pos, impl="pallas", backend=backend, **tuning)


def errors_vs(fn, ref, q, k, v) -> dict:
    """Relative errors ||x - ref|| / ||ref|| of fn's output and of its q/k/v gradients against ref's (the kernel
    against the jnp gather on the benchmark's own inputs: the GPU check of the kernel)."""
    w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
    loss = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum(), (0, 1, 2)))
    (_, g), (_, g_ref) = loss(fn)(q, k, v), loss(ref)(q, k, v)
    rel = lambda x, y: float(jnp.linalg.norm((x - y).astype(jnp.float32)) / jnp.linalg.norm(y.astype(jnp.float32)))
    return {
        "rel_err_fwd_vs_gather": rel(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v)),
        **{f"rel_err_d{n}_vs_gather": rel(x, y) for n, x, y in zip("qkv", g, g_ref)},
    }


def copy_bandwidth_gbs(mib: int, reps: int) -> float:
    """GB/s of a device copy (read + write) of a `mib` MiB array: the bandwidth decode can hope for."""
    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    ms = _time(jax.jit(lambda x: x + 1.0), x, reps=reps)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def _indexer_inputs(a, keys, dt):
    s, hi, di = a.seq, a.indexer_heads, a.indexer_dim
    qi = jax.random.normal(keys[0], (1, s, hi, di), dt)
    ki = jax.random.normal(keys[1], (1, s, di), dt)
    wi = jax.random.normal(keys[2], (1, s, hi), dt)
    return qi, ki, wi


def _topk_kwargs(entry: str, a) -> dict:
    """`ops.dsa.indexer_top_k` arguments of one `--indexer-topk` entry."""
    name, _, bits = entry.partition(":")
    if name == "threshold":
        return {"impl": name, "radix_bits": int(bits or 2), "query_chunk": a.indexer_query_chunk}
    if name != "sort" or bits:
        raise ValueError(f"--indexer-topk entry {entry!r} must be 'sort' or 'threshold:<radix_bits>'")
    return {"impl": name}


def indexer_topk_rows(a, keys, base, dt) -> list[dict]:
    """The indexer top-k over the whole sequence (`ops.dsa.indexer_top_k`, forward only), one row per
    `--indexer-topk` entry ("sort" or "threshold:<radix_bits>"), each row but the first with the fraction of queries
    whose selected set (valid keys) differs from the first entry's: the GPU check that the impls agree (scores
    rounded differently by a different tiling can swap near-tied keys, so a tiny fraction may differ)."""
    s = a.seq
    kk = min(a.top_k, s)
    qi, ki, wi = _indexer_inputs(a, keys, dt)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    rows, first = [], None
    sets = jax.jit(lambda idx, valid: jnp.sort(jnp.where(valid, idx, -1), -1))
    for entry in a.indexer_topk.split(","):
        kw = _topk_kwargs(entry, a)
        select = jax.jit(lambda qi, ki, wi, kw=kw: dsa.indexer_top_k(qi, ki, wi, pos, top_k=kk, **kw))
        row = {"op": "dsa_indexer_topk", "impl": entry, **base, "top_k": kk, "indexer_heads": a.indexer_heads,
               "indexer_dim": a.indexer_dim, "ms_fwd": _time(select, qi, ki, wi, reps=a.reps)}  # fmt: skip
        if kw["impl"] == "threshold":
            row["query_chunk"] = a.indexer_query_chunk or dsa.default_query_chunk(1, s)
        got = sets(*select(qi, ki, wi))
        if first is None:
            first = (entry, got)
        else:
            row[f"mismatch_queries_vs_{first[0]}"] = float((got != first[1]).any(-1).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def indexer_and_decode_rows(a, keys, q, k, v, base) -> list[dict]:
    """The indexer top-k over the whole sequence (`indexer_topk_rows`), and one-token DSA decode over a full cache."""
    s, hkv, d, di = a.seq, a.kv_heads, a.head_dim, a.indexer_dim
    dt = q.dtype
    kk = min(a.top_k, s)
    rows = indexer_topk_rows(a, keys, base, dt)
    qi, ki, wi = _indexer_inputs(a, keys, dt)
    lengths = jnp.array([s], jnp.int32)
    last = slice(s - 1, s)
    gbs = copy_bandwidth_gbs(a.copy_mib, a.reps)
    itemsize = jnp.dtype(dt).itemsize
    floor_bytes = (s * di + 2 * kk * hkv * d) * itemsize
    decode_base = {**base, "seq_len": s, "top_k": kk, "copy_gbs": gbs, "hbm_floor_ms": 1e3 * floor_bytes / (gbs * 1e9)}
    for impl, kw in (("pallas", {"backend": a.dsa_backend}), ("gather", {})):
        step = jax.jit(
            lambda q, k, v, ki, qi, wi, impl=impl, kw=kw: dsa.dsa_decode(
                q, k, v, ki, qi, wi, lengths, top_k=kk, impl=impl, **kw
            )[0]
        )
        ms = _time(step, q[:, last], k, v, ki, qi[:, last], wi[:, last], reps=a.reps)
        rows.append({"op": "dsa_decode", "impl": impl if impl == "gather" else f"topk:{a.dsa_backend}",
                     **decode_base, "ms": ms})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    impl = None if a.dense_impl == "xla" else a.dense_impl
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))
    rows.append({"op": "dense_decode", "impl": a.dense_impl, **base, "seq_len": s, "copy_gbs": gbs,
                 "hbm_floor_ms": 1e3 * 2 * s * hkv * d * itemsize / (gbs * 1e9),
                 "ms": _time(dense, q[:, last], k, v, reps=a.reps)})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    return rows


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
    ap.add_argument(
        "--kernel-backend", default="auto", help="backend of the NSA rows' kernels (auto, triton, tpu, reference)"
    )
    ap.add_argument(
        "--dsa-backend", default="auto", help="pallas_kernels.topk_attention backend (auto, triton, reference)"
    )
    ap.add_argument(
        "--topk-configs", default="64:4:2,32:4:2,128:8:2", help="block_k:num_warps:num_stages of each timed kernel row"
    )
    ap.add_argument("--indexer-heads", type=int, default=4)
    ap.add_argument("--indexer-dim", type=int, default=64)
    ap.add_argument("--indexer-topk", default="sort,threshold:1,threshold:2,threshold:4",
                    help="indexer top-k rows: 'sort' or 'threshold:<radix_bits>', comma-separated (the first is the "
                         "reference of the mismatch check)")  # fmt: skip
    ap.add_argument("--indexer-query-chunk", type=int, default=None, help="query_chunk of the threshold rows "
                    "(default: ops.dsa's automatic chunk)")  # fmt: skip
    ap.add_argument("--only-indexer-topk", action="store_true", help="time only the indexer top-k rows")
    ap.add_argument("--copy-mib", type=int, default=2048, help="array size of the copy-bandwidth measurement")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.heads % a.kv_heads:
        raise ValueError(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    dt = jnp.dtype(a.dtype)
    s, hq, hkv, d = a.seq, a.heads, a.kv_heads, a.head_dim
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    q = jax.random.normal(ks[0], (1, s, hq, d), dt)
    k = jax.random.normal(ks[1], (1, s, hkv, d), dt)
    v = jax.random.normal(ks[2], (1, s, hkv, d), dt)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    base = dict(seq_len=s, batch=1, heads=hq, kv_heads=hkv, head_dim=d, dtype=a.dtype)
    if a.only_indexer_topk:
        _write(a.out, indexer_topk_rows(a, ks[5:], base, dt))
        return
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
    blocks = nsa_selection(ks[3], s, a.block, a.top_n, hkv)
    keys = nsa.selected_key_indices(blocks, a.block)[:, :, 0]  # kv head 0's lists, [1, s, n * block]
    nsa_gather = lambda q, k, v: dsa.dsa_attention_gather(q, k, v, keys, (keys >= 0) & (keys < s), pos,
                                                          block_q=a.dsa_block_q)  # fmt: skip
    for config in a.topk_configs.split(","):
        block_k, num_warps, num_stages = (int(x) for x in config.split(":"))
        tuning = dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages)
        kernel = functools.partial(_nsa_kernel, blocks=blocks, pos=pos, block=a.block, backend=a.kernel_backend,
                                   **tuning)  # fmt: skip
        add("nsa_selected", kernel, impl=f"topk:{a.kernel_backend}", block=a.block, top_n=a.top_n, **tuning)
        if hkv == 1:  # the gather's lists are shared by all heads: kv head 0's are every head's here
            rows[-1].update(errors_vs(kernel, nsa_gather, q, k, v))
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
    gather = lambda q, k, v: dsa.dsa_attention_gather(q, k, v, idx, valid, pos, block_q=a.dsa_block_q)
    for config in a.topk_configs.split(","):
        block_k, num_warps, num_stages = (int(x) for x in config.split(":"))
        tuning = dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages)
        kernel = lambda q, k, v, tuning=tuning: _dsa_kernel(q, k, v, idx, valid, pos=pos, backend=a.dsa_backend,
                                                             **tuning)  # fmt: skip
        add("dsa_topk_kernel", kernel, impl=f"topk:{a.dsa_backend}", top_k=kk, **tuning)
        rows[-1].update(errors_vs(kernel, gather, q, k, v))
    # the whole DSA attention: the indexer's top-k (no gradient) and the kernel over the selected keys
    qi, ki, wi = _indexer_inputs(a, ks[5:], dt)
    first_tuning = dict(zip(("block_k", "num_warps", "num_stages"), map(int, a.topk_configs.split(",")[0].split(":"))))
    for entry in a.indexer_topk.split(","):
        select_kw = _topk_kwargs(entry, a)
        add("dsa_select_attend",
            lambda q, k, v, kw=select_kw: _dsa_kernel(
                q, k, v, *dsa.indexer_top_k(qi, ki, wi, pos, top_k=kk, **kw), pos=pos, backend=a.dsa_backend,
                **first_tuning),
            impl=f"{entry}+topk:{a.dsa_backend}", top_k=kk, **first_tuning)  # fmt: skip
    dense = rows[0]
    for r in rows[1:]:
        r["speedup_fwd_vs_dense"] = dense["ms_fwd"] / r["ms_fwd"]
        r["speedup_fwdbwd_vs_dense"] = dense["ms_fwdbwd"] / r["ms_fwdbwd"]
    rows.extend(indexer_and_decode_rows(a, ks[5:], q, k, v, base))
    _write(a.out, rows)


def _write(path: str, rows: list[dict]) -> None:
    rec = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.date.today().isoformat(),
        "versions": {"jax": jax.__version__},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
