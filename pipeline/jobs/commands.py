"""What the ``jointdiff`` command (:mod:`pipeline.cli`) shares with the Ray jobs' own entry points
(``python -m pipeline.jobs.clean`` and ``python -m pipeline.jobs.train_prior``, what a submitted job runs):
the arguments of ``clean`` and ``train``, a clean config loaded from them, the summary printed at the end,
and :func:`run_command`, the one place where an exception becomes one line and an exit code.

It sits below the CLI and the jobs, so that no module imports the CLI: the CLI composes these parsers as its
sub-commands, a job parses its own arguments with the same definitions, and ``jointdiff submit`` checks a
job's arguments with the job's parser before anything is sent.

Exit codes: 0 done; 1 an error of the environment (storage, a missing file, a bad checkpoint); 2 a
configuration the user can fix (:class:`~pipeline.config.ConfigError`); 3 the accounting does not hold; 4 the
run rejected too many rows (complete and recorded); 130 interrupted (the message says how to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import CleanConfig, ConfigError, check_run_id
from pipeline.data import storage
from pipeline.data.accounting import AccountingError, RejectedRowsError
from pipeline.run import RunFailed

EXECUTORS = ("local", "ray")


def add_clean_arguments(p: argparse.ArgumentParser, executor: bool = True) -> argparse.ArgumentParser:
    """The arguments of ``jointdiff clean`` (``executor``: with ``--executor``; the Ray job has none)."""
    p.add_argument("input", nargs="?", help="observation dataset: folder or URI of Parquet shards "
                   "(default: the config's input:)")
    p.add_argument("output", nargs="?", help="output root; the run goes to OUTPUT/runs/RUN_ID/ and its "
                   "summary row to OUTPUT/summary/ (default: the config's output:)")
    p.add_argument("--config", default=None, help="YAML clean config (default: built-in faces+digits, dps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sampler.steps=100")
    p.add_argument("--section", default=None, help="top-level section of --config (e.g. clean)")
    p.add_argument("--run-id", default=None, help="default: a hash of the input and the recipe (pinned priors, "
                   "forward model, sampler, input policy), so re-running over a grown dataset cleans only its new "
                   "shards")
    if executor:
        p.add_argument("--executor", default=None, choices=EXECUTORS,
                       help="where the shards are cleaned: local (this process, no Ray) or ray (an actor pool on a "
                       "local Ray in this process, or the cluster of --ray-address / RAY_ADDRESS). Default: ray when "
                       "a cluster is named (--ray-address, RAY_ADDRESS or the config's ray.address), else local")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on as its driver, from a machine of the cluster: HEAD:6379 "
                   "(the GCS address) or auto (default RAY_ADDRESS, else a local Ray in this process). "
                   "Not ray:// (Ray Client cannot run Ray Data) nor the Jobs API (http://HEAD:8265): from "
                   "outside the cluster use `jointdiff submit clean`")
    p.add_argument("--actors", type=int, default=None, help="sampler actors of the ray executor (default: one "
                   "per GPU, else CPUs / ray.threads_per_actor)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(command="clean")
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``jointdiff train``."""
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/prior_faces.yaml")
    p.add_argument("--section", default=None,
                   help="top-level section of a recipe config (configs/celeba_mnist.yaml: image_prior, noise_prior)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray-address", default=None, help="train data-parallel on this Ray cluster (Ray Train, DDP), "
                   "from a machine of it: HEAD:6379 or auto (not ray://; from outside, `jointdiff submit train`); "
                   "without it and without --workers, training stays in this process")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2 with --ray-address; "
                   "alone, on an in-process local Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker (NCCL)")
    p.add_argument("--registry", default=None, help="publish the final model to ROOT/models/NAME/VERSION/ "
                   "(and point ROOT/models/NAME/latest at it)")
    p.set_defaults(command="train")
    return p


def add_learn_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``jointdiff learn-prior`` (and of its submitted job, ``python -m pipeline.jobs.learn``)."""
    p.add_argument("input", metavar="INPUT", help="the corrupted dataset (observation shards, any URI: `jointdiff "
                    "ingest` or `corrupt` makes them); its images at the noise prior's size")
    p.add_argument("output", metavar="OUTPUT", help="output root: OUTPUT/learn/<run id>/round-<k>/ (and the registry "
                    "OUTPUT/models/ unless --registry)")
    p.add_argument("--noise-prior", required=True, help="the noise's prior: shipped name (stripes, digits, ...), "
                    "model folder or registry .../latest")
    p.add_argument("--rounds", type=int, default=4, help="EM rounds after round 0 (default 4); fewer when the "
                    "noise fit stops improving")
    p.add_argument("--config", default=None, help="cleaning recipe YAML (sampler, forward model); each round "
                    "sets its priors and one posterior sample per image")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="cleaning recipe override, "
                    "e.g. forward.alpha=0.5, sampler.steps=50")
    p.add_argument("--prior-config", default=None, help="the image prior's YAML (unet, train); default: the noise "
                    "prior's network, 600 steps a round at batch 32")
    p.add_argument("--prior-set", action="append", default=[], metavar="KEY=VALUE", help="image prior override, "
                    "e.g. train.steps=1000")
    p.add_argument("--name", default="image", help="the prior's name in the registry (default image)")
    p.add_argument("--registry", default=None, help="registry root (default OUTPUT)")
    p.add_argument("--validation", default=None, help="a small dataset with truth (observation and clean "
                    "columns): cleaned every round for PSNR/SSIM")
    p.add_argument("--start", default=None, help="round 0's prior, instead of a Gaussian of the observations "
                    "(a shipped prior, model folder or registry .../latest); later rounds fine-tune it")
    p.add_argument("--tolerance", type=float, default=0.01, help="stop when the noise fit improves by less than "
                    "this fraction (default 0.01)")
    p.add_argument("--no-early-stop", action="store_true", help="run every round, whatever the noise fit")
    p.add_argument("--run-id", default=None, help="default: derived from the input, priors and configs (run the "
                    "same command again to resume)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per round (default 1)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs")
    p.add_argument("--ray-address", default=None, help="a cluster to join as the driver, from a machine of it "
                   "(HEAD:6379; default RAY_ADDRESS, else a local Ray); from outside, `jointdiff submit learn-prior`")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(command="learn-prior")
    return p


def learn_parser(prog: str) -> argparse.ArgumentParser:
    return add_learn_arguments(argparse.ArgumentParser(
        prog=prog, description="Learn the image prior from a corrupted dataset and a noise prior, by EM."))


LEARN_FLAGS = ("--quiet", "--gpu", "--no-early-stop", "-h", "--help")  # learn-prior's options that take no value


def learn_params(args: argparse.Namespace) -> dict[str, Any]:
    """``learn-prior``'s arguments as :func:`pipeline.jobs.learn.open_learning`'s (and the flow's) parameters."""
    return dict(input_uri=args.input, output=args.output, noise_prior=args.noise_prior, rounds=args.rounds,
                config=args.config, overrides=args.set, prior_config=args.prior_config,
                prior_overrides=args.prior_set, name=args.name, registry=args.registry, validation=args.validation,
                run_id=args.run_id, start=args.start, tolerance=None if args.no_early_stop else args.tolerance,
                workers=args.workers, use_gpu=args.gpu, ray_address=args.ray_address)


LEARN_INTERRUPTED = ("interrupted; run the same command again to resume: the rounds done are kept, and the round under "
                     "way resumes at its last training state and cleaned shard")


def clean_parser(prog: str, executor: bool = True) -> argparse.ArgumentParser:
    return add_clean_arguments(argparse.ArgumentParser(prog=prog, description="Clean an observation dataset."),
                               executor)


def train_parser(prog: str) -> argparse.ArgumentParser:
    return add_train_arguments(argparse.ArgumentParser(prog=prog, description="Train one diffusion prior."))


def load_clean(args: argparse.Namespace) -> tuple[CleanConfig, str, str]:
    """``(config, input, output)`` from ``clean``'s arguments; INPUT and OUTPUT default to the config's."""
    from pipeline.config import load_config

    cfg = load_config(CleanConfig, args.config, args.set, section=args.section)
    input_uri, output = args.input or cfg.input, args.output or cfg.output
    if not input_uri or not output:
        raise ConfigError(f"{args.command} needs INPUT and OUTPUT (arguments, or the config's input: and output:)")
    if any(str(u).startswith("s3") for u in (input_uri, output, cfg.priors.image, cfg.priors.noise)):
        print(f"storage: {cfg.storage.describe()}", file=sys.stderr)
    return cfg, input_uri, output


def summary_line(summary: Any) -> None:
    """A command's result as one JSON line on stdout, for scripts (``> run.json``, ``| jq``): only when stdout is
    not a terminal, where the lines on stderr already say it for people."""
    if not sys.stdout.isatty():
        print(json.dumps(summary, default=str), flush=True)


def print_summary(summary: dict[str, Any]) -> int:
    """A run's summary for people on stderr, its row as one JSON line on stdout (what a followed job's caller
    reads back; not to a terminal); 0."""
    from pipeline.summary import format_summary

    print(format_summary(summary), file=sys.stderr)
    summary_line({k: v for k, v in summary.items() if k != "job"})
    return 0


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str = "jointdiff") -> int:
    """``func(args)``, with ``--run-id`` checked first and every expected failure as one line and an exit code
    (see the module docstring)."""
    command = getattr(args, "command", None) or prog
    try:
        if getattr(args, "run_id", None) is not None:  # a folder name under OUTPUT/runs/: checked before any work
            check_run_id(args.run_id, "--run-id")
        with storage.errors_named():  # an object-store error half-way (expired credentials): URI and cause
            return func(args)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except storage.StorageError as exc:
        print(f"{prog} {command}: storage error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError, ShardError are ValueErrors
        print(f"{prog} {command}: error: {exc}", file=sys.stderr)
        return 1
    except AccountingError as exc:
        print(f"{prog} {command}: {exc}", file=sys.stderr)
        return 3
    except RejectedRowsError as exc:  # the run is complete and recorded; too many of its rows were rejected
        from pipeline.summary import format_summary

        print(format_summary(exc.summary), file=sys.stderr)
        print(f"{prog} {command}: {exc}", file=sys.stderr)
        summary_line({k: v for k, v in exc.summary.items() if k != "job"})
        return 4
    except KeyboardInterrupt as exc:
        print(f"\n{prog} {command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except RunFailed as exc:  # the executor failed part-way: why, how far, how to resume
        print(f"{prog} {command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a local disk full, a folder not writable: the message names the path
        print(f"{prog} {command}: error: {exc}", file=sys.stderr)
        return 1
