"""The run history: one summary row per cleaning run in ``<output>/summary/`` (docs/concepts/architecture.md).

Every invocation of a run (``jointdiff clean``, with either executor, or the Prefect flow) appends
one Parquet file ``summary/<finished_at>-<run_id>.parquet`` holding one row, so appending never
rewrites (or races on) an existing file, and ``read_parquet('<output>/summary/*.parquet')`` in DuckDB
or pandas reads the whole history. A resumed run appends a second row: its counts and metric
aggregates cover the whole run so far, while ``processed``, ``wall_seconds`` and ``images_per_s``
cover that invocation alone.

Metric aggregates are over the run's cleaned images (``metrics/``): mean, median and 5th percentile
of PSNR and SSIM (null without ground truth), the input's PSNR/SSIM means, and the means of the
reference-free figures (residual, spread, removed-noise energy). ``models`` records the run's pinned models
(JSON ``{"image": REF, "noise": REF}``, each ``URI@sha256:PREFIX``) and ``config_hash`` its recipe
(:func:`pipeline.run.identity.identify`).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.shards import list_parts, read_table, write_table
from pipeline.data.storage import join

_F = pa.float64()
_TS = pa.timestamp("s", tz="UTC")
SUMMARY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("started_at", _TS), ("finished_at", _TS), ("dataset", pa.string()),
    ("inputs", pa.int64()), ("cleaned", pa.int64()), ("errors", pa.int64()), ("processed", pa.int64()),
    ("psnr_mean", _F), ("psnr_median", _F), ("psnr_p05", _F),
    ("ssim_mean", _F), ("ssim_median", _F), ("ssim_p05", _F),
    ("psnr_input_mean", _F), ("ssim_input_mean", _F),
    ("residual_mean", _F), ("spread_mean", _F), ("removed_energy_mean", _F),
    ("alpha_estimated", pa.int64()), ("alpha_hat_median", _F), ("alpha_error_median", _F),
    ("wall_seconds", _F), ("images_per_s", _F), ("nfe", pa.int64()), ("models", pa.string()),
    ("sampler", pa.string()), ("config_hash", pa.string()), ("executor", pa.string()), ("output", pa.string()),
])


def read_parts(uri: str) -> pa.Table | None:
    """All ``.parquet`` files under ``uri`` (recursively, sorted) as one table; None if there are none."""
    parts = [t for t in (read_table(p, attempts=3) for p in list_parts(uri)) if t.num_rows]
    return pa.concat_tables(parts, promote_options="default") if parts else None


def stats(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return None, None, None
    return float(v.mean()), float(np.median(v)), float(np.percentile(v, 5))


def append_summary(output: str, row: dict[str, Any]) -> str:
    """Append ``row`` to ``<output>/summary/`` as its own file; returns the file's URI."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    uri = join(output, "summary", f"{stamp}-{row['run_id']}.parquet")
    write_table(uri, pa.Table.from_pylist([row], schema=SUMMARY_SCHEMA))
    return uri


def read_summaries(output: str) -> pa.Table | None:
    """The run history under ``<output>/summary/`` (None when no run has finished there)."""
    return read_parts(join(output, "summary"))


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def format_summary(row: dict[str, Any]) -> str:
    """A few lines for people: counts, quality before and after, speed, and where the outputs are."""
    lines = [f"run {row['run_id']}: {row['cleaned']} cleaned, {row['errors']} rejected of {row['inputs']} input rows"
             + (f" ({row['skipped_shards']} of {row['shards']} shard(s) were already done)"
                if row.get("skipped_shards") else "")]
    if row.get("orphaned_shards"):
        orphans = row["orphaned_shards"]
        lines.append(f"  {len(orphans)} shard(s) cleaned earlier are no longer in the input ({', '.join(orphans[:3])}"
                     f"{', ...' if len(orphans) > 3 else ''}): their outputs are kept, orphaned, and not counted")
    if row.get("psnr_mean") is not None:
        lines.append(f"  PSNR {_fmt(row['psnr_input_mean'], '.2f')} -> {row['psnr_mean']:.2f} dB (mean; median "
                     f"{row['psnr_median']:.2f}, p05 {row['psnr_p05']:.2f})   SSIM "
                     f"{_fmt(row['ssim_input_mean'], '.3f')} -> {row['ssim_mean']:.3f}")
    else:
        lines.append(f"  no ground truth: residual {_fmt(row['residual_mean'], '.4f')}, removed-noise energy "
                     f"{_fmt(row['removed_energy_mean'], '.4f')} (means)")
    if row.get("alpha_estimated"):
        err = row.get("alpha_error_median")
        lines.append(f"  alpha estimated for {row['alpha_estimated']} image(s) (none given, or forward.alpha=auto): "
                     f"median {_fmt(row['alpha_hat_median'], '.3f')}"
                     + (f", median error {err:.3f} against the given alpha" if err is not None else ""))
    if row.get("paths"):
        paths = row["paths"]
        lines.append(f"  cleaned by the supervised network: {paths.get('fast', 0)}, by the joint sampler: "
                     f"{paths.get('joint', 0)} (sampler.path; each row's path is in its path column)")
    nfe = (f"NFE {row['nfe']} per image (the rows' mean over every network: the supervised network counts 1)"
           if row.get("paths") else f"NFE {row['nfe']} per prior per image")
    lines.append(f"  {row['processed']} image(s) cleaned now in {row['wall_seconds']:.1f} s: "
                 f"{_fmt(row['images_per_s'], '.2f')} images/s, {nfe}")
    from pipeline.data.storage import local_path

    run = local_path(row["output"])  # local outputs as the paths users type and open
    # a folder holds files only for rows it has (no zero-row Parquet files): name only those
    folders = (["cleaned", "metrics"] if row["cleaned"] else []) + (["errors"] if row["errors"] else [])
    lines.append("  outputs: " + (", ".join(f"{run}/{f}/" for f in folders) or f"{run} (no rows)"))
    if row.get("summary"):
        lines.append(f"  run history row: {local_path(row['summary'])}")
    if row.get("report"):
        lines.append(f"  report: {local_path(row['report'])}")
    return "\n".join(lines)
