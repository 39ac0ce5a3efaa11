"""Batched sampling with a KV cache: one left-padded prefill, then a `jax.lax.while_loop` of single-token decode steps.

The whole generation is one jitted function, compiled once per (batch, prompt bucket, max_new_tokens) and model
graph: prompt lengths are rounded up to a power of two, sampling settings are traced values, and the loop stops
early once every row has produced a stop token. Greedy decoding (temperature 0) skips the sampling sort. With a mesh
whose "sequence" axis has size > 1 the KV cache is split by slot over it and prefill and decode attention run
sequence-parallel (`sra_jax.ops.sequence_parallel.sequence_sharding`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from sra_jax.nn.cache import LeftPaddedKVCache
from sra_jax.nn.generation_cache import generation_cache, per_query_layers
from sra_jax.nn.llama import check_token_ids
from sra_jax.ops import sequence_parallel

_logger = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 8


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET, so few shapes get compiled."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, length - 1).bit_length())


def sample_logits(
    logits: Float[Array, "b v"],
    key: jax.Array,
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    top_k: Int[Array, ""],
) -> Int[Array, " b"]:
    """Sample from softmax(logits / temperature) restricted to the top_k tokens (0 = all) and to the smallest set
    whose probability reaches top_p (the most likely token is always kept)."""
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take(ordered, k - 1, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    kept = jnp.maximum((before < top_p).sum(-1), 1)
    pth = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)[:, 0]
    cutoff = jnp.maximum(kth, pth)
    return jax.random.categorical(key, jnp.where(logits >= cutoff[:, None], logits, -jnp.inf), axis=-1)


def _shard_cache_slots(cache: LeftPaddedKVCache, mesh: Mesh) -> LeftPaddedKVCache:
    """The cache's per-slot arrays split by slot over the mesh's "sequence" axis."""
    def by_slot(x, slot_axis):
        spec = [None] * x.ndim
        spec[slot_axis] = "sequence"
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))

    return cache.replace(k=by_slot(cache.k, 2), v=by_slot(cache.v, 2), critical=by_slot(cache.critical, 2),
                         positions=by_slot(cache.positions, 1))


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "mesh"))
def _generate(
    graphdef,
    state,
    tokens: Int[Array, "b p"],
    positions: Int[Array, "b p"],
    key: jax.Array,
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    top_k: Int[Array, ""],
    stop_tokens: Int[Array, " n"],
    pad_id: Int[Array, ""],
    *,
    max_new_tokens: int,
    greedy: bool,
    mesh: Mesh | None = None,
) -> tuple[Int[Array, "b t"], Bool[Array, " b"]]:
    with sequence_parallel.sequence_sharding(mesh):
        return _generate_body(graphdef, state, tokens, positions, key, temperature, top_p, top_k, stop_tokens, pad_id,
                              max_new_tokens=max_new_tokens, greedy=greedy, mesh=mesh)


def _generate_body(graphdef, state, tokens, positions, key, temperature, top_p, top_k, stop_tokens, pad_id, *,
                   max_new_tokens, greedy, mesh):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    max_len = prompt_len + max_new_tokens
    # Prompts are padded on the left: a cache built from their lengths has that layout by construction and sets
    # every position itself, so decode steps skip the per-layer layout check (and its cond). Critical keys per row
    # are bounded by construction, so the prefill gathers them (SRAMaskSpec.max_critical).
    cache = generation_cache(
        model.config, model.sra, (positions >= 0).sum(-1, dtype=jnp.int32), prompt_len=prompt_len, max_len=max_len,
        dtype=model.dtype,
    )
    if sequence_parallel.active_sequence_sharding() is not None:
        cache = _shard_cache_slots(cache, mesh)

    def choose(logits, step):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p, top_k).astype(
            jnp.int32
        )

    logits, aux = model(tokens, cache=cache, logits_to_keep=1)  # never [b, p, vocab]
    # Prompts are left-padded, so the last column holds every row's last prompt token.
    first = choose(logits[:, -1], 0)

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, done, out, cache = carry
        out = out.at[:, step].set(jnp.where(done, pad_id, token))
        done = done | jnp.isin(token, stop_tokens)
        logits, aux = model(token[:, None], cache=cache)
        return step + 1, choose(logits[:, 0], step + 1), done, out, aux.cache

    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    _, _, done, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), first, done, out, aux.cache))
    return out, done


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids; prompts may differ in length), ending with the first stop token when
    one was produced, else `max_new_tokens` long. temperature == 0 is greedy; otherwise top_k (0 = off) and top_p
    (1 = off) restrict the sampled tokens. `mesh` with a "sequence" axis of size S > 1: the KV cache (prompt bucket
    + max_new_tokens slots, which S must divide) is split by slot over it and attention runs sequence-parallel."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature=}, {top_p=}, {top_k=}"
        )
    lengths = np.array([len(p) for p in prompts])
    limit = model.config.max_position_embeddings
    if int(lengths.max()) + max_new_tokens > limit:
        raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) + max_new_tokens={max_new_tokens} "
                         f"exceeds the model's max_position_embeddings={limit}; shorten one or the other")
    check_token_ids(jnp.asarray(np.concatenate([np.asarray(p) for p in prompts]), jnp.int32),
                    model.config.vocab_size)
    width = prompt_bucket(int(lengths.max()))
    if width + max_new_tokens > limit:
        width = int(lengths.max())  # do not let bucketing push positions past what the model supports
    shards = 1 if mesh is None else dict(mesh.shape).get("sequence", 1)
    if shards > 1 and per_query_layers(model.config, model.sra):
        raise ValueError(f"mesh: a sequence axis of {shards} shards the KV cache by slot, which the "
                         f"{model.sra.attention.upper()} layers {per_query_layers(model.config, model.sra)} do not "
                         f"decode from; generate without a sequence axis (mesh=None or sequence size 1)")
    if (width + max_new_tokens) % shards:
        raise ValueError(f"the KV cache's {width + max_new_tokens} slots (prompt bucket {width} + max_new_tokens="
                         f"{max_new_tokens}) must be divisible by the mesh's sequence axis ({shards})")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        positions[row, width - len(prompt) :] = np.arange(len(prompt))
    graphdef, state = nnx.split(model)
    out, _ = _generate(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        jnp.int32(top_k),
        jnp.asarray(list(stop_tokens) or [-1], jnp.int32),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        mesh=mesh,
    )
    stops = set(stop_tokens)
    results = []
    for row in np.asarray(out).tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        results.append(row[:end])
    return results


def load_checkpoint(path: str | os.PathLike):
    """(config, model) from a Hugging Face directory, an orbax model checkpoint or a training checkpoint folder
    (see `sra_jax.convert.source`)."""
    from sra_jax.convert.source import load_source

    config, _, model = load_source(path)
    return config, model


def _default_tokenizer(checkpoint: str) -> str | Path | None:
    """The model's own tokenizer (`sra_jax.data.text_tokenizer.model_tokenizer`), else the Llama 3 tokenizer.model of
    the data folder ($SRA_JAX_DATA or ../shared/data)."""
    from sra_jax.data.text_tokenizer import model_tokenizer

    found = model_tokenizer(checkpoint)
    if found is not None:
        return found
    data = Path(os.environ.get("SRA_JAX_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    fallback = data / "llama3" / "tokenizer.model"
    return fallback if fallback.is_file() else None


def cli_main(argv: list[str] | None = None) -> int:
    """`sra-jax generate --checkpoint DIR --prompt TEXT [...]`."""
    parser = argparse.ArgumentParser(prog="sra-jax generate", description=cli_main.__doc__)
    parser.add_argument(
        "--checkpoint", required=True,
        help="Hugging Face or sra-jax orbax directory, a hub name hf://org/name[@revision] (local huggingface_hub "
             "cache), or a training checkpoint folder (newest step) or step folder"
    )
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument(
        "--prompt-ids", action="append", default=[], help="prompt as comma-separated token ids"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer.json or Llama 3 tokenizer.model, a folder holding one, or hf://org/name "
                            "(default: the checkpoint's own, see sra_jax.data.text_tokenizer)"
    )
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a chat user turn (the checkpoint's chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_ids:
        parser.error("give at least one --prompt or --prompt-ids")

    config, model = load_checkpoint(args.checkpoint)
    tokenizer = None
    if args.prompt:
        from sra_jax.data.text_tokenizer import load_tokenizer

        path = args.tokenizer or _default_tokenizer(args.checkpoint)
        if path is None:
            parser.error("no tokenizer.json or tokenizer.model found beside the checkpoint; pass --tokenizer")
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > config.vocab_size:
            parser.error(f"the tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: its text would be garbage; pass the model's own --tokenizer")
    try:
        prompts: list[list[int]] = [[int(t) for t in ids.split(",")] for ids in args.prompt_ids]
    except ValueError:
        parser.error(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers")
    for text in args.prompt:
        if args.chat:
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text, bos=tokenizer.bos_id is not None))
    eos = config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None:
        stop |= set(tokenizer.stop_ids)
    start = time.perf_counter()
    outputs = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_tokens=sorted(stop),
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    for ids in outputs:
        if tokenizer is None:
            print(",".join(map(str, ids)))
        else:  # a model vocabulary wider than the tokenizer's may sample ids that have no text
            print(tokenizer.decode([t for t in ids if t not in stop and t < tokenizer.vocab_size]))
    produced = sum(len(o) for o in outputs)
    _logger.info("%d tokens in %.2f s incl. compile", produced, seconds)
    return 0
