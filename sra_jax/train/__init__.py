"""sra_jax.train"""
