"""The cleaning run on Ray: Ray Data schedules the pending shards of a run over a pool of sampler actors.

``python -m pipeline.jobs.clean INPUT OUTPUT --config C`` (what ``ray job submit`` runs) is the same
command as ``jointdiff clean``. The driver:

0. checks, before Ray starts, what :func:`pipeline.clean.preflight_run` checks (storage access, both
   priors, an explicit device when no cluster is named), each failure one line;
1. plans the run (:func:`pipeline.clean.prepare_run`): the input's shards, those already complete for
   this run id (skipped), and the rows that repeat an earlier id (decided from the ids alone, so shards
   can be cleaned in any order);
2. makes a Ray dataset with one item per pending shard and ``map_batches`` it over an actor pool
   (``compute=ActorPoolStrategy``, ``num_gpus`` per actor: one GPU each when the cluster has GPUs, CPU
   actors otherwise). Each actor loads both priors once, from their URIs, on its first call; for each
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

Fault tolerance: Ray Data's pool actors restart when their process dies, and the shard they held is
retried on the replacement. Each attempt is counted in ``_attempts/<shard>.json`` before it starts; a
shard whose attempts reach ``MAX_SHARD_ATTEMPTS`` (one that kills its actor every time, say by running
out of memory) is given up: its rows go to the errors table and the run completes, instead of looping
forever. A retried shard's files are rewritten (atomically, so a straggling first attempt cannot tear
them) and its marker written only then. A driver killed half-way leaves complete shards marked;
running again with the same run id does only the rest (and counts attempts afresh).

Storage settings are resolved on the driver (config ``storage:`` section, then the AWS environment
variables) and handed to the actors, so workers reach the same buckets as the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.clean import (
    RunInterrupted,
    RunPlan,
    ShardCleaner,
    fail_shard,
    finish_run,
    judge_run,
    peak_rss_mb,
    preflight_run,
    prepare_run,
    process_shard,
)
from pipeline.config import CleanConfig, ConfigError
from pipeline.data.accounting import PlannedShard, plan

MAX_SHARD_ATTEMPTS = 3
MAX_REPLANS = 2  # fresh actor pools after a stall (a lost node that Ray Data cannot recover from)


class ShardActor:
    """A pool actor: both priors loaded once; each call cleans the shards of its batch."""

    def __init__(self, cfg: CleanConfig, run: RunPlan, threads: int, crash_once: str | None = None,
                 crash_shard: str | None = None, hang_once: str | None = None):
        import ray
        import torch

        from pipeline.data import storage

        storage.configure(cfg.storage)
        torch.set_num_threads(threads)
        self.cfg, self.threads = cfg, threads
        self._cleaner: ShardCleaner | None = None
        self.run = run
        self.crash_once, self.crash_shard, self.hang_once = crash_once, crash_shard, hang_once
        self._started = 0
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.node_id = ray.get_runtime_context().get_node_id()
        _exit_with_raylet()

    def _maybe_crash(self, shard: str) -> None:
        # Test hooks: the first actor to get here (outputs written, marker not yet) dies for real, or
        # every actor that gets here with `crash_shard`.
        if shard == self.crash_shard:
            os._exit(1)
        if not self.crash_once:
            return
        try:
            fd = os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one actor wins
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {shard}\n".encode())
        os.close(fd)
        os._exit(1)

    def _maybe_hang(self) -> None:
        # Test hook: ``PATH`` or ``PATH@NODE_ID``: the first actor (on that node) to start its second shard never
        # finishes it, as an actor stuck on a lost node would look to the driver.
        self._started += 1
        path, _, node = (self.hang_once or "").partition("@")
        if not path or (node and node != self.node_id) or self._started != 2:
            return
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        while True:
            time.sleep(3600)

    @property
    def cleaner(self) -> ShardCleaner:
        # Built on the first call, in the thread that runs the calls (Ray Data calls the UDF from a
        # worker thread, not the thread that ran __init__): with the models built in __init__, sampling
        # ran 1.6x slower here (23.9 s against 14.6 s for one 25-image shard at 50 steps).
        if self._cleaner is None:
            import torch

            torch.set_num_threads(self.threads)
            self._cleaner = ShardCleaner(self.cfg)
        return self._cleaner

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        keys = ("shard", "cleaned", "errors", "seconds", "started", "finished")
        out: dict[str, list[Any]] = {k: [] for k in (*keys, "pid", "node_id", "device", "gpu_ids", "peak_rss_mb",
                                                     "peak_cuda_mb")}
        for i in range(len(batch["name"])):
            shard = PlannedShard(str(batch["uri"][i]), str(batch["name"][i]), False, int(batch["size"][i]),
                                 str(batch["version"][i]))
            dups = {int(k): v for k, v in json.loads(str(batch["duplicates"][i])).items()}
            attempt = count_attempt(self.run, shard.name, self.node_id)
            self._maybe_hang()
            if attempt > MAX_SHARD_ATTEMPTS:
                res = fail_shard(self.cfg, self.run, shard, f"gave up after {MAX_SHARD_ATTEMPTS} attempts: the "
                                 "worker cleaning this shard died each time (out of memory? a crash in a decoder?)")
            else:
                res = process_shard(self.cleaner, self.run, shard, duplicates=dups, before_marker=self._maybe_crash,
                                    worker={"node_id": self.node_id})
            for k in keys:
                out[k].append(res[k])
            out["pid"].append(os.getpid())
            out["node_id"].append(self.node_id)
            out["peak_rss_mb"].append(peak_rss_mb())
            out["peak_cuda_mb"].append(_peak_cuda_mb())
            out["device"].append(self._cleaner.device if self._cleaner else self.cfg.device)
            out["gpu_ids"].append(",".join(self.gpu_ids))
        return out


def _exit_with_raylet(poll_s: float = 0.2) -> None:
    """Stop this worker process within ``poll_s`` of its raylet's death (its parent: the node is lost, or the driver
    that started a local Ray was killed), so that it writes nothing more; Ray's own check takes seconds, and
    lets the call in progress finish its shard."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-raylet", daemon=True).start()


def _peak_cuda_mb() -> float:
    """Peak CUDA memory allocated by this process's tensors so far, in MiB (0 without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def count_attempt(run: RunPlan, shard: str, node_id: str | None = None) -> int:
    """Record one more attempt at ``shard`` in ``_attempts/`` (with the Ray node and process that make it)
    and return its number in this driver session (1 for the first; attempts of an earlier, interrupted
    session do not count).

    One actor holds a shard at a time, so a plain read-then-write is enough."""
    from pipeline.data.storage import join, open_fs, write_atomic

    uri = join(run.run_uri, "_attempts", shard.replace(".parquet", ".json"))
    session = run.started_at.isoformat()
    fs, path = open_fs(uri)
    last = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    n = last.get("attempts", 0) + 1 if last.get("session") == session else 1
    write_atomic(uri, json.dumps({"attempts": n, "session": session, "pid": os.getpid(), "node_id": node_id,
                                  "started": time.time()}).encode())
    return n


def cluster_address(address: str | None, command: str = "clean") -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``, else None (a new local Ray); a ``ray://``
    or ``http://`` address is refused with a one-line :class:`ConfigError` saying what to use instead."""
    from pipeline.config import check_ray_address

    check_ray_address(address, command=command)
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_ray_address(address, "RAY_ADDRESS", command)
    return address or None


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start a new in-process local Ray; reuse a Ray
    already initialised in this process. Returns whether this call started or connected it.

    A ``ray://`` (Ray Client) address is refused before anything starts: Ray Data does not run under
    Ray Client (``'Worker' object has no attribute 'core_worker'`` half-way through the job)."""
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:
        ray.init(address=address)
    else:  # "local": a new instance, never a cluster that `ray start` left running on this machine
        ray.init(address="local", include_dashboard=False)
        _reap_local_ray()
    return True


_reaper: Any = None


def _reap_local_ray() -> None:
    """Once per process: the local Ray that this driver starts dies with it, even when it is killed outright
    (:mod:`pipeline.jobs.reaper`)."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        from pipeline.jobs import reaper

        _reaper = reaper.start()


@contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """:func:`init_ray` for the duration of a block (which gets whether it started or joined Ray itself);
    shut down on exit only if the block started it."""
    import ray

    started = init_ray(address)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


class Stalled(RuntimeError):
    """No shard finished for ``ray.stall_timeout_s`` while the live nodes hold fewer actors than planned: Ray
    Data can wait forever for actors of a lost node that it cannot place again."""


def live_capacity(threads: int, gpus: float) -> int:
    """How many actors of ``threads`` CPUs and ``gpus`` GPUs the nodes alive now can hold."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return sum(min(int(n.get("CPU", 0)) // threads, int(n.get("GPU", 0) // gpus) if gpus else 10**6)
               for n in nodes)


@dataclasses.dataclass
class JobStats:
    shards: list[dict[str, Any]]  # per shard cleaned: shard, cleaned, errors, seconds, pid, node_id, device, gpu_ids
    processed: int  # images cleaned by this job
    seconds: float  # wall time of the Ray part (actor start-up included)
    actors: int
    gpus_per_actor: float
    threads_per_actor: int

    @classmethod
    def empty(cls) -> JobStats:
        return cls([], 0, 0.0, 0, 0.0, 0)


def cpu_threads(node_cpus: list[int], n_pending: int) -> int:
    """Torch threads per CPU actor: the CPUs shared out over ``n_pending`` shards (or over the actors
    asked for, when fewer), 1 to 4 each.

    Processes scale better than threads on a sampler step's small tensors: on 2 cores, two actors of
    one thread each cleaned 2.12-2.14 images/s where one process of two threads cleaned 1.86 (ad-hoc
    runs on ``jointdiff bench speed``'s 4 shards, 50 steps; the benchmark itself: 1.07x and 1.13x).
    More threads per actor only when there are fewer shards than CPUs, so that no CPU idles; each actor
    holds both priors (about 0.7 GB resident)."""
    return max(1, min(4, max(node_cpus), sum(node_cpus) // max(1, n_pending)))


def actor_layout(cfg: CleanConfig, n_pending: int, fit_to_live: bool = False) -> tuple[int, float, int]:
    """``(actors, gpus per actor, threads per actor)`` from the config and the live nodes' resources.

    Defaults: one actor per GPU when the cluster has GPUs (each also holds ``threads`` CPUs, 2 by
    default); otherwise CPU actors, as many as fit on the nodes, of :func:`cpu_threads` threads: one
    each when there are at least as many pending shards as CPUs. An explicit choice that no node can
    host fails here rather than waiting forever, unless ``ray.autoscaling`` says the cluster adds nodes
    on demand: then the explicit choice stands. ``fit_to_live`` (a re-plan after a lost node) caps an explicit
    ``ray.actors`` at what the nodes alive hold.
    """
    import ray

    r = cfg.ray
    if r.autoscaling:
        assert r.actors is not None and r.gpus_per_actor is not None  # RayConfig's validator
        threads = r.threads_per_actor or (2 if r.gpus_per_actor else 4)
        return max(1, min(r.actors, n_pending)), r.gpus_per_actor, threads
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] or [ray.cluster_resources()]
    node_cpus = [int(n.get("CPU", 0)) for n in nodes]
    node_gpus = [int(n.get("GPU", 0)) for n in nodes]
    g = r.gpus_per_actor if r.gpus_per_actor is not None else (1.0 if max(node_gpus) >= 1 else 0.0)
    threads = r.threads_per_actor or (2 if g else cpu_threads(node_cpus, min(r.actors or n_pending, n_pending)))
    if g > max(node_gpus):
        raise ConfigError(f"ray.gpus_per_actor={g:g} but no live node has that many GPUs ({max(node_gpus)} at most); "
                          "set ray.gpus_per_actor: 0 to run on CPUs")
    if threads > max(node_cpus):
        raise ConfigError(f"ray.threads_per_actor={threads} but no live node has that many CPUs "
                          f"({max(node_cpus)} at most)")
    fit = sum(min(c // threads, int(gp // g) if g else c // threads) for c, gp in zip(node_cpus, node_gpus))
    actors = min(r.actors, max(1, fit)) if r.actors and fit_to_live else r.actors or max(1, fit)
    return max(1, min(actors, n_pending)), g, threads


def run_job(run: RunPlan, cfg: CleanConfig, progress: bool = True, crash_once: str | None = None,
            crash_shard: str | None = None, replan: bool = False) -> JobStats:
    """Clean the run's pending shards on the actor pool (Ray must be initialised, see :func:`init_ray`).

    Shards completed since ``run`` was planned (by a concurrent or failed-then-retried attempt) are
    skipped. ``crash_once`` and ``crash_shard`` are test hooks: a file path that the first actor to
    finish writing a shard's outputs creates before it exits its process (``os._exit``), as a killed
    worker would; a shard name whose every attempt kills its actor so.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    t0 = time.perf_counter()
    done_now = {s.name for s in plan(run.input_uri, run.run_uri) if s.done}
    pending = [s for s in run.pending if s.name not in done_now]
    if not pending:
        return JobStats.empty()
    actors, gpus, threads = actor_layout(cfg, len(pending), fit_to_live=replan)
    update: dict[str, Any] = {"storage": cfg.storage.resolved()}
    if not gpus and cfg.device == "auto":  # an actor without a GPU slot must not take a GPU it sees
        update["device"] = "cpu"
    cfg = cfg.model_copy(update=update)
    light = dataclasses.replace(run, shards=[], duplicates={})  # per-shard duplicates travel with each item
    items = [{"uri": s.uri, "name": s.name, "size": s.size, "version": s.version,
              "duplicates": json.dumps(run.duplicates.get(s.name, {}))} for s in pending]
    where = "GPU" if gpus else "CPU"
    print(f"clean {run.run_id}: {len(pending)} shard(s) on {actors} {where} actor(s) "
          f"({gpus:g} GPU, {threads} thread(s) each)", file=sys.stderr)
    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # our own bar below counts images
    shards: list[dict[str, Any]] = []
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = ds.map_batches(
            ShardActor, batch_size=1,
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_gpus=gpus, num_cpus=threads,
            fn_constructor_kwargs={"cfg": cfg, "run": light, "threads": threads, "crash_once": crash_once,
                                   "crash_shard": crash_shard,
                                   "hang_once": os.environ.get("JOINTDIFF_TEST_HANG_ONCE") or None})
        total = sum(run.rows.get(s.name, 1) for s in pending)
        stall_s = cfg.ray.stall_timeout_s
        with tqdm(total=total, desc=f"clean {run.run_id}", unit="img", disable=not progress) as bar, \
                _interruptible() as interrupted:
            last = time.monotonic()
            for row in _rows_or_ticks(results):
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if row is None:  # a second without a finished shard
                    if stall_s and time.monotonic() - last > stall_s:
                        capacity = live_capacity(threads, gpus)
                        if capacity < actors:
                            raise Stalled(f"no shard finished for {stall_s:g} s and the nodes alive hold "
                                          f"{capacity} of the {actors} actors planned")
                    continue
                last = time.monotonic()
                row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                shards.append(row)
                bar.update(int(row["cleaned"]) + int(row["errors"]))
                bar.set_postfix(shards=f"{len(shards)}/{len(pending)}")
    except BaseException:
        # Leaving mid-run (Ctrl-C, a stall): the thread that reads the rows is still inside Ray Data, which logs a
        # warning with a traceback for each of its calls once the session is shut down (nothing of it is news),
        # and would start a Ray of its own (Ray's auto-init) while this driver connects again for a re-plan.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        try:
            import ray._private.auto_init_hook as auto_init

            auto_init.enable_auto_connect = False  # this process always calls ray.init itself
        except (ImportError, AttributeError):
            pass
        raise
    finally:
        ctx.enable_progress_bars = bars
    processed = sum(int(r["cleaned"]) for r in shards)
    return JobStats(shards, processed, time.perf_counter() - t0, actors, gpus, threads)


def _rows_or_ticks(results: Any, tick_s: float = 1.0) -> Iterator[dict[str, Any] | None]:
    """The rows of a Ray dataset as they come, read in a thread, with ``None`` for every ``tick_s`` without one:
    the driver keeps control (Ctrl-C, the stall check) even when Ray Data waits forever."""
    q: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for row in results.iter_rows():
                q.put(("row", row))
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the driver's thread)
            q.put(("error", exc))

    threading.Thread(target=consume, name="ray-data-rows", daemon=True).start()
    while True:
        try:
            kind, item = q.get(timeout=tick_s)
        except queue.Empty:
            yield None
            continue
        if kind == "end":
            return
        if kind == "error":
            raise item
        yield item


# Lines Ray prints to the driver's stderr (from C++, so no logging filter sees them) on every run that are not
# about this run: Ray Data puts its own map function in the object store and passes it to each pool actor,
# and Ray's core worker logs that at ERROR level for any restartable actor (ray-project/ray#57733).
KNOWN_RAY_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextmanager
def quiet_ray_noise() -> Iterator[None]:
    """Drop the lines of :data:`KNOWN_RAY_NOISE` from this process's standard error (file descriptor 2)
    while the block runs; everything else passes through unchanged and at once (progress bars included).

    A pipe replaces descriptor 2 and a thread copies it to the real one. The thread stays for the life of
    the process: processes started meanwhile (a local Ray's) may still hold the pipe."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        buf = b""
        while chunk := os.read(read_end, 65536):
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl + 1], buf[nl + 1:]
                if not any(n in line for n in KNOWN_RAY_NOISE):
                    os.write(saved, line)
            if buf and not buf.startswith(b"["):  # not the start of a Ray log line: a progress bar's update
                os.write(saved, buf)
                buf = b""
        if buf:
            os.write(saved, buf)

    threading.Thread(target=pump, name="quiet-ray-noise", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)


@contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """Ctrl-C during the job stops it even where Ray Data's iterator swallows the KeyboardInterrupt (seen:
    a job interrupted after 2 of 12 shards ran to the end): the handler also sets an event, checked
    after every shard. Only in the main thread, where signal handlers live."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def handler(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def run_clean(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None, progress: bool = True,
              crash_once: str | None = None, crash_shard: str | None = None) -> dict[str, Any]:
    """The whole run: plan, clean the pending shards on Ray, check the accounting, append the summary.

    Returns the summary row plus ``shards``, ``skipped_shards``, ``output`` (the run's URI),
    ``summary`` (the row's file), ``job`` (actor layout and per-shard results) and ``report`` (the run's
    HTML report, written at the end as the flow writes it). Raises :class:`~pipeline.clean.RejectedRowsError`
    after recording a run that rejected too many rows (and writing its report).
    """
    from pipeline.clean import resolve_paths
    from pipeline.data import storage

    t0 = time.perf_counter()
    cluster_address(cfg.ray.address)  # a ray:// address fails here, before the work starts
    input_uri, output, cfg = resolve_paths(input_uri, output, cfg)
    storage.configure(cfg.storage)
    preflight_run(input_uri, output, cfg, ray=True)
    run = prepare_run(input_uri, output, cfg, run_id)
    stats = JobStats.empty()
    for replan in range(MAX_REPLANS + 1):
        if not run.pending:
            break
        try:
            with quiet_ray_noise(), ray_session(cfg.ray.address) as started:
                part = run_job(run, cfg, progress=progress, crash_once=crash_once, crash_shard=crash_shard,
                               replan=replan > 0)
            stats = dataclasses.replace(part, shards=stats.shards + part.shards,
                                        processed=stats.processed + part.processed)
            break
        except KeyboardInterrupt:
            raise RunInterrupted(run) from None
        except Stalled as exc:
            # leaving the session disconnected this driver, which ends every actor it owns, the stuck ones too
            if not started or replan == MAX_REPLANS:
                raise RuntimeError(f"run {run.run_id}: {exc}; the shards done so far are kept: run the same "
                                   "command again to clean the rest") from None
            print(f"clean {run.run_id}: {exc}: re-planning the pending shards on the nodes left", file=sys.stderr)
    summary = finish_run(run, cfg, stats.processed, "ray", time.perf_counter() - t0)
    summary["job"] = dataclasses.asdict(stats)
    from pipeline.report import write_report

    summary["report"] = write_report(run.run_uri)  # as the flow does
    judge_run(summary, cfg)
    return summary


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(["clean", *sys.argv[1:]]))
