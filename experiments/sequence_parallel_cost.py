"""Bytes each device receives per attention layer with the sequence sharded, counted from the compiled HLO on 8
fake CPU devices: sequence-parallel SRA (window halo + the compact gather of critical / global keys), the previous
gather it replaces (each shard all-gathering min(chunk, K) compacted slots, exact for a global top-k), and
all-gather context parallelism (the dense layers' path, `dense_attention_sequence_parallel`; ring attention moves
the same (S - 1) chunks through S - 1 hops), forward and forward + backward, plus the compiled memory per device.

Every collective-permute, all-gather, reduce-scatter and all-reduce of the compiled programs is counted with the
bytes an interior device receives (`collective_bytes`), at N = 128k..1M (window 1024, alpha = 0.1, S = 8, Llama 3
8B attention: 32 query / 8 kv heads x 128) and at two small layers, and compared byte for byte with the formula
(`sra_bytes`, `old_gather_bytes`, `context_parallel_bytes`); the formula then gives S = 64 and bf16. K/V are
float32 in the compiled programs: XLA's CPU backend converts bf16 collectives to float32, so bf16 would be counted
twice over. Also measured: a psum of the compact buffer against a psum_scatter + all_gather of it.

    python experiments/sequence_parallel_cost.py [--out-dir benchmarks/results] [--doc docs/sequence_parallel.md]

~1-2 min on a CPU (compilation only, nothing runs). Writes `sequence_parallel_cost-<date>.json` (+ `.md`) and,
with --doc, the table between the `<!-- cost-table -->` markers of the doc. Fails if a compiled count differs
from the formula.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import dataclasses
import datetime
import json
import math
import platform
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

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "bool": 1}
MARKERS = ("<!-- cost-table:begin -->", "<!-- cost-table:end -->")
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Layer:
    """One attention layer's sharding problem. `max_gathered`: the static bound on a row's gathered keys (K)."""

    length: int
    shards: int
    window: int
    num_global: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_gathered: int
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

    @property
    def ahead(self) -> int:
        """Positions after the chunk each shard reads (is a key seen from beyond the window?)."""
        return min(self.window, (self.shards - 1) * self.chunk)

    @property
    def compact(self) -> bool:
        """The compact buffer (psum), else every slot is all-gathered (it moves fewer bytes then)."""
        return 2 * self.max_gathered < self.length

    @property
    def old_per_shard(self) -> int:
        """The previous gather's exact per-shard bound for a global top-k: min(chunk, K)."""
        return min(self.chunk, self.max_gathered)


def _reduced(result: int, shards: int) -> int:
    """Bytes a ring all-reduce delivers to each device: 2 (S - 1) / S of its result (reduce-scatter + all-gather)."""
    return 2 * result * (shards - 1) // shards


def sra_bytes(layer: Layer, backward: bool) -> dict:
    """Bytes an interior device receives, per collective kind. Halo: K, V, position, critical flag, segment id of
    window - 1 slots (their K, V gradients come back the other way) and the positions of the `window` slots after
    the chunk. Gather: the S per-shard counts (int32); then either the compact buffer, a psum of K, V
    [max_gathered] and of (position, flag, segment) int32, whose K, V cotangents are psum'd back, or with
    2 K >= N an all-gather of every slot (K, V gradients reduce-scattered back)."""
    b, s = layer.batch, layer.shards
    out = {"collective-permute": b * layer.halo * (layer.kv_slot + 9) + b * layer.ahead * 4,
           "all-gather": b * (s - 1) * 4}
    if backward:
        out["collective-permute"] += b * layer.halo * layer.kv_slot
    if layer.compact:
        kv, meta = b * layer.max_gathered * layer.kv_slot, b * layer.max_gathered * 12
        out["all-reduce"] = _reduced(kv, s) * (2 if backward else 1) + _reduced(meta, s)
    else:
        out["all-gather"] += b * (s - 1) * layer.chunk * (layer.kv_slot + 12)
        if backward:
            out["reduce-scatter"] = b * (s - 1) * layer.chunk * layer.kv_slot
    out["total"] = sum(out.values())
    return out


def old_gather_bytes(layer: Layer, backward: bool) -> dict:
    """The previous gather: every shard compacts min(chunk, K) slots (K, V, position, flag, segment id) and they
    are all-gathered; backward reduce-scatters their K, V gradients. The halo is as in `sra_bytes`."""
    moved = layer.batch * (layer.shards - 1) * layer.old_per_shard
    out = {"all-gather": moved * (layer.kv_slot + 9)}
    if backward:
        out["reduce-scatter"] = moved * layer.kv_slot
    out["total"] = sum(out.values())
    return out


def old_layer_bytes(layer: Layer, backward: bool) -> int:
    """The previous layer: its gather plus the same halo as `sra_bytes` without the positions look-ahead."""
    halo = sra_bytes(layer, backward)["collective-permute"] - layer.batch * layer.ahead * 4
    return old_gather_bytes(layer, backward)["total"] + halo


def context_parallel_bytes(layer: Layer, backward: bool) -> dict:
    """All-gather CP (and ring attention, which moves the same (S - 1) chunks through S - 1 hops): K, V, position
    and segment id of every other shard; backward sends the K, V gradients back (reduce-scatter / ring)."""
    others = layer.batch * (layer.shards - 1) * layer.chunk
    out = {"all-gather": others * (layer.kv_slot + 8)}
    if backward:
        out["reduce-scatter"] = others * layer.kv_slot
    out["total"] = sum(out.values())
    return out


def kv_memory(layer: Layer) -> dict:
    """Key/value bytes resident per device during one layer's attention (scores not counted: a flash kernel does
    not materialise them): SRA its chunk, halo and K gathered slots; the old gather S x min(chunk, K) gathered
    slots; all-gather CP all N; ring its chunk and two rotating buffers."""
    near = layer.chunk + layer.halo
    slots = {"sra": near + layer.max_gathered if layer.compact else near + layer.length,
             "old_gather": near + layer.shards * layer.old_per_shard, "allgather_cp": layer.length,
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
    delivers its result; an all-gather (S - 1) / S of its result; a reduce-scatter (S - 1) x its result; an
    all-reduce 2 (S - 1) / S of its result (a ring's reduce-scatter + all-gather)."""
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
                          "reduce-scatter": result * (size - 1), "all-reduce": _reduced(result, size),
                          "all-to-all": result * (size - 1) // size}[kind]
        ops[kind] += 1
    counted = {kind: value for kind, value in counted.items() if ops[kind]}
    return {"bytes": counted, "ops": {kind: n for kind, n in ops.items() if n}}


def _old_gather(k, v, positions, critical, segment_ids, *, num_global, per_shard, axis):
    """The previous gather (peer for the comparison, not a library path): this shard's first `per_shard` critical or
    global keys compacted and all-gathered; the output sums the gathered K * V so the backward sends their
    gradients home."""
    wanted = (positions >= 0) & (critical | (positions < num_global))
    slots = jax.vmap(lambda row: jnp.nonzero(row, size=per_shard, fill_value=0)[0])(wanted)
    used = jnp.take_along_axis(wanted, slots, axis=1)
    taken = [jax.vmap(lambda x, idx: x[idx])(x, slots) for x in (k, v, positions, critical, segment_ids)]
    taken[2] = jnp.where(used, taken[2], -1)
    k_all, v_all, pos_all, crit_all, seg_all = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in taken)
    keep = (pos_all >= 0) & (crit_all | (seg_all >= 0))
    return jnp.sum(jnp.where(keep[..., None, None], k_all * v_all, 0.0), axis=(1, 2, 3))[:, None]


def _compiled(program, *args) -> dict:
    compiled = jax.jit(program).lower(*args).compile()
    stats = compiled.memory_analysis()
    out = collective_bytes(compiled.as_text(), 8)
    out["temp_bytes"] = getattr(stats, "temp_size_in_bytes", None)
    out["argument_bytes"] = getattr(stats, "argument_size_in_bytes", None)
    return out


def _loss_grad(fn, inexact: int):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), tuple(range(inexact)))


def measure(layer: Layer, devices, q_heads: int) -> dict:
    """Compile SRA, the old gather and all-gather CP at this size; count their collectives, forward and forward +
    backward, and the compiled memory per device."""
    mesh = jax.sharding.Mesh(np.asarray(devices[: layer.shards]), ("sequence",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    b, n, hkv, d = layer.batch, layer.length, layer.kv_heads, layer.head_dim
    dtype = {4: jnp.float32, 2: jnp.bfloat16}[layer.dtype_bytes]
    q = jax.ShapeDtypeStruct((b, n, q_heads, d), dtype)
    kv = jax.ShapeDtypeStruct((b, n, hkv, d), dtype)
    ids = jax.ShapeDtypeStruct((b, n), jnp.int32)
    flags = jax.ShapeDtypeStruct((b, n), jnp.bool_)

    def sra(q, k, v, positions, critical, segment_ids):
        return sp.sra_attention_sequence_parallel(q, k, v, positions, critical, segment_ids, window=layer.window,
                                                  num_global=layer.num_global, mesh=mesh,
                                                  max_gathered=layer.max_gathered)

    def cp(q, k, v, positions, critical, segment_ids):
        return sp.dense_attention_sequence_parallel(q, k, v, positions, segment_ids, mesh=mesh)

    rows = PartitionSpec(None, "sequence")
    old_layer = jax.shard_map(partial(_old_gather, num_global=layer.num_global, per_shard=layer.old_per_shard,
                                      axis="sequence"), mesh=mesh, in_specs=(rows,) * 5, out_specs=rows)

    def old(k, v, positions, critical, segment_ids):
        return old_layer(k, v, positions, critical, segment_ids)

    out = {}
    for name, fn, args in (("sra", sra, (q, kv, kv, ids, flags, ids)), ("allgather_cp", cp, (q, kv, kv, ids, flags,
                                                                                               ids)),
                           ("old_gather", old, (kv, kv, ids, flags, ids))):
        out[f"{name}_fwd"] = _compiled(fn, *args)
        out[f"{name}_fwd_bwd"] = _compiled(_loss_grad(fn, 2 if name == "old_gather" else 3), *args)
    return out


def measure_assembly(devices, slots: int, kv_heads: int, head_dim: int) -> dict:
    """The compact buffer's two possible assemblies on 8 devices, forward + backward: a psum, and a psum_scatter
    (tiled) then all_gather; compiled and counted like the layers."""
    mesh = jax.sharding.Mesh(np.asarray(devices[:8]), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = PartitionSpec("sequence")

    def psum(x):
        return jax.lax.psum(x, "sequence")

    def scatter_gather(x):
        return jax.lax.all_gather(jax.lax.psum_scatter(x, "sequence", scatter_dimension=1, tiled=True), "sequence",
                                  axis=1, tiled=True)

    def loss(body, x):  # each shard weighs the assembled buffer differently: the backward must sum cotangents
        weight = (jax.lax.axis_index("sequence") + 1).astype(x.dtype)
        return jnp.sum(jnp.sin(body(x[0])) * weight, keepdims=True)

    out = {}
    buffer = jax.ShapeDtypeStruct((8, 1, slots, kv_heads, head_dim), jnp.float32)  # one buffer per shard
    for name, body in (("psum", psum), ("psum_scatter_all_gather", scatter_gather)):
        mapped = jax.shard_map(partial(loss, body), mesh=mesh, in_specs=spec, out_specs=spec)
        out[f"{name}_fwd"] = _compiled(mapped, buffer)
        out[f"{name}_fwd_bwd"] = _compiled(jax.grad(lambda x, mapped=mapped: jnp.sum(mapped(x))), buffer)
    return out


def check(layer: Layer, measured: dict) -> list[str]:
    """Differences between the compiled collectives and the formula (empty when they agree byte for byte)."""
    problems = []
    for backward, suffix in ((False, "fwd"), (True, "fwd_bwd")):
        for name, formula in (("sra", sra_bytes), ("old_gather", old_gather_bytes),
                              ("allgather_cp", context_parallel_bytes)):
            got = measured[f"{name}_{suffix}"]["bytes"]
            expect = {kind: value for kind, value in formula(layer, backward).items() if kind != "total"}
            if got != expect:
                problems.append(f"{name} {suffix} at {layer}: compiled {got}, formula {expect}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The tables.

SMALL = [  # the compact buffer with a two-shard halo; a bound over half the row (every slot all-gathered)
    Layer(length=512, shards=8, window=80, num_global=2, kv_heads=2, head_dim=16, dtype_bytes=4, max_gathered=40),
    Layer(length=1024, shards=4, window=33, num_global=2, kv_heads=2, head_dim=16, dtype_bytes=4, max_gathered=600),
]
LENGTHS = [128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
SHARDS, FORMULA_SHARDS = 8, 64
ALPHA, WINDOW, NUM_GLOBAL = 0.1, 1024, 4
LLAMA_8B = {"kv_heads": 8, "head_dim": 128}  # one Llama 3 8B layer's K/V; 32 query heads
Q_HEADS = 32


def long_layer(length: int, shards: int, dtype_bytes: int) -> Layer:
    """K = ceil(alpha N) critical keys + the globals of one sequence (`sequence_parallel.gather_bound`)."""
    return Layer(length=length, shards=shards, window=WINDOW, num_global=NUM_GLOBAL, dtype_bytes=dtype_bytes,
                 max_gathered=math.ceil(ALPHA * length) + NUM_GLOBAL, **LLAMA_8B)


def total(entry: dict) -> int:
    return sum(entry["bytes"].values())


def measured_row(layer: Layer, measured: dict) -> dict:
    row = {"layer": dataclasses.asdict(layer)}
    for name in ("sra", "old_gather", "allgather_cp"):
        for suffix in ("fwd", "fwd_bwd"):
            row[f"{name}_{suffix}"] = measured[f"{name}_{suffix}"]
    halo = {suffix: old_layer_bytes(layer, backward) - old_gather_bytes(layer, backward)["total"]
            for suffix, backward in (("fwd", False), ("fwd_bwd", True))}
    row["old_layer_total"] = {suffix: total(row[f"old_gather_{suffix}"]) + halo[suffix] for suffix in halo}
    row["kv_memory"] = kv_memory(layer)
    bf16 = dataclasses.replace(layer, dtype_bytes=2)
    row["bf16_formula"] = {"sra_fwd": sra_bytes(bf16, False)["total"], "old_fwd": old_layer_bytes(bf16, False),
                           "allgather_cp_fwd": context_parallel_bytes(bf16, False)["total"]}
    return row


def markdown(rows: list[dict], formula_rows: list[dict], checks: list[dict], assembly: dict) -> str:
    lines = [
        (f"Measured: bytes an interior device receives per layer, counted from the compiled HLO on 8 fake CPU "
         f"devices (float32 K/V), Llama 3 8B attention ({Q_HEADS} query / 8 kv heads x 128), batch 1, window "
         f"{WINDOW}, {NUM_GLOBAL} globals, alpha = {ALPHA}, K = ceil(alpha N) + {NUM_GLOBAL} gathered keys, "
         f"S = {SHARDS}. 'old' is the gather this one replaces (each shard all-gathers min(chunk, K) slots) plus "
         "the same halo. Each count equals the formula byte for byte."),
        "",
        ("| N | SRA fwd MiB | SRA fwd+bwd MiB | old fwd MiB | old fwd+bwd MiB | all-gather CP fwd MiB | "
         "CP fwd+bwd MiB | CP / SRA fwd | old / SRA fwd | bf16 fwd MiB (formula): SRA / old / CP |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sra, sra_b = total(row["sra_fwd"]), total(row["sra_fwd_bwd"])
        old, old_b = row["old_layer_total"]["fwd"], row["old_layer_total"]["fwd_bwd"]
        cp, cp_b = total(row["allgather_cp_fwd"]), total(row["allgather_cp_fwd_bwd"])
        bf16 = row["bf16_formula"]
        lines.append(f"| {row['layer']['length'] // 1024}k | {sra / MIB:.1f} | {sra_b / MIB:.1f} | {old / MIB:.1f} | "
                     f"{old_b / MIB:.1f} | {cp / MIB:.1f} | {cp_b / MIB:.1f} | {cp / sra:.1f}x | {old / sra:.1f}x | "
                     f"{bf16['sra_fwd'] / MIB:.1f} / {bf16['old_fwd'] / MIB:.1f} / "
                     f"{bf16['allgather_cp_fwd'] / MIB:.1f} |")
    lines += ["", ("Memory per device (same compiles; MiB). K/V resident: the slots a flash kernel would hold during "
                   "the layer (formula, float32). Compiled temp: XLA's temp buffers of the jnp per-shard code, "
                   "forward + backward (it materialises one query block's scores against every gathered key), "
                   "not a kernel's."), "",
              "| N | K/V resident: SRA / old / all-gather CP / ring | compiled temp fwd+bwd: SRA / all-gather CP |",
              "|---|---|---|"]
    for row in rows:
        memory = row["kv_memory"]
        lines.append(f"| {row['layer']['length'] // 1024}k | {memory['sra'] / MIB:.0f} / "
                     f"{memory['old_gather'] / MIB:.0f} / {memory['allgather_cp'] / MIB:.0f} / "
                     f"{memory['ring'] / MIB:.0f} | {row['sra_fwd_bwd']['temp_bytes'] / MIB:.0f} / "
                     f"{row['allgather_cp_fwd_bwd']['temp_bytes'] / MIB:.0f} |")
    lines += ["", (f"Formula only (checked above), S = {FORMULA_SHARDS}, bf16 K/V: the compact gather does not grow "
                   "with S; the old one did."), "",
              "| N | SRA fwd MiB | old fwd MiB | all-gather CP fwd MiB | CP / SRA |", "|---|---|---|---|---|"]
    for row in formula_rows:
        lines.append(f"| {row['length'] // 1024}k | {row['sra_fwd'] / MIB:.1f} | {row['old_fwd'] / MIB:.1f} | "
                     f"{row['allgather_cp_fwd'] / MIB:.1f} | {row['allgather_cp_fwd'] / row['sra_fwd']:.1f}x |")
    lines += ["", "Small layers, compiled and checked the same way (bytes):", "",
              "| N | S | window | K | gather | SRA fwd | SRA fwd+bwd | old fwd+bwd (gather) | all-gather CP fwd+bwd |",
              "|---|---|---|---|---|---|---|---|---|"]
    for item in checks:
        layer, measured = Layer(**item["layer"]), item["measured"]
        lines.append(f"| {layer.length} | {layer.shards} | {layer.window} | {layer.max_gathered} | "
                     f"{'compact (psum)' if layer.compact else 'every slot (all-gather)'} | "
                     f"{total(measured['sra_fwd'])} | {total(measured['sra_fwd_bwd'])} | "
                     f"{total(measured['old_gather_fwd_bwd'])} | {total(measured['allgather_cp_fwd_bwd'])} |")
    measured = assembly["measured"]
    lines += ["", (f"Assembling the compact buffer ({assembly['slots']} slots of float32 K, 8 x 128) on 8 devices, "
                   "bytes received (ops), forward / forward + backward: "
                   + "; ".join(f"{name} {total(measured[name + '_fwd'])} ({sum(measured[name + '_fwd']['ops'].values())})"
                               f" / {total(measured[name + '_fwd_bwd'])} "
                               f"({sum(measured[name + '_fwd_bwd']['ops'].values())})"
                               for name in ("psum", "psum_scatter_all_gather"))
                   + ". The same bytes; the layer uses the psum (fewer ops).")]
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
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this markdown file")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="comma-separated N of the measured long-context rows (multiples of 8)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(length < 1 or length % SHARDS for length in lengths):
        raise SystemExit(f"--lengths ({args.lengths!r}) must be positive multiples of {SHARDS}")
    devices = jax.devices("cpu")
    if len(devices) < 8:
        raise SystemExit(f"needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {devices}")
    checks, problems, rows = [], [], []
    for layer in SMALL:
        measured = measure(layer, devices, q_heads=2 * layer.kv_heads)
        problems += check(layer, measured)
        checks.append({"layer": dataclasses.asdict(layer), "measured": measured,
                       "formula": {f"{name}_{suffix}": formula(layer, backward)
                                   for name, formula in (("sra", sra_bytes), ("old_gather", old_gather_bytes),
                                                         ("allgather_cp", context_parallel_bytes))
                                   for suffix, backward in (("fwd", False), ("fwd_bwd", True))}})
    for length in lengths:
        layer = long_layer(length, SHARDS, dtype_bytes=4)
        measured = measure(layer, devices, q_heads=Q_HEADS)
        problems += check(layer, measured)
        rows.append(measured_row(layer, measured))
    formula_rows = []
    for length in LENGTHS:
        layer = long_layer(length, FORMULA_SHARDS, dtype_bytes=2)
        formula_rows.append({"length": length, "shards": FORMULA_SHARDS, "sra_fwd": sra_bytes(layer, False)["total"],
                             "old_fwd": old_layer_bytes(layer, False),
                             "allgather_cp_fwd": context_parallel_bytes(layer, False)["total"],
                             "kv_memory": kv_memory(layer)})
    slots = long_layer(lengths[0], SHARDS, 4).max_gathered // SHARDS * SHARDS
    assembly = {"slots": slots, "measured": measure_assembly(devices, slots, **LLAMA_8B)}
    table = markdown(rows, formula_rows, checks, assembly)
    date = datetime.date.today().isoformat()
    record = {"device": "cpu, 8 fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): compiled HLO, "
                        "nothing executed", "date": date,
              "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
                           else None, "python": platform.python_version()},
              "alpha": ALPHA, "window": WINDOW, "num_global": NUM_GLOBAL, "q_heads": Q_HEADS, "model": LLAMA_8B,
              "rows": rows, "formula_rows": formula_rows, "small_checks": checks, "assembly": assembly,
              "problems": problems}
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
