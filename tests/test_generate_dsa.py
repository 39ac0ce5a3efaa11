"""Generation of a Llama with a DSA layer through its cache (`sra_jax.nn.generation_cache`): `generate`, the eval
generation path and `sra-jax generate` on a left-padded batch equal greedy decoding by recomputing each row alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import CONFIG, NEW, PROMPTS, greedy_without_cache, random_model

from sra_jax.config import DSAConfig, NSAConfig, SRAConfig
from sra_jax.convert import save_hf
from sra_jax.evals.generation import greedy_generate
from sra_jax.generate import cli_main, generate, load_checkpoint
from sra_jax.nn.dsa_cache import DSACache
from sra_jax.nn.generation_cache import generation_cache
from sra_jax.nn.nsa_cache import NSACache

# top_k=4 keys per query: fewer than the longer prompts and every decode step past 4 tokens, so the indexer's
# selection shapes every row but the 2-token prompt's first steps.
DSA = DSAConfig(top_k=4, indexer_heads=2, indexer_dim=8, block_q=4, indexer_block_k=8, impl="gather")
SRA = SRAConfig(attention="dsa", layers=(1,), dsa=DSA)


@pytest.fixture(scope="module")
def model():
    return random_model(sra=SRA)


@pytest.fixture(scope="module")
def reference(model):
    return [greedy_without_cache(model, p, NEW) for p in PROMPTS]


def test_generate_decodes_through_the_dsa_cache_as_recomputing_each_row(model, reference):
    cache = generation_cache(CONFIG, SRA, [5, 2, 7], prompt_len=8, max_len=8 + NEW, dtype=jnp.float32)
    assert isinstance(cache, DSACache) and cache.kv.layout == "left_padded"
    assert generate(model, PROMPTS, max_new_tokens=NEW) == reference
    # The selection matters: the same weights with every key selected give other logits.
    dense = random_model(sra=SRAConfig(attention="dsa", layers=(1,), dsa=DSAConfig(**{**DSA.__dict__, "top_k": 64})))
    tokens = jnp.asarray([PROMPTS[2] + reference[2]], jnp.int32)
    assert float(jnp.abs(model(tokens)[0] - dense(tokens)[0]).max()) > 1e-2


def test_eval_generation_decodes_through_the_dsa_cache(model, reference):
    # A one-token prompt leaves its row all padding in the prefill (the prompt less its last token).
    result = greedy_generate(model, [*PROMPTS, [4]], max_new_tokens=NEW, chunk=3, bucket=8)
    assert result.tokens == [*reference, greedy_without_cache(model, [4], NEW)]
    assert result.prompt_tokens == result.generated_tokens == 0  # no SRA router layer


def test_cli_generates_from_a_dsa_checkpoint(model, reference, tmp_path, capsys):
    save_hf(model, tmp_path / "hf")  # the retrofit export's layout: the indexer in sra_router.safetensors
    _, loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.sra == SRA
    ids = [arg for p in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, p)))]
    assert cli_main(["--checkpoint", str(tmp_path / "hf"), *ids, "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out.strip() == "\n".join(",".join(map(str, row)) for row in reference)


def test_generate_decodes_an_nsa_model_through_its_cache():
    """NSA on every layer (its forward is causal: a token's block selection is its own), greedy decoding through
    the NSACache equals recomputing each row without a cache. top_n=3 of up to 4 selection blocks: tokens from
    position 12 on choose a block by importance."""
    nsa = SRAConfig(attention="nsa", layers=None, nsa=NSAConfig(block=4, stride=2, block_sel=4, top_n=3, window=4))
    nsa_model = random_model(sra=nsa)
    cache = generation_cache(CONFIG, nsa, [5, 2, 7], prompt_len=8, max_len=8 + NEW, dtype=jnp.float32)
    assert isinstance(cache, NSACache)
    assert generate(nsa_model, PROMPTS, max_new_tokens=NEW) == [greedy_without_cache(nsa_model, p, NEW) for p in PROMPTS]


def test_unsupported_generation_is_refused_by_name(model):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 2), ("sequence",))  # refused before any device use
    with pytest.raises(ValueError, match="mesh: a sequence axis of 2 .*DSA layers \\(1,\\)"):
        generate(model, PROMPTS, max_new_tokens=NEW, mesh=mesh)
    kv = generation_cache(CONFIG, None, [3], prompt_len=4, max_len=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="attention='dsa'"):
        DSACache.wrap(kv, CONFIG, SRAConfig())
    np.testing.assert_array_equal(DSACache.wrap(kv, CONFIG, SRA).index_k.shape, (2, 1, 8, DSA.indexer_dim))
