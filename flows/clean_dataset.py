"""Prefect flow ``clean-dataset``: plan the shards, clean them on Ray, check the accounting, record the run.

A thin layer over the run object (:class:`pipeline.run.Run`) and its Ray executor (:mod:`pipeline.jobs.clean`):
the same steps as ``jointdiff clean --executor ray``, each task calling one step of the run, with Prefect's
retries on the tasks that touch storage and two artifacts per run: a table of the summary row and a markdown
note of where the outputs are, with a link to the run's HTML report (and a link artifact of it).

- first, no task and no retries: :meth:`pipeline.run.Run.open` (storage access, priors, device; the models
  pinned), so a wrong bucket or credential fails the flow at once, with one line;
- ``plan_run`` (3 retries): lists the shards, skips complete ones, finds repeated ids;
- ``clean_shards`` (2 retries): the Ray job; in-process local Ray unless ``ray_address`` or
  ``RAY_ADDRESS`` names a cluster to join as the driver. A retry cleans only the shards still unmarked;
- or, with ``jobs_address`` / ``RAY_API_SERVER_ADDRESS`` (the shipped nightly deployment), ``submit_clean_job``
  (1 retry, none for a config, accounting or rejected-rows failure) instead of the four tasks around it:
  ``jointdiff clean`` submitted through the Ray Jobs API, followed, its summary row read from its logs; the
  flow fails when the job fails. No Ray driver runs where the flow runs;
- ``verify_accounting`` (no retries: a failed check is a finding, not a glitch): every input row once;
- ``record_summary`` (3 retries): appends the summary row to ``<output>/summary/``;
- ``write_run_report`` (3 retries): writes the run's HTML report, ``<run>/report.html``
  (:mod:`pipeline.report`), which the markdown artifact links, along with a link artifact.
- ``judge_rejections`` (no retries): fails the flow (:class:`~pipeline.data.accounting.RejectedRowsError`)
  when more than ``max_rejected_fraction`` of the run's input rows were rejected, or none was cleaned;
  the outputs, summary row, report and artifacts are written before.

``plan_run`` also checks the input before any work (:func:`pipeline.run.plan.check_inputs`) and fails at
once, without retries, with a ``ConfigError`` naming the ``--set`` that fixes a configuration that would
reject every row.

Run it with ``python -m flows.clean_dataset INPUT OUTPUT [--config C] [--ray-address A]`` or from
Python; ``jointdiff demo`` runs it on embedded data. The parameters are plain strings, so a
deployment can schedule it. Prefect stores flow parameters in its database in plain text, so no override
may set storage credentials or options (:mod:`flows`: refused before a run is created, by the Prefect server
for a deployment run): they come from the environment, the cluster's own identity or the config file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import Overrides, artifact_key, refusing_flow
from pipeline.config import CleanConfig, ConfigError, load_config, refuse_credentials, with_ray
from pipeline.data import storage
from pipeline.data.accounting import Accounting, AccountingError, RejectedRowsError
from pipeline.data.storage import absolute_uri
from pipeline.jobs.clean import JobStats, clean_pending
from pipeline.jobs.session import cluster_address
from pipeline.report import write_report
from pipeline.run import Run
from pipeline.summary import format_summary
from pipeline.untrusted import RunId, check_run_id


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
def plan_run(run: Run) -> Run:
    run = run.plan()  # stops here (ConfigError) when every row would be rejected
    print(f"run {run.run_id}: {len(run.pending)} of {len(run.shards)} shard(s) to clean "
          f"({run.pending_rows} rows), outputs in {run.run_uri}")
    return run


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless(ConfigError, FileNotFoundError))
def clean_shards(run: Run, progress: bool) -> JobStats:
    return clean_pending(run, progress=progress)  # a retry cleans only the shards still unmarked


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless(AccountingError))
def verify_accounting(run: Run) -> Accounting:
    acc = run.verify()
    print(acc.describe())
    return acc


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record_summary(run: Run, acc: Accounting, stats: JobStats, wall_seconds: float) -> dict[str, Any]:
    return run.record(acc, stats.processed, "ray", wall_seconds)


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_run_report(run_uri: str) -> str:
    return write_report(run_uri)  # Run.report, also for a run that a submitted job made


@task(cache_policy=NO_CACHE)  # no retries: a verdict, not a glitch
def judge_rejections(run: Run, summary: dict[str, Any]) -> None:
    run.judge(summary)


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
                   f"- rejected rows: `{run}/errors/`" if summary["errors"] else "- rejected rows: none",
                   f"- run history row: `{summary['summary']}`",
                   f"- report: [report.html]({summary['report']}) (`{summary['report']}`)", "",
                   f"{summary['cleaned']} cleaned, {summary['errors']} rejected of {summary['inputs']} rows."]),
        key=f"clean-outputs-{artifact_key(summary['run_id'])}", description="Where the run's outputs are")
    create_link_artifact(summary["report"], link_text=f"report of run {summary['run_id']}",
                         key=f"clean-report-{artifact_key(summary['run_id'])}",
                         description="The run's HTML report: summary, plots, images, errors")


class JobFailed(RuntimeError):
    """A submitted cleaning job ended without success; ``exit_code`` is its driver's (2 config, 3 accounting,
    4 too many rejected rows: findings that a retry would repeat)."""

    def __init__(self, message: str, exit_code: int | None):
        super().__init__(message)
        self.exit_code = exit_code


def _retry_job(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except JobFailed as exc:
        return exc.exit_code not in (2, 3, 4)
    except ConfigError:
        return False
    except Exception:
        return True
    return False


class _PrintLines:
    """A text stream that prints whole lines (so that Prefect's ``log_prints`` logs a followed job's output)."""

    def __init__(self) -> None:
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            print(line)
        return len(text)

    def flush(self) -> None:
        pass


def job_summary(logs: str, key: str = "run_id") -> dict[str, Any] | None:
    """The last JSON object with ``key`` that a job printed on a line of its own (`jointdiff clean`: its
    summary row; `jointdiff train`: the model's card), if any."""
    for line in reversed(logs.splitlines()):
        if line.startswith("{") and f'"{key}"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


@task(retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE, retry_condition_fn=_retry_job)
def submit_clean_job(input_uri: str, output: str, config: str | None, overrides: list[str], run_id: str | None,
                     jobs_address: str) -> dict[str, Any]:
    """Submit `jointdiff clean` to the cluster through the Ray Jobs API, follow its logs, and return the summary
    row it printed; :class:`JobFailed` when the job does not succeed. A retry resumes: done shards are skipped."""
    args = [input_uri, output, *(["--config", config] if config else []),
            *[x for o in overrides for x in ("--set", o)], *(["--run-id", run_id] if run_id else []), "--quiet"]
    return run_submitted("clean", args, jobs_address, "run_id")


def run_submitted(kind: str, args: list[str], jobs_address: str, key: str) -> dict[str, Any]:
    """Submit `jointdiff KIND ARGS` through the Ray Jobs API (working directory: here), print its logs as they
    come, and return the last JSON line with ``key`` it printed; :class:`JobFailed` if it does not succeed."""
    from pipeline.jobs import submit as sj

    job_id = sj.submit(kind, args, jobs_address, working_dir=".", log=print)
    client = sj.connect(jobs_address)
    status = sj.follow(client, job_id, out=_PrintLines())  # type: ignore[arg-type]
    info = sj.describe(client, job_id)
    if status != "SUCCEEDED":
        raise JobFailed(f"{kind} job {job_id} {status} (exit code {info['driver_exit_code']}): {info['message']}",
                        info["driver_exit_code"])
    result = job_summary(client.get_job_logs(job_id), key)
    if result is None:
        raise JobFailed(f"{kind} job {job_id} succeeded but printed no result line with {key!r}", None)
    return result


@refusing_flow(name="clean-dataset", log_prints=True)
def clean_dataset(input_uri: str, output: str, config: str | None = None, overrides: Overrides | None = None,
                  run_id: RunId | None = None, ray_address: str | None = None, progress: bool = True,
                  jobs_address: str | None = None) -> dict[str, Any]:
    """Clean the pending shards of ``input_uri`` into ``output/runs/<run_id>/`` and record the run.

    ``config`` is a clean config (YAML path, e.g. ``configs/denoise.yaml``), ``overrides`` its
    ``key=value`` overrides (none of storage credentials or options: see :mod:`flows`). Where the work runs:

    - ``jobs_address`` (else ``RAY_API_SERVER_ADDRESS``): a cluster's Ray Jobs API, ``http://HEAD:8265``. The
      flow submits ``jointdiff clean`` as a Ray job, follows its logs and fails when the job fails; no Ray driver
      runs where the flow runs (the shipped nightly deployment);
    - else ``ray_address`` (else ``RAY_ADDRESS``): a Ray cluster that this process joins as the driver
      (``HEAD:6379`` or ``auto``, on a machine of the cluster);
    - else a Ray started in this process.

    ``run_id`` names the folder ``output/runs/<run_id>``: a :data:`~pipeline.untrusted.RunId` (letters, digits,
    ``.``, ``_``, ``-``; no ``..``; at most 128), which Prefect checks against the parameter schema when a
    deployment run is created, and the flow again here.

    Returns the run's summary row, with ``report``: the URI of the run's HTML report.
    """
    import os

    t0 = time.perf_counter()
    if run_id is not None:
        check_run_id(run_id, "run_id")  # before anything is read or written (also when called as .fn)
    refuse_credentials(overrides or [])  # a deployment run made without the schema's check: use none of them
    cfg = with_ray(load_config(CleanConfig, config, overrides or []), address=ray_address)
    storage.configure(cfg.storage)
    jobs_address = jobs_address or os.environ.get("RAY_API_SERVER_ADDRESS") or None
    if jobs_address:
        summary = submit_clean_job(absolute_uri(input_uri), absolute_uri(output), config, overrides or [], run_id,
                                   jobs_address)
        if not summary.get("report"):
            summary = {**summary, "report": write_run_report(summary["output"])}
        publish_artifacts(summary)
        print(format_summary(summary))
        return summary
    cluster_address(cfg.ray.address)
    # the driver's checks (and the models pinned): no retries, what they find is no glitch
    run = Run.open(input_uri, output, cfg, run_id, ray=True)
    run = plan_run(run)
    stats = clean_shards(run, progress)
    acc = verify_accounting(run)
    summary = record_summary(run, acc, stats, time.perf_counter() - t0)
    summary = {**summary, "report": write_run_report(run.run_uri)}
    publish_artifacts(summary)
    print(format_summary(summary))
    judge_rejections(run, summary)  # fails the flow (RejectedRowsError) when too many rows were rejected
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.clean_dataset", description=clean_dataset.__doc__)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-id", default=None)
    p.add_argument("--ray-address", default=None, help="a cluster to join as the driver (HEAD:6379 or auto)")
    p.add_argument("--jobs-address", default=None, help="a cluster's Ray Jobs API (http://HEAD:8265): submit the "
                   "work as a Ray job (default RAY_API_SERVER_ADDRESS)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.run_id is not None:
            check_run_id(a.run_id, "--run-id")  # one line here, before Prefect creates a run
        summary = clean_dataset(a.input, a.output, a.config, a.set, a.run_id, a.ray_address, progress=not a.quiet,
                                jobs_address=a.jobs_address)
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
