"""The `distsparse` command line."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from distsparse.data import commands as data_commands
from distsparse.errors import DistsparseError
from distsparse.evaluate import commands as evaluate_commands
from distsparse.export.command import add_export_parser, run_export
from distsparse.prune_command import add_prune_parser, run_prune

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distsparse", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser(
        "train", help="train a sparse network",
        description="Train from a YAML config with dotted overrides, e.g. "
        "`distsparse train configs/quickstart.yaml method.sparsity=0.95`.",
    )
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--resume", metavar="RUN_DIR", type=Path,
                       help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="start N local worker processes (DDP, or backend.name=deepspeed or fsdp; gloo on "
                       "CPU, NCCL on GPU)")
    add_prune_parser(verbs)
    add_export_parser(verbs)
    evaluate_commands.add_parsers(verbs)
    data_commands.add_parsers(verbs)
    _add_job_parsers(verbs)
    return parser


def _add_job_parsers(verbs: argparse._SubParsersAction) -> None:
    """submit / status / stop: training runs as Ray jobs."""
    address = {"metavar": "URL", "help": "Ray job server, e.g. http://127.0.0.1:8265 "
               "(default: $RAY_ADDRESS)"}
    submit = verbs.add_parser("submit", help="run `train CONFIG [overrides]` as a Ray job",
                              description="Validate the config, upload the working directory "
                              "and run the training as a Ray job; prints the job id.")
    submit.add_argument("config", type=Path, help="YAML config inside the working directory")
    submit.add_argument("overrides", nargs="*", help="key.sub=value overrides (run.dir absolute)")
    submit.add_argument("--address", **address)
    submit.add_argument("--working-dir", type=Path, default=Path("."),
                        help="directory uploaded as the job's working directory (default: .)")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 1 unless it SUCCEEDED")
    status = verbs.add_parser("status", help="a Ray job's status and message")
    status.add_argument("job_id")
    status.add_argument("--address", **address)
    status.add_argument("--logs", action="store_true", help="also print the job's whole log")
    stop = verbs.add_parser("stop", help="stop a Ray job")
    stop.add_argument("job_id")
    stop.add_argument("--address", **address)


def _run_job_verb(args: argparse.Namespace) -> int:
    from distsparse.orchestrate import jobs

    if args.verb == "submit":
        return jobs.submit_run(args.config, args.overrides, args.address, args.working_dir,
                               args.follow)
    if args.verb == "status":
        return jobs.job_status(args.job_id, args.address, args.logs)
    return jobs.stop_job(args.job_id, args.address)


def _train_arguments(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The config file and overrides a train command stands for."""
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).is_file():
        config_path, overrides = None, [config_path, *overrides]
    if config_path is None:
        if args.resume is None:
            raise DistsparseError("train needs a CONFIG file, or --resume RUN_DIR")
        config_path = args.resume / "config.yaml"
        overrides = ["run.stop_at_step=null", *overrides]  # the stop that paused the run ends here
    if args.nproc > 1:
        overrides = [f"launcher.num_workers={args.nproc}", *overrides]
    if args.resume is not None:
        overrides.append(f"run.dir={args.resume}")
    return Path(config_path), overrides


def _train(config_path: Path, overrides: list[str], resume: Path | None, nproc: int) -> None:
    from distsparse.config import load_config
    from distsparse.engine.trainer import train

    config = load_config(config_path, overrides)
    ray_workers = config.launcher.num_workers if config.launcher.name == "ray" else 1
    if max(nproc, ray_workers) > 1 and config.backend.name == "single":
        config.backend.name = "ddp"
    if config.launcher.name == "ray":
        if nproc > 1:
            raise DistsparseError("--nproc starts local workers; launcher.name=ray starts "
                                  "launcher.num_workers Ray workers instead")
        from distsparse.orchestrate.ray_train import train_with_ray

        train_with_ray(config, resume)
        return
    train(config, resume=resume)


def _worker(rank: int, world_size: int, port: int, arguments: tuple) -> None:
    """One of --nproc local workers: torchrun's environment variables, then the same training."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Share the cores instead of oversubscribing them (torch is not imported yet in this child).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    sys.exit(_run_reporting_errors(_train, *arguments, quiet=rank != 0))


def _spawn(nproc: int, arguments: tuple) -> int:
    """Start the workers; if one fails, stop the others instead of leaving them in a collective."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = [context.Process(target=_worker, args=(rank, nproc, port, arguments))
               for rank in range(nproc)]
    for worker in workers:
        worker.start()
    first_failure = 0
    while any(w.exitcode is None for w in workers):
        failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]  # the cause, not the SIGTERM sent to the others
            for worker in workers:
                worker.terminate()
        time.sleep(0.2)
    return first_failure or max((w.exitcode for w in workers), key=abs)


def _run_reporting_errors(function, *arguments, quiet: bool = False) -> int:
    try:
        status = function(*arguments)
    except DistsparseError as exc:
        if not quiet:
            print(f"distsparse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distsparse: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


_TRAILING = {"train": ("overrides", str), "submit": ("overrides", str), "compare": ("run_dirs", Path)}
"""Each verb's trailing positional list: its name and item type."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distsparse` console script; returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends a positional list at the first option: `train CONFIG --nproc 2 key=value` leaves
    # what follows the option unparsed. It belongs to the verb's trailing list all the same.
    trailing = _TRAILING.get(args.verb)
    unknown = [item for item in rest if item.startswith("-")] or ([] if trailing else rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        name, kind = trailing
        setattr(args, name, [*getattr(args, name), *map(kind, rest)])
    if args.verb == "train":
        if args.nproc < 1:
            print("distsparse: error: --nproc must be at least 1", file=sys.stderr)
            return 2
        try:
            config_path, overrides = _train_arguments(args)
        except DistsparseError as exc:
            print(f"distsparse: error: {exc}", file=sys.stderr)
            return 2
        arguments = (config_path, overrides, args.resume, args.nproc)
        if args.nproc > 1:
            return _spawn(args.nproc, arguments)
        return _run_reporting_errors(_train, *arguments)
    if args.verb == "prune":
        return run_prune(args)
    if args.verb == "export":
        return run_export(args)
    if args.verb in evaluate_commands.VERBS:
        return _run_reporting_errors(evaluate_commands.run, args)
    if args.verb in data_commands.VERBS:
        return _run_reporting_errors(data_commands.run, args)
    if args.verb in ("submit", "status", "stop"):
        return _run_reporting_errors(_run_job_verb, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
