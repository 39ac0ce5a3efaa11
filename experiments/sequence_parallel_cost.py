"""Bytes each device receives per attention layer with the sequence sharded: sequence-parallel SRA (window halo +
gathered globals / critical keys) against all-gather context parallelism and ring attention (every device receives
the other N - N/S keys and values), and the key/value memory each device holds.

The formula is checked, byte for byte, against the collectives XLA compiles: `sra_attention_sequence_parallel` and
an all-gather CP layer are lowered on 8 fake CPU devices at small N, and every collective-permute, all-gather and
reduce-scatter of the compiled HLO is counted with its per-device bytes (forward, and forward + backward).

    python experiments/sequence_parallel_cost.py [--out-dir experiments/results] [--doc docs/sequence_parallel.md]

~20 s on a CPU. Writes `sequence_parallel_cost-<date>.json` (+ `.md`) and, with --doc, the table between the
`<!-- cost-table -->` markers of the doc. Fails if a compiled count differs from the formula.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sra_jax.ops import sequence_parallel as sp
from sra_jax.ops.attention import attention

# Per-slot metadata that travels with a key: position (int32), critical flag (bool), segment id (int32).
META_BYTES = 4 + 1 + 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "bool": 1}
MARKERS = ("<!-- cost-table:begin -->", "<!-- cost-table:end -->")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One attention layer's sharding problem. `per_shard` is the static bound of gathered keys per shard."""

    length: int
    shards: int
    window: int
    num_global: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    per_shard: int
    batch: int = 1

    @property
    def chunk(self) -> int:
        return self.length // self.shards

    @property
    def kv_slot(self) -> int:
        """Bytes of one key + value slot."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def halo(self) -> int:
        return min(self.window - 1, (self.shards - 1) * self.chunk)


def sra_bytes(layer: Layer, backward: bool) -> dict:
    """Bytes an interior device receives: the halo (K, V, metadata of window - 1 slots; gradients of K, V back the
    other way) and the gather (S - 1 shards x per_shard slots; their K, V gradients reduce-scattered back)."""
    halo = layer.batch * layer.halo * (layer.kv_slot + META_BYTES)
    gather = layer.batch * (layer.shards - 1) * layer.per_shard * (layer.kv_slot + META_BYTES)
    if backward:
        halo += layer.batch * layer.halo * layer.kv_slot
        gather += layer.batch * (layer.shards - 1) * layer.per_shard * layer.kv_slot
    return {"collective-permute": halo, "all-gather": gather, "total": halo + gather}


def context_parallel_bytes(layer: Layer, backward: bool) -> dict:
    """All-gather CP (and ring attention, which moves the same (S - 1) chunks through S - 1 hops): K, V and
    position / segment ids of every other shard; backward sends the K, V gradients back (reduce-scatter / ring)."""
    others = layer.batch * (layer.shards - 1) * layer.chunk
    forward = others * (layer.kv_slot + META_BYTES - 1)  # no critical flag needed
    total = forward + (others * layer.kv_slot if backward else 0)
    return {"all-gather": total, "total": total}


def kv_memory(layer: Layer) -> dict:
    """Key/value bytes resident per device during one layer's attention (scores are not materialised by a flash
    kernel): SRA keeps chunk + halo + gathered slots; all-gather CP all N; ring its chunk and two rotating buffers."""
    slots = {"sra": layer.chunk + layer.halo + layer.shards * layer.per_shard, "allgather_cp": layer.length,
             "ring": 3 * layer.chunk}
    return {name: layer.batch * count * layer.kv_slot for name, count in slots.items()}


# --------------------------------------------------------------------------------------------------------------
# Counting the collectives of a compiled program.

_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(collective-permute|all-gather|reduce-scatter|all-reduce|all-to-all)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        name = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "pred": "bool"}.get(dtype)
        if name is None:
            raise ValueError(f"unexpected dtype {dtype!r} in a collective's shape {text!r}")
        total += DTYPE_BYTES[name] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo: str, shards: int) -> dict:
    """Bytes an interior device receives, per collective kind, from the compiled HLO text: a collective-permute
    delivers its result; an all-gather (S - 1) / S of its result; a reduce-scatter (S - 1) x its result."""
    counted = {"collective-permute": 0, "all-gather": 0, "reduce-scatter": 0, "all-reduce": 0, "all-to-all": 0}
    ops = {kind: 0 for kind in counted}
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        shape, kind, asynchronous = match.groups()
        if asynchronous:  # an async start's tuple holds (operand, result): keep the result
            shape = _SHAPE.findall(shape)[-1]
            shape = f"{shape[0]}[{shape[1]}]"
        groups = _GROUPS.search(line)
        size = len(groups.group(1).split(",")) if groups else shards
        result = _shape_bytes(shape)
        counted[kind] += {"collective-permute": result, "all-gather": result * (size - 1) // size,
                          "reduce-scatter": result * (size - 1), "all-reduce": 2 * result * (size - 1) // size,
                          "all-to-all": result * (size - 1) // size}[kind]
        ops[kind] += 1
    counted = {kind: value for kind, value in counted.items() if ops[kind]}
    return {"bytes": counted, "ops": {kind: n for kind, n in ops.items() if n}}


def _allgather_cp(q, k, v, positions, segment_ids, *, axis):
    """Dense causal attention of this shard's queries over all-gathered keys (all-gather context parallelism)."""
    keys = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, positions, segment_ids)]
    k_all, v_all, k_pos, k_seg = keys
    mask = ((k_pos[:, None, :] <= positions[:, :, None]) & (k_pos[:, None, :] >= 0)
            & (k_seg[:, None, :] == segment_ids[:, :, None]))
    return attention(q, k_all, v_all, mask=mask)


def measure(layer: Layer, devices) -> dict:
    """Compile SRA and all-gather CP at this size; count their collectives forward and forward + backward."""
    mesh = jax.sharding.Mesh(np.asarray(devices[: layer.shards]), ("sequence",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    b, n, hkv, d = layer.batch, layer.length, layer.kv_heads, layer.head_dim
    dtype = {4: jnp.float32, 2: jnp.bfloat16}[layer.dtype_bytes]
    q = jax.ShapeDtypeStruct((b, n, 2 * hkv, d), dtype)
    kv = jax.ShapeDtypeStruct((b, n, hkv, d), dtype)
    ids = jax.ShapeDtypeStruct((b, n), jnp.int32)
    flags = jax.ShapeDtypeStruct((b, n), jnp.bool_)

    def sra(q, k, v, positions, critical, segment_ids):
        return sp.sra_attention_sequence_parallel(q, k, v, positions, critical, segment_ids, window=layer.window,
                                                  num_global=layer.num_global, mesh=mesh,
                                                  max_gathered=layer.per_shard)

    rows = PartitionSpec(None, "sequence")
    cp_layer = jax.shard_map(partial(_allgather_cp, axis="sequence"), mesh=mesh, in_specs=(rows,) * 5, out_specs=rows)

    def cp(q, k, v, positions, critical, segment_ids):
        return cp_layer(q, k, v, positions, segment_ids)

    out = {}
    for name, fn in (("sra", sra), ("allgather_cp", cp)):
        for backward in (False, True):
            program = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2)) if backward else fn
            compiled = jax.jit(program).lower(q, kv, kv, ids, flags, ids).compile()
            stats = compiled.memory_analysis()
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}"
            out[key] = collective_bytes(compiled.as_text(), layer.shards)
            out[key]["temp_bytes"] = getattr(stats, "temp_size_in_bytes", None)
            out[key]["argument_bytes"] = getattr(stats, "argument_size_in_bytes", None)
    return out


def check(layer: Layer, measured: dict) -> list[str]:
    """Differences between the compiled collectives and the formula (empty when they agree byte for byte)."""
    problems = []
    for backward, suffix in ((False, "fwd"), (True, "fwd_bwd")):
        sra = measured[f"sra_{suffix}"]["bytes"]
        expect = sra_bytes(layer, backward)
        got_halo = sra.get("collective-permute", 0)
        got_gather = sra.get("all-gather", 0) + sra.get("reduce-scatter", 0)
        if (got_halo, got_gather) != (expect["collective-permute"], expect["all-gather"]):
            problems.append(f"SRA {suffix} at {layer}: compiled halo / gather bytes {got_halo} / {got_gather}, "
                            f"formula {expect['collective-permute']} / {expect['all-gather']} ({sra})")
        cp = measured[f"allgather_cp_{suffix}"]["bytes"]
        got_cp = sum(cp.values())
        if got_cp != context_parallel_bytes(layer, backward)["total"]:
            problems.append(f"all-gather CP {suffix} at {layer}: compiled {got_cp} bytes, formula "
                            f"{context_parallel_bytes(layer, backward)['total']} ({cp})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The table at long context.

SMALL = [  # window longer than a chunk (two-shard halo) and shorter; float32 so no dtype games in XLA
    Layer(length=512, shards=8, window=80, num_global=2, kv_heads=2, head_dim=16, dtype_bytes=4, per_shard=8),
    Layer(length=1024, shards=4, window=33, num_global=2, kv_heads=2, head_dim=16, dtype_bytes=4, per_shard=30),
]
LENGTHS = [128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
SHARDS = [8, 64]
ALPHA, WINDOW, NUM_GLOBAL = 0.1, 1024, 4
LLAMA_8B = {"kv_heads": 8, "head_dim": 128, "dtype_bytes": 2}  # bf16 K/V of one Llama 3 8B layer


def long_context_rows() -> list[dict]:
    rows = []
    for shards in SHARDS:
        for length in LENGTHS:
            chunk = length // shards
            balanced = math.ceil(ALPHA * chunk) + NUM_GLOBAL  # a per-shard quota of alpha * chunk critical keys
            exact = min(chunk, math.ceil(ALPHA * length) + NUM_GLOBAL)  # any global top-k fits
            base = dict(length=length, shards=shards, window=WINDOW, num_global=NUM_GLOBAL, **LLAMA_8B)
            sra, sra_exact = Layer(**base, per_shard=balanced), Layer(**base, per_shard=exact)
            cp = context_parallel_bytes(sra, backward=False)["total"]
            row = {
                "length": length, "shards": shards, "chunk": chunk, "per_shard_balanced": balanced,
                "per_shard_exact": exact, "sra_halo_bytes": sra_bytes(sra, False)["collective-permute"],
                "sra_gather_bytes": sra_bytes(sra, False)["all-gather"],
                "sra_fwd_bytes": sra_bytes(sra, False)["total"],
                "sra_fwd_bwd_bytes": sra_bytes(sra, True)["total"],
                "sra_exact_fwd_bytes": sra_bytes(sra_exact, False)["total"], "cp_fwd_bytes": cp,
                "cp_fwd_bwd_bytes": context_parallel_bytes(sra, backward=True)["total"],
                "kv_memory": kv_memory(sra), "kv_memory_exact_sra": kv_memory(sra_exact)["sra"],
            }
            row["cp_over_sra_fwd"] = cp / row["sra_fwd_bytes"]
            rows.append(row)
    return rows


def markdown(rows: list[dict], checks: list[dict]) -> str:
    mib = 1024 * 1024
    lines = [
        (f"Per layer, per device, forward (backward roughly doubles both: the K/V gradients go back the same way). "
         f"Llama 3 8B attention (8 kv heads x 128, bf16), batch 1, window {WINDOW}, {NUM_GLOBAL} globals, "
         f"alpha = {ALPHA}. SRA with a per-shard quota of ceil(alpha x chunk) + {NUM_GLOBAL} gathered keys; "
         "'SRA, any top-k' bounds each shard by min(chunk, alpha N + globals), exact for a global top-k."),
        "",
        ("| N | shards | SRA halo MiB | SRA gather MiB | SRA MiB | SRA, any top-k MiB | ring / all-gather CP MiB | "
         "CP / SRA | K/V per device MiB: SRA / ring / all-gather CP |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = row["kv_memory"]
        lines.append(
            f"| {row['length'] // 1024}k | {row['shards']} | {row['sra_halo_bytes'] / mib:.1f} | "
            f"{row['sra_gather_bytes'] / mib:.1f} | {row['sra_fwd_bytes'] / mib:.1f} | "
            f"{row['sra_exact_fwd_bytes'] / mib:.1f} | {row['cp_fwd_bytes'] / mib:.1f} | "
            f"{row['cp_over_sra_fwd']:.1f}x | {memory['sra'] / mib:.0f} / {memory['ring'] / mib:.0f} / "
            f"{memory['allgather_cp'] / mib:.0f} |")
    lines += ["", "Checked against the compiled HLO on 8 fake CPU devices (bytes an interior device receives):", "",
              ("| N | shards | window | per shard | SRA fwd: HLO = formula | SRA fwd+bwd | all-gather CP fwd | "
               "all-gather CP fwd+bwd | compiled temp per device, fwd+bwd: SRA / CP |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for item in checks:
        layer, measured = item["layer"], item["measured"]
        cells = [sum(measured[key]["bytes"].values()) for key in ("sra_fwd", "sra_fwd_bwd", "allgather_cp_fwd",
                                                                  "allgather_cp_fwd_bwd")]
        temp = [measured[key]["temp_bytes"] for key in ("sra_fwd_bwd", "allgather_cp_fwd_bwd")]
        lines.append(f"| {layer['length']} | {layer['shards']} | {layer['window']} | {layer['per_shard']} | "
                     + " | ".join(f"{cell} B" for cell in cells) + f" | {temp[0]} B / {temp[1]} B |")
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    begin, end = MARKERS
    if begin not in text or end not in text:
        raise ValueError(f"{doc} has no {begin} ... {end} section to write the table into")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{table}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args(argv)
    devices = jax.devices("cpu")
    if len(devices) < 8:
        raise SystemExit(f"needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {devices}")
    checks, problems = [], []
    for layer in SMALL:
        measured = measure(layer, devices)
        problems += check(layer, measured)
        checks.append({"layer": dataclasses.asdict(layer), "measured": measured,
                       "formula": {"sra_fwd": sra_bytes(layer, False), "sra_fwd_bwd": sra_bytes(layer, True),
                                   "allgather_cp_fwd": context_parallel_bytes(layer, False),
                                   "allgather_cp_fwd_bwd": context_parallel_bytes(layer, True)}})
    rows = long_context_rows()
    table = markdown(rows, checks)
    date = datetime.date.today().isoformat()
    record = {"device": "cpu (8 fake devices) for the HLO counts; the table is the formula", "date": date,
              "versions": {"jax": jax.__version__}, "alpha": ALPHA, "window": WINDOW, "num_global": NUM_GLOBAL,
              "model": LLAMA_8B, "rows": rows, "hlo_checks": checks, "problems": problems}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"sequence_parallel_cost-{date}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".md").write_text(table)
    if args.doc is not None:
        write_doc(args.doc, table)
    print(table)
    print(f"wrote {path}")
    for problem in problems:
        print("MISMATCH:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
