"""The long-context multi-hop task: deterministic, its oracle positions hold the hops, the answer follows from them
alone, and the held-out splits differ from training as specified."""

from __future__ import annotations

import numpy as np
import pytest

from sra_jax.data import longhop

CONFIG = longhop.LonghopConfig(context_len=128, longer_context_len=192, min_hops=1, max_hops=3, num_vars=64)
TOK = longhop.LonghopTokenizer(CONFIG)


def examples(split: str, count: int = 40, seed: int = 0):
    return longhop.generate(CONFIG, count, split=split, seed=seed)


def test_generation_is_deterministic_by_seed():
    a, b, c = examples("train"), examples("train"), examples("train", seed=1)
    assert all(np.array_equal(x.prompt, y.prompt) and np.array_equal(x.critical, y.critical) for x, y in zip(a, b))
    assert sum(np.array_equal(x.prompt, y.prompt) for x, y in zip(a, c)) == 0


@pytest.mark.parametrize("split", longhop.SPLITS)
def test_prompts_have_the_split_context_length_and_a_full_answer_key(split):
    for example in examples(split):
        assert len(example.prompt) == CONFIG.context_for(split)
        assert longhop.solve(TOK, example.prompt, example.chain_vars[-1]) == example.answer
        assert example.chain_values[-1] == example.answer


@pytest.mark.parametrize("split", longhop.SPLITS)
def test_oracle_positions_hold_exactly_the_chain_statements(split):
    for example in examples(split):
        picked = example.prompt[example.critical]
        bound = [TOK.var_of(t) for i, t in enumerate(picked) if TOK.is_var(t) and picked[i + 1] == TOK.eq_id]
        assert bound == list(example.chain_vars)
        assert picked[-1] == TOK.semi_id and np.all(np.diff(example.critical) > 0)
        # Every statement of the body binding a chain variable is in the oracle set.
        binds = [i for i in range(len(example.prompt) - longhop.TAIL_LEN) if TOK.is_var(example.prompt[i])
                 and example.prompt[i + 1] == TOK.eq_id and TOK.var_of(example.prompt[i]) in example.chain_vars]
        assert set(binds) <= set(example.critical.tolist())


@pytest.mark.parametrize("split", longhop.SPLITS)
def test_answer_is_computable_from_the_oracle_tokens_alone(split):
    for example in examples(split):
        assert longhop.solve(TOK, example.prompt[example.critical], example.chain_vars[-1]) == example.answer


def test_a_window_does_not_see_the_hops():
    # The first hop (the constant) is outside the last 16 tokens in nearly every problem.
    far = [e.critical[0] < CONFIG.context_len - 16 for e in examples("train", 100)]
    assert np.mean(far) > 0.85


def test_splits_are_disjoint_as_specified():
    train = examples("train", 200)
    assert {e.hops for e in train} <= set(range(CONFIG.min_hops, CONFIG.max_hops + 1))
    assert all(e.hops > CONFIG.max_hops for e in examples("more_hops"))
    assert all(len(e.prompt) > CONFIG.context_len for e in examples("longer"))
    train_constants = {e.chain_values[0] for e in train}
    new_constants = {e.chain_values[0] for e in examples("new_values", 200)}
    assert train_constants and new_constants and not train_constants & new_constants
    prompts = {e.prompt.tobytes() for e in train}
    assert not prompts & {e.prompt.tobytes() for e in examples("test", 200)}


def test_cot_target_writes_every_hop_before_the_answer():
    example = examples("train")[5]
    target = example.target(TOK, "cot")
    assert target[-2:] == [TOK.then_id, TOK.value(example.answer)]
    assert [TOK.var_of(t) for t in target[:-2:2]] == list(example.chain_vars)
    assert [TOK.value_of(t) for t in target[1:-2:2]] == list(example.chain_values)


@pytest.mark.parametrize("form", longhop.FORMS)
def test_batch_marks_targets_and_oracle(form):
    batch_examples = examples("train", 8)
    seq_len = longhop.sequence_length(CONFIG, form)
    batch = longhop.make_batch(batch_examples, CONFIG, seq_len, form)
    for row, example in enumerate(batch_examples):
        assert np.array_equal(np.flatnonzero(batch.oracle[row]), example.critical)
        target = batch.tokens[row][batch.loss_mask[row]].tolist()
        assert target == [*example.target(TOK, form), TOK.eos_id]
    chosen = longhop.random_critical(batch.oracle, batch.positions, 0.1, seed=0)
    valid = (batch.positions >= 0).sum(1)
    assert np.array_equal(chosen.sum(1), np.ceil(0.1 * valid - 1e-9).astype(int))
    assert not (chosen & (batch.positions < 0)).any()


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="num_vars"):
        longhop.LonghopConfig(context_len=512, longer_context_len=1024, num_vars=64)
    with pytest.raises(ValueError, match="split"):
        longhop.make_example(CONFIG, "dev", 0, 0)
    with pytest.raises(ValueError, match="seq_len"):
        longhop.make_batch(examples("train", 1), CONFIG, 64)
