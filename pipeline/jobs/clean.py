"""The Ray executor of a cleaning run: Ray Data schedules the pending shards of a :class:`~pipeline.run.Run`
over a pool of sampler actors.

``jointdiff clean --executor ray`` and ``python -m pipeline.jobs.clean INPUT OUTPUT --config C`` (what a
submitted job, ``ray job submit`` or a KubeRay ``RayJob`` runs; its own parser, :func:`main`) run
:func:`run_clean`. The run does what does not depend on where shards run (open: preflight, pinned models,
identity; plan; finish: verify, record, report, judge); this module does the Ray part:

1. a Ray dataset with one item per pending shard, ``map_batches``-ed over an actor pool
   (``compute=ActorPoolStrategy``, ``num_gpus`` per actor: one GPU each when the cluster has GPUs, CPU
   actors otherwise; :func:`actor_layout`). Each actor loads the run's pinned priors once, on its first call,
   and runs :meth:`Run.clean <pipeline.run.Run.clean>` for each shard it gets;
2. the actors' per-shard results followed with a progress bar; a stall (a lost node that Ray Data cannot
   recover from) re-plans the pending shards on a fresh pool (:data:`MAX_REPLANS`).

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

from pipeline.config import CleanConfig, ConfigError
from pipeline.data.accounting import PlannedShard
from pipeline.jobs.session import cluster_address, quiet_ray_noise, ray_session
from pipeline.run import Run
from pipeline.run.local import peak_rss_mb
from pipeline.run.shard import ShardCleaner

MAX_SHARD_ATTEMPTS = 3
MAX_REPLANS = 2  # fresh actor pools after a stall (a lost node that Ray Data cannot recover from)


class ShardActor:
    """A pool actor: both priors loaded once; each call cleans the shards of its batch."""

    def __init__(self, run: Run, threads: int, crash_once: str | None = None, crash_shard: str | None = None,
                 hang_once: str | None = None):
        import ray
        import torch

        from pipeline.data import storage

        storage.configure(run.cfg.storage)
        torch.set_num_threads(threads)
        self.cfg, self.threads = run.cfg, threads
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
        # Test hook: ``PATH`` or ``PATH@NODE_ID``, several separated by commas: for each, the first actor (on that
        # node) to start its second shard never finishes it, as an actor stuck on a lost node would look to the
        # driver.
        self._started += 1
        if self._started != 2:
            return
        for entry in filter(None, (self.hang_once or "").split(",")):
            path, _, node = entry.partition("@")
            if node and node != self.node_id:
                continue
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            while True:
                time.sleep(3600)

    def cleaner(self) -> ShardCleaner:
        """The actor's cleaner (the run's pinned priors, verified), built on the first call, in the thread that
        runs the calls (Ray Data calls the UDF from a worker thread, not the thread that ran __init__): with the
        models built in __init__, sampling ran 1.6x slower here (23.9 s against 14.6 s for one 25-image shard
        at 50 steps)."""
        if self._cleaner is None:
            import torch

            torch.set_num_threads(self.threads)
            self._cleaner = ShardCleaner(self.cfg, self.run.pinned)
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
                res = self.run.give_up(shard, f"gave up after {MAX_SHARD_ATTEMPTS} attempts: the worker cleaning "
                                       "this shard died each time (out of memory? a crash in a decoder?)")
            else:
                res = self.run.clean(self.cleaner, shard, duplicates=dups, before_marker=self._maybe_crash,
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


def count_attempt(run: Run, shard: str, node_id: str | None = None) -> int:
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


def run_job(run: Run, progress: bool = True, crash_once: str | None = None, crash_shard: str | None = None,
            replan: bool = False) -> JobStats:
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
    done_now = run.done_now()
    pending = [s for s in run.pending if s.name not in done_now]
    if not pending:
        return JobStats.empty()
    cfg = run.cfg
    actors, gpus, threads = actor_layout(cfg, len(pending), fit_to_live=replan)
    update: dict[str, Any] = {"storage": cfg.storage.resolved()}
    if not gpus and cfg.device == "auto":  # an actor without a GPU slot must not take a GPU it sees
        update["device"] = "cpu"
    light = dataclasses.replace(run.light(), cfg=cfg.model_copy(update=update))  # duplicates travel with each item
    items = [{"uri": s.uri, "name": s.name, "size": s.size, "version": s.version,
              "duplicates": json.dumps(run.duplicates.get(s.name, {}))} for s in pending]
    where = "GPU" if gpus else "CPU"
    print(f"clean {run.run_id}: {len(pending)} shard(s) on {actors} {where} actor(s) "
          f"({gpus:g} GPU, {threads} thread(s) each)", file=sys.stderr)
    if not gpus and not replan:  # CPU actors: measured here at their thread count (a GPU would need the GPU)
        _print_estimate(run, light.cfg, actors, threads)
    ctx = DataContext.get_current()
    bars, callbacks = ctx.enable_progress_bars, list(ctx.custom_execution_callback_classes)
    ctx.enable_progress_bars = False  # our own bar below counts images
    tracker = _executor_tracker()
    ctx.custom_execution_callback_classes = [*callbacks, tracker]  # the dataset copies the context when made
    shards: list[dict[str, Any]] = []
    reader: list[threading.Thread] = []
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = ds.map_batches(
            ShardActor, batch_size=1,
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_gpus=gpus, num_cpus=threads,
            fn_constructor_kwargs={"run": light, "threads": threads, "crash_once": crash_once,
                                   "crash_shard": crash_shard,
                                   "hang_once": os.environ.get("JOINTDIFF_TEST_HANG_ONCE") or None})
        total = sum(run.rows.get(s.name, 1) for s in pending)
        stall_s = cfg.ray.stall_timeout_s
        with tqdm(total=total, desc=f"clean {run.run_id}", unit="img", disable=not progress) as bar, \
                _interruptible() as interrupted:
            last = time.monotonic()
            for row in _rows_or_ticks(results, reader):
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
        # Leaving mid-run (Ctrl-C, a stall): Ray Data's scheduling thread and the thread that reads the rows are
        # still inside Ray. Left running, they call into the core worker as the session shuts down and a re-plan
        # connects again, and the driver dies on a SIGSEGV in CoreWorker::Wait. So the executor is shut down
        # here (which also ends its pool's actors, the stuck ones too) and the reader given time to leave.
        # What Ray Data still logs about it is no news; its auto-init must not start a Ray of its own.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        _stop_executors(tracker.executors, reader)
        try:
            import ray._private.auto_init_hook as auto_init

            auto_init.enable_auto_connect = False  # this process always calls ray.init itself
        except (ImportError, AttributeError):
            pass
        raise
    finally:
        ctx.enable_progress_bars, ctx.custom_execution_callback_classes = bars, callbacks
    processed = sum(int(r["cleaned"]) for r in shards)
    return JobStats(shards, processed, time.perf_counter() - t0, actors, gpus, threads)


def _print_estimate(run: Run, cfg: CleanConfig, actors: int, threads: int) -> None:
    """The run's estimated time on ``actors`` CPU actors of ``threads`` threads, measured on this machine."""
    import torch

    from pipeline.run.models import ModelChanged
    from pipeline.run.shard import estimate_line

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        line = estimate_line(run, ShardCleaner(cfg, run.pinned), workers=actors)
    except ModelChanged:  # the shards' work gives them up, saying so
        line = None
    finally:
        torch.set_num_threads(before)
    if line:
        print(line, file=sys.stderr)


def _executor_tracker() -> Any:
    """A Ray Data execution callback class (Ray makes one per execution, without arguments) whose ``executors``
    list gets each streaming executor of the datasets made while it is registered."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class Tracker(ExecutionCallback):
        executors: list[Any] = []

        def before_execution_starts(self, executor: Any) -> None:
            Tracker.executors.append(executor)

    return Tracker


def _stop_executors(executors: list[Any], reader: list[threading.Thread], wait_s: float = 10.0) -> None:
    """Shut down Ray Data's executors (force: their actors are killed, their scheduling threads joined) and wait
    up to ``wait_s`` for the thread reading the rows to leave."""
    for executor in executors:
        try:
            executor.shutdown(force=True)
        except Exception as exc:  # noqa: BLE001 (leaving anyway: say so, go on)
            print(f"could not stop Ray Data's executor ({type(exc).__name__}: {exc})", file=sys.stderr)
    for thread in reader:
        thread.join(timeout=wait_s)


def _rows_or_ticks(results: Any, reader: list[threading.Thread] | None = None,
                   tick_s: float = 1.0) -> Iterator[dict[str, Any] | None]:
    """The rows of a Ray dataset as they come, read in a thread, with ``None`` for every ``tick_s`` without one:
    the driver keeps control (Ctrl-C, the stall check) even when Ray Data waits forever. The thread is appended
    to ``reader``."""
    q: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for row in results.iter_rows():
                q.put(("row", row))
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the driver's thread)
            q.put(("error", exc))

    thread = threading.Thread(target=consume, name="ray-data-rows", daemon=True)
    thread.start()
    if reader is not None:
        reader.append(thread)
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


def clean_pending(run: Run, progress: bool = True, crash_once: str | None = None,
                  crash_shard: str | None = None) -> JobStats:
    """Clean the run's pending shards on Ray (joined or started here, :func:`~pipeline.jobs.session.ray_session`),
    re-planning on a fresh pool after a stall, at most :data:`MAX_REPLANS` times. Ctrl-C raises
    :class:`~pipeline.run.RunInterrupted`; a stall past the re-plans, or a failure of Ray itself (a pool actor
    lost), :class:`~pipeline.run.RunFailed`, with the shards done so far kept."""
    stats = JobStats.empty()
    for replan in range(MAX_REPLANS + 1):
        if not run.pending:
            break
        try:
            with quiet_ray_noise(), ray_session(run.cfg.ray.address) as started:
                part = run_job(run, progress=progress, crash_once=crash_once, crash_shard=crash_shard,
                               replan=replan > 0)
            return dataclasses.replace(part, shards=stats.shards + part.shards,
                                       processed=stats.processed + part.processed)
        except KeyboardInterrupt:
            raise run.interrupted() from None
        except Stalled as exc:
            # leaving the session disconnected this driver, which ends every actor it owns, the stuck ones too
            if not started or replan == MAX_REPLANS:
                raise run.failed(str(exc)) from None
            print(f"clean {run.run_id}: {exc}: re-planning the pending shards on the nodes left", file=sys.stderr)
        except Exception as exc:  # Ray's own failures (a pool actor lost or cancelled): one line, resumable
            from ray.exceptions import RayError

            if not isinstance(exc, RayError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise run.failed(f"the Ray job failed ({type(exc).__name__}: {first[:300]})") from None
    return stats


def run_clean(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None, progress: bool = True,
              crash_once: str | None = None, crash_shard: str | None = None) -> dict[str, Any]:
    """The whole run with the Ray executor: open and plan the run, clean its pending shards on Ray, finish it
    (verify, record, report, judge).

    Returns the summary row plus ``shards``, ``skipped_shards``, ``output`` (the run's URI),
    ``summary`` (the row's file), ``job`` (actor layout and per-shard results) and ``report`` (the run's
    HTML report). Raises :class:`~pipeline.data.accounting.RejectedRowsError` after recording a run that
    rejected too many rows (and writing its report). ``crash_once`` and ``crash_shard``: test hooks of
    :func:`run_job`.
    """
    t0 = time.perf_counter()
    cluster_address(cfg.ray.address)  # a ray:// address fails here, before the work starts
    run = Run.open(input_uri, output, cfg, run_id, ray=True).plan()
    stats = clean_pending(run, progress, crash_once, crash_shard)
    return run.finish(stats.processed, "ray", time.perf_counter() - t0, dataclasses.asdict(stats))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.jobs.clean INPUT OUTPUT [--config C] [--set K=V] [--run-id R] ...``: the Ray
    executor's own entry point (a submitted job's), with ``jointdiff clean``'s arguments and exit codes."""
    from pipeline.config import with_ray
    from pipeline.jobs.commands import clean_parser, load_clean, print_summary, run_command

    def clean(a: Any) -> int:
        cfg, input_uri, output = load_clean(a)
        cfg = with_ray(cfg, address=a.ray_address, actors=a.actors)
        return print_summary(run_clean(input_uri, output, cfg, run_id=a.run_id, progress=not a.quiet))

    return run_command(clean, clean_parser("python -m pipeline.jobs.clean", executor=False).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
