"""The cleaning run on Ray: Ray Data schedules the pending shards of a run over a pool of sampler actors.

``python -m pipeline.jobs.clean INPUT OUTPUT --config C`` (what ``ray job submit`` runs) is the same
command as ``jointdiff clean``. The driver:

1. plans the run (:func:`pipeline.clean.prepare_run`): the input's shards, those already complete for
   this run id (skipped), and the rows that repeat an earlier id (decided from the ids alone, so shards
   can be cleaned in any order);
2. makes a Ray dataset with one item per pending shard and ``map_batches`` it over an actor pool
   (``compute=ActorPoolStrategy``, ``num_gpus`` per actor: one GPU each when the cluster has GPUs, CPU
   actors otherwise). Each actor loads both priors once, from their URIs, in its constructor; for each
   shard it reads and validates the rows (bad rows to the errors table), runs the joint sampler in
   batches, encodes the images and writes the shard's cleaned, metrics and errors files (named by
   source shard, so a redo replaces) and then, last, its completion marker;
3. follows the actors' per-shard results with a progress bar, then checks the accounting (every input
   row once, in cleaned or errors; :class:`~pipeline.data.accounting.AccountingError` otherwise) and
   appends the run's row to ``<output>/summary/`` (:func:`pipeline.clean.finish_run`).

Why a shard, not an image, is the unit of work: outputs are written per source shard, so a shard is
what can be finished, marked done and skipped on resume; an unreadable shard fails inside its own
item (one error row) instead of failing a whole ``read_parquet``. Within a shard the sampler runs in
batches of ``batch_size``.

Fault tolerance is Ray's: pool actors restart when their process dies (``max_restarts=-1``) and the
shard they held is retried on the replacement; its files are rewritten and its marker written only
then. A driver killed half-way leaves complete shards marked; running again with the same run id
does only the rest.

Storage settings are resolved on the driver (config ``storage:`` section, then the AWS environment
variables) and handed to the actors, so workers reach the same buckets as the driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from pipeline.clean import RunPlan, ShardCleaner, finish_run, prepare_run, process_shard
from pipeline.config import CleanConfig
from pipeline.data.accounting import PlannedShard, plan


class ShardActor:
    """A pool actor: both priors loaded once; each call cleans the shards of its batch."""

    def __init__(self, cfg: CleanConfig, run: RunPlan, threads: int, crash_once: str | None = None):
        import ray
        import torch

        from pipeline.data import storage

        storage.configure(cfg.storage)
        torch.set_num_threads(threads)
        self.cleaner = ShardCleaner(cfg)
        self.run = run
        self.crash_once = crash_once
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]

    def _maybe_crash(self, shard: str) -> None:
        # Test hook: the first actor to get here (outputs written, marker not yet) dies for real.
        if self.crash_once and not os.path.exists(self.crash_once):
            with open(self.crash_once, "w") as f:
                f.write(f"{os.getpid()} {shard}\n")
            os._exit(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in ("shard", "cleaned", "errors", "seconds", "pid", "device",
                                                     "gpu_ids")}
        for i in range(len(batch["name"])):
            shard = PlannedShard(str(batch["uri"][i]), str(batch["name"][i]), False, int(batch["size"][i]))
            dups = {int(k): v for k, v in json.loads(str(batch["duplicates"][i])).items()}
            res = process_shard(self.cleaner, self.run, shard, duplicates=dups, before_marker=self._maybe_crash)
            for k in ("shard", "cleaned", "errors", "seconds"):
                out[k].append(res[k])
            out["pid"].append(os.getpid())
            out["device"].append(self.cleaner.device)
            out["gpu_ids"].append(",".join(self.gpu_ids))
        return out


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start an in-process local Ray; reuse a Ray
    already initialised in this process. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    return True


@dataclasses.dataclass
class JobStats:
    shards: list[dict[str, Any]]  # one result per shard cleaned: shard, cleaned, errors, seconds, pid, device
    processed: int  # images cleaned by this job
    seconds: float  # wall time of the Ray part (actor start-up included)
    actors: int
    gpus_per_actor: float
    threads_per_actor: int


def actor_layout(cfg: CleanConfig, n_pending: int) -> tuple[int, float, int]:
    """``(actors, gpus per actor, threads per actor)`` from the config and the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = max(1, int(res.get("CPU", 1))), float(res.get("GPU", 0))
    g = cfg.ray.gpus_per_actor if cfg.ray.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    threads = cfg.ray.threads_per_actor or (2 if g else min(4, cpus))
    actors = cfg.ray.actors or (max(1, int(gpus // g)) if g else max(1, cpus // threads))
    return max(1, min(actors, n_pending)), g, threads


def run_job(run: RunPlan, cfg: CleanConfig, progress: bool = True, crash_once: str | None = None) -> JobStats:
    """Clean the run's pending shards on the actor pool (Ray must be initialised, see :func:`init_ray`).

    Shards completed since ``run`` was planned (by a concurrent or failed-then-retried attempt) are
    skipped. ``crash_once`` is a test hook: a file path; the first actor to finish writing a shard's
    outputs creates it and exits its process (``os._exit``), as a killed worker would.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    t0 = time.perf_counter()
    done_now = {s.name for s in plan(run.input_uri, run.run_uri) if s.done}
    pending = [s for s in run.pending if s.name not in done_now]
    if not pending:
        return JobStats([], 0, time.perf_counter() - t0, 0, 0.0, 0)
    actors, gpus, threads = actor_layout(cfg, len(pending))
    cfg = cfg.model_copy(update={"storage": cfg.storage.resolved()})
    light = dataclasses.replace(run, shards=[], duplicates={})  # per-shard duplicates travel with each item
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar below counts images
    items = [{"uri": s.uri, "name": s.name, "size": s.size,
              "duplicates": json.dumps(run.duplicates.get(s.name, {}))} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    results = ds.map_batches(
        ShardActor, batch_size=1,
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_gpus=gpus, num_cpus=threads,
        fn_constructor_kwargs={"cfg": cfg, "run": light, "threads": threads, "crash_once": crash_once})
    where = "GPU" if gpus else "CPU"
    print(f"clean {run.run_id}: {len(pending)} shard(s) on {actors} {where} actor(s) "
          f"({gpus:g} GPU, {threads} thread(s) each)", file=sys.stderr)
    shards: list[dict[str, Any]] = []
    with tqdm(total=run.pending_rows, desc=f"clean {run.run_id}", unit="img", disable=not progress) as bar:
        for row in results.iter_rows():
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            shards.append(row)
            bar.update(int(row["cleaned"]) + int(row["errors"]))
            bar.set_postfix(shards=f"{len(shards)}/{len(pending)}")
    processed = sum(int(r["cleaned"]) for r in shards)
    return JobStats(shards, processed, time.perf_counter() - t0, actors, gpus, threads)


def run_clean(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None, progress: bool = True,
              crash_once: str | None = None) -> dict[str, Any]:
    """The whole run: plan, clean the pending shards on Ray, check the accounting, append the summary.

    Returns the summary row plus ``shards``, ``skipped_shards``, ``output`` (the run's URI),
    ``summary`` (the row's file) and ``job`` (actor layout and per-shard results).
    """
    from pipeline.data import storage

    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    run = prepare_run(input_uri, output, cfg, run_id)
    stats = JobStats([], 0, 0.0, 0, 0.0, 0)
    if run.pending:
        started = init_ray(cfg.ray.address)
        try:
            stats = run_job(run, cfg, progress=progress, crash_once=crash_once)
        finally:
            if started:
                import ray

                ray.shutdown()
    summary = finish_run(run, cfg, stats.processed, "ray", time.perf_counter() - t0)
    summary["job"] = dataclasses.asdict(stats)
    return summary


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(["clean", *sys.argv[1:]]))
