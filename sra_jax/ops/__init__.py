"""sra_jax.ops"""
