"""sra_jax.data: the synthetic multi-hop task (`synthetic`), the Llama 3 tokenizer (`tokenizer`), GSM8K / MATH
loading, prompts and batching (`datasets`), and answer extraction and grading (`grading`).

Modules are imported on demand (`from sra_jax.data import synthetic`): light ones never pull in `datasets`.
"""
