"""Shared test settings: hypothesis profiles sized for a 2-core CPU machine, the real-data location, a check that
every Triton module lowered in a test verifies, and JAX's in-memory caches released after each test file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# JAX compiles per shape, so each example costs a compile: few examples, no deadline.
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`$SRA_JAX_DATA`, else `../shared/data` beside the checkout (where CI puts it)."""
    return Path(os.environ.get("SRA_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "gsm8k" / "test.jsonl").exists():
        raise FileNotFoundError(f"real data not found at {path}; set SRA_JAX_DATA to the shared/data folder")
    return path


@pytest.fixture(scope="session", autouse=True)
def verify_triton_modules():
    """Verify every Triton module that Pallas lowers (tests lower the GPU kernels for `cuda` on CPU). Pallas does
    not verify them itself; an invalid op (say a masked atomic whose mask shape differs from its value's) then
    only fails inside XLA's Triton compiler on a GPU. This catches it on the CPU."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError naming the op and the source line
        return result

    registration.lowering.lower_jaxpr_to_triton_module = lower_and_verify
    yield
    registration.lowering.lower_jaxpr_to_triton_module = lower


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drop JAX's in-memory caches (traces, lowerings, compiled executables) after each test file. A pytest-xdist
    worker runs many files in one process; left to accumulate, thousands of CPU executables have ended in
    segmentation faults inside XLA's compiler late in a run (never in a fresh process). Files share few programs,
    so little is compiled twice."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
