"""`sra-jax export --checkpoint RUN_CKPT_DIR [--step N] --out DST [--dtype ...]`: a training checkpoint (or any model
source, see `sra_jax.convert.source`) as a Hugging Face Llama folder that `transformers.LlamaForCausalLM` loads
unchanged, with the SRA routers in `sra_router.safetensors` and the SRAConfig in `sra_config.json` beside it
(`sra_jax.convert.load_hf` restores both)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from sra_jax.convert.hf import DEFAULT_MAX_SHARD_BYTES, save_hf
from sra_jax.convert.source import describe, load_source, resolve_source

_logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Write the model of `checkpoint` (a run's checkpoint folder: newest step unless `step`) to `out` as a Hugging
    Face folder; dtype None keeps the stored parameter dtype bit for bit."""
    source = resolve_source(checkpoint, step=step)
    _logger.info("exporting %s", describe(source))
    _, _, model = load_source(source)
    save_hf(model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra-jax export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run's checkpoint folder (checkpoint.dir), one step folder, or any model folder")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--out", required=True, help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast parameters (default: keep the stored dtype)")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="split model safetensors above this (with an index)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        export_hf(args.checkpoint, args.out, step=args.step, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes,
                  overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sra-jax export: {error}", file=sys.stderr)
        return 1
    _logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
