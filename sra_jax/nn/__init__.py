"""sra_jax.nn"""
