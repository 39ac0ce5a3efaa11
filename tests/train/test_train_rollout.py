"""LM GRPO: sampled groups are laid out right, and one update moves the policy toward rewarded completions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.data import synthetic
from sra_jax.nn import Llama
from sra_jax.train import rollout


def test_grpo_step_samples_groups_and_raises_log_prob_of_rewarded_completions():
    config = LlamaConfig.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96)
    model = Llama(config, SRAConfig(critical_fraction=0.5, window=4, num_global=1, router_hidden=8),
                  rngs=nnx.Rngs(0))
    tokenizer = synthetic.SyntheticTokenizer()
    problems = synthetic.generate(synthetic.SyntheticConfig(min_hops=1, max_hops=2, min_distractors=0, max_distractors=1), 2)
    prompts = [tokenizer.prompt_ids(p) for p in problems]
    group, seq_len = 4, 64

    sampled = rollout.sample_group(model, prompts, group_size=group, max_new_tokens=5, seq_len=seq_len,
                                   temperature=1.0, stop_tokens=[tokenizer.eos_id], seed=1)
    assert sampled.tokens.shape == (len(prompts) * group, seq_len)
    for row, completion in enumerate(sampled.completions):
        prompt = prompts[row // group]
        np.testing.assert_array_equal(sampled.tokens[row, : len(prompt)], prompt)
        assert sampled.completion_mask[row].sum() == len(completion)

    # Reward completions whose first token is even; GRPO should make such first tokens more likely.
    def grade(_, completion):
        return completion[0] % 2 == 0

    def even_first_token_prob():
        logits, _ = model(jnp.asarray([prompts[0]]))
        probs = jax.nn.softmax(logits[0, -1])
        return float(probs[::2].sum())

    before = even_first_token_prob()
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    for step in range(4):
        metrics = rollout.grpo_step(model, optimizer, prompts, grade, group_size=group, max_new_tokens=3,
                                    seq_len=seq_len, stop_tokens=[tokenizer.eos_id], seed=step)
        assert np.isfinite(metrics["loss"])
    assert even_first_token_prob() > before
