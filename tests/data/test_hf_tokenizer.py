"""`HFTokenizer` (tokenizer.json + chat template) against transformers' PreTrainedTokenizerFast on the same folder, and
`load_tokenizer` picking the implementation from the files."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import transformers

from sra_jax.data.hf_tokenizer import HFTokenizer
from sra_jax.data.text_tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from tests.user_sources import SPECIAL_TOKENS, write_tokenizer

TEXTS = ["What is 12 plus 30?", "héllo wörld 🙂 unseen-words ¿", "  two  spaces\n\nand <|end|> inside", ""]
CHATS = [
    [{"role": "user", "content": "What is 12 plus 30? "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 7 times 6"}],
    [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "42"}],
]


@pytest.fixture(scope="module", params=["inline", "jinja_file"])
def folder(request, tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp(request.param), template_file=request.param == "jinja_file")


@pytest.fixture(scope="module")
def pair(folder):
    return HFTokenizer(folder), transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def test_encode_and_decode_match_transformers(pair):
    ours, peer = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == peer.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == peer.decode(ids) == text
    assert ours.encode("Q", bos=True, eos=True) == [peer.bos_token_id, *peer.encode("Q", add_special_tokens=False),
                                                    peer.eos_token_id]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompt_matches_transformers_apply_chat_template(pair, add_generation_prompt):
    ours, peer = pair
    for messages in CHATS:
        text = peer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.format_chat(messages, add_generation_prompt=add_generation_prompt) == text
        ids = peer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(ids)


def test_special_ids_come_from_tokenizer_config_and_generation_config(pair):
    ours, peer = pair
    assert isinstance(ours, Tokenizer)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (peer.bos_token_id, peer.eos_token_id, len(peer))
    assert ours.stop_ids == (SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|end|>"))
    assert ours.pad_id == ours.eos_id  # no pad_token: padding slots reuse eos (they are masked)


def test_load_tokenizer_picks_tokenizer_json_over_tiktoken(folder, tmp_path):
    (folder / "original").mkdir(exist_ok=True)
    assert find_tokenizer(folder) == folder / "tokenizer.json"
    assert isinstance(load_tokenizer(folder), HFTokenizer)
    assert isinstance(load_tokenizer(folder / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json, tokenizer.model, original/tokenizer.model"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_reads_the_llama3_tiktoken_model(data_dir):
    from sra_jax.data.tokenizer import Llama3Tokenizer

    tokenizer = load_tokenizer(data_dir / "llama3")
    assert isinstance(tokenizer, Llama3Tokenizer) and isinstance(tokenizer, Tokenizer)
    assert tokenizer.format_chat([{"role": "user", "content": "hi"}]).startswith("<|begin_of_text|>")


def test_bad_tokenizer_files_name_the_file(tmp_path):
    folder = write_tokenizer(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<nope>' is not in the vocabulary"):
        HFTokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 10_000]}))
    with pytest.raises(ValueError, match="eos_token_id 10000 is not a token id"):
        HFTokenizer(folder)
    (folder / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        HFTokenizer(folder).format_chat([{"role": "user", "content": "x"}])
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        HFTokenizer(folder)
