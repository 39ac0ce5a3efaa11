"""Supervised losses: next-token cross-entropy on loss-masked tokens and KL to a dense teacher.

Conventions follow `sra_jax.data.synthetic.SyntheticBatch`: the target of position t is `tokens[:, t]`, predicted by
`logits[:, t - 1]`, and counts when `loss_mask[:, t]` is True.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def shifted_token_log_probs(
    logits: Float[Array, "b s v"], tokens: Int[Array, "b s"]
) -> Float[Array, "b s1"]:
    """log p(tokens[:, t] | tokens[:, :t]) for t = 1..s-1 (so s1 = s - 1), in float32."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def masked_mean(values: Float[Array, "*s"], mask: Bool[Array, "*s"]) -> Float[Array, ""]:
    """Mean of `values` where `mask`; 0 (not NaN) when the mask is empty."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(
    logits: Float[Array, "b s v"], tokens: Int[Array, "b s"], loss_mask: Bool[Array, "b s"]
) -> Float[Array, ""]:
    """Mean next-token negative log-likelihood over the target tokens selected by `loss_mask`."""
    return masked_mean(-shifted_token_log_probs(logits, tokens), loss_mask[:, 1:])


def answer_correct(
    logits: Float[Array, "b s v"], tokens: Int[Array, "b s"], loss_mask: Bool[Array, "b s"]
) -> Bool[Array, " b"]:
    """Whether every loss-masked token is the argmax of its prediction (teacher forcing).

    For a target that directly follows the prompt this equals exact-match greedy decoding: greedy decoding reproduces
    the target iff each target token is the argmax given the gold prefix.
    """
    hits = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return jnp.all(hits | ~loss_mask[:, 1:], axis=-1)


def teacher_kl(
    student_logits: Float[Array, "b s v"], teacher_logits: Float[Array, "b s v"], loss_mask: Bool[Array, "b s"]
) -> Float[Array, ""]:
    """Mean KL(teacher || student) of the next-token distributions at the positions that predict masked tokens."""
    student = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return masked_mean(kl, loss_mask[:, 1:])


def segment_answer_correct(
    logits: Float[Array, "b s v"], tokens: Int[Array, "b s"], loss_mask: Bool[Array, "b s"],
    segment_ids: Int[Array, "b s"],
) -> tuple[Bool[Array, "b n"], Bool[Array, "b n"]]:
    """`answer_correct` per segment of packed rows: (correct, present), indexed [row, segment id], n = seq_len + 1.

    present[r, j]: segment j of row r has a loss-masked token; correct[r, j]: every one of them is the argmax of its
    prediction. Ids run from 0 (padding, which has no loss-masked token) to at most seq_len (each segment holds a
    token). Accuracy over examples = sum(correct & present) / sum(present).
    """
    s = tokens.shape[1] + 1
    hits = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    target = loss_mask[:, 1:]
    ids = segment_ids[:, 1:]
    count = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=s))
    targets = count(target.astype(jnp.int32), ids)
    wrong = count((target & ~hits).astype(jnp.int32), ids)
    present = targets > 0
    return present & (wrong == 0), present
