"""The ``jointdiff`` command. Each sub-command is a thin wrapper over a library function; the arguments and
exit codes it shares with the Ray jobs' own entry points live in :mod:`pipeline.jobs.commands` (nothing imports
this module). The verb ``denoise`` was removed before 1.0: ``jointdiff clean --executor local`` does what it
did (docs/changelog.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, refuse_credentials
from pipeline.jobs.commands import (
    LEARN_INTERRUPTED,
    add_clean_arguments,
    add_learn_arguments,
    add_train_arguments,
    learn_params,
    load_clean,
    print_summary,
    run_command,
    summary_line,
)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import PriorConfig, load_config
    from pipeline.diffusion.train import TrainingInterrupted
    from pipeline.training import train_prior

    if args.ray_address or args.workers:
        from pipeline.jobs.train_prior import train_on_ray

        return train_on_ray(args)
    config = load_config(PriorConfig, args.config, args.set, section=args.section)
    print(f"training prior '{config.name}' on {config.data.source}/{config.data.split} "
          f"for {config.train.steps} steps -> {config.output}", file=sys.stderr)
    try:
        summary = train_prior(config, progress=not args.quiet)
    except TrainingInterrupted as stop:
        print(f"\ninterrupted at step {stop.step}; the training state is saved in {config.output}/state. "
              "Run the same command again to resume.", file=sys.stderr)
        return 130
    if summary["steps"] >= config.train.steps and args.registry:
        from pipeline.registry import publish

        summary["published"] = publish(f"{config.output}/model", args.registry, config.name)
    if summary["steps"] >= config.train.steps:
        heldout = summary.get("heldout_loss")
        heldout = f"held-out loss {heldout:.4f}" if heldout is not None else "no held-out loss (no test split)"
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, {heldout}, "
              f"{summary['seconds_total']:.0f} s of training; model in {config.output}/model",
              file=sys.stderr)
    summary_line({k: v for k, v in summary.items() if k != "train_config"})
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pipeline.diffusion.checkpoint import load_model
    from pipeline.diffusion.sampling import sample
    from pipeline.priors import resolve_model
    from pipeline.viz import save_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    model, sde, meta = load_model(resolve_model(args.checkpoint), args.device)
    n_batches = -(-args.n // args.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=args.steps * n_batches, desc=f"sample {meta.get('name', args.checkpoint)}",
              unit="step", disable=args.quiet) as bar:
        images = sample(model, sde, args.n, args.steps, args.seed, args.batch_size, args.device,
                        progress=bar.update)
    seconds = time.perf_counter() - t0
    save_grid(images.numpy(), args.out, nrow=args.nrow)
    result: dict[str, object] = {"out": args.out, "n": args.n, "steps": args.steps, "seconds": round(seconds, 2)}
    if args.nearest:
        from pipeline.training import memorisation_report

        if args.n % args.nrow:
            raise ConfigError("--nearest needs --n to be a multiple of --nrow")

        if not meta.get("dataset"):
            raise ConfigError(f"{args.checkpoint}: its config.json names no training dataset; "
                              "--nearest needs one")
        rep, nearest = memorisation_report(images, meta["dataset"], model.config.image_size,
                                           model.config.channels)
        # pairs of rows: samples, then the training image nearest to each
        pairs = torch.stack([images.view(-1, args.nrow, *images.shape[1:]),
                             nearest.view(-1, args.nrow, *images.shape[1:])], 1).flatten(0, 2)
        pair_path = str(args.out).rsplit(".", 1)[0] + "_nearest.png"
        save_grid(pairs.numpy(), pair_path, nrow=args.nrow)
        rep["pairs_png"] = pair_path
        unseen = ("" if rep["test_median"] is None else
                  f"; unseen test images median {rep['test_median']:.3f} (min {rep['test_min']:.3f})")
        print(f"nearest training image, RMS distance on [0,1]: samples median {rep['samples_median']:.3f} "
              f"(min {rep['samples_min']:.3f}, max {rep['samples_max']:.3f}){unseen}", file=sys.stderr)
        result["nearest"] = rep
    print(f"wrote {args.n} samples to {args.out} in {seconds:.1f} s", file=sys.stderr)
    summary_line(result)
    return 0


def _cmd_export_embedded(args: argparse.Namespace) -> int:
    from pipeline.data.embedded import load_embedded
    from pipeline.data.shards import write_image_shards

    ds = load_embedded(args.name, args.split, args.size, args.channels, args.n)
    shards = write_image_shards(args.uri, ds.ids, ds.images, shard_size=args.shard_size, bits=args.bits)
    print(f"wrote {len(ds)} {args.name}/{args.split} images ({args.size}x{args.size}, {args.channels} ch, "
          f"{args.bits}-bit PNG) in {len(shards)} shard(s) to {args.uri}", file=sys.stderr)
    return 0


def _size_arg(v: str) -> int | str:
    if v == "native":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a size: give a number of pixels or 'native'") from None


CORRUPT_FLAGS = ("clean", "noise", "out", "alpha", "forward", "sigma_y", "split", "n", "size", "channels",
                 "noise_channel", "seed", "shard_size", "format")


def _cmd_corrupt(args: argparse.Namespace) -> int:
    from pipeline.config import CorruptConfig, load_config
    from pipeline.data.corrupt import corrupt
    from pipeline.data.datasets import load_images

    # a config file (or section) gives the defaults; flags given on the command line win
    given = [f"{k}={json.dumps(getattr(args, k))}" for k in CORRUPT_FLAGS if getattr(args, k) is not None]
    c = load_config(CorruptConfig, args.config, given, section=args.section)
    missing = [k for k in ("clean", "noise", "out") if getattr(c, k) is None]
    if missing:
        raise ConfigError(f"corrupt needs {', '.join(missing).upper()} (arguments, or keys of --config)")
    if c.size == "native":
        from pipeline.data.corrupt import corrupt_native

        clean = load_images(c.clean, c.split, None, c.channels, column_key=None)
        obs = corrupt_native(clean, c.noise, c.split, c.n or len(clean), alpha=c.alpha, seed=c.seed,
                             forward=c.forward, sigma_y=c.sigma_y)
        where = _write_corrupted(c, obs)
        print(f"wrote {len(obs.ids)} observations ({c.forward}, alpha {c.alpha}, seed {c.seed}) of {c.clean} under "
              f"{c.noise} at each image's own size {where}", file=sys.stderr)
        return 0
    clean = load_images(c.clean, c.split, c.size, c.channels, column_key=None)
    noise_channels = 4 if c.noise == "text" else 1 if c.noise_channel == "random" else c.channels
    noise = load_images(c.noise, c.split, c.size, noise_channels, column_key=None)
    n = c.n or len(clean)
    obs = corrupt(clean, noise, n, alpha=c.alpha, seed=c.seed, forward=c.forward,
                  sigma_y=c.sigma_y, noise_channel=c.noise_channel)
    where = _write_corrupted(c, obs)
    print(f"wrote {n} observations ({c.forward}, alpha {c.alpha}, seed {c.seed}) of {c.clean} under "
          f"{c.noise} {where}", file=sys.stderr)
    return 0


def _write_corrupted(c: Any, obs: Any) -> str:
    """Write ``corrupt``'s observations as ``c.format`` says; where they went, for the last line."""
    if c.format == "shards":
        from pipeline.data.corrupt import write_observations

        shards = write_observations(c.out, obs, shard_size=c.shard_size)
        return f"in {len(shards)} shard(s) to {c.out}"
    from pipeline.data.shards import encode_png, from_float
    from pipeline.data.storage import join, write_atomic
    from pipeline.untrusted import safe_names

    for name, y in zip(safe_names(obs.ids), obs.observation, strict=True):
        write_atomic(join(c.out, name), encode_png(from_float(y, 8)))
    return f"as PNG files in {c.out} (no truth kept: no PSNR for them)"


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data import storage
    from pipeline.data.ingest import IngestConfig, ingest

    flags = {"policy.size": args.size, "policy.channels": args.channels, "policy.resize": args.resize,
             "shard_size": args.shard_size, "bits": args.bits}
    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = load_config(IngestConfig, args.config, args.set + given, section=args.section)
    storage.configure(cfg.storage)
    if any(u.startswith("s3") for u in (args.src, args.dst)):
        print(f"storage: {cfg.storage.describe()}", file=sys.stderr)
    summary = ingest(args.src, args.dst, cfg, progress=not args.quiet,
                     log=None if args.quiet else (lambda m: print(f"rejected: {m}", file=sys.stderr)))
    hidden = f"; {summary['hidden']} hidden name(s) (.DS_Store...) are not inputs" if summary["hidden"] else ""
    print(f"{summary['inputs']} inputs: {summary['ingested']} ingested, {summary['errors']} rejected "
          f"(see {args.dst.rstrip('/')}/_errors/); {len(summary['written'])} shard(s) written, "
          f"{len(summary['skipped'])} already complete{hidden}", file=sys.stderr)
    summary_line(summary)
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from pipeline.config import with_ray

    cfg, input_uri, output = load_clean(args)
    cfg = with_ray(cfg, address=args.ray_address, actors=args.actors)
    executor = args.executor or ("ray" if cfg.ray.address or os.environ.get("RAY_ADDRESS") else "local")
    if executor == "local":
        if args.ray_address or args.actors:
            raise ConfigError("--ray-address and --actors are settings of the ray executor; leave them out or use "
                              "--executor ray")
        from pipeline.run.local import run_local

        return print_summary(run_local(input_uri, output, cfg, run_id=args.run_id, progress=not args.quiet))
    from pipeline.jobs.clean import run_clean

    return print_summary(run_clean(input_uri, output, cfg, run_id=args.run_id, progress=not args.quiet))


def argv_of(args: argparse.Namespace) -> list[str]:
    """The command line that produced ``args`` (for a benchmark's record of how it was run)."""
    return getattr(args, "argv", None) or sys.argv[1:]


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.kind == "gpu":  # the standalone torch-only script; its other options: python pipeline/bench/gpu.py -h
        from pipeline.bench import gpu

        argv = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
        argv += ["--device", args.device] if args.device else []
        return gpu.main(argv + (["--threads", str(args.threads)] if args.threads else []))

    import platform

    import torch

    from pipeline.bench import quality as q

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = _int_list(args.steps) if args.steps else None
    rules = args.rules.split(",") if args.rules else None
    if args.scenarios is not None and args.kind in ("quality", "large"):
        from pipeline.bench import large as lg

        known = [s.name for s in lg.SCENARIOS] if args.kind == "large" else [s.name for s in q.SCENARIOS] + ["mixed"]
        names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        allowed = known + (["none"] if args.kind == "large" and args.memory else [])
        unknown = [s for s in names if s not in allowed]
        args.scenarios = ",".join(names)
        if unknown or not names:
            raise ConfigError(f"--scenarios: bench {args.kind} has no scenario {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(known)}" + (" (or none, with --memory)" if args.kind == "large"
                                                                   else ""))
    if args.methods is not None:
        from pipeline.bench import large as lg

        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in lg.METHODS]
        if args.kind != "large" or unknown or not names:
            what = ("only bench large takes it" if args.kind != "large"
                    else f"bench large has no method {', '.join(unknown) or '(none given)'}")
            raise ConfigError(f"--methods: {what}; choose from {', '.join(lg.METHODS)}")
        args.methods = ",".join(names)
    if args.kind == "speed":
        from pipeline.bench import speed as sp

        doc = sp.speed(quick=args.quick, steps=steps[0] if steps else None, rules=rules, threads=args.threads,
                       batches=tuple(_int_list(args.batches)) if args.batches else None, device=args.device or "cpu",
                       log=lambda m: print(m, file=sys.stderr))
        doc["meta"]["command"] = "jointdiff " + " ".join(argv_of(args))
        print(sp.table(doc))
        print(f"\noverhead_ratio {doc['overhead_ratio']:.3f}  ray_vs_single_ratio {doc['ray_vs_single_ratio']:.3f}  "
              f"({doc['meta']['seconds']:.0f} s)", file=sys.stderr)
        if args.json:
            sp.write_json(doc, args.json)
            print(f"wrote {args.json}", file=sys.stderr)
        return 0
    if args.kind == "large":
        from pipeline.bench import large as lg

        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        if args.memory and args.scenarios == "none":
            doc = {"meta": {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}, "rows": []}
        else:
            doc = lg.large(quick=args.quick, steps=steps[0] if steps else None, rule=rules[0] if rules else None,
                           scenarios=args.scenarios.split(",") if args.scenarios else None, figure=args.figure,
                           log=log, methods=args.methods.split(",") if args.methods else None)
        if args.scenarios != "none" and "joint" in (args.methods or "joint").split(","):  # the samplers' tiling
            doc["tiling"] = lg.tiling_overhead(steps=2 if args.quick else 6, repeats=1 if args.quick else 3, log=log)
        if args.memory:
            doc["memory"] = lg.memory(threads=args.threads, rule=rules[0] if rules else "dps",
                                      full_steps=steps[0] if steps else 50, log=log)
            joint = [r for r in doc["rows"] if r["method"] == "joint"]
            if joint:  # the full time from the benchmark's own seconds per megapixel at its steps
                per_mp = max(r["seconds_per_megapixel"] for r in joint)
                doc["memory"]["extrapolated_seconds_from_bench"] = per_mp * lg.MEMORY_SIZE**2 / 1e6
        doc["meta"]["command"] = "jointdiff " + " ".join(argv_of(args))
        print(lg.table(doc))
        if args.json:
            lg.write_json(doc, args.json)
            print(f"wrote {args.json}", file=sys.stderr)
        return 0
    if args.kind == "em":
        from pipeline.bench import em

        setting = em.settings_for(args.quick, n_train=args.n, rounds=args.rounds, train_steps=args.train_steps,
                                  n_test=args.n_test, steps=steps[0] if steps else None)
        doc = em.em(**setting, state=args.state, threads=args.threads, log=lambda m: print(m, file=sys.stderr))
        doc["meta"]["command"] = "jointdiff " + " ".join(argv_of(args))
        print(em.table(doc))
        em.write(doc, args.json, args.figure)
        for path in (args.json, args.figure):
            if path:
                print(f"wrote {path}", file=sys.stderr)
        return 0
    if args.kind == "nfe":
        from pipeline.bench import nfe

        solvers = args.solvers.split(",") if args.solvers else None
        doc = nfe.nfe_curve(quick=args.quick, n=args.n, n_val=args.n_val, solvers=solvers,
                            steps={s: steps for s in (solvers or nfe.DEFAULT_SOLVERS)} if steps else None,
                            log=lambda m: print(m, file=sys.stderr))
        doc["target"] = nfe.target(doc)
        doc["meta"]["command"] = "jointdiff " + " ".join(argv_of(args))
        print(nfe.table(doc))
        t = doc["target"]
        if t["reference"]:
            print(f"\nbest at <= 50 NFE: {t['best']['curve']} at {t['best']['steps']} steps, "
                  f"{t['best']['psnr_mean']:.2f} dB; em at 600: {t['reference']['psnr_mean']:.2f} dB; gap "
                  f"{t['gap_db']:.2f} dB (target <= 0.3: {'met' if t['met'] else 'not met'})", file=sys.stderr)
        nfe.write(doc, args.json, args.figure)
        for path in (args.json, args.figure):
            if path:
                print(f"wrote {path}", file=sys.stderr)
        return 0
    if args.kind == "tune" and rules and "paper" in rules and rules != ["paper"]:
        raise ConfigError("--rules: the paper preset is tuned on its own (bench tune --rules paper)")
    if args.kind == "tune" and rules == ["paper"]:  # into the tuned table; scores to --json
        t0 = time.perf_counter()
        res = q.tune_paper(n_val=args.n_val or 20, log=lambda m: print(m, file=sys.stderr))
        res["meta"] = {"command": "jointdiff " + " ".join(argv_of(args)), "seconds": time.perf_counter() - t0,
                       "threads": torch.get_num_threads(), "machine": platform.machine()}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"paper: best lambda_x {res['best']['lambda_x']} kappa_n {res['best']['kappa_n']} "
              f"(recorded in pipeline/posterior/tuned.yaml)", file=sys.stderr)
        return 0
    if args.kind == "tune":
        res = q.tune(steps or [50, 100, 200], rules or list(q.TUNE_GRIDS), n_val=args.n_val or 20,
                     log=lambda m: print(m, file=sys.stderr))
        from pipeline.posterior.tuned import TABLE

        print(f"default rule {res['default_rule']}; weights written to {TABLE}", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    rows = q.quality(quick=args.quick, n=args.n, n_robust=args.n_robust, steps=steps, rules=rules,
                     scenarios=args.scenarios.split(",") if args.scenarios else None, n_val=args.n_val,
                     figure=args.figure, log=lambda m: print(m, file=sys.stderr))
    print(q.table(rows))
    if args.json:
        q.write_json(rows, args.json, {"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
                                       "threads": torch.get_num_threads(), "machine": platform.machine(),
                                       "guidance": "pipeline/posterior/tuned.yaml"})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    out = write_report(args.run_uri, args.out, per_group=args.per_group)
    print(f"report of {args.run_uri.rstrip('/')} written to {out}", file=sys.stderr)
    print(out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.export import export_run

    done = export_run(args.run, args.dir, run_id=args.run_id, noise=args.noise, progress=not args.quiet,
                      log=lambda m: print(m, file=sys.stderr))
    print(done.describe(), file=sys.stderr)
    summary_line(dataclasses.asdict(done))
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.report import history_rows, runs_table

    rows = history_rows(args.metrics_uri, args.limit)
    if args.json:
        print(json.dumps(rows, default=str))
    else:
        print(runs_table(rows))
    return 0


def _local_flow(name: str, who: str) -> Any:
    """The flow ``flows.<name>.<name>``, set up to run on a temporary Prefect server started here."""
    # the temporary Prefect server's usage analytics cannot reach the network from most machines
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to start, which a busy 2-core machine can miss (seen in CI)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    import importlib

    try:
        flow = getattr(importlib.import_module(f"flows.{name}"), name)
    except ImportError as exc:
        raise ConfigError(f"{who} runs the Prefect flow in flows/, which did not import ({exc}); "
                          "install jointdiff with `make demo` or `pip install -e .`") from exc
    _detached_prefect_server()
    return flow


def _detached_prefect_server() -> None:
    """Where no Prefect API is configured, start the temporary server that a flow run here would start, in a
    session of its own. A Ctrl-C at the terminal goes to the whole foreground process group: Prefect's server
    would stop with the job, and the flow would then spend minutes retrying to report its end to it. Started
    here, Prefect's calls find it running (one server per process) and it stops when this process exits."""
    import functools
    import subprocess

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if PREFECT_API_URL.value() or server.running:
        return
    popen = subprocess.Popen
    subprocess.Popen = functools.partial(popen, start_new_session=True)  # type: ignore[misc]
    try:
        server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    finally:
        subprocess.Popen = popen  # type: ignore[misc]


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.data.corrupt import corrupt, write_observations
    from pipeline.data.datasets import load_images

    refuse_credentials(args.set)  # the flow's parameters are stored in plain text: before any work
    clean_dataset = _local_flow("clean_dataset", "the demo")

    out = Path(args.out).resolve()
    bucket = out / "bucket"
    obs_uri = (bucket / "observations").as_uri()
    print(f"1/3 corrupting {args.n} test faces with test digits (alpha 0.5) into {obs_uri}", file=sys.stderr)
    clean, noise = load_images("faces", "test", 32, 1), load_images("digits", "test", 32, 1)
    obs = corrupt(clean, noise, args.n, alpha=0.5, seed=args.seed)
    shards = write_observations(obs_uri, obs, shard_size=args.shard_size)
    print(f"    {len(shards)} shard(s) of up to {args.shard_size} observations", file=sys.stderr)
    from pipeline.posterior.sampler import SamplerSettings

    default = SamplerSettings()
    steps = args.steps or default.steps
    print("2/3 running the Prefect flow clean-dataset on a local Ray (shipped priors faces + digits, "
          f"{default.rule}, {default.solver} {steps} steps)", file=sys.stderr)
    summary = clean_dataset(obs_uri, (bucket / "cleaning").as_uri(), config=None,
                            overrides=([f"sampler.steps={args.steps}"] if args.steps else []) + args.set,
                            run_id=args.run_id,
                            progress=not args.quiet)
    run = summary["output"]
    print(f"3/3 done: the run is in {run}, its summary row in {summary['summary']}", file=sys.stderr)
    print(f"\nlook at it with DuckDB:\n  duckdb -c \"SELECT id, psnr_input, psnr, ssim FROM "
          f"read_parquet('{run.removeprefix('file://')}/metrics/*/*.parquet') ORDER BY psnr LIMIT 5\"",
          file=sys.stderr)
    print(f"the run history: jointdiff runs {(bucket / 'cleaning').as_uri()}", file=sys.stderr)
    print(f"the report (written by the flow; open it in a browser):\n  {summary['report'].removeprefix('file://')}",
          file=sys.stderr)
    summary_line(summary)
    return 0


def _cmd_learn_prior(args: argparse.Namespace) -> int:
    refuse_credentials(args.set)  # the flow's parameters are stored in plain text
    refuse_credentials(args.prior_set, "--prior-set")
    from pipeline.jobs.learn import open_learning

    params = learn_params(args)
    # checked here, before Prefect starts: a wrong path, prior or setting is one line and no flow run
    open_learning(**params)
    flow = _local_flow("learn_prior", "learn-prior")
    try:
        result = flow(**params, progress=not args.quiet)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(LEARN_INTERRUPTED) from None
    print(f"learned prior: {result['latest'] or result['prior']} (round {result['chosen']}); cleaned dataset: "
          f"{result['cleaned']}; every round: {result['root']}", file=sys.stderr)
    summary_line({k: v for k, v in result.items() if k != "rounds"})
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    try:
        return _submit_action(args)
    except RuntimeError as exc:  # what Ray's Jobs API client raises for an HTTP error
        job = getattr(args, "job", None) or getattr(args, "job_id", None)
        if "404" in str(exc) and job:
            print(f"jointdiff submit {args.action}: no job {job!r} on that cluster (see `jointdiff submit list`)",
                  file=sys.stderr)
        else:
            print(f"jointdiff submit {args.action}: the Ray Jobs API said: {exc}", file=sys.stderr)
        return 1


def _submit_action(args: argparse.Namespace) -> int:
    from pipeline.jobs import submit as sj

    if args.action in sj.ENTRYPOINTS:
        job_id = sj.submit(args.action, args.job_args, args.address, working_dir=args.working_dir,
                           runtime_env=args.runtime_env, submission_id=args.job_id,
                           entrypoint_num_cpus=args.entrypoint_num_cpus)
        print(job_id)
        address = sj.jobs_address(args.address)
        if not args.follow:
            print(f"submitted. Follow it with: jointdiff submit logs {job_id} --address {address} --follow",
                  file=sys.stderr)
            return 0
        return _follow(sj, sj.connect(args.address), job_id, address)
    client = sj.connect(args.address)
    if args.action == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)[: args.limit]
        print(f"{'job id':<44} {'status':<10} {'started (UTC)':<26} entrypoint")
        for j in jobs:
            start = sj.describe(client, j.submission_id or j.job_id)["start_time"] or ""
            print(f"{(j.submission_id or j.job_id):<44} {j.status.value:<10} {start:<26} {j.entrypoint[:80]}")
        return 0
    if args.action == "status":
        info = sj.describe(client, args.job)
        if args.json:
            print(json.dumps(info))
        else:
            for key in ("job_id", "status", "message", "entrypoint", "start_time", "end_time", "driver_exit_code"):
                print(f"{key + ':':<18} {info[key]}")
        return 0
    if args.action == "logs":
        if args.follow:
            return _follow(sj, client, args.job, sj.jobs_address(args.address))
        sys.stdout.write(client.get_job_logs(args.job))
        return 0
    if args.action == "stop":
        stopped = client.stop_job(args.job)
        print(f"{args.job}: " + ("stop requested" if stopped else "not running (already finished)"), file=sys.stderr)
        return 0
    raise AssertionError(args.action)


def _follow(sj, client, job_id: str, address: str) -> int:  # noqa: ANN001 (module and client are lazy imports)
    try:
        status = sj.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: jointdiff submit stop {job_id} "
              f"--address {address}", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_train_supervised(args: argparse.Namespace) -> int:
    from pipeline.config import PriorConfig, load_config
    from pipeline.diffusion.train import TrainingInterrupted
    from pipeline.training import supervised_plan, train_supervised

    image = load_config(PriorConfig, args.image_config)
    noise = load_config(PriorConfig, args.noise_config)
    try:
        plan = supervised_plan(image, noise, args.forward, args.batch_size, args.steps)
    except ValueError as exc:
        raise ConfigError(f"--forward {args.forward}: {exc}") from None
    budget = " + ".join(f"{b['prior']} {b['steps']} x {b['batch_size']} x {b['parameters']:,}" for b in plan["budget"])
    print(f"supervised {image.name}+{noise.name} ({args.forward}, weight U{tuple(plan['weight_range'])}): "
          f"{plan['parameters']:,} parameters (base_channels {plan['net'].base_channels}; the priors "
          f"{plan['budget_parameters']:,}), {plan['steps']} steps x {plan['batch_size']} (matched compute "
          f"{plan['matched_steps']}: {budget}) -> {args.output}", file=sys.stderr)
    if args.plan:
        return 0
    try:
        summary = train_supervised(image, noise, args.forward, args.output, steps=args.steps,
                                   batch_size=args.batch_size, device=args.device, threads=args.threads,
                                   progress=not args.quiet,
                                   route_priors=tuple(args.route_priors) if args.route_priors else None)
    except TrainingInterrupted as stop:
        print(f"\ninterrupted at step {stop.step}; the training state is saved in {args.output}/state. "
              "Run the same command again to resume.", file=sys.stderr)
        return 130
    heldout = summary.get("heldout_loss")
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          + (f"held-out loss {heldout:.4f}" if heldout is not None else "no held-out loss (no test split)")
          + f", {summary['seconds_total']:.0f} s of training; model in {args.output}/model", file=sys.stderr)
    summary_line({k: v for k, v in summary.items() if k != "train_config"})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointdiff", description="Remove structured noise from image "
                                "datasets with two diffusion priors and joint posterior sampling.")
    sub = p.add_subparsers(dest="command", required=True)

    t = add_train_arguments(sub.add_parser("train", help="train one diffusion prior (in this process, or on Ray "
                                                         "Train with --workers / --ray-address)"))
    t.set_defaults(func=_cmd_train)

    ts = sub.add_parser("train-supervised", help="train the supervised network for a pair of prior recipes: "
                        "observation -> clean image in one evaluation (the fast path's network)")
    ts.add_argument("output", help="folder for the training state and the exported model (OUTPUT/model)")
    ts.add_argument("--image-config", required=True, help="the image prior's recipe (its data, network and "
                    "training settings), e.g. configs/prior_faces.yaml")
    ts.add_argument("--noise-config", required=True, help="the noise prior's recipe, e.g. configs/prior_digits.yaml")
    ts.add_argument("--forward", default="blend", help="how pairs are made: blend (alpha from U[0.2, 0.8]) or "
                    "composite (a from U[0.5, 1]); default blend")
    ts.add_argument("--steps", type=int, default=None, help="default: the two priors' training compute "
                    "(steps x batch x parameters) at this network's size")
    ts.add_argument("--batch-size", type=int, default=None, help="default: the image prior's")
    ts.add_argument("--device", default=None, help="default: the image recipe's train.device")
    ts.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the image recipe's)")
    ts.add_argument("--route-priors", nargs=2, metavar=("IMAGE", "NOISE"), default=None,
                    help="the priors the router (sampler.path=routed) is calibrated with (default: the recipes' "
                    "names, where they are shipped priors); run again on a finished OUTPUT to recalibrate")
    ts.add_argument("--plan", action="store_true", help="print the network size and steps, then exit")
    ts.add_argument("--quiet", action="store_true", help="no progress bar")
    ts.set_defaults(func=_cmd_train_supervised)

    s = sub.add_parser("sample", help="draw unconditional samples from a prior into a PNG grid")
    s.add_argument("checkpoint", help="model folder/URI, or a shipped prior: faces, digits, stripes, natural, "
                                         "stripes-rgb, text")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--steps", type=int, default=500, help="Euler-Maruyama steps (default 500)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png", help="PNG path or URI (default samples.png)")
    s.add_argument("--nrow", type=int, default=8)
    s.add_argument("--nearest", action="store_true",
                   help="report each sample's distance to its nearest training image (memorisation "
                   "check) and write OUT_nearest.png: rows of samples above their nearest training images")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("export-embedded", help="write an embedded dataset as Parquet image shards")
    e.add_argument("name", help="faces, digits, patches, stripes, natural or text (RGBA layers: --channels 4)")
    e.add_argument("uri", help="destination folder or URI (file://, s3://, memory://...)")
    e.add_argument("--split", default="train", choices=["train", "val", "test"])
    e.add_argument("--size", type=int, default=32)
    e.add_argument("--channels", type=int, default=1, choices=[1, 3, 4])
    e.add_argument("--bits", type=int, default=8, choices=[8, 16], help="PNG bit depth")
    e.add_argument("--n", type=int, default=None, help="only the first N images")
    e.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    e.set_defaults(func=_cmd_export_embedded)

    c = sub.add_parser("corrupt", help="build an observation dataset: clean images under structured noise")
    c.add_argument("clean", nargs="?", help="clean images: embedded name (faces, patches...) or a shard URI")
    c.add_argument("noise", nargs="?", help="noise images: embedded name (digits, stripes...) or a shard URI")
    c.add_argument("out", nargs="?", help="destination folder or URI for the observation shards")
    c.add_argument("--config", default=None, help="YAML with these keys (flags given here win)")
    c.add_argument("--section", default=None, help="top-level section of --config (e.g. corrupt)")
    c.add_argument("--alpha", type=float, default=None, help="the noise's weight: the blend's alpha, the overlay's "
                                                               "or composite's a (default 0.5)")
    c.add_argument("--forward", default=None, choices=["blend", "sum", "overlay", "composite"],
                   help="default: composite for text (RGBA layers), blend for the rest")
    c.add_argument("--sigma-y", type=float, default=None, help="Gaussian read-out noise std ([0, 1] units; default 0)")
    c.add_argument("--split", default=None, choices=["train", "val", "test"],
                   help="split of embedded datasets (default test)")
    c.add_argument("--n", type=int, default=None, help="observations (default: one per clean image)")
    c.add_argument("--size", type=_size_arg, default=None,
                   help="default 32; native: each clean image at its own size, the noise rendered at it "
                        "(stripes, text)")
    c.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default 1")
    c.add_argument("--noise-channel", default=None, choices=["all", "random"],
                   help="grey noise on RGB images: in every channel (default), or in one random channel (the paper)")
    c.add_argument("--seed", type=int, default=None, help="default 0")
    c.add_argument("--shard-size", type=int, default=None, help="default 1000")
    c.add_argument("--format", default=None, choices=["shards", "png"],
                   help="shards (default): Parquet observation shards with the truth, for metrics; png: the "
                        "observations alone as PNG files named by id, a folder of images to try `jointdiff "
                        "ingest` on")
    c.set_defaults(func=_cmd_corrupt)

    ig = sub.add_parser("ingest", help="image files (folder, tar or zip on any URI) -> observation shards")
    ig.add_argument("src", help="folder, .tar[.gz] or .zip of PNG/JPEG/TIFF/BMP/WebP/.npy images (any URI)")
    ig.add_argument("dst", help="destination folder or URI of the shards")
    ig.add_argument("--config", default=None, help="YAML ingest config (policy, shard_size, bits, storage)")
    ig.add_argument("--section", default=None, help="top-level section of --config")
    ig.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set policy.alpha=white")
    ig.add_argument("--size", type=int, default=None, help="square size to produce (default: keep)")
    ig.add_argument("--channels", type=int, default=None, choices=[1, 3], help="channels to produce (default: keep)")
    ig.add_argument("--resize", default=None, choices=["error", "resize", "center-crop"],
                    help="images of another size: reject (default), resize, or centre-crop then resize")
    ig.add_argument("--shard-size", type=int, default=None, help="inputs per shard (default 1000)")
    ig.add_argument("--bits", type=int, default=None, choices=[8, 16], help="PNG bit depth (default 16)")
    ig.add_argument("--quiet", action="store_true")
    ig.set_defaults(func=_cmd_ingest)

    cl = add_clean_arguments(sub.add_parser(
        "clean", help="clean an observation dataset: in this process (--executor local) or on Ray (--executor ray: "
                      "a local Ray in this process, or a cluster with --ray-address / RAY_ADDRESS)"))
    cl.set_defaults(func=_cmd_clean)

    b = sub.add_parser("bench", help="benchmarks: quality (denoising vs baselines), tune (guidance weights), "
                       "speed (compute floor, images/s, Ray vs one process, memory), nfe (PSNR against NFE per "
                       "solver), gpu (the paper's setting on one GPU: images/s, memory, FLOP/s; bench/gpu.py), "
                       "large (held-out photos at their own size under text and stripes: quality, seams, s/MP, "
                       "memory), em (an image prior learned from corrupted data by EM, round by round)")
    b.add_argument("kind", choices=["quality", "tune", "speed", "nfe", "gpu", "large", "em"])
    b.add_argument("--quick", action="store_true", help="a few images and steps (a smoke test, minutes; em: the "
                   "setting its targets are judged on, about an hour)")
    b.add_argument("--rounds", type=int, default=None, help="em: EM rounds (quick 4)")
    b.add_argument("--train-steps", type=int, default=None, help="em: training steps per round (quick 600)")
    b.add_argument("--n-test", type=int, default=None, help="em: test observations (quick 50)")
    b.add_argument("--state", default=None, help="em: the resumable state's folder (default "
                   "~/.cache/jointdiff/bench/em/<settings hash>)")
    b.add_argument("--json", default=None, help="write the rows as JSON here")
    b.add_argument("--n", type=int, default=None, help="test observations per scenario (default 100)")
    b.add_argument("--n-robust", type=int, default=None,
                   help="test observations for the other scenarios (default 50)")
    b.add_argument("--n-val", type=int, default=None, help="validation observations for tuning (default 20)")
    b.add_argument("--steps", default=None, help="comma-separated step counts (default 50,100,200)")
    b.add_argument("--rules", default=None, help="comma-separated guidance rules (default all)")
    b.add_argument("--scenarios", default=None, help="comma-separated: main,stripes,alpha0.3,alpha0.7,ood,"
                   "font-digits,stripes-fine,alpha0.1,alpha0.9,unknown-alpha,read-out,mixed; large:"
                   " text,stripes,unknown-alpha,text-serif,faces (none: with --memory, the memory "
                   "figure alone)")
    b.add_argument("--methods", default=None, help="large: comma-separated rows to measure: observation,nlm,tv,bm3d,"
                   "inpaint,gaussian,joint,supervised (default all); the test images are the same whatever is chosen")
    b.add_argument("--memory", action="store_true", help="large: also clean one 4096x4096 RGB image at 2 steps in a "
                   "child process and report its peak RSS")
    b.add_argument("--figure", default=None,
                   help="quality: write a PNG of 8 main-scenario test images (observation, joint, gaussian, "
                   "NLM, truth, noise estimate); nfe: an SVG of PSNR against NFE")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--batches", default=None, help="speed: comma-separated batch sizes (default 1,8,32,128)")
    b.add_argument("--device", default=None, help="speed: cpu (default) or cuda; gpu: default cuda when torch "
                   "sees a GPU")
    b.add_argument("--solvers", default=None, help="nfe: comma-separated solvers: em, ddim, ddim-noclip, ddim-tp2 "
                   "(default em,ddim)")
    b.set_defaults(func=_cmd_bench)

    r = sub.add_parser("report", help="one self-contained HTML report of a cleaning run (summary, plots, images, "
                       "errors)")
    r.add_argument("run_uri", metavar="RUN_URI", help="the run folder OUTPUT/runs/RUN_ID (any URI: path, file://, s3://)")
    r.add_argument("--out", default=None, help="where to write the HTML (any URI; default RUN_URI/report.html)")
    r.add_argument("--per-group", type=int, default=8,
                   help="images in each of the best / worst / random groups (default 8)")
    r.set_defaults(func=_cmd_report)

    x = sub.add_parser("export", help="write a run's cleaned images as PNG files, named by row id, with "
                       "DIR/export.csv mapping file to id")
    x.add_argument("run", metavar="RUN", help="a run folder OUTPUT/runs/RUN_ID, or an output root (then its only "
                   "run, --run-id, or else the newest); any URI")
    x.add_argument("dir", metavar="DIR", help="folder to write into (created if missing; any URI); files are "
                   "written only inside it")
    x.add_argument("--run-id", default=None, help="the run to export when RUN is an output root")
    x.add_argument("--noise", action="store_true", help="also write the noise estimates, as DIR/noise/NAME.png")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.set_defaults(func=_cmd_export)

    h = sub.add_parser("runs", help="the run history: one line per run invocation from OUTPUT/summary/, newest first")
    h.add_argument("metrics_uri", metavar="METRICS_URI", help="the output root of the runs (it holds summary/), "
                   "or its summary/ folder (any URI)")
    h.add_argument("--limit", type=int, default=20, help="newest N rows (default 20; 0 for all)")
    h.add_argument("--json", action="store_true", help="the full summary rows as JSON instead of a table")
    h.set_defaults(func=_cmd_runs)

    d = sub.add_parser("demo", help="the main job on embedded data: corrupt test faces with test digits, clean them "
                       "with the Prefect flow on a local Ray, print the summary and where the outputs are")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); the object-store "
                   "folder is OUT/bucket")
    d.add_argument("--n", type=int, default=100, help="observations (default 100: each test face under 5 digits)")
    d.add_argument("--shard-size", type=int, default=25, help="observations per shard (default 25)")
    d.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's tuned default)")
    d.add_argument("--seed", type=int, default=0, help="corruption seed")
    d.add_argument("--run-id", default=None, help="default: derived from input, models and sampler config")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="clean config override")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)

    lp = add_learn_arguments(sub.add_parser(
        "learn-prior", help="learn the image prior from a corrupted dataset and a noise prior alone (EM: clean with "
        "the current prior, fine-tune it on the posterior samples, repeat), as the Prefect flow learn-prior on Ray; "
        "publishes each round's prior (docs/how-to/learn-prior.md)"))
    lp.set_defaults(func=_cmd_learn_prior)

    sm = sub.add_parser("submit", help="run train or clean on a Ray cluster through the Ray Jobs API (as `ray job "
                        "submit`), and look after submitted jobs: status, logs, stop, list")
    sa = sm.add_subparsers(dest="action", required=True)
    for kind, text in (("clean", "submit `jointdiff clean ARGS` (INPUT OUTPUT --config ... --set ...)"),
                       ("train", "submit `jointdiff train ARGS` on Ray Train (--config ... --workers N --gpu "
                                 "--registry ...)"),
                       ("learn-prior", "submit `jointdiff learn-prior ARGS` (INPUT OUTPUT --noise-prior ... "
                                       "--rounds K ...), the EM job without Prefect")):
        k = sa.add_parser(kind, help=text, description=text + ". Arguments other than the ones below are the "
                          f"job's own, checked here by `jointdiff {kind}`'s parser before submitting.")
        k.add_argument("--follow", action="store_true", help="print the job's logs until it ends; exit 0 if it "
                       "succeeded, 1 if not")
        k.add_argument("--working-dir", default=".", help="folder shipped to the cluster as the job's working "
                       "directory (default: here); --config (and --prior-config) must be inside it")
        k.add_argument("--runtime-env", default=None, help="runtime env YAML (default: WORKING_DIR/"
                       "deploy/runtime_env.yaml when present)")
        k.add_argument("--job-id", default=None, help="submission id (default jointdiff-KIND-UTCSTAMP-XXXX)")
        k.add_argument("--entrypoint-num-cpus", type=float, default=None,
                       help="CPUs reserved for the job's driver (default: none)")
        k.set_defaults(passthrough=True)
    for action, text in (("status", "a job's status, message and times"), ("logs", "a job's logs"),
                         ("stop", "stop a running job"), ("list", "the cluster's jobs, newest first")):
        a = sa.add_parser(action, help=text)
        if action != "list":
            a.add_argument("job", help="job (submission) id, as printed by `jointdiff submit clean|train`")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        if action == "status":
            a.add_argument("--json", action="store_true", help="print JSON")
        if action == "list":
            a.add_argument("--limit", type=int, default=20)
    for a in sa.choices.values():
        a.add_argument("--address", default=None, help="the Ray Jobs API, http://HEAD:8265 (as for `ray job "
                       "submit`; default RAY_API_SERVER_ADDRESS). Not a ray:// cluster address. The auth token is "
                       "read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    sm.set_defaults(func=_cmd_submit)
    return p


REMOVED = {"denoise": "jointdiff clean --executor local"}
"""Verbs removed before 1.0, and what does their work now (docs/changelog.md)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in REMOVED:
        print(f"jointdiff: the verb `{argv[0]}` was removed; use `{REMOVED[argv[0]]}` (see docs/changelog.md)",
              file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if getattr(args, "passthrough", False):
        args.job_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
