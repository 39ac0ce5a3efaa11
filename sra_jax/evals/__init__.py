"""sra_jax.evals: few-shot GSM8K / MATH evaluation (`text_tasks`) on greedy KV-cache generation (`generation`)."""
