"""The FlexAttention peer of NSA's selected branch runs at a tiny size on CPU (eager FlexAttention, forward only) and
computes what our kernel computes: the mask_mod and the tile lists express the same per-token selection."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_flex_attention_with_our_selection_gives_our_output(tmp_path):
    out = tmp_path / "flex.json"
    # 4 query tiles of 128, blocks of 16, top-2 (the first and the own block): each tile visits tile 0 and its own
    # tile only, so the block mask skips tiles (density 7/10) and a missing tile would change the output.
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "nsa_flex_peer.py"), "--seq", "512", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "32", "--block", "16", "--top-n", "2", "--block-k", "16", "--reps", "1",
           "--no-compile", "--backend", "reference", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"})
    ours, flex = json.loads(out.read_text())["rows"]
    assert ours["ms_fwd"] > 0 and flex["ms_fwd"] > 0
    assert flex["tile_density"] == 0.7
    # bfloat16 inputs on both sides, float32 accumulation on ours, FlexAttention's own on CPU: a wrong mask gives O(1)
    assert flex["rel_err_vs_ours"] < 1e-2, flex
