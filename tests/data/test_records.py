"""The user's own data (sra_jax.data.records): jsonl and `datasets` rows as examples, errors naming file, line and
field; tokenisation plain and through the chat template; the graders of `data.grader`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sra_jax.data import records
from sra_jax.data.grading import grade_answer
from sra_jax.data.hf_tokenizer import HFTokenizer
from tests.user_sources import write_tokenizer

ROWS = [
    {"question": "What is 12 plus 30?", "solution": 42},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 7 times 6"},
                  {"role": "assistant", "content": "42"}]},
]
FIELDS = records.Fields(prompt="question", answer="solution")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return HFTokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_become_prompt_answer_and_chat_records(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], "", ROWS[1]])
    plain, chat = records.read_jsonl(path, FIELDS)
    assert (plain.prompt, plain.messages, plain.answer, plain.where) == ("What is 12 plus 30?", None, "42", f"{path}:1")
    assert chat.prompt is None and [m["role"] for m in chat.messages] == ["system", "user"]
    assert (chat.answer, chat.where) == ("42", f"{path}:3")


@pytest.mark.parametrize("line, message", [
    ("{not json", r":2: not valid JSON"),
    ('["a list"]', r":2: each row must be a JSON object, got list"),
    ('{"question": "q"}', r":2: no field 'solution' \(data.answer_field\); the row has fields \['question'\]"),
    ('{"question": ["q"], "solution": "a"}', r":2: field 'question' \(data.prompt_field\) must be a string"),
    ('{"question": " ", "solution": "a"}', r":2: field 'question' \(data.prompt_field\) is empty"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}',
     r":2: field 'messages' \(data.messages_field\): the last message is the target and must have role 'assistant'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     r":2: field 'messages' \(data.messages_field\)\[0\] must be an object with string 'role' and 'content'"),
])
def test_bad_jsonl_lines_name_the_file_line_and_field(tmp_path, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], line])
    with pytest.raises(ValueError, match=f"bad.jsonl{message}"):
        records.read_jsonl(path, FIELDS)


def test_datasets_sources_read_local_json_and_parquet(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    _jsonl(tmp_path / "d.json", ROWS)
    datasets.Dataset.from_list([{"question": "2+2?", "solution": "4"}]).to_parquet(str(tmp_path / "d.parquet"))
    from_json = records.load_dataset_records("json", data_files=[str(tmp_path / "d.json")], fields=FIELDS)
    assert [r.answer for r in from_json] == ["42", "42"] and from_json[1].messages is not None
    (row,) = records.load_dataset_records("parquet", data_files=[str(tmp_path / "d.parquet")], fields=FIELDS)
    assert (row.prompt, row.answer, row.where.endswith("row 0")) == ("2+2?", "4", True)
    with pytest.raises(ValueError, match=r"load_dataset\('parquet'.*row 0: no field 'prompt'"):
        records.load_dataset_records("parquet", data_files=[str(tmp_path / "d.parquet")])


def test_plain_examples_are_bos_prompt_then_answer_eos(tokenizer):
    record = records.Record("What is 12 plus 30?", None, "42", "x:1")
    example = records.tokenize_record(record, tokenizer, chat=False)
    prompt = [tokenizer.bos_id, *tokenizer.encode(record.prompt)]
    target = [*tokenizer.encode(" 42"), tokenizer.eos_id]
    np.testing.assert_array_equal(example.tokens, prompt + target)
    np.testing.assert_array_equal(example.loss_mask, [False] * len(prompt) + [True] * len(target))


@pytest.mark.parametrize("chat_record", [False, True])
def test_chat_examples_put_the_loss_on_the_assistant_turn(tokenizer, chat_record):
    if chat_record:
        record = records.Record(None, ({"role": "user", "content": "Q: 7 times 6"},), "42", "x:1")
    else:
        record = records.Record("Q: 7 times 6", None, "42", "x:1")
    example = records.tokenize_record(record, tokenizer, chat=True)
    assert tokenizer.decode(example.tokens[~example.loss_mask]) == "<s><|user|>\nQ: 7 times 6<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(example.tokens[example.loss_mask]) == "42<|end|>\n"
    assert records.prompt_ids(record, tokenizer, chat=True) == example.tokens[~example.loss_mask].tolist()


@pytest.mark.parametrize("grader, completion, gold, extracted, correct", [
    ("exact", "  Paris \n", "Paris", "Paris", True),
    ("exact", "paris", "Paris", "paris", False),
    ("numeric", "So 6 * 7 = 42. The answer is 42.", "#### 42", "42", True),
    ("numeric", "The answer is 1,000.", "1000", "1000", True),
    ("numeric", "no number", "42", None, False),
    ("math", "so \\boxed{\\frac{1}{2}}", "$0.5$", "\\frac{1}{2}", True),
    ("math", "The final answer is $3$.", "\\boxed{4}", "3", False),
])
def test_graders(grader, completion, gold, extracted, correct):
    assert grade_answer(grader, completion, gold) == (extracted, correct)


def test_unknown_grader_is_refused():
    with pytest.raises(ValueError, match="grader 'fuzzy' must be one of"):
        grade_answer("fuzzy", "a", "a")
