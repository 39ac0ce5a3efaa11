"""`sra-jax train --config NAME_OR_PATH [--set key=value ...]`.

`--config` takes a YAML file or the name of a packaged config (`sra_jax/configs/`: synthetic_sra, gpu_synthetic, ...).

On several hosts (TPU pod workers, GPU nodes) run the same command on every host; `jax.distributed.initialize()` is
called first when `--distributed` is given (it reads the coordinator from the cluster environment: TPU metadata,
SLURM, Open MPI, Kubernetes); elsewhere pass --coordinator / --num-processes / --process-id or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID on every host (a coordinator address alone also
turns it on).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sra_jax import log

_logger = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"sra-jax train: ${name}={value!r} must be an integer") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra-jax train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of TrainConfig keys, or a packaged config name such as synthetic_sra (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.learning_rate=1e-3 (repeatable)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="host:port of process 0 (default $JAX_COORDINATOR_ADDRESS; with --num-processes / "
                             "--process-id)")
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                        help="default $JAX_NUM_PROCESSES")
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), help="default $JAX_PROCESS_ID")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    from sra_jax.train.config import TrainConfig

    console = log.console()
    try:
        config = TrainConfig.load(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        console.print(f"sra-jax train: {error}", style="red", highlight=False, markup=False)
        return 2
    if args.distributed or args.coordinator:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax

    if args.print_config:  # the command's output, not a log record
        if jax.process_index() == 0:
            console.print(config.to_yaml(), highlight=False, markup=False)
        return 0
    if jax.process_index() == 0:
        _logger.info("config:\n%s", config.to_yaml().rstrip())
        _logger.info("devices: %d x %s over %d process(es)", jax.device_count(), jax.devices()[0].device_kind,
                     jax.process_count())

    from sra_jax.train.checkpoint import host_int
    from sra_jax.train.loop import run, summarize

    result = run(config, console=console)
    if jax.process_index() == 0:
        summary = summarize(result.history)
        _logger.info("%s at step %d: %s", result.reason, host_int(result.state.step),
                     ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
