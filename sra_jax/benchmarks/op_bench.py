"""The public op with default arguments vs cuDNN dense (and FlexAttention when torch + CUDA are there).

`sra_jax.ops.attention(q, k, v, spec=SRAMaskSpec.create(...), impl="pallas")` with no `max_critical`, jitted as a
model would (the op then picks the compact bucket at run time), at S tokens, window W, a fraction of scattered
critical tokens (a random router: the worst case), queries "critical" and "all", forward and forward+backward;
the same with `max_critical` set (the static bound a model passes); then the compact path with keys = cache
slots (a prompt prefilled into a longer cache, and a chunk prefilled after earlier chunks) vs our dense path on
the same cache (`impl="cudnn"`). Shape B1 H32 (kv 8) D128 bf16 (Llama-3-8B attention). One JSON record in the
DESIGN.md format; the first call's seconds (compile) are kept in every row.

    PYTHONPATH=. python3 -m sra_jax.benchmarks.op_bench --out benchmarks/results/attention-op-2026-12-04.json
    PYTHONPATH=. python3 -m sra_jax.benchmarks.op_bench --smoke --out /tmp/op.json   # CPU, tiny, reference backends
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

from sra_jax.benchmarks.timing import fwd_bwd, time_call
from sra_jax.ops.attention import attention
from sra_jax.ops.masks import SRAMaskSpec


def _critical(key, s: int, fraction: float) -> jax.Array:
    """[1, s] flags of round(fraction * s) tokens drawn uniformly (scattered, as a random router)."""
    n = int(round(fraction * s))
    return jnp.zeros((1, s), bool).at[0, jax.random.permutation(key, s)[:n]].set(True)


def _flex(q, k, v, critical, *, window: int, num_global: int, queries: str):
    """(fwd, fwdbwd) callables of torch FlexAttention under the same SRA rule, or None without torch + CUDA."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    crit = torch.from_numpy(np.asarray(critical[0])).cuda()

    def rule(b, h, qi, ki):
        keep = (qi - ki < window) | (ki < num_global) | (crit[ki] & (crit[qi] | (queries == "all")))
        return (ki <= qi) & keep

    s = q.shape[1]
    block_mask = create_block_mask(rule, None, None, s, s, device="cuda")
    to_t = lambda x: torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous()
    tq, tk, tv = (to_t(x).detach().requires_grad_(True) for x in (q, k, v))
    attn = torch.compile(flex_attention)
    w = torch.randn_like(tq)

    def fwd():
        return attn(tq, tk, tv, block_mask=block_mask, enable_gqa=True)

    def fwdbwd():
        return torch.autograd.grad((fwd() * w).sum(), (tq, tk, tv))

    return fwd, fwdbwd


def _time_torch(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--num-global", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache-lens", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--chunk", type=int, default=4096, help="queries of the chunked-prefill case (0: skip it)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dense", default="cudnn", help="jax.nn.dot_product_attention implementation of the peer")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--deadline-s", type=float, default=330.0, help="start no new case after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (kernels' reference backend, xla dense)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.smoke:
        a.seq, a.window, a.heads, a.kv_heads, a.head_dim = 64, 8, 2, 1, 16
        a.cache_lens, a.chunk, a.iters, a.dense, a.no_flex = [128], 16, 1, "xla", True
    start = time.perf_counter()
    dtype = jnp.bfloat16
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    rows: list[dict] = []
    record = {
        "device": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "rows": rows,
    }

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "w") as fh:
            json.dump(record, fh, indent=1)

    def late():
        if time.perf_counter() - start > a.deadline_s:
            print("deadline reached: no new case", flush=True)
            return True
        return False

    s, hq, hkv, d = a.seq, a.heads, a.kv_heads, a.head_dim
    kq, kk, kv, kd, kc = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(kq, (1, s, hq, d), dtype)
    do = jax.random.normal(kd, q.shape, dtype)
    base = {"batch": 1, "heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16",
            "window": a.window, "num_global": a.num_global, "critical_fraction": a.fraction}

    # ------------------------------------------------------------------ self-attention: the public op vs dense
    k = jax.random.normal(kk, (1, s, hkv, d), dtype)
    v = jax.random.normal(kv, (1, s, hkv, d), dtype)
    critical = _critical(kc, s, a.fraction)
    positions = jnp.arange(s, dtype=jnp.int32)[None]
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=a.dense)
    dense_f, dense_first = time_call(jax.jit(dense), (q, k, v), a.iters)
    dense_fb, _ = time_call(jax.jit(fwd_bwd(dense)), (q, k, v, do), a.iters)
    add({"op": "attention", "impl": f"{a.dense}_dense_causal", "seq_len": s, **base, "density": 1.0,
         "ms_fwd": dense_f, "ms_fwdbwd": dense_fb, "speedup_fwd_vs_cudnn": 1.0, "speedup_fwdbwd_vs_cudnn": 1.0,
         "first_call_s": dense_first})
    n_crit = int(critical.sum())
    for queries in ("critical", "all"):
        flex = None if a.no_flex else _flex(q, k, v, critical, window=a.window, num_global=a.num_global,
                                            queries=queries)
        flex_ms = (_time_torch(flex[0]), _time_torch(flex[1])) if flex else None
        if flex_ms:
            add({"op": "sra_attention", "impl": "flex", "seq_len": s, "queries": queries, **base,
                 "ms_fwd": flex_ms[0], "ms_fwdbwd": flex_ms[1], "speedup_fwd_vs_cudnn": dense_f / flex_ms[0],
                 "speedup_fwdbwd_vs_cudnn": dense_fb / flex_ms[1]})
        for name, bound in (("public_op_default", None), ("public_op_max_critical", n_crit)):
            if late():
                return 0

            def op(q, k, v, critical, bound=bound, queries=queries):
                spec = SRAMaskSpec.create(positions, critical, window=a.window, num_global=a.num_global,
                                          queries=queries, max_critical=bound)
                return attention(q, k, v, spec=spec, impl="pallas")

            ms_f, first_f = time_call(jax.jit(op), (q, k, v, critical), a.iters)
            ms_fb, first_fb = time_call(jax.jit(fwd_bwd(op)), (q, k, v, do, critical), a.iters)
            row = {"op": "sra_attention", "impl": name, "seq_len": s, "queries": queries, **base,
                   "max_critical": bound, "ms_fwd": ms_f, "ms_fwdbwd": ms_fb,
                   "speedup_fwd_vs_cudnn": dense_f / ms_f, "speedup_fwdbwd_vs_cudnn": dense_fb / ms_fb,
                   "first_call_s_fwd": first_f, "first_call_s_fwdbwd": first_fb}
            if flex_ms:
                row.update(speedup_fwd_vs_flex=flex_ms[0] / ms_f, speedup_fwdbwd_vs_flex=flex_ms[1] / ms_fb)
            add(row)

    # ------------------------------------------------- keys = cache slots: prefill (whole prompt, then a chunk)
    cases = [(cache_len, s, 0) for cache_len in a.cache_lens if cache_len >= s]
    if a.chunk:
        cases += [(cache_len, a.chunk, s - a.chunk) for cache_len in a.cache_lens if cache_len >= s][-1:]
    for cache_len, n_q, first_pos in cases:
        if late():
            return 0
        kc_ = jax.random.normal(kk, (1, cache_len, hkv, d), dtype)
        vc_ = jax.random.normal(kv, (1, cache_len, hkv, d), dtype)
        k_positions = jnp.where(jnp.arange(cache_len) < first_pos + n_q, jnp.arange(cache_len), -1)[None]
        k_critical = jnp.pad(critical, ((0, 0), (0, cache_len - s)))[:, :cache_len] & (k_positions >= 0)
        q_positions = jnp.arange(first_pos, first_pos + n_q, dtype=jnp.int32)[None]
        qc = q[:, :n_q]
        row_base = {"seq_len": n_q, "cache_len": cache_len, "first_position": first_pos, **base,
                    "queries": "critical"}
        timings = {}
        for name, impl, bound, rule in (
            ("dense_on_cache", a.dense, None, dict(window=2**30, num_global=0)),
            ("public_op_on_cache", "pallas", int(k_critical.sum()), dict(window=a.window, num_global=a.num_global)),
        ):
            impl = "xla" if a.smoke and impl == "cudnn" else impl

            def op(q, k, v, k_critical, impl=impl, bound=bound, rule=rule, q_positions=q_positions,
                   first_pos=first_pos, n_q=n_q, k_positions=k_positions):
                spec = SRAMaskSpec.create(q_positions, k_critical[:, first_pos:first_pos + n_q],
                                          k_positions=k_positions, k_critical=k_critical, max_critical=bound,
                                          queries="critical", **rule)
                return attention(q, k, v, spec=spec, impl=impl)

            ms_f, _ = time_call(jax.jit(op), (qc, kc_, vc_, k_critical), a.iters)
            ms_fb, _ = time_call(jax.jit(fwd_bwd(op)), (qc, kc_, vc_, do[:, :n_q], k_critical), a.iters)
            timings[name] = (ms_f, ms_fb)
            add({"op": "sra_attention_cache", "impl": name, **row_base, "max_critical": bound, "ms_fwd": ms_f,
                 "ms_fwdbwd": ms_fb, "speedup_fwd_vs_dense": timings["dense_on_cache"][0] / ms_f,
                 "speedup_fwdbwd_vs_dense": timings["dense_on_cache"][1] / ms_fb})
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
