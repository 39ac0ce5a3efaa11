"""Greedy batched generation for evaluation: KV cache, stop tokens and host-checked stop strings.

It differs from `sra_jax.generate.generate` in two ways that matter for few-shot evaluation:
- the prefill writes the prompt (all but its last column) into the cache without computing logits (XLA drops the
  unused LM head), so a 1000-token few-shot prompt costs no [batch, 1000, vocab] logits array;
- decoding runs in jitted chunks of `chunk` tokens; between chunks the host checks each row for a stop string
  (e.g. the next "Question:") and the loop ends once every row has stopped, instead of running to max_new_tokens.

Prompts are left-padded to a multiple of `bucket` (few compiled shapes; sort prompts by length for tight batches).
With SRA the cache's critical threshold is fixed by that prefill (the prompt less its last token); the last prompt
token is then the first decode step. The SRA counts of prefill and decode are returned for a selected fraction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Int

from sra_jax.nn.generation_cache import GenerationCache, generation_cache


@dataclasses.dataclass(frozen=True)
class Generation:
    """New token ids per prompt (ending with its stop token when one came) and the SRA counts of the batch."""

    tokens: list[list[int]]
    stopped: list[bool]  # a stop token or stop string ended the row (else max_new_tokens did)
    prompt_critical: float  # critical (layer, token) pairs among prompt tokens, summed over SRA layers
    prompt_tokens: float  # valid (layer, token) pairs of the prompt over SRA layers
    generated_critical: float
    generated_tokens: float


def _sra_counts(aux, valid: Bool[Array, "b s"]) -> tuple[jax.Array, jax.Array]:
    if not aux.sra_layers:
        return jnp.float32(0), jnp.float32(0)
    layers = jnp.asarray(aux.sra_layers, jnp.int32)
    critical = (aux.critical[layers] & valid[None]).sum()
    return critical.astype(jnp.float32), (valid.sum() * len(aux.sra_layers)).astype(jnp.float32)


@partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, tokens: Int[Array, "b p"], positions: Int[Array, "b p"], *, max_len: int):
    model = nnx.merge(graphdef, state)
    # Left-padded prompts (position -1), then the next positions: the layout the decode kernel reads, which a cache
    # built from the prompt lengths keeps by construction (it sets every position itself; critical keys bounded).
    cache = generation_cache(
        model.config, model.sra, (positions >= 0).sum(-1, dtype=jnp.int32), prompt_len=tokens.shape[1],
        max_len=max_len, dtype=model.dtype,
    )
    _, aux = model(tokens, cache=cache, logits_to_keep=1)  # unused logits: the last position only
    return aux.cache, _sra_counts(aux, positions >= 0)


@partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache",))
def _decode_chunk(
    graphdef,
    state,
    cache: GenerationCache,
    token: Int[Array, " b"],
    done: Bool[Array, " b"],
    stop_tokens: Int[Array, " n"],
    pad_id: Int[Array, ""],
    steps_left: Int[Array, ""],
    *,
    chunk: int,
):
    """Up to min(chunk, steps_left) greedy steps; each feeds `token` at the cache's next position and emits the argmax. Stops early
    when every row is done; finished rows emit pad_id."""
    model = nnx.merge(graphdef, state)
    out = jnp.full((token.shape[0], chunk), pad_id, jnp.int32)

    def cond(carry):
        step, _, done, _, _, _ = carry
        return (step < jnp.minimum(chunk, steps_left)) & ~jnp.all(done)

    def body(carry):
        step, token, done, out, cache, counts = carry
        logits, aux = model(token[:, None], cache=cache)
        new = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        new = jnp.where(done, pad_id, new)
        critical, total = _sra_counts(aux, ~done[:, None])
        out = out.at[:, step].set(new)
        done = done | jnp.isin(new, stop_tokens)
        return step + 1, new, done, out, aux.cache, counts + jnp.stack([critical, total])

    init = (jnp.int32(0), token, done, out, cache, jnp.zeros((2,), jnp.float32))
    steps, token, done, out, cache, counts = jax.lax.while_loop(cond, body, init)
    return out, steps, token, done, cache, counts


def greedy_generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
    chunk: int = 32,
    bucket: int = 128,
    pad_id: int = 0,
) -> Generation:
    """Greedy continuation of each prompt. A row ends at a stop token (kept as its last token), when
    `stop(new_tokens_so_far)` says so (checked after every chunk; the row keeps the whole chunk, so cut the text at
    the stop string afterwards), or after `max_new_tokens`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1 or chunk < 1 or bucket < 1:
        raise ValueError(f"need max_new_tokens, chunk, bucket >= 1; got {max_new_tokens=}, {chunk=}, {bucket=}")
    longest = max(len(p) for p in prompts)
    width = -(-longest // bucket) * bucket
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        positions[row, width - len(prompt) :] = np.arange(len(prompt))
    chunk = min(chunk, max_new_tokens)
    graphdef, state = nnx.split(model)
    cache, (prompt_critical, prompt_total) = _prefill(
        graphdef, state, jnp.asarray(tokens[:, :-1]), jnp.asarray(positions[:, :-1]), max_len=width + max_new_tokens
    )
    token = jnp.asarray(tokens[:, -1])
    done = jnp.zeros((len(prompts),), bool)
    stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    outputs: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    counts = np.zeros(2)
    produced = 0
    while produced < max_new_tokens and not all(stopped):
        out, steps, token, done, cache, chunk_counts = _decode_chunk(
            graphdef, state, cache, token, done, stops, jnp.int32(pad_id),
            jnp.int32(max_new_tokens - produced), chunk=chunk,
        )
        counts += np.asarray(chunk_counts)
        out, done_host = np.asarray(out)[:, : int(steps)], np.asarray(done).copy()
        produced += int(steps)
        for row in range(len(prompts)):
            if stopped[row]:
                continue
            new = out[row].tolist()
            if done_host[row]:  # a stop token: keep the tokens up to and including it
                end = next(i for i, t in enumerate(new) if t in set(stop_tokens))
                outputs[row].extend(new[: end + 1])
                stopped[row] = True
                continue
            outputs[row].extend(new)
            if stop is not None and stop(outputs[row]):
                stopped[row], done_host[row] = True, True
        done = jnp.asarray(done_host)
    return Generation(
        tokens=outputs,
        stopped=stopped,
        prompt_critical=float(prompt_critical),
        prompt_tokens=float(prompt_total),
        generated_critical=float(counts[0]),
        generated_tokens=float(counts[1]),
    )
