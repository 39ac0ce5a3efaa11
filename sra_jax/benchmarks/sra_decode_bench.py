"""One decode step of a small SRA Llama at a long cache, attention_impl="pallas": the sparse decode kernel (window +
globals + critical slots, `decode_kernel="auto"`) against the block-sparse path (`decode_kernel="off"`: the
prefill kernels with one query row over the whole cache), same weights, same cache, same process.

The cache is filled synthetically (random K/V of the model's dtype, positions 0..filled-1 from slot 0, ~critical
fraction of the prompt slots flagged critical with the slot lists the cache keeps for them (`KVCache.with_critical`),
a router threshold per row), so no 32k prefill is run. A step is the whole jitted model call for one new token per
row (routers, projections, MLPs, LM head, cache write, list append), the cache donated so the write is in place;
`steps` calls run back to back and the mean is reported. The kernel alone on one layer of the stacked cache
(`layer=`) shows what the cache's slot list saves: the list as a decode step used to build it (jnp.nonzero of the
layer's flags inside the jit, capacity max_len, -1 padding, no counts) against the cache's list with
`critical_counts` (the kernel walks only the live entries).

    python -m sra_jax.benchmarks.sra_decode_bench --out $OUT/sra-decode.json
    python -m sra_jax.benchmarks.sra_decode_bench --tiny --lengths 128 --steps 2 --out /tmp/x.json  # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.nn import KVCache, LeftPaddedKVCache, Llama


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
        threshold=jax.random.normal(keys[3], shape[:2]),
        index=jnp.int32(filled),
    ).with_critical((jax.random.uniform(keys[2], shape[:3]) < fraction) & (slots < filled))


def left_padded(cache: KVCache, config: LlamaConfig, filled: int) -> LeftPaddedKVCache:
    """The synthetic cache as a `LeftPaddedKVCache` (rows of `filled` tokens from slot 0: the same positions)."""
    built = LeftPaddedKVCache.create(
        config, jnp.full((cache.batch,), filled, jnp.int32), prompt_len=filled, max_len=cache.max_len,
        dtype=cache.k.dtype,
    )
    return built.replace(
        k=cache.k, v=cache.v, critical=cache.critical, threshold=cache.threshold, index=cache.index,
        critical_slots=cache.critical_slots, num_critical=cache.num_critical, positions=cache.positions,
    )


def time_steps(model: Llama, cache: KVCache, steps: int, warmup: int = 3):
    """(mean ms per step, first step's logits, compile s): the jitted step on a private copy of the cache."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token, cache):
        model = nnx.merge(graphdef, state)
        logits, aux = model(token, cache=cache)  # at the cache's next position
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
    """(ms with the list rebuilt from the flags, ms with the cache's list + counts) of the decode attention alone on
    layer 1 of the stacked cache (read in place through `layer=`)."""
    b, n = cache.batch, cache.max_len
    q = jax.random.normal(jax.random.key(9), (b, 1, heads, cache.k.shape[-1]), cache.k.dtype)
    lengths = jnp.full((b,), cache.index + 1, jnp.int32)
    kw = dict(window=sra.window, num_global=sra.num_global, critical_sorted=True, layer=1)

    def rebuilt(q, k, v, critical, slots, counts):
        crit = jax.vmap(lambda row: jnp.nonzero(row, size=n, fill_value=-1)[0].astype(jnp.int32))(critical[1])
        return pallas_kernels.sparse_decode_attention(q, k, v, lengths, critical_indices=crit, **kw)

    def listed(q, k, v, critical, slots, counts):
        return pallas_kernels.sparse_decode_attention(
            q, k, v, lengths, critical_indices=slots[1], critical_counts=counts[1], **kw
        )

    args = (q, cache.k, cache.v, cache.critical, cache.critical_slots, cache.num_critical)
    out = []
    for fn in (jax.jit(rebuilt), jax.jit(listed)):
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
        for mode in ("off", "auto", "auto-unchecked"):
            model.set_decode_kernel(mode.removesuffix("-unchecked"))
            # -unchecked: a LeftPaddedKVCache (as generate's are): no per-layer layout check and lax.cond
            timed = left_padded(cache, config, filled) if mode.endswith("-unchecked") else cache
            ms, logits, compile_s = time_steps(model, timed, args.steps)
            result[mode] = (ms, logits, compile_s)
            print(f"T={length} decode_kernel={mode}: {ms:.3f} ms/step (compile {compile_s:.1f}s)", flush=True)
        diff = float(jnp.abs(result["off"][1] - result["auto"][1]).max())
        diff_unchecked = float(jnp.abs(result["auto-unchecked"][1] - result["auto"][1]).max())
        scale = float(jnp.abs(result["off"][1]).max())
        rebuilt_ms, listed_ms = time_kernel(cache, sra, config.num_attention_heads)
        print(f"  one layer's decode attention: list rebuilt from the flags {rebuilt_ms:.4f} ms, cache list + "
              f"counts {listed_ms:.4f} ms; max|dlogits| {diff:.3g}")
        rows.append(dict(
            cache_len=length, filled=filled, batch=args.batch, layers=config.num_hidden_layers,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            hidden=config.hidden_size, dtype=str(jnp.dtype(dtype)), window=sra.window, num_global=sra.num_global,
            critical_fraction=sra.critical_fraction, queries=sra.queries,
            ms_step_before=result["off"][0], ms_step_after=result["auto"][0],
            ms_step_after_layout_unchecked=result["auto-unchecked"][0],
            speedup=result["off"][0] / result["auto"][0],
            compile_s_before=result["off"][2], compile_s_after=result["auto"][2],
            critical_listed=int(cache.num_critical[1].max()),
            ms_kernel_one_layer_list_rebuilt=rebuilt_ms, ms_kernel_one_layer_cache_list=listed_ms,
            max_abs_logit_diff=diff, max_abs_logit_diff_unchecked=diff_unchecked, max_abs_logit=scale, steps=args.steps,
        ))
    report = dict(
        device=str(jax.devices()[0].device_kind),
        date=datetime.date.today().isoformat(),
        versions=dict(jax=jax.__version__, python=".".join(map(str, __import__("sys").version_info[:3]))),
        what="one decode step (1 new token/row) of an SRA Llama, attention_impl='pallas': before = block-sparse "
        "prefill kernel over the whole cache (decode_kernel='off'), after = sparse decode kernel ('auto') reading "
        "the cache's critical slot list with critical_counts; ms_kernel_one_layer_*: the kernel alone on one layer, "
        "list rebuilt by jnp.nonzero each call (no counts, the earlier path) vs the cache's list + counts; "
        "ms_step_after_layout_unchecked: 'auto' on the same cache built as a LeftPaddedKVCache (as generate's "
        "caches are): no per-layer layout check / lax.cond (what they cost)",
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
