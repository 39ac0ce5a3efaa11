"""`sra_jax.generate`: KV-cache decoding equals recomputing the whole sequence, one compile per shape bucket,
stop tokens, top-k / top-p sampling, and the `sra-jax generate` command."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.convert import save_hf, save_orbax
from sra_jax.convert.params import abstract_model, merge
from sra_jax.generate import _generate, cli_main, generate, prompt_bucket, sample_logits

CONFIG = LlamaConfig.tiny(vocab_size=96, num_hidden_layers=2, max_position_embeddings=128)
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [1, 2, 3, 4, 5, 6, 7]]
# Every test decodes 3 prompts of bucket 8 for NEW tokens, so the whole file compiles greedy and sampled once each.
NEW = 8


def random_model(config: LlamaConfig = CONFIG, sra: SRAConfig | None = None, seed: int = 0):
    """A Llama with N(0, 0.1) weights (norm scales around 1), filled without running the initialisers."""
    graphdef, flat = abstract_model(config, sra, dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    values = {}
    for path, variable in flat:
        shape = variable.get_value().shape
        offset = 1.0 if path[-1] == "scale" else 0.0
        values[path] = jnp.asarray(offset + 0.1 * rng.standard_normal(shape), jnp.float32)
    return merge(graphdef, flat, values)


@pytest.fixture(scope="module")
def model():
    return random_model()


def greedy_without_cache(model, prompt: list[int], steps: int, width: int = 16) -> list[int]:
    """Reference: rerun the full sequence every step (right-padded to a fixed width, padding at position -1)."""
    forward = jax.jit(lambda tokens, positions: model(tokens, positions)[0])
    sequence = list(prompt)
    for _ in range(steps):
        tokens = np.zeros((1, width), np.int32)
        positions = np.full((1, width), -1, np.int32)
        tokens[0, : len(sequence)] = sequence
        positions[0, : len(sequence)] = np.arange(len(sequence))
        logits = forward(jnp.asarray(tokens), jnp.asarray(positions))
        sequence.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
    return sequence[len(prompt) :]


def test_greedy_decoding_with_the_cache_equals_recomputing_the_sequence(model):
    outputs = generate(model, PROMPTS, max_new_tokens=NEW)
    assert outputs == [greedy_without_cache(model, p, NEW) for p in PROMPTS]


def test_generation_compiles_once_per_shape_bucket(model):
    generate(model, PROMPTS, max_new_tokens=NEW, temperature=0.7, seed=0)
    compiled = _generate._cache_size()
    # Other prompt lengths in the same bucket, other sampling settings and seed: no new compile.
    other = [[4, 5, 6], [7] * 8, [8]]
    generate(model, other, max_new_tokens=NEW, temperature=1.3, top_p=0.8, top_k=5, seed=1)
    assert {prompt_bucket(len(p)) for p in PROMPTS + other} == {8}
    assert _generate._cache_size() == compiled


def test_a_stop_token_ends_its_row_and_is_kept(model):
    free = generate(model, PROMPTS, max_new_tokens=NEW)
    stop = free[0][2]
    stopped = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    for row, out in zip(free, stopped):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert out == row[:end]


def test_top_k_of_one_samples_the_greedy_tokens(model):
    greedy = generate(model, PROMPTS, max_new_tokens=NEW)
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3) == greedy


def test_sampling_is_reproducible_for_a_seed(model):
    a = generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, seed=7)
    assert a == generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, seed=7)
    assert a != generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, seed=8)


def test_sample_logits_draws_only_inside_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draw = jax.jit(sample_logits)
    key = jax.random.key(0)
    args = (jnp.float32(1.0),)
    top_p = np.asarray(draw(logits, key, *args, jnp.float32(0.7), jnp.int32(0)))
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    top_k = np.asarray(draw(logits, key, *args, jnp.float32(1.0), jnp.int32(3)))
    assert set(top_k.tolist()) == {0, 1, 2}
    counts = (
        np.bincount(np.asarray(draw(logits, key, *args, jnp.float32(1.0), jnp.int32(0))), minlength=4) / 2000
    )
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)  # ~4 binomial standard deviations


def test_an_sra_model_generates_with_its_cache():
    sra = SRAConfig(critical_fraction=0.25, window=4, num_global=1, selection="topk", router_hidden=8)
    outputs = generate(random_model(sra=sra), PROMPTS, max_new_tokens=NEW)
    assert [len(o) for o in outputs] == [NEW] * 3
    assert all(0 <= t < CONFIG.vocab_size for o in outputs for t in o)


def test_bad_arguments_are_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_cli_generates_from_hf_and_orbax_checkpoints(model, tmp_path, capsys):
    save_hf(model, tmp_path / "hf")
    save_orbax(model, tmp_path / "orbax")
    expected = "\n".join(",".join(map(str, row)) for row in generate(model, PROMPTS, max_new_tokens=NEW))
    ids = [arg for p in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, p)))]
    for directory in ("hf", "orbax"):
        assert cli_main(["--checkpoint", str(tmp_path / directory), *ids, "--max-new-tokens", str(NEW)]) == 0
        assert capsys.readouterr().out.strip() == expected


def test_cli_encodes_text_with_the_llama3_tokenizer(data_dir, tmp_path, capsys):
    config = LlamaConfig.tiny(
        vocab_size=128256,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
    )
    save_hf(random_model(config), tmp_path / "hf")
    argv = [
        "--checkpoint",
        str(tmp_path / "hf"),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
        "--chat",
        "--tokenizer",
        str(data_dir / "llama3" / "tokenizer.model"),
    ]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.strip()
