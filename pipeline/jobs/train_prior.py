"""Data-parallel training of one prior with Ray Train (``TorchTrainer``; DDP, gloo on CPU, NCCL on GPU).

WORK IN PROGRESS (issue 6): the worker loop reuses :class:`pipeline.diffusion.train.Trainer`,
:func:`pipeline.diffusion.train.fit` and :mod:`pipeline.training`'s data loading and export, so the
loss, EMA, optimiser, schedule and checkpoints are those of single-process training:

* every worker builds the same initial weights (same seed) and wraps the model in
  ``DistributedDataParallel``; the loss runs through the wrapper (``Trainer.net``), while EMA,
  checkpoints and export use the bare model;
* worker ``r`` of ``w`` trains on images ``r::w`` of the training set; rank 0 keeps the single-process
  random stream (so one worker reproduces single-process training), other ranks reseed theirs;
* only rank 0 writes training states (``<output>/state``) and the final export (``<output>/model``);
  every rank resumes from the latest state, so re-running with the same output continues the run.

Not yet: streaming only a worker's shards, the model registry, bf16/compile options, the Prefect flow.
"""

from __future__ import annotations

import tempfile
from typing import Any

from pipeline.config import PriorConfig


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from pipeline.data import storage
    from pipeline.diffusion.train import Trainer, fit
    from pipeline.training import finish_training, load_train_data

    cfg = PriorConfig.model_validate(config["prior"])
    storage.configure(config["storage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_set, data, random_channel = load_train_data(cfg)
    part = data[rank::world]
    trainer = Trainer(cfg, cfg.train.device)

    def after_resume(t: Trainer) -> None:
        if rank:  # rank 0 keeps the single-process stream; the others draw their own
            t.generator.manual_seed(cfg.train.seed + 1 + 7919 * rank + t.step_count)
        t.net = torch.nn.parallel.DistributedDataParallel(t.model)

    def on_step(step: int, loss: float) -> None:
        if step % cfg.train.log_every == 0:  # every rank reports at the same steps
            recent = trainer.losses[-cfg.train.log_every:]
            ray.train.report({"step": step, "loss": sum(recent) / len(recent)})

    summary = fit(trainer, part, cfg.output, on_step=on_step, chief=rank == 0, after_resume=after_resume)
    if rank == 0 and trainer.step_count >= cfg.train.steps:
        finish_training(cfg, trainer, summary, len(train_set), random_channel, extra_meta={"workers": world})


def train_distributed(config: PriorConfig, num_workers: int = 2, use_gpu: bool = False,
                      ray_address: str | None = None) -> dict[str, Any]:
    """Train ``config`` on ``num_workers`` Ray Train workers; returns the exported model's card."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data import storage
    from pipeline.data.storage import join
    from pipeline.diffusion.checkpoint import read_json
    from pipeline.jobs.clean import ray_session

    with ray_session(ray_address):
        TorchTrainer(
            _worker_loop,
            train_loop_config={"prior": config.model_dump(mode="json"), "storage": storage.current().resolved()},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.train.threads or 1}),
            run_config=RunConfig(name=f"train-{config.name}",
                                 storage_path=f"{tempfile.gettempdir()}/jointdiff-ray-train"),
        ).fit()
    return read_json(join(config.output, "model", "config.json"))["meta"]
