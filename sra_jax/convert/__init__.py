"""sra_jax.convert"""
