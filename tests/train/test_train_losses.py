"""Supervised losses against hand-computed values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sra_jax.train import losses


def test_cross_entropy_averages_only_masked_targets():
    # vocab 2, uniform logits except one confident prediction; targets at t=1,2 predicted from t=0,1.
    logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    tokens = jnp.array([[0, 1, 0]])
    mask = jnp.array([[False, True, True]])
    # t=1: token 1 under uniform -> log 2; t=2: token 0 under (3/4, 1/4) -> log(4/3)
    np.testing.assert_allclose(losses.cross_entropy(logits, tokens, mask), (math.log(2) + math.log(4 / 3)) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(logits, tokens, jnp.zeros_like(mask)), 0.0)


def test_answer_correct_requires_every_masked_token_to_be_the_argmax():
    logits = jnp.array([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    tokens = jnp.array([[0, 1, 0], [0, 1, 0]])
    mask = jnp.array([[False, True, True], [False, True, True]])
    np.testing.assert_array_equal(losses.answer_correct(logits, tokens, mask), [True, False])


def test_teacher_kl_is_zero_for_equal_logits_and_matches_closed_form():
    student = jnp.zeros((1, 2, 2))
    teacher = jnp.array([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    mask = jnp.array([[False, True]])
    np.testing.assert_allclose(losses.teacher_kl(student, student, mask), 0.0, atol=1e-7)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    np.testing.assert_allclose(losses.teacher_kl(student, teacher, mask), expected, rtol=1e-6)
