"""sra_jax.ops: pure functions of arrays (no state, no Flax).

Modules: `selection` (Gumbel top-k, top-k, Plackett-Luce log-prob, sparsemax), `masks` (SRA mask rule,
`SRAMaskSpec`, block layouts), `rope` (Llama 3 RoPE), `attention` (`attention(q, k, v, ..., impl=...)`),
`sequence_parallel` (SRA attention, top-k, log-prob and cache decode with the sequence sharded over a mesh axis).
Import from the modules; nothing is re-exported here so `sra_jax.ops.attention` stays the module.
"""
