"""Data-parallel training of one prior with Ray Train (``TorchTrainer``; DDP, gloo on CPU, NCCL on GPU).

The worker loop reuses :class:`pipeline.diffusion.train.Trainer`,
:func:`pipeline.diffusion.train.fit` and :mod:`pipeline.training`'s data loading and export, so the
loss, EMA, optimiser, schedule and checkpoints are those of single-process training:

* every worker builds the same initial weights (same seed) and wraps the model in
  ``DistributedDataParallel``; the loss runs through the wrapper (``Trainer.net``), while EMA,
  checkpoints and export use the bare model;
* worker ``r`` of ``w`` trains on images ``r::w`` of the training set; rank 0 keeps the single-process
  random stream (so one worker reproduces single-process training), other ranks reseed theirs;
* only rank 0 writes training states (``<output>/state``) and the final export (``<output>/model``);
  every rank resumes from the latest state, so re-running with the same output continues the run.

``python -m pipeline.jobs.train_prior --config C [--workers N] [--registry ROOT]`` (what ``ray job
submit`` runs) is ``jointdiff train`` on Ray Train, with 2 workers unless ``--workers`` says otherwise;
it joins the cluster of ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local Ray.

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
    from pipeline.training import finish_training, train_settings

    cfg = PriorConfig.model_validate(config["prior"])
    storage.configure(config["storage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_set, data, random_channel, n_images, data_hash = _worker_data(cfg, rank, world)
    trainer = Trainer(train_settings(cfg), cfg.train.device)

    def after_resume(t: Trainer) -> None:
        if rank:  # rank 0 keeps the single-process stream; the others draw their own
            t.generator.manual_seed(cfg.train.seed + 1 + 7919 * rank + t.step_count)
        t.prepare_net(torch.nn.parallel.DistributedDataParallel)

    def on_step(step: int, loss: float) -> None:
        if step % cfg.train.log_every == 0:  # every rank reports at the same steps
            recent = trainer.losses[-cfg.train.log_every:]
            ray.train.report({"step": step, "loss": sum(recent) / len(recent)})

    summary = fit(trainer, data, cfg.output, on_step=on_step, chief=rank == 0, after_resume=after_resume,
                  stop_after=config.get("stop_after"))
    if rank == 0 and trainer.step_count >= cfg.train.steps:
        finish_training(cfg, trainer, summary, n_images, random_channel,
                        extra_meta={"workers": world, "git_commit": config["git_commit"]}, dataset_hash=data_hash)


def _worker_data(cfg: PriorConfig, rank: int, world: int) -> tuple[Any, Any, bool, int, str]:
    """This worker's part of the training images: ``(images, network tensor, random channel, images in
    all parts, dataset hash)``. A shard dataset with at least one shard per worker is split by shard
    (worker ``r`` reads shards ``r::w`` only); otherwise every worker loads all and keeps rows ``r::w``."""
    import hashlib

    import torch.distributed as dist

    from pipeline.data.embedded import NAMES
    from pipeline.data.shards import list_shards
    from pipeline.data.storage import open_fs
    from pipeline.training import images_hash, load_train_data

    source = cfg.data.source
    shards = [] if source in NAMES else list_shards(source)
    if len(shards) >= world > 1:
        parts = [load_train_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": u})}))
                 for u in shards[rank::world]]
        train_set, random_channel = parts[0][0], parts[0][2]
        import torch

        from pipeline.diffusion.train import PatchPool

        if isinstance(parts[0][1], PatchPool):
            data = PatchPool([im for p in parts for im in p[1].images], parts[0][1].patch)
        else:
            data = torch.cat([p[1] for p in parts])
        count = torch.tensor([len(data)])
        if dist.is_initialized():
            dist.all_reduce(count)
        listing = []
        for u in shards:  # the dataset's version: its shards' names and sizes
            fs, path = open_fs(u)
            listing.append(f"{u.rsplit('/', 1)[-1]}:{fs.size(path)}")
        return train_set, data, random_channel, int(count.item()), \
            hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    train_set, data, random_channel = load_train_data(cfg)
    return train_set, data[rank::world], random_channel, len(train_set), images_hash(train_set)


def _fit_interruptibly(trainer: Any) -> None:
    """``trainer.fit()``, with Ctrl-C as :class:`KeyboardInterrupt`. Ray Train handles SIGINT itself: it aborts
    the run and leaves by ``sys.exit`` (no message, exit code 1), and keeps its handler installed afterwards, so
    a later Ctrl-C (in the next round's cleaning) would abort a run that has ended. Here its exit becomes an
    interruption that says how to resume, and the handler before it is put back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt("training interrupted; its state is kept at the last checkpoint: run the same "
                                "command again to resume") from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def train_distributed(config: PriorConfig, num_workers: int = 2, use_gpu: bool = False,
                      ray_address: str | None = None, registry: str | None = None,
                      stop_after: int | None = None) -> dict[str, Any] | None:
    """Train ``config`` on ``num_workers`` Ray Train workers; returns the exported model's card, with
    ``published`` (the registry version's URI) when ``registry`` names a registry root. ``stop_after``
    (a test hook, as in :func:`pipeline.training.train_prior`) ends the run after that many new steps,
    without export, and returns None."""
    from pipeline.data import storage
    from pipeline.data.datasets import image_column
    from pipeline.data.embedded import NAMES
    from pipeline.data.storage import join
    from pipeline.diffusion.checkpoint import read_json
    from pipeline.jobs.session import ray_session
    from pipeline.training import git_commit

    if config.data.source not in NAMES:  # the image column, chosen (or refused in one line) here, not in each worker
        column = image_column(config.data.source, config.data.column)
        config = config.model_copy(update={"data": config.data.model_copy(update={"column": column})})
    with ray_session(ray_address):  # before Ray is imported (pipeline.jobs.session.use_the_token_at_hand)
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(
            _worker_loop,
            # the driver's commit: workers run in Ray's session folder, outside the repository
            train_loop_config={"prior": config.model_dump(mode="json"), "storage": storage.current().resolved(),
                               "git_commit": git_commit(), "stop_after": stop_after},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.train.threads or 1}),
            run_config=RunConfig(name=f"train-{config.name}",
                                 storage_path=f"{tempfile.gettempdir()}/jointdiff-ray-train"),
        )
        _fit_interruptibly(trainer)
    if stop_after is not None:
        return None
    meta = read_json(join(config.output, "model", "config.json"))["meta"]
    if registry:
        from pipeline.registry import publish

        meta["published"] = publish(join(config.output, "model"), registry, config.name)
    return meta


def train_on_ray(args: Any) -> int:
    """``jointdiff train``'s arguments on Ray Train (``--workers``, default 2): the model's card as one JSON line
    on stdout (with ``published`` when ``--registry`` is given); 0."""
    import json
    import sys

    from pipeline.config import load_config
    from pipeline.jobs.session import cluster_address

    config = load_config(PriorConfig, args.config, args.set, section=args.section)
    cluster_address(args.ray_address, "train")  # ray:// and http:// fail here, before anything starts
    workers = args.workers or 2
    print(f"training prior '{config.name}' on {workers} Ray Train worker(s) for {config.train.steps} steps "
          f"-> {config.output}", file=sys.stderr)
    meta = train_distributed(config, num_workers=workers, use_gpu=args.gpu, ray_address=args.ray_address,
                             registry=args.registry)
    assert meta is not None  # no stop_after
    print(f"done: {meta['steps']} steps, final loss {meta['final_loss']:.4f}; model in {config.output}/model"
          + (f", published as {meta['published']}" if meta.get("published") else ""), file=sys.stderr)
    print(json.dumps(meta, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.jobs.train_prior --config C [--workers N] [--registry ROOT] ...``: a submitted
    training job's entry point, ``jointdiff train``'s arguments, always on Ray Train."""
    from pipeline.jobs.commands import run_command, train_parser

    return run_command(train_on_ray, train_parser("python -m pipeline.jobs.train_prior").parse_args(argv))


if __name__ == "__main__":  # what `ray job submit` runs: `jointdiff train`, always on Ray Train
    import sys

    sys.exit(main())
