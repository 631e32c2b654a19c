"""``jointdiff bench em``: an image prior learned from corrupted observations alone, by EM
(:mod:`pipeline.posterior.em`).

The clean source is ``digits`` and the noise ``stripes`` (blend, alpha :data:`ALPHA`), 32x32 grey. The training
split is corrupted and its clean images hidden; the noise prior is the shipped ``stripes``. Each round:

* **E-step**: one posterior sample per training observation with the current image prior (the sampler below;
  its result for one sample, the last evaluation's guided estimate and the final projection);
* **M-step**: the image prior trained on those samples for ``train_steps`` steps (:func:`pipeline.training
  .train_prior` on them, written as a shard dataset): round 1 from scratch (round 0 is no network), each later
  round fine-tuning the previous round's (``train.init``).

Round 0 is a Gaussian fitted to the training observations (per-pixel mean and variance,
:func:`pipeline.posterior.em.observation_gaussian`). The upper bound, ``clean-trained``, is a prior of the same network
trained on the hidden clean training images for as many steps as all rounds' training together. Every row
cleans the same test observations with the same sampler settings (:data:`SAMPLER`, ``steps`` NFE); figures are
PSNR/SSIM on them, the noise fit (the noise prior's denoising loss on the test noise estimates: the figure without
truth that ``jointdiff learn-prior`` stops on) and per round the mean residual the sampler left on the training
observations (another figure without truth, which does not move).

State: each round's samples, training state and model, and each row's scores, live under ``state`` (default
``~/.cache/jointdiff/bench/em/<settings hash>``): a stopped run resumes at the round (and the training step)
where it stopped, and a finished round is not run again.

``--quick`` is the setting the targets are judged on (:data:`QUICK`, fits an hour on 2 CPU cores); the full
setting (:data:`FULL`) is for a GPU cluster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.config import PriorConfig
from pipeline.data.corrupt import corrupt
from pipeline.data.embedded import load_embedded
from pipeline.data.shards import write_dataset
from pipeline.data.storage import write_atomic
from pipeline.diffusion.checkpoint import load_model
from pipeline.forward import make_forward
from pipeline.posterior.denoise import Denoiser
from pipeline.posterior.em import noise_fit, observation_gaussian
from pipeline.posterior.sampler import SamplerSettings
from pipeline.priors import resolve_model

CLEAN, NOISE, NOISE_PRIOR, ALPHA = "digits", "stripes", "stripes", 0.5
# the image prior's network: the shipped digits prior's (0.69M parameters)
NET = {"image_size": 32, "channels": 1, "base_channels": 16, "channel_mults": [1, 2, 4], "num_res_blocks": 1,
       "attention_resolutions": [8], "dropout": 0.0}
SAMPLER = {"rule": "dps", "solver": "ddim", "lambda_x": 20.0, "kappa_n": 20.0}  # the same for every row
QUICK = {"n_train": 500, "rounds": 4, "train_steps": 600, "n_test": 50, "steps": 50, "batch_size": 32}
# a GPU cluster's setting (not run here): every training digit, 8 rounds of 3,000 steps at batch 64, 200 test
# images at 100 NFE; about 8 x (1,400 posterior samples at 100 NFE + 3,000 steps) + 24,000 steps for the bound
FULL = {"n_train": 1400, "rounds": 8, "train_steps": 3000, "n_test": 197, "steps": 100, "batch_size": 64}


def default_state(settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~/.cache/jointdiff/bench/em")) / key


def _prior_config(name: str, source: str, output: Path, steps: int, batch_size: int, init: str | None,
                  threads: int | None) -> PriorConfig:
    return PriorConfig.model_validate({
        "name": name, "data": {"source": source, "size": 32, "channels": 1}, "unet": NET,
        "train": {"steps": steps, "batch_size": batch_size, "warmup_steps": min(200, steps),
                  "checkpoint_every": max(1, min(100, steps)), "init": init, "threads": threads},
        "output": str(output)})


def _train(name: str, images: np.ndarray, where: Path, steps: int, batch_size: int, init: str | None,
           threads: int | None, log: Any) -> str:
    """Train (resuming) a prior on ``images`` ([0, 1], (N, 1, 32, 32)) under ``where``; the model's folder."""
    from pipeline.training import train_prior

    model = where / "train" / "model"
    if (model / "config.json").exists():
        return str(model)
    data = where / "images"
    if not (data / "_complete").exists():
        write_dataset(str(data), [f"{name}-{k:05d}" for k in range(len(images))], {"image": images},
                      bits={"image": 16})
        (data / "_complete").write_text("")
    log(f"{name}: training {steps} steps on {len(images)} images" + (f" from {init}" if init else ""))
    summary = train_prior(_prior_config(name, str(data), where / "train", steps, batch_size, init, threads),
                          progress=False)
    log(f"{name}: final loss {summary['final_loss']:.4f} ({summary['seconds']:.0f} s)")
    return str(model)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _clean(x_model: Any, n_model: Any, sde: Any, ids: list[str], y: torch.Tensor, settings: SamplerSettings,
           batch: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampler on ``y``: ``(x_hat, residual, noise estimate)`` per observation."""
    den = Denoiser(x_model, n_model, sde, settings)
    xs, rs, ns = [], [], []
    for s in range(0, len(ids), batch):
        out = den(ids[s:s + batch], y[s:s + batch], make_forward("blend", len(ids[s:s + batch]), alpha=ALPHA))
        xs.append(out.denoised)
        rs.append(out.residual)
        ns.append(out.noise_estimate)
    return torch.cat(xs), torch.cat(rs), torch.cat(ns)


def em(n_train: int, rounds: int, train_steps: int, n_test: int, steps: int, batch_size: int,
       state: Path | None = None, threads: int | None = None, log: Any = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); ``{"meta", "rows"}``."""
    t_start = time.perf_counter()
    setting = {"n_train": n_train, "rounds": rounds, "train_steps": train_steps, "n_test": n_test, "steps": steps,
               "batch_size": batch_size, "clean": CLEAN, "noise": NOISE, "alpha": ALPHA, "net": NET,
               "sampler": SAMPLER}
    state = Path(state) if state is not None else default_state(setting)
    state.mkdir(parents=True, exist_ok=True)
    log(f"bench em: state in {state} (a stopped run resumes there)")
    train = corrupt(load_embedded(CLEAN, "train", 32, 1), load_embedded(NOISE, "train", 32, 1), n_train,
                    alpha=ALPHA, seed=0)
    test = corrupt(load_embedded(CLEAN, "test", 32, 1), load_embedded(NOISE, "test", 32, 1), n_test, alpha=ALPHA,
                   seed=1)
    y_train, y_test = torch.from_numpy(train.observation), torch.from_numpy(test.observation)
    clean_test = torch.from_numpy(test.clean)
    n_model, sde, _ = load_model(resolve_model(NOISE_PRIOR))
    n_model.requires_grad_(False)
    settings = SamplerSettings(steps=steps, **SAMPLER)

    def scored(name: str, x_model: Any, where: Path, **extra: Any) -> dict[str, Any]:
        done = where / "scores.json"
        if done.exists() and "noise_fit" in (row := json.loads(done.read_text())):
            return row  # (a row scored before rows had the noise fit is scored again)
        t0 = time.perf_counter()
        x_hat, _, n_hat = _clean(x_model, n_model, sde, test.ids, y_test, settings)
        p, s = metrics.psnr(x_hat, clean_test), metrics.ssim(x_hat, clean_test)
        # the reference-free figure of `jointdiff learn-prior` (pipeline.jobs.learn.noise_fit), on the test cleaning
        fit = noise_fit(n_model, sde, n_hat)
        row = {"method": name, "psnr_mean": float(p.mean()), "psnr_median": float(p.median()),
               "ssim_mean": float(s.mean()), "noise_fit": fit, "n_test": n_test,
               "test_seconds": time.perf_counter() - t0, **extra}
        write_atomic(str(done), json.dumps(row).encode())
        return row

    rows = []
    x_prior: Any = observation_gaussian(y_train, sde)
    (state / "round-0").mkdir(exist_ok=True)
    rows.append(scored("round 0", x_prior, state / "round-0", round=0, train_steps=0))
    log(_fmt(rows[-1]))
    model: str | None = None
    for k in range(1, rounds + 1):
        where = state / f"round-{k}"
        where.mkdir(exist_ok=True)
        samples_file = where / "samples.npy"
        if not samples_file.exists():  # the E-step: a posterior sample of every training observation
            t0 = time.perf_counter()
            samples, residual, _ = _clean(x_prior, n_model, sde, train.ids, y_train, settings)
            write_atomic(str(where / "residual.npy"), _npy(residual.numpy()))
            write_atomic(str(samples_file), _npy(samples.numpy()))  # last: its presence marks the E-step done
            log(f"round {k}: {n_train} posterior samples in {time.perf_counter() - t0:.0f} s, mean residual "
                f"{float(residual.mean()):.4f}")
        samples = np.load(samples_file)
        residual = float(np.load(where / "residual.npy").mean())
        model = _train(f"em-round-{k}", samples, where, train_steps, batch_size, model, threads, log)
        x_prior = load_model(model)[0].requires_grad_(False)
        rows.append(scored(f"round {k}", x_prior, where, round=k, train_steps=k * train_steps,
                           residual_train=residual))
        log(_fmt(rows[-1]))
    where = state / "clean-trained"
    where.mkdir(exist_ok=True)
    bound = _train("clean-trained", train.clean, where, rounds * train_steps, batch_size, None, threads, log)
    rows.append(scored("clean-trained", load_model(bound)[0].requires_grad_(False), where, round=None,
                       train_steps=rounds * train_steps))
    log(_fmt(rows[-1]))
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.perf_counter() - t_start,
            "state": str(state), **setting}
    return {"meta": meta, "rows": rows}


def _fmt(r: dict[str, Any]) -> str:
    res = f"  train residual {r['residual_train']:.4f}" if r.get("residual_train") is not None else ""
    return (f"{r['method']:14s} PSNR {r['psnr_mean']:6.2f} (med {r['psnr_median']:6.2f})  SSIM {r['ssim_mean']:.3f}"
            f"  noise fit {r['noise_fit']:.4f}  {r['train_steps']:6d} training steps{res}")


def table(doc: dict[str, Any]) -> str:
    lines = ["| prior | training steps | test PSNR mean (median) | test SSIM | noise fit | training residual |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        res = f"{r['residual_train']:.4f}" if r.get("residual_train") is not None else ""
        lines.append(f"| {r['method']} | {r['train_steps']} | {r['psnr_mean']:.2f} ({r['psnr_median']:.2f}) | "
                     f"{r['ssim_mean']:.3f} | {r['noise_fit']:.4f} | {res} |")
    return "\n".join(lines)


def svg(doc: dict[str, Any]) -> str:
    """Test PSNR against round, with the clean-trained prior as a flat line (:func:`pipeline.report.svg_lines`)."""
    from pipeline.report import svg_lines

    rounds = [r for r in doc["rows"] if r["round"] is not None]
    series = {"EM": [r["psnr_mean"] for r in rounds]}
    bound = next((r for r in doc["rows"] if r["round"] is None), None)
    if bound is not None:
        series["trained on the clean images"] = [bound["psnr_mean"]] * len(rounds)
    return svg_lines("em-psnr", "test PSNR by EM round", "test PSNR (dB)", [str(r["round"]) for r in rounds], series,
                     xlabel="EM round")


def write(doc: dict[str, Any], json_path: str | None, svg_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    if svg_path:
        Path(svg_path).parent.mkdir(parents=True, exist_ok=True)
        Path(svg_path).write_text(svg(doc))


def settings_for(quick: bool, **given: Any) -> dict[str, Any]:
    """The run's settings: :data:`QUICK` (``quick``) or :data:`FULL`, with the options given (not None) on top."""
    return {**(QUICK if quick else FULL), **{k: v for k, v in given.items() if v is not None}}

