"""What a run checks before any work, on its driver, each failure one line (:class:`ConfigError`, exit 2): the
device exists on this machine, the input can be read and the output bucket written, both priors resolve and
fit together. What only the data can tell (a dataset that every row of would be rejected) is checked when the
run is planned (:func:`pipeline.run.plan.check_inputs`)."""

from __future__ import annotations

import os

import torch

from pipeline.config import CleanConfig, ConfigError
from pipeline.run.models import check_models


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


def preflight(input_uri: str, output: str, cfg: CleanConfig, ray: bool = False) -> None:
    """The device, storage access (:func:`pipeline.data.storage.preflight`) and both priors.

    For the Ray executor (``ray=True``) the device is resolved by each actor on its own node, so it is checked
    here only when the config names one (not ``auto``) and no cluster is named (``ray.address`` or
    ``RAY_ADDRESS``): then the actors run on this machine."""
    from pipeline.data import storage

    if not ray or (cfg.device != "auto" and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))):
        check_device(cfg.device)
    storage.preflight(input_uri, output, cfg.storage)
    check_models(cfg.priors.image, cfg.priors.noise, cfg.storage, cfg.forward.name)
