"""`sra-jax <command> [args...]`: each command lives beside the code it drives and exposes `main(argv) -> int`.

One error style for every command: a user mistake (a `ValueError` naming the key / file / argument, a missing or
unreadable file) ends the command with one line on stderr and exit status 2; `--debug` (anywhere on the command line)
or SRA_JAX_DEBUG=1 shows the Python traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from sra_jax import __version__, log

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("sra_jax.train.demo", "main", "train tiny dense and SRA models on the synthetic task and compare them (CPU)"),
    "train": ("sra_jax.train.cli", "main", "train from a YAML config with key=value overrides"),
    "eval": ("sra_jax.train.evaluate", "main", "evaluate a checkpoint on GSM8K / MATH / the synthetic task"),
    "generate": ("sra_jax.generate", "cli_main", "sample from a checkpoint"),
    "convert": ("sra_jax.convert.cli", "main", "convert Hugging Face safetensors <-> orbax checkpoints"),
    "export": ("sra_jax.convert.export", "main", "write a training checkpoint as a Hugging Face folder + routers"),
    "bench": ("sra_jax.benchmarks.attention_bench", "main", "time attention kernels (GPU)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sra-jax [--version] [-q | --quiet] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "options (before the command):", "  --version    print the sra-jax version and exit",
              "  -q, --quiet  log warnings and errors only (progress bars stay)",
              "", "`sra-jax <command> --help` describes a command."]
    return "\n".join(lines)


EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"sra-jax {__version__}")
        return 0
    debug = "--debug" in argv or os.environ.get("SRA_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return _dispatch(argv)
    try:
        return _dispatch(argv)
    except (ValueError, OSError) as error:
        command = next((arg for arg in argv if not arg.startswith("-")), "")
        print(f"sra-jax {command}: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _dispatch(argv: list[str]) -> int:
    quiet = False
    while argv[:1] and argv[0] in ("-q", "--quiet"):
        quiet, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sra-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    log.setup(quiet=quiet)
    module = importlib.import_module(module_name)
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
