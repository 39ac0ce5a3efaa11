"""sra_jax.data"""
