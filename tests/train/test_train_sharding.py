"""Meshes of 8 fake CPU devices train like 1 device, and parameters are sharded as the rules say.

The device count must be set before jax starts, so the multi-device runs happen in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sra_jax.train import sharding

WORKER = Path(__file__).with_name("_mesh_worker.py")
MESHES = ["8,1,1", "1,8,1", "2,2,2", "1,4,2"]


def run_worker(*args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=WORKER.parents[2])
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_logical_rules_shard_fsdp_and_tensor_axes_and_replicate_what_does_not_divide():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 128), mesh) == P(None, None)  # axes of size 1
    fake = jax.sharding.AbstractMesh((2, 4, 2, 1), sharding.MESH_AXES)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 128), fake) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (99, 64), fake) == P(None, "fsdp")  # 99 % 2 != 0
    assert sharding.logical_to_mesh_spec(("norm",), (64,), fake) == P(None)
    assert sharding.logical_to_mesh_spec(None, (3,), fake) == P()
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_mesh_spec(("experts",), (4,), fake)


def test_activations_split_by_batch_and_by_position_over_the_sequence_axis():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    assert mesh.axis_names == sharding.MESH_AXES and mesh.shape["sequence"] == 1
    assert sharding.batch_sharding(mesh, 3, leading=1).spec == P(None, ("data", "fsdp"), None)  # sequence size 1
    fake = jax.sharding.AbstractMesh((2, 1, 1, 4), sharding.MESH_AXES)
    assert sharding.batch_sharding(fake, 3, leading=1).spec == P(None, ("data", "fsdp"), "sequence")
    assert sharding.batch_sharding(fake, 2).spec == P(("data", "fsdp"), "sequence")
    assert sharding.batch_sharding(fake, 2, sequence=False).spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="3 or 4 entries"):
        sharding.make_mesh((1, 1), jax.devices()[:1])


def _spec(specs: dict[str, str], *words: str) -> str:
    return next(v for k, v in specs.items() if all(w in k for w in words))


def test_meshes_give_the_same_losses_as_one_device_and_shard_params_by_the_rules():
    results = run_worker("dense", *MESHES)
    reference = results["1,1,1"]["losses"]
    for mesh in MESHES:
        # f32 sums reduced in a different order per mesh drift by a few ulps per step; 5 AdamW steps stay < 1e-5.
        assert results[mesh]["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-6), mesh
    specs = results["2,2,2"]["specs"]
    assert _spec(specs, "q_proj", "kernel") == str(P("fsdp", "tensor"))
    assert _spec(specs, "down_proj", "kernel") == str(P("tensor", "fsdp"))
    assert _spec(specs, "embed", "embedding") == str(P("tensor", "fsdp"))
    assert _spec(specs, "input_norm") == str(P(None))
    assert _spec(results["1,8,1"]["specs"], "q_proj", "kernel") == str(P("fsdp", None))
    assert _spec(results["8,1,1"]["specs"], "q_proj", "kernel") == str(P(None, None))  # pure data parallel
    # AdamW moments follow their parameters' shardings.
    assert any("q_proj" in k and v == str(P("fsdp", "tensor")) for k, v in results["2,2,2"]["opt_specs"].items())


def test_sra_with_router_rl_on_a_2x2x2_mesh_matches_one_device():
    """SRA + CE + router policy gradient (Gumbel selections drawn from sharded keys) on all three axes at once."""
    results = run_worker("sra", "2,2,2")
    assert results["2,2,2"]["losses"] == pytest.approx(results["1,1,1"]["losses"], rel=1e-5, abs=1e-6)
    # Router axes ("embed", "router_hidden"): embed follows FSDP, router_hidden is replicated.
    router = {k: v for k, v in results["2,2,2"]["specs"].items() if "router" in k}
    assert router and set(router.values()) <= {str(P("fsdp", None)), str(P(None, None)), str(P(None))}
    assert str(P("fsdp", None)) in router.values()
