"""The run object: one cleaning run, whatever executes its shards.

:meth:`Run.open` resolves a run on its driver: local paths become absolute ``file://`` URIs (before any
worker sees them), storage is configured, everything checkable is checked (:mod:`pipeline.run.preflight`),
the recipe is resolved with its models pinned (:mod:`pipeline.run.recipe`) and the run's identity computed
(:mod:`pipeline.run.identity`). Then, each one step that an executor may call on its own (the Prefect flow
makes each a task with its own retries):

* :meth:`Run.plan`: the shards, the repeated ids, the input check (:mod:`pipeline.run.plan`);
* :meth:`Run.clean`: one shard's work (:func:`pipeline.run.shard.clean_shard`), or its giving up when the
  pinned models changed under the run (:meth:`Run.give_up`);
* :meth:`Run.verify`: the accounting, every input row once in cleaned or errors
  (:class:`~pipeline.data.accounting.AccountingError` otherwise);
* :meth:`Run.record`: the run's row appended to ``<output>/summary/`` (:mod:`pipeline.summary`);
* :meth:`Run.report`: the run's HTML report (:mod:`pipeline.report`);
* :meth:`Run.judge`: fail a run that rejected too many rows (:mod:`pipeline.run.judge`).

:meth:`Run.finish` is verify, record, report, judge in that order. The executors compose these: the local
executor (:mod:`pipeline.run.local`, in this process), the Ray job (:mod:`pipeline.jobs.clean`, an actor
pool) and the Prefect flow (:mod:`flows.clean_dataset`). A run is a plain dataclass: a Ray actor gets it
(without its plan's per-shard lists) as a constructor argument.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import CleanConfig, check_run_id
from pipeline.data.accounting import Accounting, AccountingError, PlannedShard, check_run, plan
from pipeline.data.storage import absolute_uri, join, local_path
from pipeline.run.identity import identify
from pipeline.run.models import ModelChanged
from pipeline.run.recipe import PinnedRecipe, resolve

if TYPE_CHECKING:
    from pipeline.run.shard import ShardCleaner


@dataclass
class Run:
    input_uri: str  # absolute URI
    output: str  # absolute URI of the output root
    cfg: CleanConfig  # the priors as pinned URIs
    pinned: PinnedRecipe
    run_id: str
    config_hash: str
    shards: list[PlannedShard] = field(default_factory=list)  # filled by plan()
    duplicates: dict[str, dict[int, str]] = field(default_factory=dict)  # shard -> {row: reason}
    rows: dict[str, int] = field(default_factory=dict)  # rows of each pending shard
    mean_pixels: float | None = None  # pixels per image of the first pending rows (plan's check), for estimates
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    @classmethod
    def open(cls, input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None,
             ray: bool = False) -> Run:
        """Resolve a run on the driver (see the module docstring); ``ray``: its shards run on Ray actors (the
        device is then checked only where they run on this machine). Nothing is written yet."""
        from pipeline.data import storage
        from pipeline.run.preflight import preflight

        if run_id is not None:
            check_run_id(run_id, "run_id")  # it names the folder OUTPUT/runs/RUN_ID: never a path
        input_uri, output = absolute_uri(input_uri), absolute_uri(output)
        storage.configure(cfg.storage)
        preflight(input_uri, output, cfg, ray=ray)
        pinned = resolve(cfg.recipe)
        cfg = cfg.model_copy(update={"priors": pinned.recipe.priors, "sampler": pinned.recipe.sampler})
        ident = identify(pinned, input_uri)
        return cls(str(input_uri), str(output), cfg, pinned, run_id or ident.run_id, ident.config_hash)

    @property
    def run_uri(self) -> str:
        return join(self.output, "runs", self.run_id)

    @property
    def dataset(self) -> str:
        return self.input_uri.rstrip("/")

    @property
    def pending(self) -> list[PlannedShard]:
        return [s for s in self.shards if not s.done]

    @property
    def pending_rows(self) -> int:
        return sum(self.rows.values())

    def light(self) -> Run:
        """This run without its plan's per-shard lists (what a Ray actor needs: each shard's duplicates travel
        with the shard)."""
        return dataclasses.replace(self, shards=[], duplicates={}, rows={})

    def plan(self) -> Run:
        """Plan (or re-plan) the run: :func:`pipeline.run.plan.plan_shards`, then
        :func:`pipeline.run.plan.check_inputs`; then, when there is work and the sampler's weights were not
        tuned for this combination, one line on standard error saying so. Returns the run."""
        import sys

        from pipeline.run.plan import check_inputs, plan_shards

        p = plan_shards(self.input_uri, self.run_uri)
        self.shards, self.duplicates, self.rows = p.shards, p.duplicates, p.rows
        check_inputs(self)
        if self.pinned.note and self.pending:
            print(self.pinned.note, file=sys.stderr)
        return self

    def done_now(self) -> set[str]:
        """The shards complete now (by this or a concurrent or earlier attempt)."""
        return {s.name for s in plan(self.input_uri, self.run_uri) if s.done}

    def clean(self, cleaner: Callable[[], ShardCleaner], shard: PlannedShard,
              progress: Callable[[int], None] | None = None, duplicates: Mapping[int, str] | None = None,
              before_marker: Callable[[str], None] | None = None,
              worker: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One shard's work with the cleaner that ``cleaner()`` gives (built once by the caller); a shard whose
        pinned models changed under the run is given up, with the reason."""
        from pipeline.run.shard import clean_shard

        try:
            c = cleaner()
        except ModelChanged as exc:
            return self.give_up(shard, str(exc))
        return clean_shard(c, self, shard, progress=progress, duplicates=duplicates, before_marker=before_marker,
                           worker=worker)

    def give_up(self, shard: PlannedShard, reason: str) -> dict[str, Any]:
        """Every row of ``shard`` to the errors, with ``reason`` (:func:`pipeline.run.shard.give_up`)."""
        from pipeline.run.shard import give_up

        return give_up(self, shard, reason)

    def verify(self) -> Accounting:
        """The accounting check: every row of the run's plan once, in cleaned or errors; :class:`AccountingError`
        if not. Shards that landed in the input during the run are not part of it; outputs of shards removed
        from the input are orphaned (kept and reported)."""
        acc = check_run(self.input_uri, self.run_uri, self.shards)
        if not acc.ok:
            raise AccountingError(f"run {self.run_id}: {acc.describe()}")
        return acc

    def record(self, acc: Accounting, processed: int, executor: str, wall_seconds: float) -> dict[str, Any]:
        """Append the run's summary row to ``<output>/summary/``; returns it, with the shard counts and the
        ``output`` (run) and ``summary`` (row file) URIs."""
        from pipeline.run.record import summary_row
        from pipeline.summary import append_summary

        row = summary_row(self, acc, processed=processed, executor=executor, wall_seconds=wall_seconds)
        where = append_summary(self.output, row)
        return {**row, "shards": len(self.shards), "skipped_shards": len(self.shards) - len(self.pending),
                "orphaned_shards": sorted(acc.orphaned), "output": self.run_uri, "summary": where}

    def report(self) -> str:
        """Write the run's HTML report, ``<run>/report.html``; returns its URI."""
        from pipeline.report import write_report

        return write_report(self.run_uri)

    def judge(self, summary: dict[str, Any]) -> None:
        """:func:`pipeline.run.judge.judge` with this run's ``max_rejected_fraction``."""
        from pipeline.run.judge import judge

        judge(summary, self.cfg.max_rejected_fraction)

    def finish(self, processed: int, executor: str, wall_seconds: float,
               job: dict[str, Any] | None = None) -> dict[str, Any]:
        """Verify, record, report, judge; returns the summary row with ``job`` (the executor's per-shard
        results) and ``report``. A run that rejected too many rows is recorded and reported, then fails."""
        summary = self.record(self.verify(), processed, executor, wall_seconds)
        summary["job"] = job or {}
        summary["report"] = self.report()
        self.judge(summary)
        return summary

    def interrupted(self) -> RunInterrupted:
        return RunInterrupted(self)

    def failed(self, cause: str) -> RunFailed:
        return RunFailed(self, cause)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says how far it got and how to resume."""

    def __init__(self, run: Run):
        done = len(run.done_now())
        super().__init__(f"interrupted: {done} of {len(run.shards)} shard(s) of run {run.run_id} are complete in "
                         f"{local_path(run.run_uri)}. Run the same command again to resume: complete shards are "
                         f"skipped (or pass --run-id {run.run_id}).")


class RunFailed(RuntimeError):
    """The executor failed part-way (a lost cluster, a stalled pool): the message says why, how far the run got
    and how to resume."""

    def __init__(self, run: Run, cause: str):
        super().__init__(f"run {run.run_id}: {cause}; {len(run.done_now())} of {len(run.shards)} shard(s) are "
                         f"complete in {local_path(run.run_uri)} and kept. Run the same command again to clean the "
                         "rest.")
