"""`sra-jax <command> [args...]`: each command lives beside the code it drives and exposes `main(argv) -> int`.

One error style for every command: a user mistake (a `ValueError` naming the key / file / argument, a missing or
unreadable file) ends the command with one line on stderr and exit status 2; `--debug` (anywhere on the command line)
or SRA_JAX_DEBUG=1 shows the Python traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("sra_jax.train.demo", "main", "train tiny dense and SRA models on the synthetic task and compare them (CPU)"),
    "train": ("sra_jax.train.cli", "main", "train from a YAML config with key=value overrides"),
    "eval": ("sra_jax.train.evaluate", "main", "evaluate a checkpoint on GSM8K / MATH / the synthetic task"),
    "generate": ("sra_jax.generate", "cli_main", "sample from a checkpoint"),
    "convert": ("sra_jax.convert.cli", "main", "convert Hugging Face safetensors <-> orbax checkpoints"),
    "bench": ("benchmarks.attention_bench", "main", "time attention kernels (GPU)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sra-jax <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SRA_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return _dispatch(argv)
    try:
        return _dispatch(argv)
    except (ValueError, OSError) as error:
        command = argv[0] if argv else ""
        print(f"sra-jax {command}: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sra-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or module_name.startswith("sra_jax"):
            raise
        # benchmarks/ ships with the repository, not with the installed package.
        print(f"sra-jax {command}: {module_name} is not importable here; run it from the sra-jax repository root "
              f"(where benchmarks/ lives) or `python -m {module_name}` there", file=sys.stderr)
        return 2
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
