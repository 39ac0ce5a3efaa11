"""With a mesh, `load_hf` places every parameter sharded and each device's slice is read on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from hf_models import write_random_checkpoint

from sra_jax.config import LlamaConfig

# Runs in a fresh process: the fake CPU device count must be set before jax starts.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from sra_jax.convert import load_hf, params
    requested = []
    place = params.place
    def recording_place(source, dtype, sharding):
        if sharding is not None and source.flags.c_contiguous:  # a transposed view is placed through its .T
            full = source
            source = type("Spy", (), {
                "shape": full.shape, "ndim": full.ndim, "flags": full.flags,
                "__getitem__": lambda self, index: requested.append((full.ndim, full[index].size / full.size)) or full[index],
            })()
        return place(source, dtype, sharding)
    params.place = recording_place
    mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"))
    _, sharded = load_hf(sys.argv[1], mesh=mesh)
    params.place = place
    _, plain = load_hf(sys.argv[1])
    expected = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    specs = {}
    for path, variable in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = variable.get_value()
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path].get_value()))
        specs[".".join(map(str, path))] = [str(a) for a in value.sharding.spec]
    print(json.dumps({"specs": specs, "largest_read": max(f for ndim, f in requested if ndim == 2)}))
    """
)


def test_load_hf_with_a_mesh_shards_parameters_and_reads_only_slices(tmp_path):
    config = LlamaConfig.tiny(vocab_size=64, num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    src = write_random_checkpoint(tmp_path / "hf", config)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    specs = result["specs"]
    assert specs["layers.0.attn.q_proj.kernel"] == ["fsdp", "tensor"]
    assert specs["layers.0.mlp.down_proj.kernel"] == ["tensor", "fsdp"]
    assert specs["embed.embedding"] == ["tensor", "fsdp"]
    # Every device of the 2 x 2 mesh holds a quarter of a matrix; no callback reads a whole tensor of one.
    assert result["largest_read"] <= 0.5
