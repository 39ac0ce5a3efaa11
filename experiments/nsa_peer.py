"""Our NSA (`sra_jax.nn.NSAAttention`, `sra_jax.ops.nsa`) against `native-sparse-attention-pytorch`'s
`SparseAttention` (0.2.3) on the same weights, branch by branch.

GPU (H200, about 2 minutes each; torch with CUDA and triton, the peer's wheel and its deps, jax with CUDA):
    # the peer's triton selected-blocks kernel (bfloat16: it takes nothing else) against our layer (float32)
    python experiments/nsa_peer.py --device cuda --triton --selected-backend auto --seq 4096 --hidden 1024 \
        --heads 16 --kv-heads 1 --block 32 --stride 16 --block-sel 64 --top-n 16 --window 513 --batch 1 \
        --out nsa-peer-triton.json
    # the peer's reference path in float32 against our block-sparse kernel (float32): same command without --triton
CPU (the peer's reference path, float32, tiny; tests/ops/test_nsa_peer.py runs it):
    python experiments/nsa_peer.py --device cpu --out /tmp/nsa-peer.json

The peer is set up to match our architecture where a setting can do it: no pre-norm, our projections copied into its
`to_qkv` / `combine_heads`, our gate linear as its `strategy_combine_mlp` (same (head, branch) layout, sigmoid),
a compress network that is our learned linear pool (`Pool`), our intra-block position embedding copied into its
per-kv-head `k/v_intrablock_positions`, zero memory tokens, its sliding window one shorter (it sees
`window_size + 1` keys, ours `window`), `num_selected_blocks = top_n - 1` (it adds the own block beside its top-n),
and its rotary replaced by `Rope` (our Llama half-split RoPE at our frequencies, or none). Differences no
setting removes (see docs/nn.md, "NSA against native-sparse-attention-pytorch"):

- compressed branch: theirs always prepends `num_compressed_mem_kv >= 1` memory tokens (zero-initialised: a key of
  logit 0 with a zero value), shows a compressed block only when it ends strictly before the query (ours: at or
  before), builds the compressed keys before RoPE (ours: from RoPE'd keys, scored by RoPE'd queries), and its windows
  end at (j+1)*stride - 1 with the first ones zero-padded on the left (ours start at token 0, as the paper's eq. 7);
- selection: both pick top-n blocks per query, shared by a GQA group; theirs from the softmax over blocks of the
  compressed logits averaged over the group and the compressed blocks of a selection block (ours: the compressed
  attention probabilities summed over the group and the overlapping compressed blocks), with the own block added on
  top of the top-n (ours forces the first and the own block inside the top-n).

So the rows here: `compress_k/v` (our `compress` on the sequence left-padded by block - stride zeros equals their
compressed keys/values, all windows), `compressed_peer_rules` (their compressed branch against our `masked_attention`
over those compressed keys with their memory token and strict mask), `window` and `selected_all` (the module with
RoPE: the window branch, and the selected branch with top-n >= the number of blocks, where both select every causal
block), `combined` (gates on the selected and window branches, compressed gate 0; values and gradients) and
`selected_given_their_blocks` (their selected branch against our `masked_attention` with their per-query blocks as
the mask). Measurements, not checks: `selection_agreement` and `selection_overlap` (how often their per-query
selection equals ours, and the share of their blocks we select too), `compressed_design_gap` and `selected_design_gap` (our own compressed / selected branch against
theirs, each side with its own rules) and `window_vs_selected_all`.
Errors are max |ours - theirs| / max |theirs|.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

# torch and JAX share the GPU here: JAX must not take 75% of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from sra_jax.config import LlamaConfig
from sra_jax.nn.layers import project_qkv
from sra_jax.nn.nsa import NSAAttention
from sra_jax.ops import nsa, rope

PEER = "native-sparse-attention-pytorch"
BIG = 1e4  # a gate bias of +-BIG makes sigmoid exactly 1 or 0 in float32, on both sides
BRANCHES = {"compressed": (1, 0, 0), "selected": (0, 1, 0), "window": (0, 0, 1)}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of a comparison (`--seq`, ...); `window`, `top_n` are ours (the peer gets window - 1, top_n - 1)."""

    batch: int = 2
    seq: int = 60
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    block: int = 16
    stride: int = 8
    block_sel: int = 16
    top_n: int = 3
    window: int = 9

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_sel_blocks(self) -> int:
        return -(-self.seq // self.block_sel)


def llama_config(shape: Shape) -> LlamaConfig:
    return LlamaConfig.tiny(
        hidden_size=shape.hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads
    )


def ours(
    shape: Shape, seed: int, *, gates: str | tuple[int, int, int] = "random", selected_backend: str = "reference"
) -> NSAAttention:
    """Our layer with random weights (pool weights and position embeddings included). `gates`: "random", or
    "no_compressed" (random on the selected and window branches, exactly 0 on the compressed one), or a one-hot
    (compressed, selected, window) triple (each gate exactly 0 or 1)."""
    mod = NSAAttention(
        llama_config(shape), block=shape.block, stride=shape.stride, block_sel=shape.block_sel,
        top_n=shape.top_n, window=shape.window, selected_backend=selected_backend, rngs=nnx.Rngs(seed),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    l, hd, h = shape.block, shape.head_dim, shape.heads
    mod.nsa_cmp_weights_k[...] = jnp.asarray(rng.uniform(0.5, 1.5, l) / l, jnp.float32)
    mod.nsa_cmp_weights_v[...] = jnp.asarray(rng.uniform(0.5, 1.5, l) / l, jnp.float32)
    mod.nsa_cmp_pos_k[...] = jnp.asarray(0.3 * rng.standard_normal((l, hd)), jnp.float32)
    mod.nsa_cmp_pos_v[...] = jnp.asarray(0.3 * rng.standard_normal((l, hd)), jnp.float32)
    kernel = 0.2 * rng.standard_normal((shape.hidden, h, 3))
    bias = rng.standard_normal((h, 3))
    if gates == "no_compressed":
        kernel[..., 0], bias[..., 0] = 0.0, -BIG
    elif gates != "random":
        kernel[:] = 0.0
        bias[:] = np.where(np.asarray(gates, bool), BIG, -BIG)
    mod.nsa_gate.kernel[...] = jnp.asarray(kernel.reshape(shape.hidden, 3 * h), jnp.float32)
    mod.nsa_gate.bias[...] = jnp.asarray(bias.reshape(3 * h), jnp.float32)
    return mod


class Pool(torch.nn.Module):
    """Our compression network as a peer `compress_mlp`: [b, h, w, l, d] -> sum_j weights[j] * x[..., j, :]."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.tensor(np.asarray(weights)))

    def forward(self, x):
        return torch.einsum("bhwnd,n->bhwd", x, self.weights)


class Rope(torch.nn.Module):
    """The peer's rotary slot (`rotate_queries_with_cached_keys`, used by its selected and window branches) with our
    RoPE: the Llama half-split rotation at `inv_freq` (None: no rotation)."""

    def __init__(self, inv_freq: np.ndarray | None):
        super().__init__()
        self.inv_freq = None if inv_freq is None else torch.tensor(np.asarray(inv_freq))

    def _rotate(self, x, offset: int):
        pos = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq.to(x.device)[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    def rotate_queries_with_cached_keys(self, q, k):
        if self.inv_freq is None:
            return q, k
        return self._rotate(q, k.shape[-2] - q.shape[-2]), self._rotate(k, 0)


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, np.float32))


def peer(mod: NSAAttention, shape: Shape, *, rope_on: bool, triton: bool = False):
    """The peer's `SparseAttention` (float32, CPU) with `mod`'s weights (see the module docstring)."""
    from native_sparse_attention_pytorch.native_sparse_attention import SparseAttention

    h, hkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    gate = torch.nn.Linear(shape.hidden, 3 * h)
    p = SparseAttention(
        dim=shape.hidden, dim_head=hd, heads=h, kv_heads=hkv, sliding_window_size=shape.window - 1,
        compress_block_size=shape.block, compress_block_sliding_stride=shape.stride,
        selection_block_size=shape.block_sel, num_selected_blocks=shape.top_n - 1,
        num_compressed_mem_kv=1, causal=True, norm=False, use_triton_kernel=triton,
        compress_mlp=Pool(mod.nsa_cmp_weights_k[...]), strategy_combine_mlp=gate,
    )  # fmt: skip
    with torch.no_grad():
        p.to_qkv.weight.copy_(_t(jnp.concatenate([mod.q_proj.kernel[...], mod.k_proj.kernel[...],
                                                  mod.v_proj.kernel[...]], 1).T))  # fmt: skip
        p.combine_heads.weight.copy_(_t(mod.o_proj.kernel[...].T))
        gate.weight.copy_(_t(mod.nsa_gate.kernel[...].T))
        gate.bias.copy_(_t(mod.nsa_gate.bias[...]))
        p.k_compress.weights.copy_(_t(mod.nsa_cmp_weights_k[...]))
        p.v_compress.weights.copy_(_t(mod.nsa_cmp_weights_v[...]))
        p.k_intrablock_positions.copy_(_t(mod.nsa_cmp_pos_k[...])[None].expand(hkv, -1, -1))
        p.v_intrablock_positions.copy_(_t(mod.nsa_cmp_pos_v[...])[None].expand(hkv, -1, -1))
        p.compress_mem_kv.zero_()
    cfg = mod.config
    p.rotary_emb = Rope(np.asarray(rope.rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)) if rope_on else None)
    return p


def inputs(shape: Shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x [b, s, hidden] (float32) and positions [b, s] (0..s-1: the peer has no padding or segments)."""
    x = np.random.default_rng(seed + 1).standard_normal((shape.batch, shape.seq, shape.hidden)).astype(np.float32)
    return x, np.broadcast_to(np.arange(shape.seq, dtype=np.int32), (shape.batch, shape.seq)).copy()


def qkv_no_rope(mod: NSAAttention, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, s, _ = x.shape
    hd = mod.config.head_dim
    return tuple(proj(jnp.asarray(x)).reshape(b, s, -1, hd) for proj in (mod.q_proj, mod.k_proj, mod.v_proj))


def peer_merged(p, x: torch.Tensor, **kw) -> torch.Tensor:
    """The peer's gated branch mix before `combine_heads` ([b, s, heads * head_dim])."""
    got = {}
    hook = p.combine_heads.register_forward_pre_hook(lambda _m, args: got.setdefault("x", args[0]))
    try:
        p(x, **kw)
    finally:
        hook.remove()
    return got["x"]


def peer_compressed_kv(p, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's compressed keys and values ([b, hkv, w, d], before its memory tokens)."""
    got = {}
    hooks = [
        p.k_compress.register_forward_hook(lambda _m, _a, out: got.setdefault("k", out)),
        p.v_compress.register_forward_hook(lambda _m, _a, out: got.setdefault("v", out)),
    ]
    try:
        p(x)
    finally:
        for hk in hooks:
            hk.remove()
    return got["k"], got["v"]


class _Probe(Exception):
    pass


def peer_selection(p, x: torch.Tensor) -> np.ndarray:
    """The peer's per-query top-n block indices [b, hkv, s, n], read through its `fine_selection_flex_mask` hook
    (called with them before the selected branch runs; the probe stops the forward there)."""
    got = {}

    def probe(indices, num_grouped_queries=1):
        got["idx"] = indices
        raise _Probe

    try:
        p(x, fine_selection_flex_mask=probe, disable_triton_kernel=True)
    except _Probe:
        pass
    return got["idx"].cpu().numpy()


def padded_compress(shape: Shape, x, positions, weights, pos_emb) -> jax.Array:
    """Our `compress` over the sequence left-padded by block - stride zeros: the peer's windows (its first windows
    start before token 0 on zeros); window j ends at token (j + 1) * stride - 1."""
    lead = shape.block - shape.stride
    xp = jnp.pad(x, ((0, 0), (lead, 0), (0, 0), (0, 0)))
    pp = jnp.concatenate([jnp.broadcast_to(jnp.arange(lead), (x.shape[0], lead)), positions + lead], 1)
    return nsa.compress(xp, pp, weights, pos_emb, block=shape.block, stride=shape.stride)[0]


def compressed_peer_rules(shape: Shape, mod: NSAAttention, x, positions) -> jax.Array:
    """The compressed branch with the peer's rules from our pieces: our `compress` on the peer's windows, one zero
    memory token always visible, a block visible when it ends strictly before the query; our `masked_attention`."""
    q, k, v = qkv_no_rope(mod, x)
    kc = padded_compress(shape, k, positions, mod.nsa_cmp_weights_k[...], mod.nsa_cmp_pos_k[...])
    vc = padded_compress(shape, v, positions, mod.nsa_cmp_weights_v[...], mod.nsa_cmp_pos_v[...])
    zero = jnp.zeros_like(kc[:, :1])
    end = (jnp.arange(kc.shape[1]) + 1) * shape.stride - 1
    visible = end[None, None, :] < positions[:, :, None]
    mask = jnp.concatenate([jnp.ones_like(visible[..., :1]), visible], -1)
    o, _ = nsa.masked_attention(q, jnp.concatenate([zero, kc], 1), jnp.concatenate([zero, vc], 1), mask)
    return o.reshape(*o.shape[:2], -1)


def selected_given_blocks(shape: Shape, q, k, v, idx: np.ndarray) -> jax.Array:
    """Our `masked_attention` with the peer's per-query blocks as the mask: query t (in block t // block_sel) sees
    the blocks in idx[t] that lie before its own block, and its own block causally. (The peer also drops a block of
    importance <= 1e-10, which the indices do not tell; on random weights none is that small, else this row shows
    it.)"""
    s, bs = shape.seq, shape.block_sel
    qb = np.arange(s) // bs
    sel = np.zeros((*idx.shape[:3], shape.num_sel_blocks), bool)
    np.put_along_axis(sel, idx, True, axis=-1)
    sel &= np.arange(shape.num_sel_blocks)[None, None, None, :] < qb[None, None, :, None]
    key_mask = np.repeat(sel, bs, axis=-1)[..., :s]  # [b, hkv, s, s]
    own = (qb[:, None] == qb[None, :]) & (np.arange(s)[None, :] <= np.arange(s)[:, None])
    o, _ = nsa.masked_attention(q, k, v, jnp.asarray(key_mask | own[None, None]))
    return o.reshape(*o.shape[:2], -1)


def selection_agreement(shape: Shape, idx: np.ndarray, blocks: np.ndarray) -> dict[str, float]:
    """Over (batch, kv head, query) rows, the peer's selection (its blocks before the query's own block, plus the own
    block) against ours (the query's own selected blocks): `selection_agreement`, the fraction of rows whose sets
    are equal, and `selection_overlap`, the mean share of the peer's blocks that we select too."""
    s, bs, n = shape.seq, shape.block_sel, shape.num_sel_blocks
    qb = np.arange(s) // bs
    theirs = np.zeros((*idx.shape[:3], n), bool)
    np.put_along_axis(theirs, idx, True, axis=-1)
    theirs &= np.arange(n)[None, None, None, :] < qb[None, None, :, None]
    theirs[..., np.arange(s), qb] = True
    ours_blocks = np.moveaxis(blocks, 2, 1)  # [b, hkv, s, top_n]
    mine = (ours_blocks[..., None] == np.arange(n)).any(-2)  # -1 (empty) matches no block
    return {
        "selection_agreement": float((theirs == mine).all(-1).mean()),
        "selection_overlap": float(((theirs & mine).sum(-1) / theirs.sum(-1)).mean()),
    }


def _np(a) -> np.ndarray:
    return np.asarray(a.detach().cpu().float() if isinstance(a, torch.Tensor) else a, np.float64)


def _err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = _np(a), _np(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _qkv_rope(mod: NSAAttention, x, positions):
    return project_qkv(mod.config, mod.q_proj, mod.k_proj, mod.v_proj, jnp.asarray(x), jnp.asarray(positions))


def our_selection(mod: NSAAttention, x, positions) -> jax.Array:
    """Our selection [b, s, hkv, top_n] (each query's blocks, -1 empty) for this layer on x."""
    q, k, v = _qkv_rope(mod, x, positions)
    g = jnp.zeros((*q.shape[:3], 3), q.dtype)
    _, blocks = nsa.nsa_attention(
        q, k, v, g, jnp.asarray(positions),
        cmp_weights_k=mod.nsa_cmp_weights_k[...], cmp_pos_k=mod.nsa_cmp_pos_k[...],
        cmp_weights_v=mod.nsa_cmp_weights_v[...], cmp_pos_v=mod.nsa_cmp_pos_v[...],
        block=mod.block, stride=mod.stride, block_sel=mod.block_sel, top_n=mod.top_n, window=mod.window,
    )  # fmt: skip
    return blocks


def _cotangent(shape: Shape, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 2).standard_normal((shape.batch, shape.seq, width)).astype(np.float32)


def _grads(ours_fn, mod: NSAAttention, peer_fn, p, x: np.ndarray, ct: np.ndarray, device: str, dtype) -> dict:
    """Gradients of sum(out * ct) on both sides: d/dx and d/d(our parameters, the peer's mapped onto ours); a
    parameter whose peer gradient is all zero (a branch gated off) gets no row."""
    gm, gx = nnx.grad(lambda m, x: (ours_fn(m, x) * ct).sum(), argnums=(0, 1))(mod, jnp.asarray(x))
    xt = torch.tensor(x, device=device, dtype=dtype, requires_grad=True)
    (peer_fn(p, xt) * torch.tensor(ct, device=device, dtype=dtype)).sum().backward()
    rows = {"grad_x": _err(gx, xt.grad)}
    g = lambda name: gm[name]["kernel"][...]
    theirs_qkv = p.to_qkv.weight.grad.T
    rows["grad_qkv_proj"] = _err(jnp.concatenate([g("q_proj"), g("k_proj"), g("v_proj")], 1), theirs_qkv)
    gate = p.to_strategy_combine[0].weight.grad
    for row, name, theirs in (("grad_o_proj", "o_proj", p.combine_heads.weight.grad), ("grad_gate", "nsa_gate", gate)):
        if theirs is not None and np.abs(_np(theirs)).max() > 0:
            rows[row] = _err(g(name), theirs.T)
    # the pool's gradients (the peer's per-kv-head position embeddings hold copies of ours: their gradients add up)
    for kv, pool, pos in (("k", p.k_compress, p.k_intrablock_positions), ("v", p.v_compress, p.v_intrablock_positions)):
        if pool.weights.grad is not None and np.abs(_np(pool.weights.grad)).max() > 0:
            rows[f"grad_cmp_weights_{kv}"] = _err(gm[f"nsa_cmp_weights_{kv}"][...], pool.weights.grad)
            rows[f"grad_cmp_pos_{kv}"] = _err(gm[f"nsa_cmp_pos_{kv}"][...], pos.grad.sum(0))
    return rows


def compare(
    shape: Shape, seed: int = 0, *, device: str = "cpu", triton: bool = False, selected_backend: str = "reference"
) -> dict:
    """Every row of the module docstring: relative max errors (max |ours - theirs| / max |theirs|), gradient rows
    (`<row>.grad_*`) for the compressed branch and the combined output; measurements, not checks:
    `selection_agreement`, `compressed_design_gap` / `selected_design_gap` (our branch against theirs, each with
    its own rules) and `window_vs_selected_all` (the two branches differ, so their rows tell them apart). The peer runs
    on the torch `device` (bfloat16 with `triton`: its kernel takes nothing else; float32 otherwise); our layer on
    JAX's default device with its selected branch on `selected_backend` (`NSAConfig.selected_backend`)."""
    if shape.top_n < 2:
        raise ValueError(f"top_n must be >= 2 (the peer selects top_n - 1 blocks beside its own), got {shape.top_n}")
    x, positions = inputs(shape, seed)
    pos = jnp.asarray(positions)
    dtype = torch.bfloat16 if triton else torch.float32
    xt = torch.tensor(x, device=device, dtype=dtype)
    hidden_ct = _cotangent(shape, shape.hidden, seed)
    merged_ct = _cotangent(shape, shape.heads * shape.head_dim, seed)

    def build(mod, s, rope_on):
        return peer(mod, s, rope_on=rope_on, triton=triton).to(device=device, dtype=dtype)

    # compression and the compressed branch, RoPE off on both sides (theirs never rotates it; ours rotates it)
    mod = ours(shape, seed, gates=BRANCHES["compressed"])
    p = build(mod, shape, False)
    ck, cv = peer_compressed_kv(p, xt)
    q, k, v = qkv_no_rope(mod, x)
    cmp_k = padded_compress(shape, k, positions, mod.nsa_cmp_weights_k[...], mod.nsa_cmp_pos_k[...])
    cmp_v = padded_compress(shape, v, positions, mod.nsa_cmp_weights_v[...], mod.nsa_cmp_pos_v[...])
    rows = {"compress_k": _err(cmp_k.transpose(0, 2, 1, 3), ck), "compress_v": _err(cmp_v.transpose(0, 2, 1, 3), cv)}
    theirs = peer_merged(p, xt)
    rows["compressed_peer_rules"] = _err(compressed_peer_rules(shape, mod, x, positions), theirs)
    # a measurement: our own compressed branch (paper windows, inclusive end, no memory token) against theirs
    ours_cmp, _ = nsa.nsa_attention(
        q, k, v, jnp.broadcast_to(jnp.asarray(BRANCHES["compressed"], q.dtype), (*q.shape[:3], 3)), pos,
        cmp_weights_k=mod.nsa_cmp_weights_k[...], cmp_pos_k=mod.nsa_cmp_pos_k[...],
        cmp_weights_v=mod.nsa_cmp_weights_v[...], cmp_pos_v=mod.nsa_cmp_pos_v[...],
        block=shape.block, stride=shape.stride, block_sel=shape.block_sel, top_n=shape.top_n, window=shape.window,
    )  # fmt: skip
    rows["compressed_design_gap"] = _err(ours_cmp.reshape(theirs.shape), theirs)
    grads = _grads(lambda m, x: compressed_peer_rules(shape, m, x, positions), mod, peer_merged, p, x, merged_ct,
                   device, dtype)  # fmt: skip
    rows.update({f"compressed_peer_rules.{k}": e for k, e in grads.items()})

    # the module with RoPE: window, selected with every causal block, combined (compressed gate 0)
    full = dataclasses.replace(shape, top_n=shape.num_sel_blocks)
    outs = {}
    for name in ("window", "selected"):
        mod = ours(full, seed, gates=BRANCHES[name], selected_backend=selected_backend)
        outs[name] = mod(jnp.asarray(x), pos)
        rows["window" if name == "window" else "selected_all"] = _err(outs[name], build(mod, full, True)(xt))
    # the two branches must differ, or the rows above would not tell them apart
    rows["window_vs_selected_all"] = _err(outs["window"], outs["selected"])
    mod = ours(full, seed, gates="no_compressed", selected_backend=selected_backend)
    p = build(mod, full, True)
    rows["combined"] = _err(mod(jnp.asarray(x), pos), p(xt))
    grads = _grads(lambda m, x: m(x, pos), mod, lambda p, x: p(x), p, x, hidden_ct, device, dtype)
    rows.update({f"combined.{k}": e for k, e in grads.items()})

    # top-n below the block count: their selection, and their selected branch given it
    mod = ours(shape, seed, gates=BRANCHES["selected"])
    p = build(mod, shape, True)
    idx = peer_selection(p, xt)
    qr, kr, vr = _qkv_rope(mod, x, positions)
    rows["selected_given_their_blocks"] = _err(selected_given_blocks(shape, qr, kr, vr, idx), peer_merged(p, xt))
    rows.update(selection_agreement(shape, idx, np.asarray(our_selection(mod, x, positions))))
    rows["selected_design_gap"] = _err(mod(jnp.asarray(x), pos), p(xt))  # each side with its own selection
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="torch device of the peer (cpu, cuda)")
    ap.add_argument("--triton", action="store_true", help="the peer's triton selected-blocks kernel (CUDA, bfloat16)")
    ap.add_argument("--selected-backend", default="reference", help="our selected branch (NSAConfig.selected_backend)")
    for f in dataclasses.fields(Shape):
        ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shape = Shape(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Shape)})
    # float32 matmuls in float32 on GPU too (no TF32), so the float32 rows measure the algorithms, not the precision
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = compare(shape, a.seed, device=a.device, triton=a.triton, selected_backend=a.selected_backend)
    import importlib.metadata as md

    record = dict(
        date=datetime.date.today().isoformat(), device=a.device, triton=a.triton, jax_device=str(jax.devices()[0]),
        selected_backend=a.selected_backend, peer_dtype="bfloat16" if a.triton else "float32",
        versions={n: md.version(n) for n in ("jax", "torch", PEER)}, shape=dataclasses.asdict(shape), errors=rows,
    )  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
