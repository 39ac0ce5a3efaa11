"""One decode step of a small SRA Llama at a long cache, attention_impl="pallas": the sparse decode kernel (window +
globals + critical slots, `decode_kernel="auto"`) against the earlier path (`decode_kernel="off"`: the block-sparse
prefill kernels with one query row over the whole cache), same weights, same cache, same process.

The cache is filled synthetically (random K/V of the model's dtype, positions 0..filled-1 from slot 0, ~critical
fraction of the prompt slots flagged critical, a router threshold per row), so no 32k prefill is run. A step is the
whole jitted model call for one new token per row (routers, projections, MLPs, LM head, cache write), the cache
donated so the write is in place; `steps` calls run back to back and the mean is reported. The kernel alone on one
layer (a standalone [b, T, kv, d] array, and the same sliced out of the [layers, b, T, kv, d] cache inside the jit)
shows what the per-layer cache slice costs.

    PYTHONPATH=. python3 -m benchmarks.sra_decode_bench --out $OUT/sra-decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import KVCache, Llama


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:  # CPU smoke test of this script
        return LlamaConfig.tiny(num_hidden_layers=2)
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=65536,
    )


def synthetic_cache(config: LlamaConfig, batch: int, max_len: int, filled: int, fraction: float, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    slots = jnp.arange(max_len)
    cache = KVCache.init(config, batch, max_len, dtype)
    return cache.replace(
        k=jax.random.normal(keys[0], shape, dtype),
        v=jax.random.normal(keys[1], shape, dtype),
        positions=jnp.broadcast_to(jnp.where(slots < filled, slots, -1), (batch, max_len)).astype(jnp.int32),
        critical=(jax.random.uniform(keys[2], shape[:3]) < fraction) & (slots < filled),
        threshold=jax.random.normal(keys[3], shape[:2]),
        index=jnp.int32(filled),
    )


def time_steps(model: Llama, cache: KVCache, steps: int, warmup: int = 3):
    """(mean ms per step, first step's logits, compile s): the jitted step on a private copy of the cache."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token, cache):
        model = nnx.merge(graphdef, state)
        position = jnp.broadcast_to(cache.index, token.shape).astype(jnp.int32)
        logits, aux = model(token, position, cache)
        return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), logits, aux.cache

    step = jax.jit(step, donate_argnums=(2,))
    cache = jax.tree.map(jnp.copy, cache)
    token = jnp.ones((cache.batch, 1), jnp.int32)
    start = time.perf_counter()
    token, first_logits, cache = step(state, token, cache)
    jax.block_until_ready(cache)
    compile_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        token, _, cache = step(state, token, cache)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    for _ in range(steps):
        token, _, cache = step(state, token, cache)
    jax.block_until_ready(cache)
    return (time.perf_counter() - start) / steps * 1e3, first_logits, compile_s


def time_kernel(cache: KVCache, sra: SRAConfig, heads: int, reps: int = 20):
    """(ms standalone layer, ms sliced from the full cache inside the jit, ms reading the layer in place through
    `layer=`) of the decode attention alone."""
    b, n = cache.batch, cache.max_len
    q = jax.random.normal(jax.random.key(9), (b, 1, heads, cache.k.shape[-1]), cache.k.dtype)
    lengths = jnp.full((b,), cache.index + 1, jnp.int32)
    crit = jax.vmap(lambda row: jnp.nonzero(row, size=n, fill_value=-1)[0].astype(jnp.int32))(cache.critical[0])
    kw = dict(window=sra.window, num_global=sra.num_global, critical_indices=crit, critical_sorted=True)
    alone = jax.jit(lambda q, k, v: pallas_kernels.sparse_decode_attention(q, k, v, lengths, **kw))
    sliced = jax.jit(lambda q, k, v: pallas_kernels.sparse_decode_attention(q, k[1], v[1], lengths, **kw))
    in_place = jax.jit(lambda q, k, v: pallas_kernels.sparse_decode_attention(q, k, v, lengths, layer=1, **kw))
    k1, v1 = jnp.copy(cache.k[1]), jnp.copy(cache.v[1])
    out = []
    for fn, args in ((alone, (q, k1, v1)), (sliced, (q, cache.k, cache.v)), (in_place, (q, cache.k, cache.v))):
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(reps):
            result = fn(*args)
        jax.block_until_ready(result)
        out.append((time.perf_counter() - start) / reps * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768", help="comma-separated cache lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (script check)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = model_config(args.tiny)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    sra = SRAConfig(critical_fraction=0.1, window=8 if args.tiny else 256, num_global=4, queries="all",
                    selection="topk", router_hidden=64)
    model = Llama(config, sra, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, attention_impl="pallas")
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        filled = length - args.steps - 8
        cache = synthetic_cache(config, args.batch, length, filled, sra.critical_fraction, dtype)
        result = {}
        for mode in ("off", "auto"):
            model.set_decode_kernel(mode)
            ms, logits, compile_s = time_steps(model, cache, args.steps)
            result[mode] = (ms, logits, compile_s)
            print(f"T={length} decode_kernel={mode}: {ms:.3f} ms/step (compile {compile_s:.1f}s)", flush=True)
        diff = float(jnp.abs(result["off"][1] - result["auto"][1]).max())
        scale = float(jnp.abs(result["off"][1]).max())
        alone_ms, sliced_ms, in_place_ms = time_kernel(cache, sra, config.num_attention_heads)
        print(f"  kernel alone {alone_ms:.4f} ms, sliced from the cache {sliced_ms:.4f} ms, layer= in place "
              f"{in_place_ms:.4f} ms; max|dlogits| {diff:.3g}")
        rows.append(dict(
            cache_len=length, filled=filled, batch=args.batch, layers=config.num_hidden_layers,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            hidden=config.hidden_size, dtype=str(jnp.dtype(dtype)), window=sra.window, num_global=sra.num_global,
            critical_fraction=sra.critical_fraction, queries=sra.queries,
            ms_step_before=result["off"][0], ms_step_after=result["auto"][0],
            speedup=result["off"][0] / result["auto"][0],
            compile_s_before=result["off"][2], compile_s_after=result["auto"][2],
            ms_kernel_one_layer_standalone=alone_ms, ms_kernel_one_layer_sliced_from_cache=sliced_ms,
            ms_kernel_one_layer_in_place=in_place_ms,
            max_abs_logit_diff=diff, max_abs_logit=scale, steps=args.steps,
        ))
    report = dict(
        device=str(jax.devices()[0].device_kind),
        date=datetime.date.today().isoformat(),
        versions=dict(jax=jax.__version__, python=".".join(map(str, __import__("sys").version_info[:3]))),
        what="one decode step (1 new token/row) of an SRA Llama, attention_impl='pallas': before = block-sparse "
        "prefill kernel over the whole cache (decode_kernel='off'), after = sparse decode kernel ('auto')",
        rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
