"""Prefect flow ``train-priors``: train the image prior and the noise prior with Ray Train, publish both.

Each prior is one task (``train_one``, one retry: a retry resumes from the
latest training state). Both run at once when the Ray cluster has CPUs (or GPUs) for both worker
groups, else one after the other. Each trained prior is published to the registry, and the flow
emits a markdown artifact per prior with its card, loss curve and a grid of unconditional samples.
Its ``overrides`` apply to both configs; like the cleaning flow's, none may set storage credentials or
options (:mod:`flows`): a prior's job reaches buckets with the environment's or the cluster's own identity.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import Overrides, artifact_key, refusing_flow
from flows.clean_dataset import _retry_job, run_submitted
from pipeline.config import PriorConfig, load_config, refuse_credentials
from pipeline.data.storage import join
from pipeline.jobs.session import ray_session
from pipeline.jobs.train_prior import train_distributed


@task(retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE, retry_condition_fn=_retry_job)
def submit_train_job(config_path: str, overrides: list[str], workers: int, use_gpu: bool, registry: str,
                     output: str | None, jobs_address: str) -> dict[str, Any]:
    """`jointdiff train` of one prior submitted through the Ray Jobs API and followed; returns its card."""
    args = ["--config", config_path, "--workers", str(workers), "--registry", registry,
            *(["--gpu"] if use_gpu else []), *[x for o in overrides for x in ("--set", o)],
            *(["--set", f"output={output}"] if output else [])]
    meta = run_submitted("train", args, jobs_address, "steps")
    print(f"prior: {meta['steps']} steps, final loss {meta['final_loss']:.4f}, published as {meta.get('published')}")
    return meta


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_one(config: PriorConfig, workers: int, use_gpu: bool, registry: str) -> dict[str, Any]:
    meta = train_distributed(config, num_workers=workers, use_gpu=use_gpu, registry=registry)
    print(f"prior {config.name}: {meta['steps']} steps, final loss {meta['final_loss']:.4f}, "
          f"published as {meta['published']}")
    return meta


def _png(mosaic: Any) -> str:
    from pipeline.viz import png_bytes

    return base64.b64encode(png_bytes(mosaic)).decode()


def publish_artifact(config: PriorConfig, meta: dict[str, Any], n_samples: int = 16, steps: int = 100) -> None:
    """Card, loss curve and unconditional samples of one published prior, as a markdown artifact."""
    from pipeline.training import preview
    from pipeline.viz import grid, loss_curve

    losses, samples = preview(config.output, meta["published"], n_samples, steps)
    card = "\n".join(f"| {k} | {meta.get(k)} |" for k in ("steps", "final_loss", "heldout_loss", "workers",
                                                          "dataset", "dataset_hash", "git_commit", "created_at"))
    sheet = _png(grid(samples, 8, scale=2))
    create_markdown_artifact(
        f"# Prior `{config.name}`\n\npublished: `{meta['published']}`\n\n| key | value |\n| --- | --- |\n{card}\n\n"
        f"## Loss\n\n![loss](data:image/png;base64,{_png(loss_curve(losses))})\n\n"
        f"## {n_samples} samples ({steps} steps)\n\n![samples](data:image/png;base64,{sheet})",
        key=f"prior-{artifact_key(config.name)}",
        description=f"Training of prior {config.name}")


@refusing_flow(name="train-priors", log_prints=True)
def train_priors(image_config: str, noise_config: str, registry: str, workers: int = 2, use_gpu: bool = False,
                 ray_address: str | None = None, overrides: Overrides | None = None,
                 output_root: str | None = None, jobs_address: str | None = None) -> dict[str, Any]:
    """Train both priors (configs are YAML paths; ``overrides`` apply to both) and publish them to
    ``registry``; returns ``{name: card}``. ``output_root`` puts each prior's training state and model in
    ``<output_root>/<name>`` instead of its config's ``output`` (on a cluster: a bucket every worker reaches).

    With ``jobs_address`` (else ``RAY_API_SERVER_ADDRESS``), each prior is a `jointdiff train` job submitted
    through the Ray Jobs API and followed (the shipped deployment); else this process is the Ray Train driver,
    on ``ray_address`` (else ``RAY_ADDRESS``) or a Ray started here."""
    import os

    refuse_credentials(overrides or [])  # a deployment run made without the schema's check: use none of them
    configs = [load_config(PriorConfig, path, overrides or []) for path in (image_config, noise_config)]
    if output_root:
        configs = [c.model_copy(update={"output": join(output_root, c.name)}) for c in configs]
    jobs_address = jobs_address or os.environ.get("RAY_API_SERVER_ADDRESS") or None
    if jobs_address:
        futures = [submit_train_job.submit(path, overrides or [], workers, use_gpu, registry,
                                           c.output if output_root else None, jobs_address)
                   for path, c in zip((image_config, noise_config), configs)]
        metas = [f.result() for f in futures]
        for c, m in zip(configs, metas):
            publish_artifact(c, m)
        return {c.name: m for c, m in zip(configs, metas)}
    with ray_session(ray_address):  # before Ray is imported (pipeline.jobs.session.use_the_token_at_hand)
        import ray

        res = ray.cluster_resources()
        need = [workers * (1 if use_gpu else (c.train.threads or 1)) for c in configs]
        have = res.get("GPU", 0) if use_gpu else res.get("CPU", 0)
        if sum(need) <= have:  # room for both worker groups: train them at once
            futures = [train_one.submit(c, workers, use_gpu, registry) for c in configs]
            metas = [f.result() for f in futures]
        else:
            metas = [train_one(c, workers, use_gpu, registry) for c in configs]
    for c, m in zip(configs, metas):
        publish_artifact(c, m)
    return {c.name: m for c, m in zip(configs, metas)}
