"""NSA's selected-blocks branch, ours against PyTorch FlexAttention with the identical mask: forward and
forward + backward time, and the difference of the outputs.

The selection is `nsa_dsa_bench.nsa_selection` (per token and kv head: the first and own block and random causal
blocks up to `--top-n` blocks of `--block` keys; random importance, so neighbouring tokens share few blocks: the hard
case for any kernel that tiles queries). Ours: `ops.nsa.nsa_selected(impl="pallas")`, each token's own key list
(the top-k gather kernel). FlexAttention: `mask_mod(b, h, q, kv) = kv <= q and table[h // group, q, kv // block]`
(the same token-level mask), with a `BlockMask` built from the selection (each 128-query tile visits the union of
the 128-key tiles its tokens selected; every visited tile goes through `mask_mod`), `enable_gqa=True`, compiled with
`torch.compile`. Inputs are the same bfloat16 arrays on both sides. Both frameworks share the GPU (JAX does not
preallocate here).

    python experiments/nsa_flex_peer.py --seq 32768 --heads 16 --kv-heads 1 --out nsa-flex.json      # GPU, ~2 min
    python experiments/nsa_flex_peer.py --seq 256 --heads 4 --kv-heads 2 --block 16 --top-n 4 --reps 1 \\
        --out /tmp/nsa-flex.json                                                   # CPU check (eager FlexAttention)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs on the same GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nsa_dsa_bench as bench  # noqa: E402

TILE = 128  # FlexAttention's default block size, both axes


def selection_table(blocks: np.ndarray, num_blocks: int) -> np.ndarray:
    """[hkv, s, nb] bool: token t of kv head h selected key block j (from `blocks` [1, s, hkv, n], -1 = empty)."""
    _, s, hkv, n = blocks.shape
    table = np.zeros((hkv, s, num_blocks + 1), bool)  # a spare column takes the empty slots
    h = np.broadcast_to(np.arange(hkv)[None, :, None], (s, hkv, n))
    t = np.broadcast_to(np.arange(s)[:, None, None], (s, hkv, n))
    table[h, t, np.where(blocks[0] >= 0, blocks[0], num_blocks)] = True
    return table[..., :num_blocks]


def tile_lists(table: np.ndarray, block: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(kv_num_blocks [1, H, nq], kv_indices [1, H, nq, nk]) of the 128-tiles each query tile visits (H = 1 when
    one kv head serves every query head, else the query heads, each with its kv head's tiles)."""
    hkv, s, nb = table.shape
    if TILE % block or s % TILE:
        raise ValueError(f"--block {block} must divide {TILE} and {TILE} must divide --seq {s}")
    per_tile = TILE // block
    n_tiles = s // TILE
    token_tiles = table.reshape(hkv, s, n_tiles, per_tile).any(-1)  # [hkv, s, n_tiles]
    visited = token_tiles.reshape(hkv, n_tiles, TILE, n_tiles).any(2)  # [hkv, q tile, k tile]
    if hkv > 1:
        visited = np.repeat(visited, heads // hkv, axis=0)
    counts = visited.sum(-1).astype(np.int32)
    order = np.argsort(~visited, axis=-1, kind="stable").astype(np.int32)  # visited tiles first, ascending
    return counts[None], order[None]


def flex_rows(q, k, v, blocks, *, block: int, reps: int, compile_: bool) -> tuple[list[dict], np.ndarray]:
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, s, hq, _ = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nb = -(-s // block)
    table = selection_table(np.asarray(blocks), nb)
    counts, order = tile_lists(table, block, hq)
    t_table = torch.from_numpy(table).to(device)
    density = float(counts.sum() / (counts.shape[1] * (s // TILE) * (s // TILE + 1) / 2))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & t_table[h // group, q_idx, kv_idx // block]

    mask = BlockMask.from_kv_blocks(torch.from_numpy(counts).to(device), torch.from_numpy(order).to(device),
                                    BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(s, s))
    to_t = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device, torch.bfloat16).transpose(1, 2)
    tq, tk, tv = (to_t(x).contiguous() for x in (q, k, v))
    attend = torch.compile(flex_attention) if compile_ else flex_attention
    fwd = lambda: attend(tq, tk, tv, block_mask=mask, enable_gqa=True)

    grads = [x.detach().requires_grad_(True) for x in (tq, tk, tv)]

    def fwdbwd():
        out = attend(*grads, block_mask=mask, enable_gqa=True)
        out.float().sum().backward()
        return grads[0].grad

    def timed(fn) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    with torch.no_grad():
        out = fwd().transpose(1, 2).float().cpu().numpy()
    row = {"op": "nsa_selected", "impl": "flex_attention" + ("" if compile_ else "_eager"), "torch": torch.__version__,
           "tile": TILE, "tile_density": density, "ms_fwd": timed(lambda: fwd()),
           "ms_fwdbwd": timed(fwdbwd) if device == "cuda" else None}  # FlexAttention has no CPU backward
    return [row], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=32, help="our kernel's key block (the fastest of nsa_dsa_bench)")
    ap.add_argument("--backend", default="auto", help="our kernel's backend (auto, triton, reference)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="eager FlexAttention (CPU check)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.heads % a.kv_heads:
        raise ValueError(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    s = a.seq
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, s, a.heads, a.head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, s, a.kv_heads, a.head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, s, a.kv_heads, a.head_dim), jnp.bfloat16)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    blocks = bench.nsa_selection(ks[3], s, a.block, a.top_n, a.kv_heads)
    ours = functools.partial(bench._nsa_kernel, blocks=blocks, pos=pos, block=a.block, backend=a.backend,
                             block_k=a.block_k)
    fwd, fb = bench._fb(ours)
    base = dict(seq_len=s, batch=1, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype="bfloat16",
                block=a.block, top_n=a.top_n)
    rows = [{"op": "nsa_selected", "impl": f"sra_jax topk:{a.backend}", "block_k": a.block_k,
             "ms_fwd": bench._time(fwd, q, k, v, reps=a.reps), "ms_fwdbwd": bench._time(fb, q, k, v, reps=a.reps)}]
    peer, peer_out = flex_rows(q, k, v, blocks, block=a.block, reps=a.reps, compile_=not a.no_compile)
    ours_out = np.asarray(fwd(q, k, v).astype(jnp.float32))
    peer[0]["rel_err_vs_ours"] = float(np.linalg.norm(peer_out - ours_out) / np.linalg.norm(ours_out))
    rows += peer
    rows = [{**base, **r} for r in rows]
    for r in rows:
        print(json.dumps(r), flush=True)
    record = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
              "versions": {"jax": jax.__version__}, "rows": rows,
              "ratio_flex_over_ours": {m: rows[1][m] / rows[0][m] for m in ("ms_fwd", "ms_fwdbwd") if rows[1][m]}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
