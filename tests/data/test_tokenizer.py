"""Llama 3 tokenizer: special-token ids, known encodings, round trips on real data, chat format."""

from __future__ import annotations

import json

import pytest

from sra_jax.data.tokenizer import (
    LLAMA3_PATTERN,
    Llama3Tokenizer,
    format_chat,
    llama3_special_tokens,
)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return Llama3Tokenizer(data_dir / "llama3" / "tokenizer.model")


@pytest.fixture(scope="module")
def real_texts(data_dir) -> list[str]:
    texts = []
    with open(data_dir / "gsm8k" / "test.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    with open(data_dir / "math" / "math500_test.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            texts += [row["problem"], row["solution"], row["answer"]]
    return texts


def test_special_tokens_have_their_llama3_ids(tokenizer):
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {name: tokenizer.special_tokens[name] for name in expected} == expected
    assert len(tokenizer.special_tokens) == 256 and len(set(tokenizer.special_tokens.values())) == 256
    assert tokenizer.vocab_size == 128256 and tokenizer.num_base_tokens == 128000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id, tokenizer.eom_id) == (
        128000,
        128001,
        128009,
        128008,
    )
    assert (tokenizer.start_header_id, tokenizer.end_header_id, tokenizer.python_tag_id) == (
        128006,
        128007,
        128010,
    )
    assert set(tokenizer.stop_ids) == {128001, 128008, 128009}
    for name, token in tokenizer.special_tokens.items():
        assert tokenizer.encode(name, allowed_special="all") == [token] and tokenizer.decode([token]) == name


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("hello world", [15339, 1917]),
        ("Hello, world!", [9906, 11, 1917, 0]),
        (" 1234567", [220, 4513, 10961, 22]),  # digits are split in groups of at most three
        ("I'm here\n\n  ok", [40, 2846, 1618, 271, 220, 5509]),
        ("", []),
    ],
)
def test_known_encodings_of_plain_strings(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_bos_eos_and_special_text_handling(tokenizer):
    assert tokenizer.encode("hello world", bos=True, eos=True) == [128000, 15339, 1917, 128001]
    # Special-token text in data is plain text unless explicitly allowed.
    as_text = tokenizer.encode("a<|eot_id|>")
    assert 128009 not in as_text and tokenizer.decode(as_text) == "a<|eot_id|>"
    assert tokenizer.encode("a<|eot_id|>", allowed_special={"<|eot_id|>"}) == [64, 128009]


def test_round_trip_on_gsm8k_and_math(tokenizer, real_texts):
    assert len(real_texts) == 2 * 1319 + 3 * 500
    for text in real_texts:
        ids = tokenizer.encode(text)
        assert max(ids) < tokenizer.num_base_tokens
        assert tokenizer.decode(ids) == text


def test_encodings_match_an_independent_bpe_implementation(tokenizer, real_texts, data_dir):
    """Hugging Face `tokenizers`, built from the same rank file, gives the same ids on real text."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter
    reference = converter(
        vocab_file=str(data_dir / "llama3" / "tokenizer.model"),
        pattern=LLAMA3_PATTERN,
        additional_special_tokens=list(llama3_special_tokens(128000)),
    ).converted()
    sample = real_texts[::7]
    for text, encoding in zip(sample, reference.encode_batch(sample, add_special_tokens=False)):
        assert tokenizer.encode(text) == encoding.ids, text[:80]


def test_very_long_runs_are_encoded_without_error(tokenizer):
    text = "a" * 60_000 + " " * 30_000 + "b"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_format_matches_the_llama3_spec(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": " What is 2+2? \n"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_chat(messages) == expected
    assert format_chat(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.encode_chat(messages[1:2])
    # "user" is 882, "assistant" 78191, "\n\n" 271 in the Llama 3 vocabulary.
    assert ids[:5] == [128000, 128006, 882, 128007, 271]
    assert ids[-5:] == [128009, 128006, 78191, 128007, 271]
    assert tokenizer.decode(ids) == format_chat(messages[1:2])


def test_bad_inputs_raise_clear_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Llama3Tokenizer(tmp_path / "missing.model")
    broken = tmp_path / "broken.model"
    broken.write_text("not-a-rank-line\n")
    with pytest.raises(ValueError, match="broken.model:1"):
        Llama3Tokenizer(broken)
    with pytest.raises(ValueError, match="role"):
        format_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([128256])
