"""Cleaning an observation dataset in one process (``jointdiff denoise``).

Reads each shard of an observation dataset (DESIGN.md "observations"), decodes and checks every
row, runs the joint posterior sampler in batches and writes, per source shard, under
``<output>/runs/<run_id>/``:

* ``cleaned/<shard>``: ``id, denoised, noise_estimate[, uncertainty]`` (16-bit PNG), the metric
  columns, ``run_id, model_ids, sampler, nfe, seconds``;
* ``metrics/run_id=<run_id>/<shard>``: one row per image for dashboards (Hive-partitioned by run id);
* ``errors/<shard>``: one row per rejected input row (``run_id, dataset, shard, row, id, stage, reason``).

Output files are named by source shard, so re-running replaces rather than duplicates. A folder holds
a shard's file only when the shard has rows for it (a run that rejected nothing has no ``errors/``
files, a shard whose every row was rejected no ``cleaned/`` or ``metrics/`` file): a zero-row Parquet
file breaks Hugging Face ``datasets``. The default run id hashes (input URI, models, sampler config).

The pieces are shared with the Ray job (:mod:`pipeline.jobs.clean`), so both give the same results:

* :func:`preflight_run` checks what can be checked before any work, each failure one line (exit 2): the
  device, read access to the input and write access to an existing output bucket, both priors (their
  ``config.json`` validated key by key, :func:`check_models`);
* :func:`prepare_run` plans the shards (done ones are skipped) and decides, from the ids alone and in
  shard order, which rows are later copies of an id (error rows), so no worker needs another's ids;
* :class:`ShardCleaner` holds both priors and :func:`process_shard` turns one source shard into its
  outputs and completion marker (in this process, or inside a Ray actor);
* :func:`finish_run` checks the accounting and appends the run's row to ``<output>/summary/``;
* :func:`judge_run` then fails a run that rejected too many rows (:class:`RejectedRowsError`).

Before any work, :func:`check_inputs` (called by :func:`prepare_run`) reads the schema and the first
rows' image headers of the first pending shard, on the driver, and stops with a
:class:`~pipeline.config.ConfigError` naming the ``--set`` that fixes what would reject every row: a
blend without an ``alpha`` column or ``forward.alpha``; images that do not fit the priors and a policy
that would not convert them (``policy.resize``, ``policy.convert_channels``, ``policy.alpha``,
``policy.max_pixels``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import CleanConfig, ConfigError, check_run_id
from pipeline.data.accounting import (
    Accounting,
    AccountingError,
    PlannedShard,
    RejectedRowsError,
    check_run,
    input_rows,
    mark_done,
    plan,
)
from pipeline.data.shards import build_table, read_table, write_table
from pipeline.data.storage import absolute_uri, join, local_path, open_fs
from pipeline.data.validate import ERRORS_SCHEMA, RowError, conform, decode_any, error_row, npy_header
from pipeline.diffusion.checkpoint import load_model
from pipeline.forward import make_forward
from pipeline.posterior.core import Runtime, auto_batch_size
from pipeline.posterior.denoise import Denoiser, truth_metrics
from pipeline.posterior.tuned import resolve_weights
from pipeline.priors import resolve_model
from pipeline.summary import append_summary, summary_row

METRIC_COLUMNS = ("psnr", "ssim", "psnr_input", "ssim_input", "residual", "spread", "removed_energy")


def model_fingerprint(name_or_uri: str) -> str:
    """A short hash of a model's ``config.json`` (architecture, SDE and training card, which records
    when and from which commit it was trained): a retrained prior of the same name hashes differently."""
    from pipeline.diffusion.checkpoint import CONFIG, read_json

    cfg = read_json(join(resolve_model(name_or_uri), CONFIG))  # bounded; check_models validated it
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def run_id_for(input_uri: str, cfg: CleanConfig) -> str:
    """A stable run id from what determines the results: the input URI, both models (name and
    fingerprint), the forward model, the sampler config and the input policy."""
    # local inputs and models hash as absolute paths: `obs`, `../obs`, `/abs/obs` and `file:///abs/obs` are
    # one dataset, with the id an absolute path always had
    key = json.dumps({"input": local_path(absolute_uri(input_uri)).rstrip("/"),
                      "image_prior": [local_path(cfg.image_prior), model_fingerprint(cfg.image_prior)],
                      "noise_prior": [local_path(cfg.noise_prior), model_fingerprint(cfg.noise_prior)],
                      "forward": cfg.forward.model_dump(), "sampler": cfg.sampler.identity(),
                      "policy": cfg.policy.identity()}, sort_keys=True)
    return "run-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def model_uri(name_or_uri: str) -> str:
    """A shipped prior's name unchanged; an existing local model path as an absolute ``file://`` URI; anything
    else unchanged (a name that is neither is refused by :func:`check_models` as the user wrote it)."""
    from pathlib import Path

    from pipeline.priors import SHIPPED

    if name_or_uri in SHIPPED or "://" in name_or_uri or not Path(name_or_uri).expanduser().exists():
        return name_or_uri
    return absolute_uri(name_or_uri)


def resolve_paths(input_uri: str, output: str, cfg: CleanConfig) -> tuple[str, str, CleanConfig]:
    """The input, the output root and both priors with local paths made absolute ``file://`` URIs, on the
    driver, before any worker sees them (a worker resolves a relative path against its own folder)."""
    cfg = cfg.model_copy(update={"image_prior": model_uri(cfg.image_prior), "noise_prior": model_uri(cfg.noise_prior)})
    return absolute_uri(input_uri), absolute_uri(output), cfg


@dataclass
class ShardResult:
    cleaned: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; anything else is kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(device: str) -> None:
    """:class:`ConfigError` unless ``device`` is ``auto`` or a device this machine has (``cpu``; ``cuda`` or
    ``cuda:N`` with N below the GPU count; ``mps`` where torch offers it)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device; use --set device=cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device={device}: torch sees no CUDA GPU on this machine; use --set device=cpu "
                              "(or device=auto: the GPU where there is one)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device={device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}; use "
                              "--set device=cuda:0, or --set device=cpu")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device}: torch offers no MPS device here; use --set device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device}: jointdiff runs on cpu, cuda, cuda:N or mps; use --set device=cpu")


def check_models(cfg: CleanConfig) -> None:
    """:class:`ConfigError` unless both priors resolve to a folder holding ``config.json`` and
    ``weights.safetensors``, each ``config.json`` is valid (size, nesting, every key of ``unet`` and ``sde``:
    :func:`~pipeline.diffusion.checkpoint.read_model_config`), and the two share their SDE, image size and
    channels. Read here, on the driver, before any shard is touched or any network built."""
    from pipeline.data import storage
    from pipeline.diffusion.checkpoint import CONFIG, WEIGHTS, CheckpointError, read_model_config

    configs = {}
    for key in ("image_prior", "noise_prior"):
        name = getattr(cfg, key)
        try:
            uri = resolve_model(name)
            configs[key] = read_model_config(uri)
            fs, path = storage.open_fs(join(uri, WEIGHTS))
            if not fs.exists(path):
                raise CheckpointError(f"{local_path(join(uri, WEIGHTS))}: no such file (a model folder holds "
                                      f"{CONFIG} and {WEIGHTS})")
        except (CheckpointError, FileNotFoundError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except Exception as exc:
            cause = storage.describe_error(exc, cfg.storage)
            if cause is None:
                raise
            raise ConfigError(f"{key}: {name}: cannot read the model: {cause}") from None
    (x_unet, x_sde, _), (n_unet, n_sde, _) = configs["image_prior"], configs["noise_prior"]
    check_pair(x_unet, x_sde, n_unet, n_sde)


def check_pair(x_unet: Any, x_sde: Any, n_unet: Any, n_sde: Any) -> None:
    """:class:`ConfigError` unless the two priors share their SDE, image size and channels (the joint sampler
    runs both on one schedule, on one shape)."""
    if x_sde != n_sde:
        differ = "; ".join(f"sde.{k} {getattr(x_sde, k)} vs {getattr(n_sde, k)}"
                           for k in ("beta_min", "beta_max", "eps") if getattr(x_sde, k) != getattr(n_sde, k))
        raise ConfigError(f"image_prior and noise_prior use different SDEs ({differ}); the joint sampler runs both "
                          "on one schedule: train them with the same sde section")
    if (x_unet.image_size, x_unet.channels) != (n_unet.image_size, n_unet.channels):
        raise ConfigError(f"the image prior is {x_unet.channels}x{x_unet.image_size}x{x_unet.image_size} but the "
                          f"noise prior is {n_unet.channels}x{n_unet.image_size}x{n_unet.image_size}; they must match "
                          "(for grey noise on RGB images, train the noise prior on RGB noise, e.g. corrupt "
                          "--noise-channel random)")


def preflight_run(input_uri: str, output: str, cfg: CleanConfig, ray: bool = False) -> None:
    """What can be checked before a cleaning run does any work, each failure one line (:class:`ConfigError`):
    the device exists on this machine, the input can be read and the output bucket written
    (:func:`pipeline.data.storage.preflight`), both priors resolve.

    For the Ray job (``ray=True``) the device is resolved by each actor on its own node, so it is checked
    here only when the config names one (not ``auto``) and no cluster is named (``ray.address`` or
    ``RAY_ADDRESS``): then the actors run on this machine."""
    from pipeline.data import storage

    if not ray or (cfg.device != "auto" and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))):
        check_device(cfg.device)
    storage.preflight(input_uri, output, cfg.storage)
    check_models(cfg)


class ShardCleaner:
    """Loads both priors once; :meth:`clean_shard` turns one observation shard into outputs."""

    def __init__(self, cfg: CleanConfig):
        # weights not given come from the tuned table (or the rule's default, with a note); the resolved ones
        # are what the sampler runs and what the outputs record
        settings, note = resolve_weights(cfg.sampler.settings(), cfg.image_prior, cfg.noise_prior, cfg.forward.name)
        if note:
            print(note, file=sys.stderr)
        self.settings = settings
        self.cfg = cfg = cfg.model_copy(update={"sampler": type(cfg.sampler)(**dataclasses.asdict(settings))})
        self.device = resolve_device(cfg.device)
        self.x_model, self.sde, x_meta = load_model(resolve_model(cfg.image_prior), self.device)
        self.n_model, n_sde, n_meta = load_model(resolve_model(cfg.noise_prior), self.device)
        check_pair(self.x_model.config, self.sde, self.n_model.config, n_sde)
        self.shape = (self.x_model.config.channels, self.x_model.config.image_size, self.x_model.config.image_size)
        self.policy = cfg.policy.model_copy(update={"size": self.shape[1], "channels": self.shape[0]})
        self.model_ids = f"{x_meta.get('name', cfg.image_prior)}+{n_meta.get('name', cfg.noise_prior)}"
        # the sampler differentiates with respect to its inputs only: no weight gradients to track
        self.x_model.requires_grad_(False)
        self.n_model.requires_grad_(False)
        self.runtime = cfg.gpu.runtime(self.device)
        if torch.device(self.device).type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        self.batch_size = self._batch_size()

    def _batch_size(self) -> int:
        """``cfg.batch_size``, or for ``auto`` the batch that fills ``gpu.memory_margin`` of the free GPU
        memory (measured with the networks as they will run, less compilation; 32 on a CPU)."""
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        probe = Runtime(self.runtime.precision, self.runtime.channels_last, compile=False)
        return auto_batch_size(probe.wrap(self.x_model, self.device), probe.wrap(self.n_model, self.device),
                               self.sde, make_forward("blend", 1), self.shape, self.device, self.settings, default=32,
                               n_samples=self.cfg.sampler.n_samples, margin=self.cfg.gpu.memory_margin,
                               cap=self.cfg.gpu.max_batch)

    def _decode(self, cell: dict[str, Any] | None, what: str) -> np.ndarray:
        if cell is None:
            raise RowError("decode", f"{what} is null")
        if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
            raise RowError("decode", f"{what} is a {type(cell).__name__}, not an image struct {{bytes, path}}")
        try:
            img = conform(decode_any(cell["bytes"], cell.get("path") or "", self.policy.max_pixels,
                                     self.policy.max_bytes), self.policy)
        except RowError as exc:
            raise RowError(exc.stage, f"{what}: {exc.reason}") from None
        if img.shape != self.shape:  # the policy converts or rejects, so this is a bug guard
            raise RowError("validate", f"{what} is {img.shape} (CxHxW) but the priors expect {self.shape}")
        return img

    def clean_shard(self, shard_uri: str, run_id: str, dataset: str,
                    progress: Callable[[int], None] | None = None,
                    duplicates: Mapping[int, str] | None = None) -> ShardResult:
        """Clean one shard. ``duplicates`` maps the rows holding a later copy of an id (found by
        :func:`prepare_run` across the whole run) to their reason: they become error rows, so ids in
        cleaned stay unique. A shard that cannot be read, or lacks a column, puts its rows (or,
        unreadable, one row -1) in the errors."""
        shard = shard_uri.rsplit("/", 1)[-1]
        result = ShardResult()
        try:
            table = read_table(shard_uri, attempts=3)
        except Exception as exc:
            result.errors.append(error_row(run_id, dataset, shard, -1, None, "read",
                                           f"the shard cannot be read: {exc}"))
            return result
        missing = [c for c in ("id", "observation") if c not in table.column_names]
        if missing:
            ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
            for row, id_ in enumerate(ids):
                result.errors.append(error_row(run_id, dataset, shard, row, id_, "validate",
                                               f"the shard lacks column(s) {missing}; an observation shard needs "
                                               f"'id' and 'observation' (it has {table.column_names})"))
            return result
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        has_truth = "clean" in cols
        valid: list[tuple[int, str, np.ndarray, np.ndarray | None, float]] = []
        duplicates = duplicates or {}
        for row, id_ in enumerate(cols["id"]):
            def reject(stage: str, reason: str, row: int = row, id_: Any = id_) -> None:
                result.errors.append(error_row(run_id, dataset, shard, row, id_, stage, reason))
            id_ = None if id_ is None else str(id_)
            if id_ is None or row in duplicates:
                reject("validate", "missing id" if id_ is None else duplicates[row])
                continue
            try:
                y = self._decode(cols["observation"][row], "observation")
                clean = self._decode(cols["clean"][row], "clean") if has_truth and cols["clean"][row] else None
            except RowError as exc:
                reject(exc.stage, exc.reason)
                continue
            alpha = 0.0  # only the blend has an alpha
            if self.cfg.forward.name == "blend":
                alpha = self.cfg.forward.alpha or (cols.get("alpha") or [None] * (row + 1))[row]
                if alpha is None or math.isnan(alpha) or not 0 < alpha < 1:
                    reject("validate", f"blend needs alpha in (0, 1); the row has {alpha!r} and forward.alpha "
                                       "is not set")
                    continue
            valid.append((row, id_, y, clean, float(alpha)))
        started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        denoiser = Denoiser(self.x_model, self.n_model, self.sde, self.settings, self.runtime)
        for start in range(0, len(valid), self.batch_size):
            batch = valid[start:start + self.batch_size]  # one forward model per batch, each row its own alpha
            self._run_batch(batch, denoiser, result, run_id, dataset, shard, started)
            if progress is not None:
                progress(len(batch))
        return result

    def _run_batch(self, batch: list, denoiser: Denoiser, result: ShardResult, run_id: str, dataset: str,
                   shard: str, started: dt.datetime) -> None:
        ids = [b[1] for b in batch]
        y = torch.from_numpy(np.stack([b[2] for b in batch])).to(self.device)
        name = self.cfg.forward.name
        forward = make_forward(name, len(batch), sigma_y=self.cfg.forward.sigma_y,
                               **({"alpha": [b[4] for b in batch]} if name == "blend" else {}))
        out = denoiser(ids, y, forward)
        figures = {"residual": out.residual, "spread": out.spread, "removed_energy": out.removed_energy}
        truth_rows = [k for k, b in enumerate(batch) if b[3] is not None]
        truth = {c: [None] * len(batch) for c in ("psnr", "ssim", "psnr_input", "ssim_input")}
        if truth_rows:
            clean = torch.from_numpy(np.stack([batch[k][3] for k in truth_rows])).to(self.device)
            tm = truth_metrics(out.denoised[truth_rows], clean, y[truth_rows])
            for c, v in tm.items():
                for k, val in zip(truth_rows, v.tolist()):
                    truth[c][k] = val
        finite = torch.isfinite(out.denoised.flatten(1)).all(1) & torch.isfinite(out.noise_estimate.flatten(1)).all(1)
        c = result.cleaned
        for k, b in enumerate(batch):
            if not finite[k]:
                result.errors.append(error_row(run_id, dataset, shard, b[0], b[1], "sample",
                                               "the sampler diverged (non-finite values); lower sampler.lambda_x / "
                                               "sampler.kappa_n or use more steps"))
                continue
            c.setdefault("row", []).append(b[0])
            c.setdefault("id", []).append(b[1])
            c.setdefault("denoised", []).append(out.denoised[k].cpu().numpy())
            c.setdefault("noise_estimate", []).append(out.noise_estimate[k].cpu().numpy())
            if out.uncertainty is not None:
                c.setdefault("uncertainty", []).append(out.uncertainty[k].cpu().numpy())
            for name in ("psnr", "ssim", "psnr_input", "ssim_input"):
                c.setdefault(name, []).append(_finite_or_none(truth[name][k]))
            for name, v in figures.items():
                c.setdefault(name, []).append(_finite_or_none(float(v[k])))
            c.setdefault("alpha", []).append(b[4])
            c.setdefault("seconds", []).append(out.seconds)
            c.setdefault("nfe", []).append(out.nfe)
            c.setdefault("started_at", []).append(started)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def write_shard_outputs(output: str, run_id: str, dataset: str, shard: str, result: ShardResult,
                        cfg: CleanConfig, model_ids: str) -> None:
    """Write the cleaned, metrics and errors files of one source shard (replacing earlier ones). A folder
    gets no file for the shard when the shard has no row for it (no zero-row files), and an earlier file
    of the shard there is removed."""
    run = join(output, "runs", run_id)
    c = result.cleaned
    n = len(c.get("id", []))
    sampler = json.dumps(cfg.sampler.model_dump(), sort_keys=True)
    metric_cols = {m: pa.array(c.get(m, []), pa.float64()) for m in METRIC_COLUMNS}
    image_cols = ["denoised", "noise_estimate"] + (["uncertainty"] if cfg.sampler.n_samples > 1 else [])
    images = {k: c.get(k, []) for k in image_cols}  # present even when every row was rejected
    extra = {**metric_cols, "run_id": pa.array([run_id] * n, pa.string()),
             "model_ids": pa.array([model_ids] * n, pa.string()), "sampler": pa.array([sampler] * n, pa.string()),
             "nfe": pa.array(c.get("nfe", []), pa.int32()), "seconds": pa.array(c.get("seconds", []), pa.float64())}
    _write_rows(join(run, "cleaned", shard),
                build_table(c.get("id", []), images, bits={k: 16 for k in images}, extra=extra))
    metrics = pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "started_at": pa.array(c.get("started_at", []), pa.timestamp("s", tz="UTC")),
        "dataset": pa.array([dataset] * n, pa.string()), "shard": pa.array([shard] * n, pa.string()),
        "row": pa.array(c.get("row", []), pa.int64()), "id": pa.array(c.get("id", []), pa.string()),
        **metric_cols, "alpha": pa.array(c.get("alpha", []), pa.float32()),
        "nfe": pa.array(c.get("nfe", []), pa.int32()), "seconds": pa.array(c.get("seconds", []), pa.float64()),
    })
    _write_rows(join(run, "metrics", f"run_id={run_id}", shard), metrics.drop_columns(["run_id"]))
    _write_rows(join(run, "errors", shard), pa.Table.from_pylist(result.errors, schema=ERRORS_SCHEMA))


def _write_rows(uri: str, table: pa.Table) -> None:
    """Write ``table`` to ``uri``, or, when it has no row, make sure no file is there: a zero-row Parquet
    file breaks Hugging Face ``datasets`` (``BatchSize must be greater than 0``), and a file left by an
    earlier attempt at the shard (a redone shard that now has no row for this folder) would be stale."""
    if table.num_rows:
        write_table(uri, table)
        return
    fs, path = open_fs(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


@dataclass
class RunPlan:
    """What a run (or a resumed run) has to do: computed once, on the driver."""

    input_uri: str
    output: str
    run_id: str
    run_uri: str
    dataset: str
    shards: list[PlannedShard]
    duplicates: dict[str, dict[int, str]]  # shard -> {row: reason} for later copies of an id
    rows: dict[str, int]  # rows of each pending shard (an unreadable shard counts as one)
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    @property
    def pending(self) -> list[PlannedShard]:
        return [s for s in self.shards if not s.done]

    @property
    def pending_rows(self) -> int:
        return sum(self.rows.values())


def prepare_run(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None) -> RunPlan:
    """Plan a run: its shards (complete ones marked done) and the rows that repeat an earlier id.

    The ``id`` column of every input shard, done or not, is read alone, in sorted shard order and row
    order; the second and later copies of an id are rejected. The answer depends on the input only, not
    on which shards a previous session finished, so shards can be cleaned in any order, by any worker,
    and a resumed run decides exactly as a fresh one would. A shard whose ids cannot be read (not
    Parquet after 3 attempts, or no ``id`` column) is left to :meth:`ShardCleaner.clean_shard`.
    A ``run_id`` that is not a run id (:func:`pipeline.untrusted.check_run_id`) is a :class:`ConfigError`.
    """
    from pipeline.data.shards import ShardError

    if run_id is not None:
        check_run_id(run_id, "run_id")  # it names the folder OUTPUT/runs/RUN_ID: never a path
    input_uri, output = absolute_uri(input_uri), absolute_uri(output)
    run_id = run_id or run_id_for(input_uri, cfg)
    run = join(output, "runs", run_id)
    shards = plan(input_uri, run)
    seen: set[str] = set()
    duplicates: dict[str, dict[int, str]] = {}
    rows: dict[str, int] = {}
    for s in shards:
        try:
            ids = read_table(s.uri, ["id"], attempts=3).column("id").to_pylist()
        except ShardError:  # unreadable, or no id column (MissingColumnError)
            if not s.done:
                rows[s.name] = input_rows(s.uri) or 1
            continue
        if not s.done:
            rows[s.name] = len(ids)
        for row, id_ in enumerate(ids):
            if id_ is None:
                continue
            key = str(id_)
            if key in seen:
                duplicates.setdefault(s.name, {})[row] = f"duplicate id {key!r} (an earlier row of this run has it)"
            seen.add(key)
    run_plan = RunPlan(str(input_uri), str(output), run_id, run, str(input_uri).rstrip("/"), shards, duplicates, rows)
    check_inputs(run_plan, cfg)
    return run_plan


PREFLIGHT_ROWS = 8  # rows of the first pending shard whose image headers check_inputs reads


def prior_shape(name_or_uri: str) -> tuple[int, int]:
    """``(channels, image size)`` of a prior, from its ``config.json`` alone (no weights loaded)."""
    from pipeline.diffusion.checkpoint import read_model_config

    unet = read_model_config(resolve_model(name_or_uri))[0]
    return unet.channels, unet.image_size


def _peek_image(cell: Any) -> tuple[int, int, int, bool, int] | None:
    """``(height, width, colour channels, has alpha, pixels)`` of a stored image from its header, or None
    when the header does not tell (the row is left to the cleaner, which rejects it if it must)."""
    if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
        return None
    import io

    data, name = cell["bytes"], cell.get("path") or ""
    try:
        if name.endswith(".npy") or data[:6] == b"\x93NUMPY":
            shape = npy_header(data)[0]
            if len(shape) not in (2, 3):
                return None
            c = 1 if len(shape) == 2 else int(shape[2])
            h, w = int(shape[0]), int(shape[1])
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:  # the header only; no pixels are decoded
                w, h = im.size
                # channels as decode_any gives them: palette to RGB(A), other modes (CMYK, YCbCr...) to RGB
                c = 4 if im.mode == "P" and "transparency" in im.info else {"L": 1, "1": 1, "I": 1, "F": 1, "I;16": 1,
                                                                            "I;16B": 1, "I;16L": 1, "LA": 2,
                                                                            "RGBA": 4}.get(im.mode, 3)
    except Exception:
        return None
    alpha = c in (2, 4)
    return h, w, c - 1 if alpha else c, alpha, h * w


def check_inputs(run: RunPlan, cfg: CleanConfig) -> None:
    """Stop before any work when the configuration would reject every row: a :class:`ConfigError` of one
    line that names the ``--set`` to add.

    Cheap and on the driver: the schema of the first pending shard and the image headers of its first
    :data:`PREFLIGHT_ROWS` rows. It stops when the blend model has neither ``forward.alpha`` nor an
    ``alpha`` column, or when none of the rows read fits the priors' size and channel count under
    ``cfg.policy`` and a policy setting would convert them; a dataset with a few odd rows goes ahead (they
    are rejected one by one). A shard that cannot be read, or has no ``observation`` column, is left to
    the cleaner (its rows become error rows that say why)."""
    import pyarrow.parquet as pq

    from pipeline.data.storage import open_fs

    if not run.pending:
        return
    shard = run.pending[0]
    fs, path = open_fs(shard.uri)
    cells: list[tuple[Any, Any]] = []
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "observation" in names and pf.metadata.num_rows:  # the first rows' image headers
                cols = [c for c in ("id", "observation") if c in names]
                batch = next(pf.iter_batches(batch_size=PREFLIGHT_ROWS, columns=cols, use_threads=False))
                ids = batch.column("id").to_pylist() if "id" in names else [None] * batch.num_rows
                cells = list(zip(ids, batch.column("observation").to_pylist()))
    except Exception:
        return
    if "observation" not in names:  # not an observation shard: the cleaner rejects its rows, saying so
        return
    problems, fixes = [], []
    if cfg.forward.name == "blend" and cfg.forward.alpha is None and "alpha" not in names:
        problems.append("it has no 'alpha' column and forward.alpha is not set (the blend "
                        "y = (1 - alpha) x + alpha n needs the noise's weight)")
        fixes.append("--set forward.alpha=0.5")
    channels, size = prior_shape(cfg.image_prior)
    p = cfg.policy
    fits, needs = 0, {}  # needs: the --set -> why, for the first row that needs it
    for id_, cell in cells:
        head = _peek_image(cell)
        if head is None:
            continue
        h, w, c, alpha, pixels = head
        mine = {}
        if pixels > p.max_pixels:
            mine[f"--set policy.max_pixels={pixels}"] = f"{pixels:,} pixels, over policy.max_pixels={p.max_pixels:,}"
        if alpha and p.alpha == "error":
            mine["--set policy.alpha=drop"] = "an alpha channel, and policy.alpha is 'error'"
        if c != channels and not p.convert_channels:
            mine["--set policy.convert_channels=true"] = f"{c} channel(s), and policy.convert_channels is off"
        if (h, w) != (size, size) and p.resize == "error":
            mine["--set policy.resize=resize"] = f"{h}x{w} pixels, and policy.resize is 'error'"
        fits += not mine
        for fix, why in mine.items():
            needs.setdefault(fix, f"{id_}: {why}" if id_ is not None else why)
    if needs and not fits:
        problems.append(f"none of its first {len(cells)} images fits the priors ({channels}x{size}x{size}) under "
                        f"the input policy ({'; '.join(needs.values())})")
        fixes += [f + (" (or policy.resize=center-crop)" if f.endswith("=resize") else "") for f in needs]
    if problems:
        raise ConfigError(f"{local_path(run.dataset)}: every row of {shard.name} would be rejected: "
                          f"{'; '.join(problems)}. Add {' '.join(fixes)}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says how far it got and how to resume."""

    def __init__(self, run: RunPlan):
        done = sum(s.done for s in plan(run.input_uri, run.run_uri))
        super().__init__(f"interrupted: {done} of {len(run.shards)} shard(s) of run {run.run_id} are complete in "
                         f"{local_path(run.run_uri)}. Run the same command again to resume: complete shards are "
                         f"skipped (or pass --run-id {run.run_id}).")


def process_shard(cleaner: ShardCleaner, run: RunPlan, shard: PlannedShard,
                  progress: Callable[[int], None] | None = None, duplicates: Mapping[int, str] | None = None,
                  before_marker: Callable[[str], None] | None = None,
                  worker: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Clean one source shard and write its outputs, then its completion marker (last).

    ``duplicates`` defaults to the run plan's entry for this shard; ``worker`` (who cleaned it: the Ray
    node id, the process) goes into the marker. Returns its counts, ``seconds`` and its
    ``started``/``finished`` wall-clock times (epoch seconds, for throughput without start-up)."""
    t0, started = time.perf_counter(), time.time()
    if duplicates is None:
        duplicates = run.duplicates.get(shard.name)
    res = cleaner.clean_shard(shard.uri, run.run_id, run.dataset, progress=progress, duplicates=duplicates)
    write_shard_outputs(run.output, run.run_id, run.dataset, shard.name, res, cleaner.cfg, cleaner.model_ids)
    if before_marker is not None:
        before_marker(shard.name)
    info = {"run_id": run.run_id, "cleaned": len(res.cleaned.get("id", [])), "errors": len(res.errors),
            "input_size": shard.size, "input_version": shard.version, "pid": os.getpid(), **(worker or {})}
    mark_done(run.run_uri, shard.name, info)
    return {"shard": shard.name, "cleaned": info["cleaned"], "errors": info["errors"],
            "seconds": time.perf_counter() - t0, "started": started, "finished": time.time()}


def fail_shard(cfg: CleanConfig, run: RunPlan, shard: PlannedShard, reason: str) -> dict[str, Any]:
    """Give up on a shard: every row of it to the errors table (one row -1 if it cannot be read), no
    cleaned or metrics file (an earlier attempt's are removed), and its marker, so the run completes and
    the accounting holds. Needs no model, so it works even when loading the models is what kills the worker."""
    from pipeline.data.shards import ShardError

    res = ShardResult()
    try:
        ids = read_table(shard.uri, ["id"], attempts=3).column("id").to_pylist()
    except ShardError:
        ids = None
    for row, id_ in ([(-1, None)] if ids is None else enumerate(ids)):
        res.errors.append(error_row(run.run_id, run.dataset, shard.name, row, id_, "sample", reason))
    write_shard_outputs(run.output, run.run_id, run.dataset, shard.name, res, cfg, model_ids="")  # no rows
    mark_done(run.run_uri, shard.name, {"run_id": run.run_id, "cleaned": 0, "errors": len(res.errors),
                                        "input_size": shard.size, "input_version": shard.version, "failed": reason})
    now = time.time()
    return {"shard": shard.name, "cleaned": 0, "errors": len(res.errors), "seconds": 0.0, "started": now,
            "finished": now}


def verify_run(run: RunPlan) -> Accounting:
    """The accounting check: every row of the run's plan once, in cleaned or errors; :class:`AccountingError` if
    not. Shards that landed in the input during the run are not part of it; outputs of shards removed from the
    input are orphaned (kept and reported)."""
    acc = check_run(run.input_uri, run.run_uri, run.shards)
    if not acc.ok:
        raise AccountingError(f"run {run.run_id}: {acc.describe()}")
    return acc


def record_run(run: RunPlan, cfg: CleanConfig, acc: Accounting, processed: int, executor: str,
               wall_seconds: float) -> dict[str, Any]:
    """Append the run's summary row to ``<output>/summary/``; returns it, with the shard counts and
    the ``output`` (run) and ``summary`` (row file) URIs."""
    row = summary_row(run, cfg, acc, processed=processed, executor=executor, wall_seconds=wall_seconds)
    where = append_summary(run.output, row)
    return {**row, "shards": len(run.shards), "skipped_shards": len(run.shards) - len(run.pending),
            "orphaned_shards": sorted(acc.orphaned), "output": run.run_uri, "summary": where}


def finish_run(run: RunPlan, cfg: CleanConfig, processed: int, executor: str, wall_seconds: float) -> dict[str, Any]:
    """:func:`verify_run`, then :func:`record_run`."""
    return record_run(run, cfg, verify_run(run), processed, executor, wall_seconds)


MAX_REASON_GROUPS = 10
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def reason_key(stage: str, reason: str) -> str:
    """What a reason says with its row-specific parts (quoted ids and values, numbers) normalised, so
    that ``512x512 pixels`` and ``300x451 pixels`` fall in one group."""
    return f"{stage}: " + _NUMBER.sub("#", _QUOTED.sub("'…'", reason or ""))


def reason_groups(run_uri: str) -> list[dict[str, Any]]:
    """The run's error rows grouped by :func:`reason_key`, most frequent first (then in shard and row
    order): ``rows``, ``stage``, ``reason`` and ``id`` of the first row of the group, ``variants``
    (distinct reasons in the group)."""
    from pipeline.data.shards import list_parts

    groups: dict[str, dict[str, Any]] = {}
    for part in list_parts(join(run_uri, "errors")):
        t = read_table(part, ["id", "stage", "reason"], attempts=3)
        for id_, stage, reason in zip(*(t.column(c).to_pylist() for c in ("id", "stage", "reason"))):
            g = groups.setdefault(reason_key(stage, reason), {"rows": 0, "stage": stage, "reason": reason,
                                                              "id": id_, "seen": set()})
            g["rows"] += 1
            g["seen"].add(reason)
    out = [{**{k: v for k, v in g.items() if k != "seen"}, "variants": len(g["seen"])} for g in groups.values()]
    return sorted(out, key=lambda g: -g["rows"])  # stable: equal counts keep shard and row order


def judge_run(summary: dict[str, Any], cfg: CleanConfig) -> None:
    """Raise :class:`RejectedRowsError` when the recorded run (its ``summary`` row, as :func:`record_run`
    returns it) rejected more than ``cfg.max_rejected_fraction`` of its input rows, or cleaned none.
    The counts are the whole run's, so a resumed run is judged as a whole."""
    inputs, errors, cleaned = summary["inputs"], summary["errors"], summary["cleaned"]
    limit = cfg.max_rejected_fraction
    if not inputs or (cleaned and errors <= limit * inputs):
        return
    why = "no row was cleaned" if not cleaned else f"more than max_rejected_fraction={limit:g}"
    groups = reason_groups(summary["output"])
    lines = [f"run {summary['run_id']}: {errors} of {inputs} input rows rejected ({errors / inputs:.0%}), "
             f"{cleaned} cleaned: {why}. Reasons, most frequent first:"]
    for g in groups[:MAX_REASON_GROUPS]:
        example = f"e.g. id {g['id']!r}" if g["id"] is not None else "e.g. a whole shard"
        vary = f"; {g['variants']} variants of this reason" if g["variants"] > 1 else ""
        lines.append(f"  {g['rows']:>6} x {g['stage']}: {g['reason']}  ({example}{vary})")
    rest = groups[MAX_REASON_GROUPS:]
    if rest:
        lines.append(f"  ... and {sum(g['rows'] for g in rest)} more row(s) for {len(rest)} other reason(s)")
    lines.append(f"every rejected row, with its id and reason: {summary['output']}/errors/ "
                 f"(the run's outputs and summary row are written)")
    raise RejectedRowsError("\n".join(lines), summary)


def denoise_dataset(input_uri: str, output: str, cfg: CleanConfig, run_id: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Clean the pending shards of ``input_uri`` into ``output`` in this process; returns the run's
    summary row (counts, metric aggregates, images/s) with the run id and output URI, under ``job``
    the per-shard results (as :func:`pipeline.jobs.clean.run_clean` does for the Ray job), and under
    ``report`` the URI of the run's HTML report, written at the end as the flow writes it.

    Shards already complete for this run id (a marker in ``_done/``) are skipped, so a re-run
    resumes. At the end every input row must appear once in cleaned or errors
    (:func:`~pipeline.data.accounting.check_run`), else :class:`AccountingError`; a run that rejected
    more than ``max_rejected_fraction`` of its rows, or cleaned none, then raises
    :class:`RejectedRowsError` (:func:`judge_run`).
    """
    from tqdm import tqdm

    from pipeline.data import storage
    from pipeline.report import write_report

    t0 = time.perf_counter()
    input_uri, output, cfg = resolve_paths(input_uri, output, cfg)
    storage.configure(cfg.storage)
    preflight_run(input_uri, output, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = prepare_run(input_uri, output, cfg, run_id)
    cleaner = ShardCleaner(cfg) if run.pending else None
    processed, shards = 0, []
    try:
        with tqdm(total=run.pending_rows, desc=f"denoise {run.run_id}", unit="img", disable=not progress) as bar:
            for s in run.pending:
                done = process_shard(cleaner, run, s, progress=bar.update)
                bar.update(done["errors"])
                processed += done["cleaned"]
                shards.append({**done, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()})
    except KeyboardInterrupt:
        raise RunInterrupted(run) from None
    summary = finish_run(run, cfg, processed, "local", time.perf_counter() - t0)
    summary["job"] = {"shards": shards, "processed": processed}
    summary["report"] = write_report(run.run_uri)  # as the flow does
    judge_run(summary, cfg)  # after the report: a run that rejected too many rows is recorded, then fails
    return summary


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
