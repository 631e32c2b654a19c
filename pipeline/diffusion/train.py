"""Single-process training of one diffusion prior; Ray Train reuses :class:`Trainer` unchanged.

One step: draw a batch (with random horizontal flips if configured), compute the DSM loss at
stratified random times, AdamW with linear warm-up, clip the gradient norm, update the EMA.
All randomness (batch indices, flips, times, noise) comes from one ``torch.Generator`` whose state is
checkpointed, so a resumed run continues the exact sequence an uninterrupted run would have drawn.

Layout under ``output``:
``state/step-000500/{model,ema,optimizer}.safetensors + state.json`` (kept: the last two),
``state/latest.json`` (written last, so a crash mid-checkpoint never points at a partial state),
``model/`` (the final EMA export, a :func:`pipeline.diffusion.checkpoint.save_model` folder).

The trainer takes a plain :class:`TrainSettings` (no application config: ``pipeline.training``, the
caller, builds it from a ``PriorConfig`` with :func:`pipeline.training.train_settings`).
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.data.storage import join, makedirs, open_fs
from pipeline.diffusion.checkpoint import (
    MAX_STATE_BYTES,
    CheckpointConfigError,
    CheckpointError,
    build_model,
    check_state,
    load_model,
    read_json,
    read_tensors,
    save_model,
    write_json,
    write_tensors,
)
from pipeline.diffusion.ema import EMA
from pipeline.diffusion.losses import random_dsm_loss
from pipeline.diffusion.nets import NetConfig, UNet
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.tiles import reflect_pad

KEEP_STATES = 2


@dataclass(frozen=True)
class TrainSettings:
    """What one prior's training needs. No defaults here: the caller's validated config decides them all."""

    net: NetConfig
    sde: VPSDE
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    seed: int
    checkpoint_every: int
    precision: str  # "fp32" or "bf16" (the forward and backward pass under bfloat16 autocast)
    compile: bool
    hflip: bool  # random horizontal flips
    shift: int  # random translations by up to this many pixels
    grey_to_rgb: str  # "replicate" or "random": a grey image for an RGB prior, in every channel or one
    record: dict[str, Any]  # the caller's full config, written into every training state (for the record)
    init: str | None  # a model folder whose weights a new run starts from (fine-tuning); a resumed run ignores it


def _random_shift(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-k, k], repeating the edge pixels."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (k, k, k, k), mode="replicate")
    dy = torch.randint(0, 2 * k + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * k + 1, (b,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
    idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[idx, chan, rows, cols]


class PatchPool:
    """Images of any sizes (network space, each ``(C, H, W)``) that training draws random
    ``patch`` x ``patch`` crops from: a uniformly chosen image (each image counts the same, whatever its
    size), then a uniformly chosen position. An image smaller than the patch is padded by reflection."""

    def __init__(self, images: list[torch.Tensor], patch: int):
        if not images:
            raise ValueError("no images to draw patches from")
        self.patch = patch
        self.images = [self._fit(im) for im in images]

    def _fit(self, im: torch.Tensor) -> torch.Tensor:
        h, w = im.shape[-2:]
        return reflect_pad(im[None], 0, max(0, self.patch - h), 0, max(0, self.patch - w))[0]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> PatchPool:
        return PatchPool(self.images[index], self.patch)

    @property
    def device(self) -> torch.device:
        return self.images[0].device

    def to(self, device: torch.device | str) -> PatchPool:
        return PatchPool([im.to(device) for im in self.images], self.patch)

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        p = self.patch
        which = torch.randint(len(self.images), (n,), generator=g, device=g.device).tolist()
        u = torch.rand(n, 2, generator=g, device=g.device).tolist()
        out = []
        for k, (fy, fx) in zip(which, u):
            im = self.images[k]
            y0, x0 = int(fy * (im.shape[-2] - p + 1)), int(fx * (im.shape[-1] - p + 1))
            out.append(im[:, y0:y0 + p, x0:x0 + p])
        return torch.stack(out).to(self.device)


def draw_images(data: torch.Tensor | PatchPool, n: int, g: torch.Generator, *, hflip: bool, shift: int,
                grey_to_rgb: str, channels: int) -> torch.Tensor:
    """``n`` random network-space images of ``data`` (with replacement; patches of a :class:`PatchPool`), drawn
    from ``g``: a grey image for a ``channels``-channel network in one random colour channel (``grey_to_rgb`` =
    ``random``), shifted by up to ``shift`` pixels and flipped left-right at random (``hflip``)."""
    if isinstance(data, PatchPool):
        x0 = data.draw(n, g)
    else:
        idx = torch.randint(data.shape[0], (n,), generator=g, device=data.device)
        x0 = data[idx]
    if grey_to_rgb == "random" and x0.shape[1] == 1 and channels == 3:
        # the grey image in one random colour channel, black (-1) in the other two
        chan = torch.randint(3, (x0.shape[0],), generator=g, device=x0.device)
        onehot = torch.nn.functional.one_hot(chan, 3).to(x0.dtype)[:, :, None, None]
        x0 = onehot * x0 + (onehot - 1)
    if shift:
        x0 = _random_shift(x0, shift, g)
    if hflip:
        flip = torch.rand(x0.shape[0], generator=g, device=x0.device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    return x0


def fine_tune_mismatch(net: NetConfig, sde: VPSDE, other_net: NetConfig,
                       other_sde: VPSDE) -> tuple[str, Any, Any] | None:
    """The first setting in which a run of ``net`` and ``sde`` could not start from the weights of a model of
    ``other_net`` and ``other_sde``: ``("unet.KEY" or "sde.KEY", this run's value, the model's)``, or None
    (``dropout`` changes no weight)."""
    for what, mine, theirs in (("unet", asdict(net), asdict(other_net)), ("sde", asdict(sde), asdict(other_sde))):
        for key in mine:
            if key != "dropout" and mine[key] != theirs.get(key):
                return f"{what}.{key}", mine[key], theirs.get(key)
    return None


def init_weights(uri: str, net: NetConfig, sde: VPSDE) -> dict[str, torch.Tensor]:
    """The weights of the model folder ``uri`` for a run of network ``net`` and ``sde``: a
    :class:`~pipeline.diffusion.checkpoint.CheckpointConfigError` naming the first setting that differs."""
    model, model_sde, _ = load_model(uri)
    if not isinstance(model, UNet):
        raise CheckpointConfigError(f"train.init={uri}: a Gaussian prior, not a network: leave train.init out to "
                                    "train from scratch")
    differ = fine_tune_mismatch(net, sde, model.config, model_sde)
    if differ is not None:
        key, mine, theirs = differ
        raise CheckpointConfigError(f"train.init={uri}: its {key} is {theirs!r}, this run's {mine!r}; set "
                                    f"{key}: {theirs!r} to fine-tune it")
    return model.state_dict()


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from ``base_lr / warmup`` to ``base_lr`` over ``warmup`` steps, then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


class Trainer:
    """Owns model, EMA, optimiser and RNG for one prior; ``step(x0)`` takes one optimisation step."""

    def __init__(self, settings: TrainSettings, device: torch.device | str = "cpu"):
        self.settings = tc = settings
        self.device = torch.device(device)
        torch.manual_seed(tc.seed)  # initial weights
        self.model = UNet(tc.net).to(self.device)
        self.sde = tc.sde
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(tc.seed + 1)
        self.step_count = 0
        self.losses: list[float] = []
        self.train_seconds = 0.0  # wall time over all (resumed) sessions
        # what the loss runs through: the model itself, or a DistributedDataParallel wrapper of it that
        # Ray Train sets (pipeline.jobs.train_prior); EMA, checkpoints and export always use self.model
        self.net: torch.nn.Module | None = None

    # ------------------------------------------------------------- one step
    def draw_batch(self, data: torch.Tensor | PatchPool) -> torch.Tensor:
        """A random batch (with replacement) of network-space images (or of patches of them), flipped if
        configured."""
        tc = self.settings
        return draw_images(data, tc.batch_size, self.generator, hflip=tc.hflip, shift=tc.shift,
                           grey_to_rgb=tc.grey_to_rgb, channels=self.model.config.channels)

    def step(self, x0: torch.Tensor) -> float:
        return self._optimise(lambda net: random_dsm_loss(net, self.sde, x0, self.generator))

    def _optimise(self, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> float:
        """One optimisation step on ``loss_of(network)``: learning rate, backward, clipping, AdamW, EMA."""
        tc = self.settings
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step_count, tc.lr, tc.warmup_steps)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            loss = loss_of(self.net or self.model).float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.ema.update(self.model)
        self.step_count += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.step_count}; lower train.lr")
        self.losses.append(value)
        return value

    def prepare_net(self, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
        """Set what the loss runs through: the model, wrapped (e.g. DDP) and/or compiled as configured."""
        net = wrap(self.model) if wrap is not None else self.model
        if self.settings.compile:
            net = torch.compile(net)
        self.net = net if net is not self.model else None

    # ------------------------------------------------------------- state
    def save_state(self, root: str) -> str:
        """Write the full training state under ``root/state`` and point ``latest.json`` at it."""
        step_dir = join(root, "state", f"step-{self.step_count:07d}")
        fs, path = open_fs(step_dir)
        makedirs(fs, path)
        write_tensors(join(step_dir, "model.safetensors"), self.model.state_dict())
        write_tensors(join(step_dir, "ema.safetensors"), self.ema.state_dict())
        opt_tensors, opt_meta = _flatten_optimizer(self.opt.state_dict())
        write_tensors(join(step_dir, "optimizer.safetensors"), opt_tensors)
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # dropout on a GPU draws from the CUDA generator
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        write_tensors(join(step_dir, "rng.safetensors"), rng)
        write_json(join(step_dir, "state.json"), {
            "step": self.step_count, "ema_updates": self.ema.num_updates, "optimizer": opt_meta,
            "losses": self.losses, "train_seconds": self.train_seconds,
            "config": {**self.settings.record, "unet": asdict(self.settings.net), "sde": asdict(self.settings.sde)},
        })
        write_json(join(root, "state", "latest.json"), {"step": self.step_count, "dir": f"step-{self.step_count:07d}"},
                   atomic=True)
        self._prune(root)
        return step_dir

    def _prune(self, root: str) -> None:
        fs, path = open_fs(join(root, "state"))
        dirs = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
        for old in dirs[:-KEEP_STATES]:
            fs.rm(old, recursive=True)

    def _latest_dir(self, root: str) -> str | None:
        """The state folder ``latest.json`` names; if it is unreadable, the newest complete one."""
        state = join(root, "state")
        fs, path = open_fs(state)
        if not fs.exists(path):
            return None
        try:
            latest = read_json(join(state, "latest.json"))["dir"]
            if not isinstance(latest, str) or not re.fullmatch(r"step-\d+", latest):  # a folder name, never a path
                raise KeyError("dir")
            return join(state, latest)
        except (CheckpointError, KeyError):
            dirs = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
            for d in reversed(dirs):
                if fs.exists(f"{d}/state.json") and fs.exists(f"{d}/rng.safetensors"):
                    return join(state, d.rsplit("/", 1)[-1])
            return None

    def start_from(self, uri: str) -> None:
        """Fine-tuning: the model and its EMA take the weights of the model ``uri`` (:func:`init_weights`)."""
        weights = init_weights(uri, self.settings.net, self.settings.sde)
        self.model.load_state_dict(weights)
        self.ema.model.load_state_dict(weights)

    def load_state(self, root: str) -> bool:
        """Resume from the latest training state under ``root/state``; returns whether it resumed."""
        step_dir = self._latest_dir(root)
        if step_dir is None:
            return False
        state_json = join(step_dir, "state.json")
        meta = read_json(state_json, max_bytes=MAX_STATE_BYTES)
        check_state(meta, state_json)  # one line naming the key, before any tensor is read
        saved = meta["config"]
        for section, mine in (("unet", asdict(self.settings.net)), ("sde", asdict(self.settings.sde))):
            if saved.get(section, mine) != mine:
                raise CheckpointError(
                    f"{step_dir}: the saved training state has a different {section} ({saved[section]}) than the "
                    f"config ({mine}); use a new output folder or the old config")
        self.model = build_model(self.settings.net, read_tensors(join(step_dir, "model.safetensors")),
                                 step_dir).to(self.device)
        self.ema = EMA(self.model, self.settings.ema_decay)
        self.ema.load_state_dict(read_tensors(join(step_dir, "ema.safetensors")), meta["ema_updates"])
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.settings.lr,
                                     weight_decay=self.settings.weight_decay)
        self.opt.load_state_dict(_unflatten_optimizer(read_tensors(join(step_dir, "optimizer.safetensors")),
                                                      meta["optimizer"]))
        rng = read_tensors(join(step_dir, "rng.safetensors"))
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step_count = int(meta["step"])
        self.losses = list(meta["losses"])
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        return True

    def export(self, uri: str, meta: dict[str, Any]) -> None:
        """Publish the EMA weights as a model folder."""
        save_model(uri, self.ema.model, self.sde, meta)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; the state at ``step`` was saved before this was raised."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@contextlib.contextmanager
def _defer_sigint() -> Iterator[list[bool]]:
    """Turn SIGINT into a flag checked between steps, so a state is never saved mid-step."""
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(trainer: Trainer, data: torch.Tensor | PatchPool, output: str,
        on_step: Callable[[int, float], None] | None = None,
        stop_after: int | None = None, chief: bool = True,
        after_resume: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
    """Train until ``settings.steps`` (resuming from ``output`` if a state exists).

    ``on_step(step, loss)`` is called after each step (progress bars live in the caller).
    ``stop_after`` ends the call after that many new steps (for tests that interrupt a run).
    Data-parallel workers pass ``chief=False`` on all but one rank (only the chief writes states) and
    ``after_resume`` to wrap the (re)loaded model for DDP.
    Returns a summary dict (steps, final loss, seconds).
    """
    tc = trainer.settings
    resumed = trainer.load_state(output)
    if not resumed and tc.init is not None:  # a new run fine-tunes train.init; a resumed one continues its state
        trainer.start_from(tc.init)
    trainer.prepare_net()
    if after_resume is not None:
        after_resume(trainer)
    start_step = trainer.step_count
    t0 = time.perf_counter()
    new = 0
    with _defer_sigint() as interrupted:
        while trainer.step_count < tc.steps and (stop_after is None or new < stop_after):
            ts = time.perf_counter()
            loss = trainer.step(trainer.draw_batch(data))
            trainer.train_seconds += time.perf_counter() - ts
            new += 1
            if on_step is not None:
                on_step(trainer.step_count, loss)
            if chief and (trainer.step_count % tc.checkpoint_every == 0 or trainer.step_count == tc.steps):
                trainer.save_state(output)
            if interrupted:
                # Ctrl-C: the step in flight finished; keep it, then stop.
                if chief and trainer.step_count % tc.checkpoint_every:
                    trainer.save_state(output)
                raise TrainingInterrupted(trainer.step_count)
    seconds = time.perf_counter() - t0
    tail = trainer.losses[-100:]
    return {"resumed": resumed, "start_step": start_step, "steps": trainer.step_count,
            "final_loss": sum(tail) / max(len(tail), 1), "seconds": seconds,
            "sde": asdict(trainer.sde)}
