"""``jointdiff learn-prior``: an image prior learned from the corrupted dataset itself, by EM, on Ray.

The people who need a dataset cleaned often have only the corrupted dataset and a prior of its noise. This job
learns the image prior from the observations (:mod:`pipeline.posterior.em` has the method and its closed-form
check). Round ``k`` has a prior of the clean images and does three things:

1. **the prior**: round 0 is a Gaussian fitted to the observations per pixel (saved as a model folder,
   :mod:`pipeline.diffusion.gaussian`), or a model given as ``start``; round ``k >= 1`` is the image prior
   trained by Ray Train (:func:`~pipeline.jobs.train_prior.train_distributed`) on the posterior samples that
   round ``k - 1`` drew, fine-tuning round ``k - 1``'s network (``train.init``; round 1 from scratch when round
   0 is the Gaussian). Each round's prior is published to the registry as version ``<run id>-round-<k>``;
2. **the E-step**: the cleaning job (:func:`~pipeline.jobs.clean.run_clean`, Ray Data) over every training
   observation with this prior and the noise prior, one posterior sample per image (``sampler.n_samples=1``:
   samples, not means, so that the next fit sees the posterior's spread). Its cleaned shards are the next
   round's training data, and the cleaned dataset the job hands over;
3. **the figure**: how well the noise estimates of that cleaning fit the noise prior, its denoising loss on
   them (:func:`~pipeline.diffusion.losses.heldout_loss`: fixed times and noise, network units; lower is
   better): no truth needed. A bad image prior leaves image content in the noise estimates, which the noise prior
   finds unlikely. With a validation set (observations and their truth), that set is cleaned too and its
   PSNR/SSIM recorded.

It stops after ``rounds`` rounds, or earlier when the figure did not improve on the best so far by
``tolerance`` (relative). The chosen round is the one with the best figure; the registry's ``latest`` points at
its prior, and its cleaning is the cleaned dataset.

Everything lives under ``OUTPUT/learn/<run id>/round-<k>/`` (``model/`` or ``train/{state,model}``, ``clean/``
(a cleaning run's output root: ``runs/e-step/...``), ``validation/``, ``samples.png``, ``loss.png``,
``round.json``) and ``OUTPUT/learn/<run id>/learn.json``. A round is done when its ``round.json`` exists; a
stopped job run again with the same arguments skips the rounds done and resumes the round under way where it
stopped: training at its last state, cleaning at its first unfinished shard.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import CleanConfig, ConfigError, PriorConfig, load_config
from pipeline.data.storage import join, open_fs, write_atomic
from pipeline.diffusion.checkpoint import read_json, write_json

DEFAULT_TRAIN = {"steps": 600, "batch_size": 32, "warmup_steps": 200, "checkpoint_every": 100}
"""Each round's training unless the prior config says otherwise (``bench em --quick``'s setting)."""
FIT_ROWS = 1000  # observations the round-0 Gaussian and each round's noise figure read (the first ones)


@dataclass(frozen=True)
class Learning:
    """One learn-prior job, checked (:func:`open_learning`)."""

    input_uri: str
    output: str
    run_id: str
    noise: str  # the noise prior: a shipped name, a model folder, a registry's .../latest
    clean: CleanConfig  # the cleaning recipe; each round replaces its priors and draws one sample per image
    prior: PriorConfig  # the image prior's network and each round's training; data, output and init set per round
    name: str  # the registry's model name
    registry: str
    validation: str | None
    rounds: int
    tolerance: float | None  # None: every round runs
    workers: int
    use_gpu: bool
    start: str | None
    start_is_network: bool = False  # --start is a network (later rounds fine-tune it), not a Gaussian
    ray_address: str | None = None

    @property
    def root(self) -> str:
        return join(self.output, "learn", self.run_id)

    def round_uri(self, k: int) -> str:
        return join(self.root, f"round-{k}")

    def version(self, k: int) -> str:
        return f"{self.run_id}-round-{k}"


def _exists(uri: str) -> bool:
    fs, path = open_fs(uri)
    return fs.exists(path)


def _log(message: str) -> None:
    print(f"learn-prior: {message}", file=sys.stderr, flush=True)


def open_learning(input_uri: str, output: str, noise_prior: str, config: str | None = None,
                  overrides: list[str] | None = None, prior_config: str | None = None,
                  prior_overrides: list[str] | None = None, name: str = "image", registry: str | None = None,
                  validation: str | None = None, run_id: str | None = None, rounds: int = 4,
                  tolerance: float | None = 0.01, workers: int = 1, use_gpu: bool = False, start: str | None = None,
                  ray_address: str | None = None) -> Learning:
    """The job, checked before any work: the input and validation datasets exist and have the columns used, the
    noise prior (and ``start``) load, the forward model's noise has the image's channels, and the image prior's
    network fits the noise prior (size, channels, SDE) and ``start``. Each problem is one :class:`ConfigError`
    line naming the input."""
    from pipeline.data import storage
    from pipeline.data.datasets import image_column
    from pipeline.data.shards import ShardError
    from pipeline.data.storage import absolute_uri
    from pipeline.diffusion.checkpoint import CheckpointError, read_model_config
    from pipeline.diffusion.sde import VPSDE
    from pipeline.diffusion.train import fine_tune_mismatch
    from pipeline.diffusion.unet import UNetConfig
    from pipeline.forward import FORWARD_MODELS
    from pipeline.priors import resolve_model
    from pipeline.run.models import check_pair, model_uri
    from pipeline.untrusted import check_run_id, is_plain_name

    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: at least 1 (round 0 is the starting prior, then 1 to K rounds)")
    if tolerance is not None and not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance {tolerance}: a relative improvement in [0, 1), e.g. 0.01")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: at least 1 Ray Train worker")
    if not is_plain_name(name):
        raise ConfigError(f"--name {name!r}: a plain folder name (the registry's models/NAME)")
    clean = load_config(CleanConfig, config, overrides or [])
    storage.configure(clean.storage)
    if FORWARD_MODELS[clean.forward.name].extra_noise_channels:
        raise ConfigError(f"forward.name={clean.forward.name}: its noise is an RGBA layer, which learn-prior's noise "
                          "fit does not read; learn under blend, sum or overlay")
    for what, uri, column in (("INPUT", input_uri, "observation"), ("--validation", validation, "observation"),
                              ("--validation", validation, "clean")):
        if uri is None:
            continue
        try:
            image_column(uri, column, None)
        except ShardError as exc:
            raise ConfigError(f"{what} {uri}: {exc}; make one with `jointdiff ingest` or `jointdiff corrupt`") from None
        except ConfigError as exc:
            why = " (the truth that PSNR is measured against)" if column == "clean" else ""
            raise ConfigError(f"{what} {exc}{why}") from None

    def net_of(key: str, model: str) -> Any:
        try:
            return read_model_config(resolve_model(model))
        except (CheckpointError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"{key} {model}: {exc}") from None

    noise = noise_prior
    noise_net, noise_sde, _ = net_of("--noise-prior", noise)
    start_net, start_sde, _ = net_of("--start", start) if start else (None, None, None)
    start_is_network = isinstance(start_net, UNetConfig)
    base = {"name": name, "data": {"size": noise_net.image_size, "channels": noise_net.channels},
            "train": dict(DEFAULT_TRAIN), "output": "unset",
            "sde": {k: getattr(noise_sde, k) for k in ("beta_min", "beta_max", "eps")}}
    if not prior_config:  # the image prior's network: the start model's, else the noise prior's
        net = start_net if start_is_network else noise_net
        if not isinstance(net, UNetConfig):
            raise ConfigError("neither --start nor the noise prior is a network to copy (a Gaussian prior): give the "
                              "image prior's network with --prior-config")
        base["unet"] = net.model_dump()
    input_uri = absolute_uri(input_uri)
    base["data"]["source"] = input_uri  # replaced by each round's samples; here for validation only
    prior = load_config(PriorConfig, prior_config, prior_overrides or [], defaults=base)
    prior_sde = VPSDE(**prior.sde.model_dump())
    try:
        check_pair(prior.unet, prior_sde, noise_net, noise_sde, clean.forward.name)
        if start_net is not None:
            check_pair(start_net, start_sde, noise_net, noise_sde, clean.forward.name)
    except ConfigError as exc:
        raise ConfigError(f"the image prior ({'--start ' + start if start else 'its network'}) and --noise-prior "
                          f"{noise}: {exc}") from None
    differ = start_is_network and fine_tune_mismatch(prior.unet.settings(), prior_sde, start_net.settings(),
                                                     start_sde)
    if differ:
        key, mine, theirs = differ
        raise ConfigError(f"--start {start}: the image prior's network differs from it ({key} {mine!r}, --start's "
                          f"{theirs!r}); later rounds fine-tune it: leave unet out of --prior-config, or set it alike")
    registry = absolute_uri(registry) if registry else absolute_uri(output)
    # what the rounds depend on: the same job again (more rounds, another tolerance, a validation set) finds them
    pinned = {"input": input_uri, "noise": model_uri(noise), "start": model_uri(start) if start else None,
              "recipe": clean.recipe.model_dump(mode="json"), "prior": prior.model_dump(mode="json"),
              "name": name, "registry": registry}
    if run_id is None:
        run_id = "learn-" + hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:10]
    check_run_id(run_id, "--run-id")
    return Learning(input_uri, absolute_uri(output), run_id, pinned["noise"], clean, prior, name, registry,
                    absolute_uri(validation) if validation else None, rounds, tolerance, workers, use_gpu,
                    pinned["start"], start_is_network, ray_address)


def _clean_config(job: Learning, image: str) -> CleanConfig:
    from pipeline.config import with_ray

    dumped = job.clean.model_dump(mode="json")
    dumped["priors"] = {"image": image, "noise": job.noise}
    dumped["sampler"] = {**dumped["sampler"], "n_samples": 1}
    return with_ray(CleanConfig.model_validate(dumped), address=job.ray_address)


def round_zero_prior(job: Learning) -> str:
    """Round 0's prior: ``start``, or a per-pixel Gaussian of the first :data:`FIT_ROWS` observations
    (:func:`pipeline.posterior.em.observation_gaussian`), saved as a model folder under ``round-0/model``; its
    URI."""
    import torch

    from pipeline.data.datasets import load_images
    from pipeline.diffusion.checkpoint import save_model
    from pipeline.diffusion.sde import VPSDE
    from pipeline.posterior.em import observation_gaussian

    if job.start:
        return job.start
    where = join(job.round_uri(0), "model")
    if not _exists(join(where, "config.json")):
        # a broken row is the cleaning runs' to report (their errors tables), not round 0's: left out here
        bad: list[ValueError] = []
        obs = load_images(job.input_uri, "train", job.prior.unet.image_size, job.prior.unet.channels, "observation",
                          None, n=FIT_ROWS, on_bad=bad.append)
        sde = VPSDE(**job.prior.sde.model_dump())
        save_model(where, observation_gaussian(torch.from_numpy(obs.images), sde), sde,
                   {"name": job.name, "dataset": job.input_uri, "n_train_images": len(obs.ids),
                    "kind": "per-pixel Gaussian of the observations (EM round 0)"})
        _log(f"round 0: a per-pixel Gaussian of {len(obs.ids)} observations -> {where}"
             + (f" ({len(bad)} row(s) that do not decode left out: the cleaning runs' errors tables name them)"
                if bad else ""))
    return where


def train_round(job: Learning, k: int, samples: str, init: str | None) -> dict[str, Any]:
    """Round ``k``'s prior: trained on Ray Train on the cleaned shards ``samples`` (their ``denoised`` column),
    from ``init``'s weights (None: from scratch); resumes a stopped training, and a finished one is not trained
    or exported again (its bytes, which the registry and the round's cleaning pinned, stay). The model's card."""
    from pipeline.jobs.train_prior import train_distributed

    output = join(job.round_uri(k), "train")
    tc = job.prior.train.model_copy(update={"init": init})
    if _exists(join(output, "model", "config.json")):
        meta = read_json(join(output, "model", "config.json"))["meta"]
        if meta.get("steps") == tc.steps:
            return meta
    data = job.prior.data.model_copy(update={"source": samples, "column": "denoised", "split": "train"})
    config = job.prior.model_copy(update={"name": job.name, "data": data, "train": tc, "output": output})
    how = "from scratch" if init is None else f"from round {k - 1}"
    if _exists(join(output, "state", "latest.json")):
        how += ", resuming at its last saved state"
    _log(f"round {k}: training {tc.steps} steps on the posterior samples of round {k - 1} ({how}), "
         f"{job.workers} Ray Train worker(s)")
    return train_distributed(config, num_workers=job.workers, use_gpu=job.use_gpu, ray_address=job.ray_address)


def noise_fit_of(cleaned: str, noise: str, channels: int, size: int, rows: int = FIT_ROWS) -> float:
    """:func:`pipeline.posterior.em.noise_fit` of a cleaning run's noise estimates (``cleaned``: its
    ``cleaned/`` folder; the first ``rows``) under the noise prior ``noise``."""
    import torch

    from pipeline.data.datasets import load_images
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.posterior.em import noise_fit
    from pipeline.priors import resolve_model

    model, sde, _ = load_model(resolve_model(noise))
    est = load_images(cleaned, "train", size, channels, "noise_estimate", None, n=rows)
    return noise_fit(model, sde, torch.from_numpy(est.images))


def _previews(job: Learning, k: int, model: str, trained: bool) -> dict[str, str]:
    """``sample_sheet``: ``samples.png``, 16 unconditional samples of the prior (100 steps, seed 0), and for a
    trained round ``loss_curve``: ``loss.png``; their URIs."""
    from pipeline.diffusion.checkpoint import load_model
    from pipeline.diffusion.sampling import sample
    from pipeline.priors import resolve_model
    from pipeline.training import preview
    from pipeline.viz import grid, loss_curve, png_bytes

    out = {}
    if trained:
        losses, samples = preview(join(job.round_uri(k), "train"), model, 16, 100)
        out["loss_curve"] = join(job.round_uri(k), "loss.png")
        write_atomic(out["loss_curve"], png_bytes(loss_curve(losses)))
    else:
        net, sde, _ = load_model(resolve_model(model))
        samples = sample(net, sde, 16, 100, seed=0).numpy()
    out["sample_sheet"] = join(job.round_uri(k), "samples.png")
    write_atomic(out["sample_sheet"], png_bytes(grid(samples, 8, scale=2)))
    return out


def run_round(job: Learning, k: int, previous: dict[str, Any] | None, progress: bool = True) -> dict[str, Any]:
    """Round ``k`` (see the module docstring), resumed where a stopped run left it; its record (also
    ``round-<k>/round.json``). ``previous``: round ``k - 1``'s record (None for round 0)."""
    from pipeline.jobs.clean import run_clean
    from pipeline.priors import resolve_model
    from pipeline.registry import publish
    from pipeline.run.models import model_uri

    done = join(job.round_uri(k), "round.json")
    if _exists(done):
        record = read_json(done)
        _log(f"round {k}: done before (noise fit {record['noise_fit']:.4f}), skipped")
        return record
    t0 = time.perf_counter()
    card: dict[str, Any] = {}
    if k == 0:
        model = round_zero_prior(job)
    else:
        assert previous is not None
        init = previous["model"] if previous.get("network") else None
        card = train_round(job, k, previous["samples"], init)
        model = join(job.round_uri(k), "train", "model")
    model = model_uri(model)
    # a new version; latest moves only when the job has chosen (learn)
    published = publish(resolve_model(model), job.registry, job.name, job.version(k), move_latest=False)
    cfg = _clean_config(job, published)
    _log(f"round {k}: cleaning the training observations with this prior (one posterior sample each)")
    summary = run_clean(job.input_uri, join(job.round_uri(k), "clean"), cfg, run_id="e-step", progress=progress)
    cleaned = join(summary["output"], "cleaned")
    fit = noise_fit_of(cleaned, job.noise, job.prior.unet.channels, job.prior.unet.image_size)
    record: dict[str, Any] = {
        "round": k, "model": model, "published": published, "network": k > 0 or job.start_is_network,
        "noise_fit": fit, "residual_mean": summary.get("residual_mean"), "psnr_mean": summary.get("psnr_mean"),
        "ssim_mean": summary.get("ssim_mean"), "cleaned_rows": summary.get("cleaned"),
        "errors": summary.get("errors"), "samples": cleaned, "run": summary["output"],
        "report": summary.get("report"), "final_loss": card.get("final_loss"), "train_steps": card.get("steps"),
        "train_seconds": card.get("train_seconds")}
    if job.validation:
        _log(f"round {k}: cleaning the validation set")
        val = run_clean(job.validation, join(job.round_uri(k), "validation"), cfg, run_id="validation",
                        progress=progress)
        record.update(validation_psnr=val.get("psnr_mean"), validation_ssim=val.get("ssim_mean"),
                      validation_report=val.get("report"))
    record.update(_previews(job, k, model, trained=k > 0))
    record["seconds"] = time.perf_counter() - t0
    write_json(done, record, atomic=True)
    _log(f"round {k}: {describe(record)}")
    return record


def describe(record: dict[str, Any]) -> str:
    """One line of a round's figures."""
    parts = [f"noise fit {record['noise_fit']:.4f}"]
    if record.get("residual_mean") is not None:
        parts.append(f"residual {record['residual_mean']:.4f}")
    if record.get("psnr_mean") is not None:
        parts.append(f"PSNR against the input's truth {record['psnr_mean']:.2f} dB")
    if record.get("validation_psnr") is not None:
        parts.append(f"validation PSNR {record['validation_psnr']:.2f} dB, SSIM {record['validation_ssim']:.3f}")
    if record.get("published"):
        parts.append(f"published {record['published']}")
    return ", ".join(parts)


def decide(records: list[dict[str, Any]], tolerance: float | None) -> tuple[int, bool]:
    """``(best round, stop)``: the round with the lowest noise fit, and whether the last round failed to improve
    on the best before it by ``tolerance`` (relative; None: never stop early)."""
    fits = [r["noise_fit"] for r in records]
    best = min(range(len(fits)), key=fits.__getitem__)
    stop = tolerance is not None and len(fits) > 1 and fits[-1] > min(fits[:-1]) * (1 - tolerance)
    return best, stop


RoundFn = Callable[[int, "dict[str, Any] | None"], "dict[str, Any]"]


def learn(job: Learning, progress: bool = True, round_fn: RoundFn | None = None) -> dict[str, Any]:
    """Rounds 0 to ``job.rounds`` (or fewer: :func:`decide`), each through ``round_fn(k, previous)`` (default
    :func:`run_round`; the Prefect flow passes its task); the result, also ``learn.json``."""
    from pipeline.jobs.session import ray_session
    from pipeline.registry import point_latest

    round_fn = round_fn or (lambda k, prev: run_round(job, k, prev, progress))
    _log(f"run {job.run_id}: up to {job.rounds} round(s) in {job.root}")
    records: list[dict[str, Any]] = []
    stopped = "rounds"
    with ray_session(job.ray_address):  # one Ray for every round's jobs (joined by each)
        for k in range(job.rounds + 1):
            records.append(round_fn(k, records[-1] if records else None))
            best, stop = decide(records, job.tolerance)
            if stop:
                stopped = "no improvement"
                _log(f"round {k}: the noise fit did not improve on round {best}'s by {job.tolerance:.0%}: stopping "
                     "(--no-early-stop runs every round)")
                break
    chosen = records[best]
    point_latest(job.registry, job.name, job.version(best))
    result = {"run_id": job.run_id, "input": job.input_uri, "noise_prior": job.noise, "rounds": records,
              "chosen": best, "stopped": stopped, "prior": chosen["published"],
              "latest": join(job.registry, "models", job.name, "latest"),
              "cleaned": chosen["samples"], "report": chosen.get("report"), "root": job.root}
    write_json(join(job.root, "learn.json"), result, atomic=True)
    _log(f"chose round {best} ({describe(chosen)}); cleaned dataset {chosen['samples']}")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.jobs.learn INPUT OUTPUT --noise-prior MODEL ...`` (what ``jointdiff submit learn-prior``
    runs on a cluster): ``jointdiff learn-prior``'s job without Prefect, joining the cluster of ``RAY_ADDRESS``;
    the result as one JSON line on stdout."""
    from pipeline.jobs.commands import LEARN_INTERRUPTED, learn_params, learn_parser, run_command

    def job(args: Any) -> int:
        learning = open_learning(**learn_params(args))
        try:
            result = learn(learning, progress=not args.quiet)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(LEARN_INTERRUPTED) from None
        print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, default=str))
        return 0

    return run_command(job, learn_parser("python -m pipeline.jobs.learn").parse_args(argv), "learn-prior")


if __name__ == "__main__":
    sys.exit(main())
