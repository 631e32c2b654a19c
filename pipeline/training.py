"""``jointdiff train``: train one prior in this process, with progress, resume and EMA export."""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, PriorConfig
from pipeline.data.datasets import load_images
from pipeline.data.embedded import NAMES
from pipeline.data.storage import join, makedirs, open_fs
from pipeline.diffusion.losses import heldout_loss
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.train import PatchPool, Trainer, TrainSettings, fit
from pipeline.diffusion.unet import count_parameters
from pipeline.priors import SHIPPED, resolve_model


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def train_settings(config: PriorConfig) -> TrainSettings:
    """The trainer's plain settings from the validated application config (the trainer never sees the latter)."""
    tc, d = config.train, config.data
    return TrainSettings(
        net=config.unet.settings(), sde=VPSDE(**config.sde.model_dump()), steps=tc.steps, batch_size=tc.batch_size,
        lr=tc.lr, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_steps, grad_clip=tc.grad_clip,
        ema_decay=tc.ema_decay, seed=tc.seed, checkpoint_every=tc.checkpoint_every, precision=tc.precision,
        compile=tc.compile, hflip=d.hflip, shift=d.shift, grey_to_rgb=d.grey_to_rgb, record=config.model_dump(),
        init=_init_uri(tc.init))


def _init_uri(init: str | None) -> str | None:
    """``train.init`` as a model folder (a shipped prior's, a registry's newest version); as given where it cannot
    be resolved now: a new run refuses it when it loads it, a resumed run never reads it."""
    if init is None:
        return None
    try:
        return resolve_model(init)
    except Exception:
        return init


def to_network(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2.0 - 1.0


def load_train_data(config: PriorConfig) -> tuple[Any, torch.Tensor | PatchPool, bool]:
    """The training images: ``(ImageSet, network-space tensor on the device, grey-to-random-channel)``; with
    ``data.patch``, the images at their own sizes in a :class:`PatchPool` instead of the tensor."""
    d = config.data
    random_channel = d.grey_to_rgb == "random" and d.channels == 3
    channels = 1 if random_channel else d.channels
    if d.patch is not None:
        if d.patch != config.unet.image_size:
            raise ValueError(f"data.patch={d.patch} but unet.image_size={config.unet.image_size}; set them alike")
        # natural photos and shard datasets at their own sizes; the other embedded sets have none
        native = d.source == "natural" or d.source not in NAMES
        train_set = load_images(d.source, d.split, None if native else d.size, channels, d.column, n=d.limit)
        pool = PatchPool([to_network(torch.from_numpy(np.asarray(im))) for im in train_set.images], d.patch)
        return train_set, pool.to(config.train.device), random_channel
    # grey_to_rgb=random: load grey, and the trainer draws each example into a random channel
    train_set = load_images(d.source, d.split, d.size, channels, d.column, n=d.limit)
    if train_set.images.shape[1:] != ((1 if random_channel else config.unet.channels), config.unet.image_size,
                                      config.unet.image_size):
        raise ValueError(f"data gives {train_set.images.shape[1:]} images but the U-Net expects "
                         f"({config.unet.channels}, {config.unet.image_size}, {config.unet.image_size}); "
                         "set data.size/data.channels and unet.image_size/unet.channels alike")
    return train_set, to_network(torch.from_numpy(train_set.images)).to(config.train.device), random_channel


def images_hash(images: Any) -> str:
    """A short hash of the training images' ids and pixels (the card's ``dataset_hash``)."""
    import hashlib

    h = hashlib.sha256()
    for id_ in images.ids:
        h.update(str(id_).encode() + b"\0")
    for im in (images.images if isinstance(images.images, list) else [images.images]):
        h.update(np.ascontiguousarray(im).tobytes())
    return h.hexdigest()[:16]


def finish_training(config: PriorConfig, trainer: Trainer, summary: dict[str, Any], n_train_images: int,
                    random_channel: bool, extra_meta: dict[str, Any] | None = None,
                    dataset_hash: str | None = None) -> dict[str, Any]:
    """Held-out loss, the training card, and the EMA export to ``<output>/model``; returns the summary."""
    d, tc = config.data, config.train
    heldout = None
    if d.source in NAMES:
        test = to_network(torch.from_numpy(load_images(d.source, "test", d.size, 1 if random_channel else d.channels,
                                                       n=d.limit).images))
        if random_channel:  # test image k in channel k mod 3, as training draws them
            onehot = torch.eye(3)[torch.arange(len(test)) % 3][:, :, None, None]
            test = onehot * test + (onehot - 1)
        heldout = heldout_loss(trainer.ema.model, trainer.sde, test.to(tc.device))
    meta = {
        "name": config.name, "dataset": d.source, "split": d.split, "n_train_images": n_train_images,
        "dataset_hash": dataset_hash,
        "size": d.size, "channels": d.channels, "steps": trainer.step_count,
        "final_loss": summary["final_loss"], "heldout_loss": heldout,
        "heldout_loss_definition": "DSM loss of the EMA model on the test split at 10 times in [eps, 1], "
                                   "noise seed 0",
        "train_seconds": trainer.train_seconds, "parameters": count_parameters(trainer.model),
        "train_config": config.train.model_dump(), "git_commit": git_commit(),
        "created_by": getpass.getuser(), "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra_meta or {}),
    }
    trainer.export(join(config.output, "model"), meta)
    summary.update(meta)
    return summary


def _progress_bar(total: int, desc: str) -> tqdm:
    """A training run's progress bar (steps, steps/s, ETA), redrawn every second on a terminal, every 30 s in a
    log."""
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def _advance(bar: tqdm | None, trainer: Trainer, step: int, every: int) -> None:
    """``bar`` after ``step`` (a resumed run's first step jumps to where it is), with the mean loss of the last
    ``every`` steps every ``every`` steps."""
    if bar is None:
        return
    if bar.n == 0 and step > 1:
        bar.update(step - 1)
    bar.update(1)
    if step % every == 0:
        bar.set_postfix(loss=f"{sum(trainer.losses[-every:]) / every:.4f}")


def train_prior(config: PriorConfig, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``config`` to its step count (resuming), export the EMA model to ``<output>/model``.

    Returns the summary (also written into the model's ``config.json`` meta). With ``stop_after``
    the call ends early (no export), as an interrupted run would.
    """
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    train_set, data, random_channel = load_train_data(config)
    trainer = Trainer(train_settings(config), tc.device)
    bar = _progress_bar(tc.steps, f"train {config.name}") if progress else None

    def on_step(step: int, loss: float) -> None:
        _advance(bar, trainer, step, tc.log_every)

    t0 = time.perf_counter()
    summary = fit(trainer, data, config.output, on_step=on_step, stop_after=stop_after)
    if bar is not None:
        bar.close()
    summary["seconds_total"] = trainer.train_seconds
    if trainer.step_count < tc.steps:
        return summary
    summary = finish_training(config, trainer, summary, len(train_set), random_channel,
                              dataset_hash=images_hash(train_set))
    summary["export_seconds"] = time.perf_counter() - t0 - summary["seconds"]
    return summary


def nearest_distances(queries: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query RMS pixel distance (on [0, 1] images) to the nearest reference, and its index."""
    q = queries.flatten(1).double()
    r = references.flatten(1).double()
    d2 = (q.pow(2).sum(1, keepdim=True) - 2 * q @ r.T + r.pow(2).sum(1)[None]).clamp_min(0)
    best = d2.min(1)
    return (best.values / q.shape[1]).sqrt().float(), best.indices


def memorisation_report(samples: torch.Tensor, dataset: str, size: int,
                        channels: int) -> tuple[dict[str, Any], torch.Tensor]:
    """How far samples are from the training set, next to how far unseen test images are.

    A prior that copies its training images gives sample distances near 0, far below the
    test-image distances; a prior that generalises gives distances of the same order.
    Returns the report and, for each sample, its nearest training image.
    """
    train = torch.from_numpy(load_images(dataset, "train", size, channels).images)
    ds, idx = nearest_distances(samples, train)
    report: dict[str, Any] = {"samples_min": float(ds.min()), "samples_median": float(ds.median()),
                              "samples_max": float(ds.max()), "test_min": None, "test_median": None,
                              "n_samples": int(ds.numel()), "n_test": 0,
                              "per_sample": [round(float(v), 4) for v in ds]}
    if dataset in NAMES:  # a shard dataset has no held-out split to compare with
        test = torch.from_numpy(load_images(dataset, "test", size, channels).images)
        dt_, _ = nearest_distances(test, train)
        report.update(test_min=float(dt_.min()), test_median=float(dt_.median()), n_test=int(dt_.numel()))
    return report, train[idx]


def preview(output: str, model_uri: str, n_samples: int = 16, steps: int = 100) -> tuple[list[float], Any]:
    """What a trained prior looks like: the training run's loss curve (from its newest state under
    ``output/state``) and ``n_samples`` unconditional samples of the model at ``model_uri`` ([0, 1], N x C x H x W
    numpy, ``steps`` Euler-Maruyama steps, seed 0)."""
    from pipeline.diffusion.checkpoint import MAX_STATE_BYTES, load_model, read_json
    from pipeline.diffusion.sampling import sample

    state = read_json(join(output, "state", "latest.json"))
    losses = read_json(join(output, "state", state["dir"], "state.json"), max_bytes=MAX_STATE_BYTES)["losses"]
    model, sde, _ = load_model(model_uri)
    return losses, sample(model, sde, n_samples, steps, seed=0).numpy()


def _on_device(config: PriorConfig, device: str | None, split: str | None = None) -> PriorConfig:
    """``config`` with its training data on ``device`` (default: its own) and from ``split`` (default: its own)."""
    train = config.train.model_copy(update={"device": device or config.train.device})
    data = config.data.model_copy(update={"split": split or config.data.split})
    return config.model_copy(update={"train": train, "data": data})


def supervised_plan(image: PriorConfig, noise: PriorConfig, forward: str, batch_size: int | None = None,
                    steps: int | None = None) -> dict[str, Any]:
    """What :func:`train_supervised` trains for the pair ``image`` + ``noise`` (two prior recipes): the image
    prior's U-Net widened to the two priors' parameters together, for their training compute together
    (:func:`pipeline.posterior.supervised.matched_budget`) unless ``steps`` is given; at the image prior's batch
    size unless ``batch_size`` is."""
    from pipeline.diffusion.unet import UNet
    from pipeline.posterior.supervised import WEIGHT_RANGES, matched_budget, width_for

    if forward not in WEIGHT_RANGES:
        raise ValueError(f"forward model {forward!r}: the supervised network is trained for "
                         f"{', '.join(WEIGHT_RANGES)}")
    from pipeline.run.models import check_pair

    check_pair(image.unet, image.sde, noise.unet, noise.sde, forward)  # the pairs can be made (ConfigError)
    parts = []
    for c in (image, noise):
        with torch.device("meta"):
            parts.append((c.train.steps, c.train.batch_size, count_parameters(UNet(c.unet.settings()))))
    budget = sum(p for _, _, p in parts)
    net = width_for(dataclasses.replace(image.unet.settings(), dropout=0.0), budget)
    with torch.device("meta"):
        params = count_parameters(UNet(net))
    batch = batch_size or image.train.batch_size
    matched = matched_budget(parts, batch, params)
    return {"net": net, "parameters": params, "budget_parameters": budget, "matched_steps": matched,
            "steps": steps or matched, "batch_size": batch, "weight_range": list(WEIGHT_RANGES[forward]),
            "budget": [{"prior": c.name, "steps": s, "batch_size": b, "parameters": p}
                       for c, (s, b, p) in zip((image, noise), parts)]}


def _pairs(trainer: Any, image: PriorConfig, noise: PriorConfig, split: str, n: int,
           seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``n`` pairs drawn from ``split`` of both sources as training draws them, without flips or shifts (generator
    ``seed``; :func:`pipeline.posterior.supervised.draw_pairs`); None where a source has no such split (a shard
    dataset)."""
    from pipeline.posterior.supervised import draw_pairs

    if image.data.source not in NAMES or noise.data.source not in NAMES:
        return None
    _, clean, _ = load_train_data(_on_device(image, None, split))
    _, noise_data, _ = load_train_data(_on_device(noise, None, split))
    plain = {"hflip": False, "shift": 0}
    return draw_pairs(clean, noise_data, n, torch.Generator(device=trainer.device).manual_seed(seed),
                      dataclasses.replace(trainer.clean_draw, **plain),
                      dataclasses.replace(trainer.noise_draw, **plain), trainer.forward, trainer.weight_range)


def _heldout_pairs(trainer: Any, image: PriorConfig, noise: PriorConfig, n: int = 256) -> float | None:
    """The supervised loss of ``trainer``'s EMA model on ``n`` pairs of the test splits (:func:`_pairs`, seed 0);
    None where a source has no test split."""
    from pipeline.posterior.supervised import pair_loss

    pairs = _pairs(trainer, image, noise, "test", n, 0)
    if pairs is None:
        return None
    y, x0, _ = pairs
    with torch.no_grad():
        return float(pair_loss(trainer.ema.model.eval(), y, x0))


def route_calibration(trainer: Any, image: PriorConfig, noise: PriorConfig, priors: tuple[str, str],
                      n: int = 256) -> dict[str, Any] | None:
    """The router's calibration (:func:`pipeline.posterior.supervised.calibrate`) of ``trainer``'s EMA model with
    the priors ``priors`` (image, noise) on ``n`` pairs of the validation splits (seed 1), as a dict for the card;
    None where the forward model is not linear in the noise or a source has no validation split."""
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.forward import FORWARD_MODELS, make_forward
    from pipeline.posterior.supervised import calibrate

    forward = trainer.forward
    pairs = _pairs(trainer, image, noise, "val", n, 1) if FORWARD_MODELS[forward].linear else None
    if pairs is None:
        return None
    y, _, w = pairs
    x_model, sde, _ = load_model(resolve_model(priors[0]), trainer.device)
    n_model, _, _ = load_model(resolve_model(priors[1]), trainer.device)
    fm = make_forward(forward, n, **{FORWARD_MODELS[forward].weight: w.cpu()})
    cal = calibrate(trainer.ema.model.eval(), x_model, n_model, sde, (y + 1) / 2, fm, priors,
                    [f"val-{k}" for k in range(n)])
    return dataclasses.asdict(cal)


SELECTION = ("the EMA weights at the checkpoint (every train.checkpoint_every steps, and the last) with the lowest "
             "MSE on 256 pairs drawn from the validation splits, seed 2")


def _select(trainer: Any, val: tuple[torch.Tensor, torch.Tensor, torch.Tensor], output: str, step: int) -> None:
    """At a checkpoint: the EMA model's loss on the validation pairs ``val``, added to ``OUTPUT/best/best.json``'s
    curve; its weights to ``best/ema-<step>.safetensors`` when it is the lowest yet (a resumed run first rewinds
    the record to its state: :func:`_rewind_best`)."""
    from pipeline.diffusion.checkpoint import CheckpointError, read_json, write_json, write_tensors
    from pipeline.posterior.supervised import pair_loss

    y, x0, _ = val
    model = trainer.ema.model.eval()
    with torch.no_grad():
        loss = float(pair_loss(model, y, x0))
    where = join(output, "best", "best.json")
    try:
        record = read_json(where)
    except (CheckpointError, FileNotFoundError):
        record = {"step": None, "val_loss": None, "curve": []}
    curve = [c for c in record["curve"] if c[0] < step] + [[step, loss]]
    if record["val_loss"] is None or loss < record["val_loss"]:
        fs, path = open_fs(join(output, "best"))
        makedirs(fs, path)  # each best under its own name, then the record: a kill never loses the one before
        write_tensors(join(output, "best", f"ema-{step:07d}.safetensors"), trainer.ema.model.state_dict())
        record = {"step": step, "val_loss": loss}
    write_json(where, {**record, "curve": curve}, atomic=True)


def _selected(trainer: Any, output: str) -> dict[str, Any]:
    """The finished run's selection: the EMA model takes the selected checkpoint's weights (:func:`_select`);
    the card's record of it. Empty (the last weights) where there was no validation split."""
    from pipeline.diffusion.checkpoint import CheckpointError, read_json, read_tensors

    try:
        record = read_json(join(output, "best", "best.json"))
    except (CheckpointError, FileNotFoundError):
        return {}
    if record.get("step") is None:
        return {}
    trainer.ema.model.load_state_dict(read_tensors(join(output, "best", f"ema-{record['step']:07d}.safetensors")))
    return {"selected_step": record["step"], "val_loss": record["val_loss"], "val_curve": record["curve"],
            "selection": SELECTION}


def train_supervised(image: PriorConfig, noise: PriorConfig, forward: str, output: str, *,
                     steps: int | None = None, batch_size: int | None = None, device: str | None = None,
                     threads: int | None = None, progress: bool = True, stop_after: int | None = None,
                     route_priors: tuple[str, str] | None = None) -> dict[str, Any]:
    """Train the supervised network for the pair of prior recipes ``image`` + ``noise`` under ``forward`` (resuming
    from ``output/state``), export its EMA to ``output/model``; returns the summary (the card's meta).

    Pairs are drawn on the fly: a clean image as the image prior draws them, a noise image as the noise prior does,
    a weight from :data:`pipeline.posterior.supervised.WEIGHT_RANGES`. The recipe (learning rate, warm-up, EMA,
    seed) is the image prior's. ``route_priors`` (image, noise; default the recipes' names where those are shipped
    priors): the priors the router's calibration is made with (:func:`route_calibration`, ``meta.route``)."""
    from pipeline.posterior.supervised import TASK, Draw, SupervisedTrainer

    plan = supervised_plan(image, noise, forward, batch_size, steps)
    threads = threads or image.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = device or image.train.device  # both sources where the trainer and its generator are
    image, noise = _on_device(image, device), _on_device(noise, device)
    if route_priors is None and image.name in SHIPPED and noise.name in SHIPPED:
        route_priors = (image.name, noise.name)
    if route_priors:  # before hours of training: the priors the router is calibrated with must fit the pairs
        _check_route_priors(route_priors, image, noise, forward)
    resumed_at = _check_resume(output, plan, image, noise, forward)
    clean_set, clean, _ = load_train_data(image)
    noise_set, noise_data, _ = load_train_data(noise)
    base = train_settings(image)
    settings = dataclasses.replace(base, net=plan["net"], steps=plan["steps"], batch_size=plan["batch_size"],
                                   init=None, record={"supervised": {**plan, "net": dataclasses.asdict(plan["net"]),
                                                                      "image": image.model_dump(),
                                                                      "noise": noise.model_dump(),
                                                                      "forward": forward}})
    nd = noise.data
    draw = Draw(hflip=nd.hflip, shift=nd.shift, grey_to_rgb=nd.grey_to_rgb, channels=noise.unet.channels)
    trainer = SupervisedTrainer(settings, draw, forward, tuple(plan["weight_range"]), image.train.device)
    bar = _progress_bar(settings.steps, f"train supervised {image.name}+{noise.name}") if progress else None

    val = _pairs(trainer, image, noise, "val", 256, 2)  # checkpoint selection (None: no validation split)
    if resumed_at is not None:
        _rewind_best(output, resumed_at)

    def on_step(step: int, loss: float) -> None:
        _advance(bar, trainer, step, image.train.log_every)
        if val is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
            _select(trainer, val, output, step)

    summary = fit(trainer, (clean, noise_data), output, on_step=on_step, stop_after=stop_after)
    if bar is not None:
        bar.close()
    summary["seconds_total"] = trainer.train_seconds
    if trainer.step_count < settings.steps:
        return summary
    selected = _selected(trainer, output)
    heldout = _heldout_pairs(trainer, image, noise)
    meta = {
        "name": f"{image.name}-{noise.name}", "task": TASK, "image": image.name, "noise": noise.name,
        "image_dataset": image.data.source, "noise_dataset": noise.data.source, "forward": forward,
        "weight_range": plan["weight_range"], "channels": plan["net"].channels, "size": plan["net"].image_size,
        "steps": trainer.step_count, "batch_size": settings.batch_size, "parameters": plan["parameters"],
        "budget": plan["budget"], "matched_steps": plan["matched_steps"],
        "n_train_images": len(clean_set), "n_noise_images": len(noise_set),
        "dataset_hash": images_hash(clean_set), "noise_dataset_hash": images_hash(noise_set),
        "final_loss": summary["final_loss"], "heldout_loss": heldout, "route": None, **selected,
        "heldout_loss_definition": "MSE (network units) of the EMA model on 256 pairs drawn from the test splits, "
                                   "seed 0",
        "train_seconds": trainer.train_seconds, "train_config": image.train.model_dump(),
        "git_commit": git_commit(), "created_by": getpass.getuser(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    trainer.export(join(output, "model"), meta)  # exported first: a calibration that fails loses no training
    if route_priors:
        meta["route"] = route_calibration(trainer, image, noise, route_priors)
        trainer.export(join(output, "model"), meta)
    summary.update(meta)
    return summary


def _check_route_priors(priors: tuple[str, str], image: PriorConfig, noise: PriorConfig, forward: str) -> None:
    """:class:`ConfigError` in one line unless the router's priors resolve and have the recipes' sizes and
    channels (:func:`pipeline.run.models.check_models`)."""
    from pipeline.run.models import check_models, prior_shape

    check_models(priors[0], priors[1], forward=forward)
    for key, name, recipe in (("image", priors[0], image), ("noise", priors[1], noise)):
        want, shape = (recipe.unet.channels, recipe.unet.image_size), prior_shape(name)
        if shape != want:
            raise ConfigError(f"--route-priors: the {key} prior {name} is {shape} (channels, size), the "
                              f"{key} recipe {want}; name priors of the recipes' shape")


def _check_resume(output: str, plan: dict[str, Any], image: PriorConfig, noise: PriorConfig,
                  forward: str) -> int | None:
    """The step of the training state under ``output`` a run resumes from (None: a new run, which clears the
    checkpoint selection a run before it left, ``best/``); a state from another pair, forward model or weight
    range: one line (:class:`~pipeline.diffusion.checkpoint.CheckpointConfigError`) before anything is trained."""
    from pipeline.diffusion.checkpoint import MAX_STATE_BYTES, CheckpointConfigError, CheckpointError, read_json

    try:
        latest = read_json(join(output, "state", "latest.json"))
        saved = read_json(join(output, "state", latest["dir"], "state.json"), max_bytes=MAX_STATE_BYTES)["config"]
        step = int(latest["step"])
    except (CheckpointError, FileNotFoundError, KeyError, TypeError, ValueError):
        fs, path = open_fs(join(output, "best"))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return None
    was = saved.get("supervised", {}) if isinstance(saved, dict) else {}
    mine = {"forward": forward, "image": image.model_dump().get("data"), "noise": noise.model_dump().get("data"),
            "weight_range": plan["weight_range"]}
    theirs = {"forward": was.get("forward"), "image": (was.get("image") or {}).get("data"),
              "noise": (was.get("noise") or {}).get("data"), "weight_range": was.get("weight_range")}
    for key in mine:
        if mine[key] != theirs[key]:
            raise CheckpointConfigError(f"{output}: its training state is of another {key} ({theirs[key]}) than this "
                                        f"run's ({mine[key]}); use a new OUTPUT, or the recipes it was started with")
    return step


def _rewind_best(output: str, step: int) -> None:
    """A run resumed at ``step``: the checkpoint selection as it was then (entries of the steps it redoes dropped;
    a best among them replaced by the best before them whose weights are kept)."""
    from pipeline.diffusion.checkpoint import CheckpointError, read_json, write_json

    try:
        record = read_json(join(output, "best", "best.json"))
    except (CheckpointError, FileNotFoundError):
        return
    curve = [c for c in record.get("curve", []) if c[0] <= step]
    if record.get("step") is not None and record["step"] > step:
        fs, best = open_fs(join(output, "best"))
        kept = [c for c in curve if fs.exists(f"{best}/ema-{c[0]:07d}.safetensors")]
        low = min(kept, key=lambda c: c[1], default=None)
        record = {"step": low[0], "val_loss": low[1]} if low else {"step": None, "val_loss": None}
    write_json(join(output, "best", "best.json"), {**record, "curve": curve}, atomic=True)
