"""Prefect flow ``learn-prior``: an image prior learned from a corrupted dataset by EM (:mod:`pipeline.jobs.learn`).

Given a corrupted dataset, a noise prior and a config, it starts from a per-pixel Gaussian of the observations
(or ``start``), then each round is one task (``round-<k>``, one retry: a retry resumes where the try stopped):
train the image prior on the last round's posterior samples with Ray Train (fine-tuning), publish it to the
registry as a new version, clean the training observations with it on Ray Data (one posterior sample each),
score the noise estimates against the noise prior (no truth needed) and, with ``validation``, clean a small
set with truth for PSNR/SSIM. It stops after ``rounds`` rounds or when the figure stops improving.

A stopped flow run again with the same parameters resumes at the round, and within it at the training step and
the shard, where it stopped. The flow's markdown artifact has one row per round, each round's cleaning report,
loss curve and sample sheet; every round's outputs stay under ``OUTPUT/learn/<run id>/round-<k>/``.

Like the other flows', its ``overrides`` (the cleaning recipe's) and ``prior_overrides`` (the image prior's
network and training) may not set storage credentials (:mod:`flows`).

Run it with ``jointdiff learn-prior INPUT OUTPUT --noise-prior NAME`` or from Python.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import Overrides, artifact_key, refusing_flow
from flows.clean_dataset import _retry_unless
from pipeline.config import ConfigError, refuse_credentials
from pipeline.data.accounting import RejectedRowsError
from pipeline.data.storage import open_fs
from pipeline.jobs.learn import Learning, describe, learn, open_learning, run_round
from pipeline.untrusted import RunId


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless(ConfigError, RejectedRowsError))
def learn_round(job: Learning, k: int, previous: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    return run_round(job, k, previous, progress)


def _png(uri: str | None) -> str:
    if not uri:
        return ""
    fs, path = open_fs(uri)
    return f"![{uri.rsplit('/', 1)[-1]}](data:image/png;base64,{base64.b64encode(fs.cat_file(path)).decode()})"


def publish_artifact(result: dict[str, Any]) -> None:
    """One markdown artifact: the rounds' figures, where their outputs are, their loss curves and samples."""
    rows = ["| round | noise fit | residual | validation PSNR | published | cleaning report |",
            "| ---: | ---: | ---: | ---: | --- | --- |"]
    for r in result["rounds"]:
        val = f"{r['validation_psnr']:.2f}" if r.get("validation_psnr") is not None else ""
        res = f"{r['residual_mean']:.4f}" if r.get("residual_mean") is not None else ""
        rows.append(f"| {r['round']}{' (chosen)' if r['round'] == result['chosen'] else ''} | {r['noise_fit']:.4f} | "
                    f"{res} | {val} | `{r.get('published') or r['model']}` | [report]({r.get('report')}) |")
    sheets = []
    for r in result["rounds"]:
        sheets += [f"### Round {r['round']}", "", describe(r), "", f"outputs: `{r['run']}`", "",
                   _png(r.get("loss_curve")), "", _png(r.get("sample_sheet")), ""]
    create_markdown_artifact(
        "\n".join([f"# Learned prior `{result['run_id']}`", "",
                   f"- input: `{result['input']}`, noise prior `{result['noise_prior']}`",
                   f"- chosen: round {result['chosen']} ({result['stopped']}), prior `{result['prior']}`"
                   + (f", registry `{result['latest']}`" if result.get("latest") else ""),
                   f"- cleaned dataset: `{result['cleaned']}`", f"- every round: `{result['root']}`", "",
                   *rows, "", "## Rounds (loss curve; 16 unconditional samples of the prior)", "", *sheets]),
        key=f"learn-prior-{artifact_key(result['run_id'])}",
        description=f"EM rounds of learn-prior run {result['run_id']}")


@refusing_flow(name="learn-prior", log_prints=True)
def learn_prior(input_uri: str, output: str, noise_prior: str, rounds: int = 4, config: str | None = None,
                overrides: Overrides | None = None, prior_config: str | None = None,
                prior_overrides: Overrides | None = None, name: str = "image", registry: str | None = None,
                validation: str | None = None, run_id: RunId | None = None, start: str | None = None,
                tolerance: float | None = 0.01, workers: int = 1, use_gpu: bool = False, ray_address: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Learn an image prior from the corrupted dataset ``input_uri`` and the noise prior ``noise_prior``
    (:mod:`pipeline.jobs.learn`); outputs under ``output/learn/<run id>/``, the priors published to
    ``registry`` (default ``output``) as ``models/<name>/<run id>-round-<k>``, ``latest`` the chosen one.

    ``config``/``overrides``: the cleaning recipe (the sampler, the forward model); ``prior_config`` /
    ``prior_overrides``: the image prior's network and each round's training (default: the noise prior's network,
    600 steps at batch 32). ``tolerance``: stop when the noise fit improves by less (relative; None: run every
    round). Returns the result (also ``learn.json``): the rounds' records, the chosen round,
    the prior and the cleaned dataset."""
    refuse_credentials(overrides or [])  # a deployment run made without the schema's check: use none of them
    refuse_credentials(prior_overrides or [], "--prior-set")
    job = open_learning(input_uri, output, noise_prior, config, overrides, prior_config, prior_overrides, name=name,
                        registry=registry, validation=validation, run_id=run_id, rounds=rounds, tolerance=tolerance,
                        workers=workers, use_gpu=use_gpu, start=start, ray_address=ray_address)

    def one(k: int, previous: dict[str, Any] | None) -> dict[str, Any]:
        return learn_round.with_options(task_run_name=f"round-{k}")(job, k, previous, progress)

    result = learn(job, progress, round_fn=one)
    publish_artifact(result)
    return result
