"""Real-token fraction of training batches, one example per row vs packed (data.pack), on CPU (no timing).

    python -m sra_jax.benchmarks.packing_fill [--out benchmarks/results/packing-fill-2026-11-23.json] [--batches 50]

Per case: the whole-epoch fraction (GSM8K: every kept train example once; synthetic: the first packing chunk of 1024
problems, or as many problems unpacked) and the mean / min over the first `--batches` batches of batch_size rows
(batches are exactly what `sra-jax train` feeds). Examples longer than seq_len are left out either way (counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import numpy as np

from sra_jax import configs
from sra_jax.data.packing import real_token_fraction
from sra_jax.train.config import TrainConfig
from sra_jax.train.data import SYNTHETIC_PACK_CHUNK, TextTaskStream, make_stream

CONFIGS = Path(configs.__file__).resolve().parent
LLAMA3 = ["model.vocab_size=128256", "model.max_position_embeddings=2048"]
CASES = {
    "gsm8k-cot-256": [*LLAMA3, "data.task=gsm8k", "data.form=cot", "data.seq_len=256"],
    "gsm8k-cot-512": [*LLAMA3, "data.task=gsm8k", "data.form=cot", "data.seq_len=512"],
    "gsm8k-direct-256": [*LLAMA3, "data.task=gsm8k", "data.form=direct", "data.seq_len=256"],
    "synthetic_dense.yaml (direct, seq 48)": str(CONFIGS / "synthetic_dense.yaml"),
    "gpu_synthetic.yaml (cot, seq 256)": str(CONFIGS / "gpu_synthetic.yaml"),
}


def epoch_fraction(stream, seq_len: int) -> tuple[float, int, int]:
    """(real-token fraction, examples, rows) over one epoch (synthetic: one packing chunk of problems)."""
    if isinstance(stream, TextTaskStream):
        lengths = [len(e.tokens) for e in stream.examples]
    else:
        lengths = [len(stream.example(i).tokens) for i in range(SYNTHETIC_PACK_CHUNK)]
    rows = len(lengths) if stream.packing is None else stream.packing.epoch_start(1)
    return sum(lengths) / (rows * seq_len), len(lengths), rows


def measure(name: str, source, batch_size: int, batches: int) -> list[dict]:
    out = []
    for pack in (False, True):
        overrides = ["sra=null", "loss.kind=sl", f"batch_size={batch_size}", "grad_accum=1", f"data.pack={pack}"]
        if isinstance(source, str):
            config = TrainConfig.load(source, overrides)
        else:
            config = TrainConfig.load(None, [*source, *overrides])
        stream = make_stream(config)
        fractions = [real_token_fraction(stream.batch(step)["positions"]) for step in range(batches)]
        epoch, examples, rows = epoch_fraction(stream, config.data.seq_len)
        out.append({"name": name, "task": config.data.task, "form": config.data.form, "seq_len": config.data.seq_len,
                    "pack": pack, "batch_size": batch_size, "epoch_real_fraction": round(epoch, 4),
                    "epoch_examples": examples, "epoch_rows": rows,
                    "batch_real_fraction_mean": round(float(np.mean(fractions)), 4),
                    "batch_real_fraction_min": round(float(np.min(fractions)), 4), "batches": batches,
                    "skipped_over_seq_len": getattr(stream, "skipped", 0)})
        print(json.dumps(out[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    rows = [r for name, source in CASES.items() for r in measure(name, source, args.batch_size, args.batches)]
    if args.out is not None:
        result = {"device": "cpu (no timing: token counts only)", "date": datetime.date.today().isoformat(),
                  "versions": {"jax": jax.__version__, "python": platform.python_version()},
                  "note": "real tokens / (rows x seq_len); Llama 3 tokenizer for GSM8K train (7473 examples); "
                          "packed = first-fit over each epoch's shuffled order, whole examples, segment ids",
                  "rows": rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
