"""Attention benchmark on one GPU: cuDNN dense causal vs our block-sparse kernel (several densities) vs torch
FlexAttention with the identical block mask, forward and forward+backward, plus sparse decode vs HBM copy.
Our kernel runs once per backend (`--backends`: the Triton kernels; the Mosaic GPU forward and backward; the
Mosaic GPU forward with the Triton backward).

Every peer is timed in the same process. Rows follow the DESIGN.md record format; the file is rewritten after
every row so a run cut short still leaves its numbers.

    python -m sra_jax.benchmarks.attention_bench --seq 4096 16384 --out benchmarks/results/attention-2026-11-23.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.block_sparse import dispatch, gpu, mosaic, token_mask

BLOCK = 128


def time_jax(fn, *args, reps: int = 5, inner: int = 10) -> float:
    """Median over `reps` of the mean of `inner` back-to-back calls (dispatch overlaps the device), in ms."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner * 1e3)
    return statistics.median(times)


def hbm_copy_gbps() -> float:
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    ms = time_jax(jax.jit(lambda x: x + 1), x)
    return 2 * x.nbytes / ms / 1e6


def block_masks(n: int, density: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(visited, full) [n, n]: random causal layout keeping the diagonal; below-diagonal blocks are full."""
    if density >= 1.0:
        visited = np.tril(np.ones((n, n), bool))
    else:
        visited = np.asarray(pk.random_causal_block_mask(jax.random.PRNGKey(seed), n, density)[0, 0])
    return visited, visited & ~np.eye(n, dtype=bool)


def flex_runner(q, k, v, visited, full, heads, kv_heads):
    """torch FlexAttention with exactly our block mask (partial = diagonal blocks with the causal mask_mod)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def csr(mask):
        idx = np.argsort(~mask, axis=-1, kind="stable").astype(np.int32)
        return (
            torch.from_numpy(mask.sum(-1).astype(np.int32))[None, None].cuda(),
            torch.from_numpy(idx)[None, None].cuda(),
        )

    partial = visited & ~full
    num, idx = csr(partial)
    full_num, full_idx = csr(full)
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    bm = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal)
    to_t = lambda x: torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous()
    tq, tk, tv = (to_t(x).detach().requires_grad_(True) for x in (q, k, v))
    attn = torch.compile(flex_attention)
    gqa = heads != kv_heads
    fwd = lambda: attn(tq, tk, tv, block_mask=bm, enable_gqa=gqa)
    w = torch.randn_like(tq)

    def fwdbwd():
        out = attn(tq, tk, tv, block_mask=bm, enable_gqa=gqa)
        return torch.autograd.grad((out * w).sum(), (tq, tk, tv))

    return fwd, fwdbwd


def time_torch(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


@dataclasses.dataclass
class Recorder:
    path: Path
    header: dict
    rows: list = dataclasses.field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1))


# Row "impl" names per `--backends` entry: (block_sparse_attention backend, MosaicConfig.backward).
# mosaic_gpu = Mosaic GPU forward + Mosaic GPU backward; mosaic_gpu_triton_bwd = Mosaic forward + Triton backward.
IMPL_NAMES = {
    "triton": "pallas_triton",
    "mosaic_gpu": "pallas_mosaic_gpu",
    "mosaic_gpu_triton_bwd": "pallas_mosaic_gpu_fwd_triton_bwd",
}


def bench_prefill(
    rec: Recorder,
    seq: int,
    heads: int,
    kv_heads: int,
    densities,
    *,
    flex: bool,
    config,
    tag="",
    backends=("triton", "mosaic_gpu"),
):
    d, dtype = 128, jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(seq + kv_heads), 4)
    q = jax.random.normal(ks[0], (1, seq, heads, d), dtype)
    k = jax.random.normal(ks[1], (1, seq, kv_heads, d), dtype)
    v = jax.random.normal(ks[2], (1, seq, kv_heads, d), dtype)
    w = jax.random.normal(ks[3], q.shape, dtype)
    base = {
        "op": "attention",
        "seq_len": seq,
        "batch": 1,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": d,
        "dtype": "bfloat16",
    }

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    cudnn_fwd = jax.jit(dense)
    cudnn_bwd = jax.jit(jax.grad(lambda q, k, v: (dense(q, k, v) * w).sum(), argnums=(0, 1, 2)))
    c_f, c_b = time_jax(cudnn_fwd, q, k, v), time_jax(cudnn_bwd, q, k, v)
    rec.add({**base, "impl": "cudnn", "density": 1.0, "ms_fwd": c_f, "ms_fwdbwd": c_b})
    ref_out = cudnn_fwd(q, k, v)

    def make(name):
        backend = "mosaic_gpu" if name.startswith("mosaic_gpu") else name
        mcfg = mosaic.MosaicConfig(backward="triton" if name == "mosaic_gpu_triton_bwd" else "mosaic")

        def ours(q, k, v, layout):
            return pk.block_sparse_attention(
                q, k, v, layout, causal=True, backend=backend, config=config, mosaic_config=mcfg
            )

        return (
            jax.jit(ours),
            jax.jit(jax.grad(lambda q, k, v, lay: (ours(q, k, v, lay) * w).sum(), argnums=(0, 1, 2))),
        )

    runners = {b: make(b) for b in backends}
    n = seq // BLOCK
    n_causal = n * (n + 1) / 2
    for density in densities:
        visited, full = block_masks(n, density, seed=int(density * 1000) + seq)
        layout = pk.layout_from_block_mask(
            jnp.asarray(visited)[None], full_mask=jnp.asarray(full)[None], block_q=BLOCK, block_k=BLOCK
        )
        real = float(visited.sum() / n_causal)
        rows = []
        for backend, (ours_fwd, ours_bwd) in runners.items():
            row = {**base, "impl": IMPL_NAMES[backend] + tag, "density": real}
            try:
                o_f, o_b = time_jax(ours_fwd, q, k, v, layout), time_jax(ours_bwd, q, k, v, layout)
            except Exception as e:  # noqa: BLE001 - a backend that fails to compile is recorded, the others go on
                rec.add({**row, "error": repr(e)[:800]})
                continue
            row.update(
                ms_fwd=o_f, ms_fwdbwd=o_b, speedup_fwd_vs_cudnn=c_f / o_f, speedup_fwdbwd_vs_cudnn=c_b / o_b
            )
            if density >= 1.0:
                out = ours_fwd(q, k, v, layout).astype(jnp.float32)
                row["rel_err_vs_cudnn"] = float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out))
            rows.append(row)
        if flex:
            try:
                fwd, fwdbwd = flex_runner(q, k, v, visited, full, heads, kv_heads)
                f_f, f_b = time_torch(fwd), time_torch(fwdbwd)
                for row in rows:
                    row.update(
                        flex_ms_fwd=f_f,
                        flex_ms_fwdbwd=f_b,
                        speedup_fwd_vs_flex=f_f / row["ms_fwd"],
                        speedup_fwdbwd_vs_flex=f_b / row["ms_fwdbwd"],
                    )
                rec.add(
                    {
                        **base,
                        "impl": "flex",
                        "density": real,
                        "ms_fwd": f_f,
                        "ms_fwdbwd": f_b,
                        "speedup_fwd_vs_cudnn": c_f / f_f,
                        "speedup_fwdbwd_vs_cudnn": c_b / f_b,
                    }
                )
            except Exception as e:  # noqa: BLE001 - flex is a peer: record its failure, keep our numbers
                for row in rows:
                    row["flex_error"] = repr(e)[:500]
        for row in rows:
            rec.add(row)


def bench_decode(
    rec: Recorder,
    length: int,
    batch: int,
    copy_gbps: float,
    *,
    heads=16,
    kv_heads=8,
    window=1024,
    critical_fraction=0.1,
    calls=16,
    variants=None,
):
    """Decode is microseconds long: time `calls` unrolled calls in one executable, each on its own cache copy and
    critical set (rotating over enough copies that the L2 cache cannot serve repeated reads)."""
    d, dtype = 128, jnp.bfloat16
    copies = 8 if batch == 1 else 2
    ks = jax.random.split(jax.random.PRNGKey(length + batch), 4)
    q = jax.random.normal(ks[0], (calls, batch, 1, heads, d), dtype)
    # Separate arrays, not slices of one stacked array: a slice fed to a custom call can cost a copy.
    kc = [
        jax.random.normal(kk, (batch, length, kv_heads, d), dtype) for kk in jax.random.split(ks[1], copies)
    ]
    vc = [
        jax.random.normal(kk, (batch, length, kv_heads, d), dtype) for kk in jax.random.split(ks[2], copies)
    ]
    lengths = jnp.full((batch,), length, jnp.int32)
    n_crit = int(critical_fraction * length)
    crit = jnp.sort(
        jax.vmap(lambda kk: jax.random.choice(kk, length, (n_crit,), replace=False))(
            jax.random.split(ks[3], calls * batch)
        )
        .astype(jnp.int32)
        .reshape(calls, batch, n_crit),
        axis=-1,
    )
    base = {
        "op": "decode",
        "seq_len": length,
        "batch": batch,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": d,
        "dtype": "bfloat16",
        "window": window,
        "critical_fraction": critical_fraction,
    }
    variants = variants or {"sparse": ({}, True), "dense_all_slots": ({}, False)}
    for name, (tuning, sparse) in variants.items():

        def one(q, kc, vc, crit, sparse=sparse, tuning=tuning):
            kw = (
                {"window": window, "num_global": 4, "critical_indices": crit}
                if sparse
                else {"window": length}
            )
            return pk.sparse_decode_attention(q, kc, vc, lengths, backend="triton", **kw, **tuning)

        many = jax.jit(
            lambda q, kc, vc, crit: [one(q[i], kc[i % copies], vc[i % copies], crit[i]) for i in range(calls)]
        )
        kw0 = (
            {"window": window, "num_global": 4, "critical_indices": crit[0]} if sparse else {"window": length}
        )
        slots, _ = pk.decode.decode_slots(
            lengths,
            num_new=1,
            window=kw0["window"],
            num_global=kw0.get("num_global", 0),
            critical_indices=kw0.get("critical_indices"),
            tile=64,
        )
        n_read = int((slots >= 0).sum())
        ms = time_jax(many, q, kc, vc, crit, reps=5, inner=1) / calls
        gbytes = n_read * kv_heads * d * 2 * 2 / 1e9
        out = one(q[0], kc[0], vc[0], crit[0]).astype(jnp.float32)
        ref = pk.reference.sparse_decode_attention(q[0], kc[0], vc[0], lengths, **kw0).astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        rec.add(
            {
                **base,
                "impl": "pallas_triton_decode_" + name,
                "density": n_read / (batch * length),
                "ms_fwd": ms,
                "kv_gbytes_read": gbytes,
                "gbps": gbytes / ms * 1e3,
                "fraction_of_hbm_copy": gbytes / ms * 1e3 / copy_gbps,
                "hbm_copy_gbps": copy_gbps,
                "rel_err_vs_reference": err,
            }
        )


def tune(rec: Recorder, seq: int, configs: dict) -> None:
    """Forward, dQ and dK/dV passes timed alone for each tile configuration (dense causal and ~10% blocks)."""
    d, h = 128, 16
    ks = jax.random.split(jax.random.PRNGKey(seq), 4)
    q, k, v, do = (jax.random.normal(kk, (1, seq, h, d), jnp.bfloat16) for kk in ks)
    rule, tokens = token_mask.make_rule_and_tokens(
        q,
        k,
        causal=True,
        window=None,
        num_global=0,
        q_positions=None,
        k_positions=None,
        segment_ids=None,
        k_segment_ids=None,
        q_critical=None,
        k_critical=None,
    )
    q_tok, qf = dispatch.pack_fields({"pos": tokens.q_positions})
    k_tok, kf = dispatch.pack_fields({"pos": tokens.k_positions})
    kw = {"rule": rule, "sm_scale": d**-0.5, "fields": (qf, kf)}
    n = seq // BLOCK
    for density in (1.0, 0.1):
        visited, full = block_masks(n, density, seed=7)
        layout = pk.layout_from_block_mask(
            jnp.asarray(visited)[None], full_mask=jnp.asarray(full)[None], block_q=BLOCK, block_k=BLOCK
        )
        for tag, cfg in configs.items():
            row = {
                "op": "tune",
                "seq_len": seq,
                "heads": h,
                "density": density,
                "config": tag,
                **dataclasses.asdict(cfg),
            }
            try:
                fwd = jax.jit(
                    lambda q, k, v, lay, cfg=cfg: gpu.forward(q, k, v, lay, q_tok, k_tok, config=cfg, **kw)
                )
                out, lse = fwd(q, k, v, layout)
                bwd = lambda q, k, v, o, lse, do, lay, cfg=cfg: gpu.backward(
                    q, k, v, o, lse, do, lay, q_tok, k_tok, config=cfg, **kw
                )
                row["ms_fwd"] = time_jax(fwd, q, k, v, layout)
                row["ms_dq"] = time_jax(
                    jax.jit(lambda *a, bwd=bwd: bwd(*a)[0]), q, k, v, out, lse, do, layout
                )
                row["ms_dkv"] = time_jax(
                    jax.jit(lambda *a, bwd=bwd: bwd(*a)[1:]), q, k, v, out, lse, do, layout
                )
            except Exception as e:  # noqa: BLE001 - a configuration Triton rejects is a result too
                row["error"] = repr(e)[:300]
            rec.add(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="*", default=[4096, 16384, 32768])
    p.add_argument("--kv-heads", type=int, nargs="*", default=[16, 8])
    p.add_argument("--densities", type=float, nargs="*", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    p.add_argument("--decode", type=int, nargs="*", default=[32768, 65536])
    p.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--backends", nargs="*", default=["triton", "mosaic_gpu"], choices=sorted(IMPL_NAMES))
    p.add_argument("--decode-tune", action="store_true", help="time decode tile / split variants, then stop")
    p.add_argument(
        "--tune", action="store_true", help="time tile configurations at the first --seq, then stop"
    )
    p.add_argument(
        "--out", type=Path, default=Path(f"benchmarks/results/attention-{datetime.date.today()}.json")
    )
    args = p.parse_args(argv)
    versions = {
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    }
    try:
        import torch
        import triton

        versions.update(torch=torch.__version__, triton=triton.__version__)
    except ImportError:
        pass
    rec = Recorder(
        args.out,
        {
            "device": str(jax.devices()[0].device_kind),
            "date": str(datetime.date.today()),
            "versions": versions,
        },
    )
    copy = hbm_copy_gbps()
    rec.add({"op": "hbm_copy", "gbps": copy})
    if args.decode_tune:
        for length in args.decode:
            for batch in args.decode_batch:
                base_splits = max(1, -(-264 // (batch * 8)))
                bench_decode(
                    rec,
                    length,
                    batch,
                    copy,
                    variants={
                        f"sparse_tile{tile}_splits{m * base_splits}": (
                            {"tile": tile, "num_splits": m * base_splits},
                            True,
                        )
                        for tile in (64, 128)
                        for m in (1, 4, 16)
                    },
                )
        return 0
    if args.tune and args.seq:
        C = pk.GpuConfig
        tune(
            rec,
            args.seq[0],
            {
                "default": C(),
                "fwd_k64_w8s3_dq_k32w4s3_dkv_q32w4s3": C(
                    fwd_block_k=64,
                    dq_block_k=32,
                    dq_warps=4,
                    dq_stages=3,
                    dkv_block_q=32,
                    dkv_warps=4,
                    dkv_stages=3,
                ),
                "fwd_s2_dq_k64w4s3_dkv_q64w4s3": C(
                    fwd_stages=2, dq_warps=4, dq_stages=3, dkv_warps=4, dkv_stages=3
                ),
                "fwd_q64w4_dq_q64k64w4_dkv_k64q64w4": C(
                    fwd_block_q=64, fwd_warps=4, dq_block_q=64, dq_warps=4, dkv_block_k=64, dkv_warps=4
                ),
                "fwd_s4_dq_k128_dkv_q128": C(fwd_stages=4, dq_block_k=128, dkv_block_q=128),
                "dq_k32w8s3_dkv_q32w8s3": C(dq_block_k=32, dq_stages=3, dkv_block_q=32, dkv_stages=3),
            },
        )
        return 0
    for seq in args.seq:
        for kv in args.kv_heads:
            bench_prefill(
                rec,
                seq,
                16,
                kv,
                args.densities,
                flex=not args.no_flex,
                config=pk.GpuConfig(),
                backends=tuple(args.backends),
            )
    for length in args.decode:
        for batch in args.decode_batch:
            bench_decode(rec, length, batch, copy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
