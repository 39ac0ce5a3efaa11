"""Our NSA against native-sparse-attention-pytorch (`SparseAttention`, its CPU reference path) on the same weights,
float32: compression, the compressed branch under the peer's rules, the window branch, the selected branch (every
block selected, and the peer's own per-query blocks), the gated mix, and gradients (x, projections, gate, pool).
The comparison itself is `experiments/nsa_peer.py` (its GPU run uses the peer's triton kernel); see docs/nn.md,
"NSA against native-sparse-attention-pytorch", for the differences no setting removes.

The peer is a test dependency (the `dev` extra): a missing install fails here at import, it is never skipped."""

from __future__ import annotations

import importlib.util
import json
import sys

import native_sparse_attention_pytorch  # noqa: F401  (the peer must be installed: fail, never skip)
import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("nsa_peer", REPO_ROOT / "experiments" / "nsa_peer.py")
nsa_peer = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = nsa_peer  # dataclasses look their module up there
spec.loader.exec_module(nsa_peer)

# float32 on both sides, sums in different orders over <= 64 keys and features: observed <= 1e-6 relative
TOL = 1e-5
ROWS = [
    "compress_k", "compress_v", "compressed_peer_rules",
    "compressed_peer_rules.grad_x", "compressed_peer_rules.grad_qkv_proj",
    "compressed_peer_rules.grad_cmp_weights_k", "compressed_peer_rules.grad_cmp_weights_v",
    "compressed_peer_rules.grad_cmp_pos_k", "compressed_peer_rules.grad_cmp_pos_v",
    "window", "selected_all", "combined",
    "combined.grad_x", "combined.grad_qkv_proj", "combined.grad_o_proj", "combined.grad_gate",
    "selected_given_their_blocks",
]  # fmt: skip
# a length no block divides, overlapping compression windows (block 16, stride 8: the peer's first window is half
# zeros), 4 selection blocks of 16 with top-3 (the peer: top-2 beside its own block), GQA 4/2, two rows
ARGS = dict(seq=60, block=16, stride=8, block_sel=16, top_n=3, window=9, heads=4, kv_heads=2, batch=2)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("nsa_peer") / "peer.json"
    argv = ["nsa_peer.py", "--device", "cpu", "--out", str(out)]
    for k, v in ARGS.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    saved, sys.argv = sys.argv, argv
    try:
        nsa_peer.main()
    finally:
        sys.argv = saved
    return json.loads(out.read_text())


@pytest.mark.parametrize("row", ROWS)
def test_matches_peer(record, row):
    assert record["errors"][row] < TOL, (row, record["errors"][row])


def test_rows_tell_branches_apart(record):
    # the window and every-block selected branches differ on these inputs, so the rows above check each of them
    assert record["errors"]["window_vs_selected_all"] > 0.1
    assert record["versions"]["native-sparse-attention-pytorch"] == "0.2.3"
    # both select per query token; the importances differ (docs/nn.md): measured 0.87 equal sets, 0.96 overlap
    assert record["errors"]["selection_agreement"] > 0.8 and record["errors"]["selection_overlap"] > 0.9


def test_top_n_below_two_is_refused():
    with pytest.raises(ValueError, match="top_n"):
        nsa_peer.compare(nsa_peer.Shape(top_n=1))
