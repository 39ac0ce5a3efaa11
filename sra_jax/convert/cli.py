"""`sra-jax convert hf-to-orbax SRC DST` and `sra-jax convert orbax-to-hf SRC DST` (streamed, atomic at DST)."""

from __future__ import annotations

import argparse
import logging
import sys

from sra_jax.convert.hf import DEFAULT_MAX_SHARD_BYTES
from sra_jax.convert.orbax_io import hf_to_orbax, orbax_to_hf
from sra_jax.convert.source import resolve_path

_logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra-jax convert", description=__doc__)
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, help_ in (
        ("hf-to-orbax", "Hugging Face directory (config.json + safetensors) -> sra-jax orbax checkpoint"),
        ("orbax-to-hf", "sra-jax orbax checkpoint -> Hugging Face directory that transformers loads"),
    ):
        command = sub.add_parser(name, help=help_)
        command.add_argument("src", help="a folder, or for hf-to-orbax a hub name hf://org/name[@revision] "
                             "(read from the local huggingface_hub cache)")
        command.add_argument("dst")
        command.add_argument("--dtype", choices=DTYPES, help="cast parameters (default: keep stored dtypes)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        if name == "orbax-to-hf":
            command.add_argument(
                "--max-shard-bytes",
                type=int,
                default=DEFAULT_MAX_SHARD_BYTES,
                help="split safetensors above this",
            )
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-orbax":
            hf_to_orbax(resolve_path(args.src), args.dst, dtype=args.dtype, overwrite=args.overwrite)
        else:
            orbax_to_hf(
                resolve_path(args.src),
                args.dst,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_bytes,
                overwrite=args.overwrite,
            )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sra-jax convert: {error}", file=sys.stderr)
        return 1
    _logger.info("wrote %s", args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
