"""The local executor: a run's pending shards cleaned one after the other in this process
(``jointdiff clean --executor local``; no Ray). One :class:`~pipeline.run.shard.ShardCleaner` loads both
priors once, on the first shard; ``threads`` sets torch's CPU threads."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from pipeline.config import CleanConfig
from pipeline.run.models import ModelChanged
from pipeline.run.run import Run
from pipeline.run.shard import ShardCleaner, estimate_line


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clean_pending(run: Run, progress: bool = True) -> dict[str, Any]:
    """Clean the run's pending shards here; returns ``{"shards": per-shard results, "processed": images}``.
    Ctrl-C raises :class:`~pipeline.run.run.RunInterrupted` (how far it got, how to resume)."""
    from tqdm import tqdm

    if run.cfg.threads:
        torch.set_num_threads(run.cfg.threads)
    cleaner: list[ShardCleaner] = []

    def once() -> ShardCleaner:
        if not cleaner:
            cleaner.append(ShardCleaner(run.cfg, run.pinned))
        return cleaner[0]

    processed, shards = 0, []
    if run.pending:
        try:
            line = estimate_line(run, once())
        except ModelChanged:  # the shards' work gives them up, saying so
            line = None
        if line:
            print(line, file=sys.stderr)
    try:
        with tqdm(total=run.pending_rows, desc=f"clean {run.run_id}", unit="img", disable=not progress) as bar:
            for s in run.pending:
                done = run.clean(once, s, progress=bar.update)
                bar.update(done["errors"])
                processed += done["cleaned"]
                shards.append({**done, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()})
    except KeyboardInterrupt:
        raise run.interrupted() from None
    return {"shards": shards, "processed": processed}


def run_local(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """The whole run in this process: open, plan, clean the pending shards, finish (verify, record, report,
    judge). Returns the summary row with the run id and output URI, ``job`` (the per-shard results) and
    ``report``. A re-run of the same run id skips complete shards."""
    t0 = time.perf_counter()
    run = Run.open(input_uri, output, cfg, run_id).plan()
    job = clean_pending(run, progress)
    return run.finish(job["processed"], "local", time.perf_counter() - t0, job)
