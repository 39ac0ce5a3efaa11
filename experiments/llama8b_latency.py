"""Llama-3-8B-shaped latency: prefill and per-token decode, sra_jax dense vs SRA vs transformers (torch) dense.

One process, one GPU, the same random weights in both frameworks: a transformers `LlamaForCausalLM` is built with
random bf16 weights, copied into `sra_jax.nn.Llama` through the converter's name table (`sra_jax.convert.mapping`)
and DLPack, and the dense logits of both are compared at a short length (the sanity row). Then, for each context
length, batch 1:

- transformers dense (SDPA): prefill `model(ids, logits_to_keep=1)`, decode `model(token, past_key_values=...)` in
  an eager Python loop (what `generate` does without torch.compile);
- sra_jax dense (`attention_impl="cudnn"` on GPU) and SRA (`attention_impl="pallas"`, critical fraction 0.1 and the
  SRAConfig defaults for window / globals): prefill is one jitted `model(tokens, cache=LeftPaddedKVCache)` call, decode a
  jitted `lax.fori_loop` of greedy single-token `model(token, cache=cache)` calls with the cache donated.

Medians over repeats after a warm-up (which also compiles), synchronised with `block_until_ready` /
`torch.cuda.synchronize`. Results: a JSON record (device, date, versions, shapes, rows) and a markdown table.

    python experiments/llama8b_latency.py                      # GPU: 4k, 32k, 128k (+ batch 8, forced sets)
    python experiments/llama8b_latency.py --tiny --out-dir /tmp/x   # tiny config on CPU (the test)

Also: decode at batch 8 (`--decode-batches`, at `--batch-lengths`, default 32k and 128k: the batch-1 prompt's cache
repeated; skipped with the GiB it needs when it does not fit). SRA prefill rows: the random router's own picks
(scattered) and, through the same compiled program, clustered picks (router scores zeroed: top-k takes the first k
tokens); optionally forced critical sets, scattered and in runs at random offsets (`--forced-lengths`, one more
compile per length).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sra_jax.config import LlamaConfig, RopeScaling, SRAConfig  # noqa: E402
from sra_jax.convert.mapping import param_specs  # noqa: E402
from sra_jax.convert.params import abstract_model, fresh_router_values, merge  # noqa: E402
from sra_jax.nn import LeftPaddedKVCache  # noqa: E402
from sra_jax.nn.cache import generation_capacity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": (jnp.bfloat16, "bfloat16"), "float32": (jnp.float32, "float32")}


def llama8b_config() -> LlamaConfig:
    """Meta-Llama-3.1-8B's shape (rope llama3, factor 8), with room for 32k + decode positions."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        max_position_embeddings=131072,
    )


def tiny_config() -> LlamaConfig:
    return LlamaConfig.tiny(
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
        ),
    )


def versions() -> dict[str, str]:
    import flax
    import jaxlib
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def timed(fn, *, warmup: int, reps: int) -> tuple[float, list[float], float]:
    """(median ms, every rep in ms, seconds of the first warm-up call, which includes compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times, first


# --------------------------------------------------------------------------------------------------- torch side
def build_torch_model(config: LlamaConfig, dtype: str, device: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def torch_to_jax_values(torch_model, config: LlamaConfig, jax_dtype) -> dict:
    """Our parameter tree from the torch state dict, via the converter's table (linear weights transposed)."""
    state = torch_model.state_dict()
    values = {}
    for spec in param_specs(config):
        tensor = state[spec.hf_name].detach()
        array = jnp.array(jax.dlpack.from_dlpack(tensor.contiguous()), dtype=jax_dtype, copy=True)
        values[spec.path] = array.T if spec.transpose else array
        if values[spec.path].shape != spec.shape:
            raise ValueError(f"{spec.hf_name}: converted shape {values[spec.path].shape}, expected {spec.shape}")
    return values


def torch_sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_rows(model, config, lengths, *, device, decode_steps, reps, seed, rows: list[dict], save,
               batches=lambda n: ()) -> None:
    """Prefill and batch-1 decode at every length; decode at each batch in `batches(length)` too."""
    rng = np.random.default_rng(seed)
    for length in lengths:
        ids = rng.integers(0, config.vocab_size, (1, length))
        base = dict(impl="transformers dense (sdpa, eager)", framework="torch", context=length, batch=1)
        try:
            _torch_length(model, ids, base, device=device, decode_steps=decode_steps, reps=reps, rows=rows,
                          batches=batches(length))
        except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
            rows.append({**base, "phase": "prefill+decode", "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
        gc.collect()
        save()


def _torch_length(model, ids, base, *, device, decode_steps, reps, rows, batches=()) -> None:
    import torch

    ids = torch.as_tensor(ids, device=device)
    length = ids.shape[1]

    @torch.inference_mode()
    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch_sync(device)
        return out

    ms, all_ms, first = timed(prefill, warmup=1, reps=reps)
    rows.append({**base, "phase": "prefill", "ms": ms, "ms_reps": all_ms, "warmup_s": first})

    with torch.inference_mode():
        out = prefill()
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def decode():
            nonlocal cache, token
            for _ in range(decode_steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch_sync(device)

        ms, all_ms, first = timed(decode, warmup=1, reps=reps)
        rows.append(
            {**base, "phase": "decode", "ms_per_token": ms / decode_steps, "steps": decode_steps,
             "ms_reps": all_ms, "warmup_s": first}
        )
        print(f"  torch {length}: prefill {rows[-2]['ms']:.1f} ms, decode {rows[-1]['ms_per_token']:.2f} ms/token",
              flush=True)
        one_row_bytes = sum(t.numel() * t.element_size() for t in _torch_cache_tensors(cache))
        for batch in batches:
            need = (batch - 1) * one_row_bytes
            free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else None
            if free is not None and need > 0.85 * free:
                rows.append({**base, "batch": batch, "phase": "decode",
                             "error": f"skipped: the batch-{batch} cache needs {need / 2**30:.1f} GiB more, "
                                      f"{free / 2**30:.1f} GiB free"})
                continue
            cache.batch_repeat_interleave(batch)  # the batch-1 prompt's cache, `batch` times
            token = token.repeat_interleave(batch, dim=0)
            ms, all_ms, first = timed(decode, warmup=1, reps=reps)
            rows.append({**base, "batch": batch, "phase": "decode", "ms_per_token": ms / decode_steps,
                         "steps": decode_steps, "ms_reps": all_ms, "warmup_s": first})
            print(f"  torch {length} batch {batch}: decode {ms / decode_steps:.2f} ms/token", flush=True)
            cache.batch_select_indices(torch.arange(1, device=token.device))
            token = token[:1]
    del out, cache, token, ids


def _torch_cache_tensors(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]


# ----------------------------------------------------------------------------------------------------- jax side
def build_jax_models(config, values, sra: SRAConfig, *, dtype, dense_impl: str, sra_impl: str, seed: int):
    """(dense model, SRA model) sharing the converted weights; the SRA model adds freshly initialised routers."""
    graph, flat = abstract_model(config, None, dtype=dtype, param_dtype=dtype, attention_impl=dense_impl)
    dense = merge(graph, flat, values)
    graph, flat = abstract_model(config, sra, dtype=dtype, param_dtype=dtype, attention_impl=sra_impl)
    routers = fresh_router_values(config, sra, seed=seed, param_dtype=dtype)
    return dense, merge(graph, flat, {**values, **routers})


def jax_functions(model, max_len: int, decode_steps: int):
    """Jitted (prefill(state, tokens, critical=None) -> (token, cache, aux stats), decode(state, token, cache) ->
    (token, cache)). `critical` [layers, b, s] forces the critical sets (the router still scores)."""
    graph, state = nnx.split(model)
    config, dtype = model.config, model.dtype

    @jax.jit
    def prefill(state, tokens, critical=None):
        m = nnx.merge(graph, state)
        # Positions 0.. from slot 0: the left-padded layout (no padding), built as generate builds its cache.
        # As generate builds it: the critical capacity bounds the prefill's critical keys (it gathers them).
        capacity = generation_capacity(m.sra, tokens.shape[1], max_len)
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        cache = LeftPaddedKVCache.create(config, lengths, prompt_len=tokens.shape[1], max_len=max_len, dtype=dtype,
                                         critical_capacity=capacity)
        logits, aux = m(tokens, cache=cache, critical=critical, logits_to_keep=1)  # never [b, s, vocab]
        stats = dict(critical=aux.critical, selected_fraction=aux.selected_fraction.mean(),
                     mask_density=aux.visible_pairs.sum() / aux.causal_pairs.sum())
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), aux.cache, stats

    @partial(jax.jit, donate_argnums=(2,))
    def decode(state, token, cache):
        m = nnx.merge(graph, state)

        def step(_, carry):
            token, cache = carry
            logits, aux = m(token[:, None], cache=cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), aux.cache

        return jax.lax.fori_loop(0, decode_steps, step, (token, cache))

    return state, prefill, decode


def block_density(critical, sra: SRAConfig, length: int, block: int = 128) -> float:
    """Fraction of causal (128 x 128) blocks the Pallas prefill kernel visits, from the critical sets it used."""
    import pallas_kernels

    positions = jnp.arange(length, dtype=jnp.int32)[None]
    block = min(block, length)
    nq = -(-length // block)
    causal_blocks = nq * (nq + 1) / 2
    visited = []
    for layer_critical in critical:
        layout = pallas_kernels.sra_layout(
            positions, positions, block_q=block, block_k=block, causal=True, window=sra.window,
            num_global=sra.num_global, k_critical=layer_critical,
            q_critical=layer_critical if sra.queries == "critical" else None,
        )
        visited.append(float(layout.kv_counts.sum()))
    return float(np.mean(visited) / causal_blocks)


# The batch axis of each KVCache field (index has none): tiling a batch-1 cache needs every field named here.
CACHE_BATCH_AXIS = {"k": 1, "v": 1, "critical": 1, "threshold": 1, "critical_slots": 1, "num_critical": 1,
                    "positions": 0, "kv_start": 0, "index": None}


def tile_cache(cache, batch: int):
    """The batch-1 `cache` repeated `batch` times along each field's batch axis (every row the same prompt)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cache) if f.metadata.get("pytree_node", True)}
    unknown = fields - set(CACHE_BATCH_AXIS)
    if unknown:
        raise ValueError(f"tile_cache does not know the batch axis of cache fields {sorted(unknown)}")
    return cache.replace(**{name: getattr(cache, name) if CACHE_BATCH_AXIS[name] is None
                            else jnp.repeat(getattr(cache, name), batch, axis=CACHE_BATCH_AXIS[name])
                            for name in fields})


def forced_critical(pattern: str, layers: int, length: int, count: int, *, run: int, seed: int) -> jax.Array:
    """[layers, 1, length] critical flags, the same `count` tokens in every layer: "scattered" draws them uniformly
    (what a random router gives, the worst case for a block layout), "clustered" takes runs of `run` consecutive
    tokens at random run-aligned offsets (what a router that picks passages gives)."""
    rng = np.random.default_rng(seed)
    flags = np.zeros(length, bool)
    if pattern == "scattered":
        flags[rng.choice(length, count, replace=False)] = True
    elif pattern == "clustered":
        run = min(run, length)
        starts = np.sort(rng.choice(length // run, -(-count // run), replace=False)) * run
        picked = (starts[:, None] + np.arange(run)).ravel()[:count]
        flags[picked] = True
    else:
        raise ValueError(f"pattern={pattern!r} must be 'scattered' or 'clustered'")
    return jnp.broadcast_to(jnp.asarray(flags), (layers, 1, length))


def zero_router_scores(state):
    """`state` with every router's score weights zeroed: all scores tie, so top-k takes the first k tokens of the
    prompt (one contiguous run, the most clustered picks) through the same compiled prefill as the router's own."""
    def zero(path, x):
        keys = [getattr(k, "key", None) for k in path]
        return jnp.zeros_like(x) if "router" in keys and "score" in keys else x

    return jax.tree_util.tree_map_with_path(zero, state)


def device_free_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def jax_rows(models, config, lengths, sra, *, decode_steps, reps, seed, rows: list[dict], save, batches=lambda n: (),
             forced=lambda n: False, cluster_run: int = 512) -> None:
    """Prefill and batch-1 decode at every length; decode at each batch in `batches(length)` (the batch-1 prompt's
    cache repeated) and, where `forced(length)`, the SRA prefill with forced scattered / clustered critical sets."""
    rng = np.random.default_rng(seed)
    for length in lengths:
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, length)), jnp.int32)
        for name, model in models.items():
            impl = model.layers[0].attn.attention_impl
            base = dict(impl=f"sra_jax {name} ({impl})", framework="jax", context=length, batch=1)
            try:
                _jax_length(model, name, tokens, sra, base, decode_steps=decode_steps, reps=reps, rows=rows,
                            batches=batches(length), forced=forced(length) and name == "SRA",
                            cluster_run=cluster_run, seed=seed)
            except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
                rows.append({**base, "phase": "prefill+decode", "error": f"{type(error).__name__}: {error}"[:2000]})
                traceback.print_exc()
            gc.collect()
            save()


def _sra_stats(stats, sra, length) -> dict:
    return dict(selected_fraction=float(stats["selected_fraction"]), mask_density=float(stats["mask_density"]),
                block_density=block_density(stats["critical"], sra, length))


def _jax_length(model, name, tokens, sra, base, *, decode_steps, reps, rows, batches=(), forced=False,
                cluster_run=512, seed=0) -> None:
    length = tokens.shape[1]
    # room for the batch-1 decode rounds (warm-up + reps), then as many again for the larger batches
    max_len = length + decode_steps * (2 * reps + 4)
    state, prefill, decode = jax_functions(model, max_len, decode_steps)
    result = {}

    def run_prefill(*critical):
        result["out"] = jax.block_until_ready(prefill(state, tokens, *critical))

    ms, all_ms, first = timed(run_prefill, warmup=1, reps=reps)
    token, cache, stats = result.pop("out")
    row = {**base, "phase": "prefill", "ms": ms, "ms_reps": all_ms, "warmup_s": first}
    if name == "SRA":
        row.update(_sra_stats(stats, sra, length), critical="the random router's top-k (scattered)")
    rows.append(row)
    del stats
    if name == "SRA":  # clustered picks through the same compiled program: every router score ties
        tied = zero_router_scores(state)
        ms, all_ms, first = timed(lambda: result.update(out=jax.block_until_ready(prefill(tied, tokens))),
                                  warmup=1, reps=reps)
        stats = result.pop("out")[2]
        rows.append({**base, "impl": f"sra_jax SRA clustered ({base['impl'].split('(')[-1]}", "phase": "prefill",
                     "ms": ms, "ms_reps": all_ms, "warmup_s": first,
                     "critical": "router scores zeroed: top-k takes the first k tokens (one run)",
                     **_sra_stats(stats, sra, length)})
        print(f"  jax SRA clustered (tied scores) {length}: prefill {ms:.1f} ms", flush=True)
        del tied, stats
    for pattern in ("scattered", "clustered") if forced else ():
        critical = forced_critical(pattern, model.config.num_hidden_layers, length, sra.num_critical(length),
                                   run=cluster_run, seed=seed)
        ms, all_ms, first = timed(lambda critical=critical: run_prefill(critical), warmup=1, reps=reps)
        stats = result.pop("out")[2]
        rows.append({**base, "impl": f"sra_jax SRA forced {pattern} ({base['impl'].split('(')[-1]}",
                     "phase": "prefill", "ms": ms, "ms_reps": all_ms, "warmup_s": first,
                     "critical": f"{pattern}, the same {sra.num_critical(length)} tokens in every layer"
                                 + (f" (runs of {cluster_run})" if pattern == "clustered" else ""),
                     **_sra_stats(stats, sra, length)})
        print(f"  jax SRA forced {pattern} {length}: prefill {ms:.1f} ms", flush=True)
        del stats
    carry = {"token": token, "cache": cache}
    del token, cache

    def run_decode():
        carry["token"], carry["cache"] = jax.block_until_ready(decode(state, carry["token"], carry["cache"]))

    ms, all_ms, first = timed(run_decode, warmup=1, reps=reps)
    rows.append(
        {**base, "phase": "decode", "ms_per_token": ms / decode_steps, "steps": decode_steps,
         "cache_slots": max_len, "ms_reps": all_ms, "warmup_s": first}
    )
    pre = next(r for r in reversed(rows) if r.get("impl") == base["impl"] and r["phase"] == "prefill")
    print(f"  jax {name} {length}: prefill {pre['ms']:.1f} ms, decode {rows[-1]['ms_per_token']:.2f} ms/token "
          f"(first calls {pre['warmup_s']:.0f} s / {rows[-1]['warmup_s']:.0f} s)", flush=True)
    one_row = sum(x.nbytes for x in jax.tree.leaves(carry["cache"]))
    for batch in batches:
        free = device_free_bytes()
        if free is not None and batch * one_row > 0.85 * free:
            rows.append({**base, "batch": batch, "phase": "decode", "cache_slots": max_len,
                         "error": f"skipped: the batch-{batch} cache needs {batch * one_row / 2**30:.1f} GiB, "
                                  f"{free / 2**30:.1f} GiB free"})
            continue
        wide = {"token": jnp.repeat(carry["token"], batch), "cache": tile_cache(carry["cache"], batch)}

        def run_wide(wide=wide):
            wide["token"], wide["cache"] = jax.block_until_ready(decode(state, wide["token"], wide["cache"]))

        ms, all_ms, first = timed(run_wide, warmup=1, reps=reps)
        rows.append({**base, "batch": batch, "phase": "decode", "ms_per_token": ms / decode_steps,
                     "steps": decode_steps, "cache_slots": max_len, "ms_reps": all_ms, "warmup_s": first,
                     "cache": "the batch-1 prompt's cache repeated"})
        print(f"  jax {name} {length} batch {batch}: decode {ms / decode_steps:.2f} ms/token "
              f"(first call {first:.0f} s)", flush=True)
        del wide


def weight_read_floor_row(model, *, copy_bytes: int) -> dict:
    """The decode floor: every parameter read once per token at the copy bandwidth measured in this process
    (`decode_bench.hbm_copy_gbps`, read + write bytes of a bf16 `x + 1`)."""
    from sra_jax.benchmarks.decode_bench import hbm_copy_gbps

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    gbps = hbm_copy_gbps(copy_bytes)
    return {"phase": "weight-read floor (parameter bytes / copy bandwidth)", "weight_bytes": weight_bytes,
            "copy_bytes": copy_bytes, "copy_gbps": gbps, "floor_ms_per_token": weight_bytes / gbps / 1e6}


def sanity_row(torch_model, dense, config, *, length: int, device: str, seed: int) -> dict:
    """Dense logits of both frameworks on the same random tokens (no cache)."""
    import torch

    tokens = np.random.default_rng(seed + 1).integers(0, config.vocab_size, (1, length))
    with torch.inference_mode():
        theirs = torch_model(input_ids=torch.as_tensor(tokens, device=device)).logits.float().cpu().numpy()
    ours, _ = nnx.jit(lambda m, t: m(t))(dense, jnp.asarray(tokens, jnp.int32))
    ours = np.asarray(ours)
    diff = np.abs(ours - theirs)
    return {
        "phase": "sanity: dense logits, transformers vs sra_jax (same weights, no cache)",
        "context": length,
        "max_abs_diff": float(diff.max()),
        "rel_err": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "logit_std": float(theirs.std()),
    }


# ------------------------------------------------------------------------------------------------------- report
def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def times(ratio):
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def markdown(record: dict) -> str:
    rows = [r for r in record["rows"] if "impl" in r and r.get("batch", 1) == 1]
    by = {(r["impl"], r["context"], r["phase"]): r for r in rows}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lengths = sorted({r["context"] for r in rows})
    torch_impl = next((i for i in impls if i.startswith("transformers")), None)
    lines = [
        f"# Llama-3-8B-shaped latency ({record['preset']})",
        "",
        f"device `{record['device']}`, date {record['date']}, {record['dtype']} weights and compute, batch 1, "
        f"versions {record['versions']}. SRA: {record['sra']}.",
        "",
        "| context | implementation | prefill ms | decode ms / token | prefill vs transformers | decode vs transformers |"
        " SRA: selected / pair density / block density |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in lengths:
        for impl in impls:
            pre, dec = by.get((impl, length, "prefill")), by.get((impl, length, "decode"))
            if pre is None and dec is None:
                continue
            ref_pre = by.get((torch_impl, length, "prefill"))
            ref_dec = by.get((torch_impl, length, "decode"))
            ratio_pre = ref_pre["ms"] / pre["ms"] if pre and ref_pre and "ms" in pre else None
            ratio_dec = (
                ref_dec["ms_per_token"] / dec["ms_per_token"] if dec and ref_dec and "ms_per_token" in dec else None
            )
            sra = ""
            if pre and "selected_fraction" in pre:
                sra = f"{pre['selected_fraction']:.3f} / {pre['mask_density']:.3f} / {pre['block_density']:.3f}"
            lines.append(
                f"| {length} | {impl} | {fmt(pre and pre.get('ms'))} | {fmt(dec and dec.get('ms_per_token'), '.2f')} "
                f"| {times(ratio_pre)} | {times(ratio_dec)} | {sra} |"
            )
    wide = [r for r in record["rows"] if r.get("batch", 1) > 1 and "ms_per_token" in r]
    if wide:
        lines += ["", "Decode with a larger batch (the batch-1 prompt's cache repeated), ms per step (one token per row):",
                  "", "| context | batch | implementation | decode ms / step |", "|---|---|---|---|"]
        lines += [f"| {r['context']} | {r['batch']} | {r['impl']} | {r['ms_per_token']:.2f} |" for r in wide]
    for r in record["rows"]:
        if r["phase"].startswith("weight-read floor"):
            decodes = [x for x in rows if x["phase"] == "decode" and "ms_per_token" in x]
            lines += ["", f"Weight-read floor: {r['weight_bytes'] / 1e9:.2f} GB of parameters at {r['copy_gbps']:.0f} "
                      f"GB/s (copy of {r['copy_bytes'] / 2**30:.2f} GiB, same process) = "
                      f"{r['floor_ms_per_token']:.2f} ms/token; batch-1 decode / floor: "
                      + ", ".join(f"{x['impl']} {x['context']}: {x['ms_per_token'] / r['floor_ms_per_token']:.2f}x"
                                  for x in decodes if x["impl"].startswith("sra_jax"))]
        if r["phase"].startswith("sanity"):
            lines += ["", f"Sanity ({r['context']} tokens, same weights): dense logits rel. error {r['rel_err']:.2e}, "
                      f"max abs diff {r['max_abs_diff']:.3g} (logit std {r['logit_std']:.3g}), argmax agreement "
                      f"{r['argmax_agreement']:.3f}."]
    errors = [r for r in record["rows"] if "error" in r]
    for r in errors:
        lines.append(f"\nFailed: {r['impl']} {r['context']} batch {r.get('batch', 1)} {r['phase']}: {r['error']}")
    lines += ["", record["notes"]]
    return "\n".join(lines) + "\n"


NOTES = (
    "Prefill: one call on `context` random tokens writing a fresh KV cache; transformers computes the last "
    "position's logits only (`logits_to_keep=1`, as `generate` does), and so does `sra_jax.nn.Llama` "
    "(`logits_to_keep=1`). Decode: ms per greedy token, from a jitted "
    "`lax.fori_loop` of `steps` single-token calls on the donated cache (sra_jax) and an eager Python loop with "
    "a DynamicCache (transformers). What SRA runs: prefill through `attention(impl='pallas')` (the block-sparse "
    "kernels, or the compact critical-token path when its estimated block count is at most half); decode through "
    "`pallas_kernels.sparse_decode_attention` (window + globals + critical slots, the layer read in place from the "
    "stacked cache). The routers are random (random weights), so the critical tokens fall wherever their scores "
    "put them. SRA columns: fraction of tokens selected, visible (query, key) pairs / causal pairs (pair density, "
    "from the masks used), and causal 128x128 blocks a plain block layout would visit (block density, from the same "
    "critical sets). Dense sra_jax runs `jax.nn.dot_product_attention(implementation='cudnn')`: the fused causal "
    "kernel when positions are 0..n-1 in the first cache slots (prefill), else the mask. `warmup_s` is the first "
    "call (compilation included). Clustered rows: the same compiled SRA prefill with every router's score weights "
    "zeroed, so all scores tie and top-k takes the first k tokens (one run; the router row's picks are scattered). "
    "Forced rows (optional): the SRA prefill with `critical=` given (the same tokens in every "
    "layer; the router still runs): scattered = drawn uniformly, clustered = runs of consecutive tokens; same "
    "count as the router's top-k. Larger-batch decode rows repeat the batch-1 prompt's cache (its K/V, positions "
    "and critical lists) `batch` times; a batch whose cache does not fit in the free device memory is skipped "
    "with the bytes it needs."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config, short lengths (CPU test of the code path)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--decode-steps", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--sanity-length", type=int, default=None)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=None,
                        help="decode also at these batch sizes (default 8), at the --batch-lengths")
    parser.add_argument("--batch-lengths", type=int, nargs="*", default=None, help="default 32k and 128k")
    parser.add_argument("--forced-lengths", type=int, nargs="*", default=None,
                        help="SRA prefill with forced scattered and clustered (runs at random offsets) critical sets here "
                             "(default none on GPU: each length compiles one more SRA prefill)")
    parser.add_argument("--cluster-run", type=int, default=None, help="tokens per run of clustered picks (512)")
    parser.add_argument("--skip-torch-timing", action="store_true", help="keep the sanity row, time only sra_jax")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON + markdown go here (default: the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="added to the file names (several runs on one date)")
    args = parser.parse_args(argv)

    gpu = jax.default_backend() == "gpu"
    config = tiny_config() if args.tiny else llama8b_config()
    lengths = args.lengths or ([32, 64] if args.tiny else [4096, 32768, 131072])
    decode_steps = args.decode_steps or (4 if args.tiny else 16)
    reps = args.reps or (2 if args.tiny else 3)
    sanity_length = args.sanity_length or (16 if args.tiny else 128)
    if any(n < 2 for n in lengths):
        parser.error(f"--lengths must be >= 2, got {lengths}")
    decode_batches = [8] if args.decode_batches is None else args.decode_batches
    if any(n < 2 for n in decode_batches):
        parser.error(f"--decode-batches must be >= 2 (batch 1 always runs), got {decode_batches}")
    batch_lengths = set(args.batch_lengths if args.batch_lengths is not None
                        else lengths if args.tiny else [32768, 131072])
    forced_lengths = set(args.forced_lengths if args.forced_lengths is not None else lengths if args.tiny else [])
    cluster_run = args.cluster_run or (4 if args.tiny else 512)
    batches = lambda n: decode_batches if n in batch_lengths else ()
    jax_dtype, torch_dtype = DTYPES[args.dtype]
    device = "cuda" if gpu else "cpu"
    sra = SRAConfig(critical_fraction=0.1)  # window, num_global, queries: the SRAConfig defaults
    dense_impl = "cudnn" if gpu else "xla"

    date = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "what": "Llama-3-8B-shaped prefill and decode latency, random weights",
        "preset": "tiny" if args.tiny else "llama3-8b",
        "device": jax.devices()[0].device_kind,
        "date": date.isoformat(timespec="seconds"),
        "versions": versions(),
        "dtype": args.dtype,
        "model": config.to_hf(),
        "sra": {"critical_fraction": sra.critical_fraction, "window": sra.window, "num_global": sra.num_global,
                "queries": sra.queries, "router_hidden": sra.router_hidden, "selection_at_inference": "top-k"},
        "impls": {"dense": dense_impl, "SRA": "pallas", "transformers": "sdpa"},
        "lengths": lengths,
        "decode_batches": {"batches": decode_batches, "at": sorted(batch_lengths)},
        "forced_critical": {"at": sorted(forced_lengths), "cluster_run": cluster_run},
        "clustered": "every length: router score weights zeroed (ties: top-k takes the first k tokens)",
        "decode_steps": decode_steps,
        "reps": reps,
        "notes": NOTES,
        "rows": [],
    }
    rows = record["rows"]
    stem = f"llama8b-latency-{'tiny-' if args.tiny else ''}{args.tag + '-' if args.tag else ''}{date:%Y-%m-%d}"
    json_path = (args.out_dir or REPO / "benchmarks" / "results") / f"{stem}.json"
    md_path = (args.out_dir or REPO / "experiments" / "results") / f"{stem}.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def save() -> None:  # after every row, so a run cut short keeps what it measured
        record["total_s"] = time.perf_counter() - start
        json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        md_path.write_text(markdown(record))

    print(f"{record['preset']} shape on {record['device']}, lengths {lengths}", flush=True)
    torch_model = build_torch_model(config, torch_dtype, device, args.seed)
    values = torch_to_jax_values(torch_model, config, jax_dtype)
    dense, sra_model = build_jax_models(
        config, values, sra, dtype=jax_dtype, dense_impl=dense_impl, sra_impl="pallas", seed=args.seed
    )
    del values
    rows.append(sanity_row(torch_model, dense, config, length=sanity_length, device=device, seed=args.seed))
    print(f"  sanity: {rows[0]} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows.append(weight_read_floor_row(dense, copy_bytes=1 << 30 if gpu else 1 << 24))
    print(f"  floor: {rows[-1]}", flush=True)
    save()
    if not args.skip_torch_timing:
        torch_rows(torch_model, config, lengths, device=device, decode_steps=decode_steps, reps=reps,
                   seed=args.seed, rows=rows, save=save, batches=batches)
    del torch_model
    gc.collect()
    if gpu:
        import torch

        torch.cuda.empty_cache()
    jax_rows({"dense": dense, "SRA": sra_model}, config, lengths, sra, decode_steps=decode_steps, reps=reps,
             seed=args.seed, rows=rows, save=save, batches=batches, forced=lambda n: n in forced_lengths,
             cluster_run=cluster_run)
    save()
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
