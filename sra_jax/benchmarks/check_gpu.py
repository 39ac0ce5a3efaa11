"""GPU smoke test: versions, kernel vs reference (forward and gradients), one quick timing. Run on the GPU machine."""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

import pallas_kernels as pk


def rel(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(b, s, hq, hkv, d, dtype, block, **rule):
    ks = jax.random.split(jax.random.PRNGKey(s + hq + d), 5)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    crit = jax.random.uniform(ks[3], (b, s)) < 0.1
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    kw = {"window": rule.get("window"), "num_global": rule.get("num_global", 0)}
    if rule.get("critical"):
        kw.update(k_critical=crit, q_critical=crit)
    lay = pk.sra_layout(pos, block_q=block, block_k=block, **kw)
    w = jax.random.normal(ks[4], (b, s, hq, d), jnp.float32)
    loss = lambda be: jax.jit(
        lambda q, k, v: (
            pk.block_sparse_attention(q, k, v, lay, backend=be, **kw).astype(jnp.float32) * w
        ).sum()
    )
    o_ref = pk.block_sparse_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lay, backend="reference", **kw
    )
    o = jax.jit(lambda q, k, v: pk.block_sparse_attention(q, k, v, lay, backend="triton", **kw))(q, k, v)
    g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    )
    g = jax.grad(loss("triton"), argnums=(0, 1, 2))(q, k, v)
    errs = [rel(o, o_ref)] + [rel(a, b_) for a, b_ in zip(g, g_ref)]
    return {
        "shape": [b, s, hq, hkv, d],
        "dtype": str(jnp.dtype(dtype)),
        "block": block,
        **rule,
        "rel_err_out_dq_dk_dv": errs,
        "finite": bool(jnp.isfinite(o.astype(jnp.float32)).all()),
    }


def main():
    import torch

    print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, flush=True)
    rows = []
    for args, rule in [
        ((1, 512, 4, 4, 64, jnp.float32, 64), {}),
        ((1, 1000, 8, 2, 128, jnp.bfloat16, 128), {"window": 100, "num_global": 4, "critical": True}),
        ((2, 384, 8, 1, 64, jnp.float16, 64), {"window": 64, "critical": True}),
        ((1, 1024, 16, 8, 128, jnp.bfloat16, 128), {}),
    ]:
        t = time.time()
        try:
            r = check(*args, **rule)
        except Exception as e:  # noqa: BLE001 - report and continue: the smoke test lists every failing configuration
            r = {"shape": list(args[:5]), "error": repr(e)[:2000]}
        r["seconds"] = time.time() - t
        print(json.dumps(r), flush=True)
        rows.append(r)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
