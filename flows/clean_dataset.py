"""Prefect flow ``clean-dataset``: plan the shards, clean them on Ray, check the accounting, record the run.

A thin layer over :mod:`pipeline.clean` and :mod:`pipeline.jobs.clean` (the same steps as
``jointdiff clean``), with Prefect's retries on the tasks that touch storage and two artifacts per
run: a table of the summary row and a markdown note of where the outputs are, with a link to the
run's HTML report (and a link artifact of it).

- ``plan_run`` (3 retries): lists the shards, skips complete ones, finds repeated ids;
- ``clean_shards`` (2 retries): the Ray job; in-process local Ray unless ``ray_address`` or
  ``RAY_ADDRESS`` names a cluster. A retry cleans only the shards still unmarked;
- ``verify_accounting`` (no retries: a failed check is a finding, not a glitch): every input row once;
- ``record_summary`` (3 retries): appends the summary row to ``<output>/summary/``;
- ``write_run_report`` (3 retries): writes the run's HTML report, ``<run>/report.html``
  (:mod:`pipeline.report`), which the markdown artifact links, along with a link artifact.
- ``judge_rejections`` (no retries): fails the flow (:class:`~pipeline.data.accounting.RejectedRowsError`)
  when more than ``max_rejected_fraction`` of the run's input rows were rejected, or none was cleaned;
  the outputs, summary row, report and artifacts are written before.

``plan_run`` also checks the input before any work (:func:`pipeline.clean.check_inputs`) and fails at
once, without retries, with a ``ConfigError`` naming the ``--set`` that fixes a configuration that would
reject every row.

Run it with ``python -m flows.clean_dataset INPUT OUTPUT [--config C] [--ray-address A]`` or from
Python; ``jointdiff demo`` runs it on embedded data. The parameters are plain strings, so a
deployment can schedule it. Prefect stores flow parameters in its database in plain text, so the
flow refuses credentials among its ``overrides``: they belong in the config file or the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import artifact_key
from pipeline.clean import RunPlan, judge_run, prepare_run, record_run, verify_run
from pipeline.config import SECRET_KEYS, CleanConfig, ConfigError, load_config, with_ray
from pipeline.data import storage
from pipeline.data.accounting import Accounting, AccountingError, RejectedRowsError
from pipeline.jobs.clean import JobStats, ray_session, run_job
from pipeline.report import write_report
from pipeline.summary import format_summary


def _retry_unless(*final: type[BaseException]):
    """A Prefect ``retry_condition_fn``: retry any failure but the ``final`` exception types."""
    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except final:
            return False
        except Exception:
            return True
        return False
    return condition


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless(ConfigError))
def plan_run(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None) -> RunPlan:
    run = prepare_run(input_uri, output, cfg, run_id)  # stops here (ConfigError) when every row would be rejected
    print(f"run {run.run_id}: {len(run.pending)} of {len(run.shards)} shard(s) to clean "
          f"({run.pending_rows} rows), outputs in {run.run_uri}")
    return run


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless(ConfigError, FileNotFoundError))
def clean_shards(run: RunPlan, cfg: CleanConfig, progress: bool) -> JobStats:
    if not run.pending:
        return JobStats.empty()
    with ray_session(cfg.ray.address):
        return run_job(run, cfg, progress=progress)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless(AccountingError))
def verify_accounting(run: RunPlan) -> Accounting:
    acc = verify_run(run)
    print(acc.describe())
    return acc


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record_summary(run: RunPlan, cfg: CleanConfig, acc: Accounting, stats: JobStats,
                   wall_seconds: float) -> dict[str, Any]:
    return record_run(run, cfg, acc, stats.processed, "ray", wall_seconds)


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_run_report(run_uri: str) -> str:
    return write_report(run_uri)


@task(cache_policy=NO_CACHE)  # no retries: a verdict, not a glitch
def judge_rejections(summary: dict[str, Any], cfg: CleanConfig) -> None:
    judge_run(summary, cfg)


def publish_artifacts(summary: dict[str, Any]) -> None:
    """A table artifact of the summary row, a markdown artifact with the outputs' URIs and a link to
    the report, and a link artifact of the report."""
    shown = ("run_id", "dataset", "inputs", "cleaned", "errors", "processed", "psnr_input_mean", "psnr_mean",
             "psnr_median", "psnr_p05", "ssim_input_mean", "ssim_mean", "ssim_median", "ssim_p05",
             "residual_mean", "images_per_s", "nfe", "models", "config_hash")
    row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k in shown}
    create_table_artifact([row], key=f"clean-summary-{artifact_key(summary['run_id'])}",
                          description=f"Cleaning run {summary['run_id']} of {summary['dataset']}")
    run = summary["output"]
    create_markdown_artifact(
        "\n".join([f"# Cleaning run `{summary['run_id']}`", "",
                   f"- input: `{summary['dataset']}`",
                   f"- cleaned shards: `{run}/cleaned/`",
                   f"- per-image metrics (Hive-partitioned by run id): `{run}/metrics/`",
                   f"- rejected rows: `{run}/errors/`",
                   f"- run history row: `{summary['summary']}`",
                   f"- report: [report.html]({summary['report']}) (`{summary['report']}`)", "",
                   f"{summary['cleaned']} cleaned, {summary['errors']} rejected of {summary['inputs']} rows."]),
        key=f"clean-outputs-{artifact_key(summary['run_id'])}", description="Where the run's outputs are")
    create_link_artifact(summary["report"], link_text=f"report of run {summary['run_id']}",
                         key=f"clean-report-{artifact_key(summary['run_id'])}",
                         description="The run's HTML report: summary, plots, images, errors")


@flow(name="clean-dataset", log_prints=True)
def clean_dataset(input_uri: str, output: str, config: str | None = None, overrides: list[str] | None = None,
                  run_id: str | None = None, ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Clean the pending shards of ``input_uri`` into ``output/runs/<run_id>/`` and record the run.

    ``config`` is a clean config (YAML path, e.g. ``configs/denoise.yaml``), ``overrides`` its
    ``key=value`` overrides; ``ray_address`` (else ``RAY_ADDRESS``) a Ray cluster to run on.
    Returns the run's summary row, with ``report``: the URI of the run's HTML report.
    """
    t0 = time.perf_counter()
    secret = [o for o in overrides or [] if o.split("=", 1)[0].strip() in SECRET_KEYS]
    if secret:
        raise ConfigError(f"clean-dataset: {', '.join(o.split('=', 1)[0] for o in secret)} may not be given as a "
                          "flow parameter (Prefect stores parameters in plain text); put credentials in the config "
                          "file's storage: section or the AWS environment variables")
    cfg = with_ray(load_config(CleanConfig, config, overrides or []), address=ray_address)
    storage.configure(cfg.storage)
    run = plan_run(input_uri, output, cfg, run_id)
    stats = clean_shards(run, cfg, progress)
    acc = verify_accounting(run)
    summary = record_summary(run, cfg, acc, stats, time.perf_counter() - t0)
    summary = {**summary, "report": write_run_report(run.run_uri)}
    publish_artifacts(summary)
    print(format_summary(summary))
    judge_rejections(summary, cfg)  # fails the flow (RejectedRowsError) when too many rows were rejected
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.clean_dataset", description=clean_dataset.__doc__)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-id", default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        summary = clean_dataset(a.input, a.output, a.config, a.set, a.run_id, a.ray_address, progress=not a.quiet)
    except ConfigError as exc:
        print(f"clean-dataset: {exc}", file=sys.stderr)
        return 2
    except RejectedRowsError as exc:
        print(f"clean-dataset: {exc}", file=sys.stderr)
        return 4
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
