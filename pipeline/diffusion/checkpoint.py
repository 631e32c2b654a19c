"""Checkpoints: ``safetensors`` weights plus a JSON config, on any fsspec URI. Never pickles.

A *model* is a folder with ``weights.safetensors`` (the EMA weights) and ``config.json``
(``{"format": "jointdiff-model", "unet": {...}, "sde": {...}, "meta": {...}}``).
A *training state* (for resuming) is a folder with ``model``, ``ema`` and ``optimizer``
safetensors files and ``state.json`` (step, RNG state, configs).

Loading refuses anything that is not this layout: a ``.pt``/``.pth``/``.ckpt``/``.pkl`` file or a
file that starts like a pickle or a ``torch.save`` zip, and a config whose architecture does not
match the stored tensors, with a message that says which.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.data.storage import join, makedirs, open_fs, write_atomic
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.unet import UNet, UNetConfig

MODEL_FORMAT = "jointdiff-model"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, is a pickle, or does not match its config."""


def write_tensors(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    fs, path = open_fs(uri)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_tensors(uri: str) -> dict[str, torch.Tensor]:
    if uri.lower().endswith(_PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{uri}: refusing to load a pickle-format checkpoint; jointdiff only loads "
            f"'{WEIGHTS}' + '{CONFIG}' folders (convert the weights with safetensors first)")
    fs, path = open_fs(uri)
    if not fs.exists(path):
        raise CheckpointError(f"{uri}: no such file")
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return st_load(data)  # parses a JSON header and raw buffers; never runs code
    except Exception as exc:  # safetensors raises its own error types
        if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{uri}: this is a pickle / torch.save file, not safetensors; "
                                  "refusing to load it") from exc
        raise CheckpointError(f"{uri}: not a valid safetensors file ({exc})") from exc


def write_json(uri: str, obj: dict[str, Any], atomic: bool = False) -> None:
    """Write JSON; ``atomic=True`` makes a reader see the old or the new file, never a partial one
    (a temporary file renamed into place; an object store's PUT is atomic already)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if atomic:
        write_atomic(uri, text.encode())
        return
    fs, path = open_fs(uri)
    with fs.open(path, "w") as f:
        f.write(text)


def read_json(uri: str) -> dict[str, Any]:
    fs, path = open_fs(uri)
    if not fs.exists(path):
        raise CheckpointError(f"{uri}: no such file")
    with fs.open(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{uri}: not valid JSON ({exc})") from exc


def save_model(uri: str, model: UNet, sde: VPSDE, meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and config to the folder ``uri``."""
    fs, path = open_fs(uri)
    makedirs(fs, path)
    write_tensors(join(uri, WEIGHTS), model.state_dict(), metadata={"format": MODEL_FORMAT})
    write_json(join(uri, CONFIG), {"format": MODEL_FORMAT, "unet": model.config.model_dump(),
                                   "sde": asdict(sde), "meta": meta or {}})


def build_model(unet_config: UNetConfig, state: dict[str, torch.Tensor], source: str) -> UNet:
    """Instantiate a U-Net and load ``state``, explaining any mismatch in terms of the config."""
    model = UNet(unet_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source}: the weights do not match the architecture in the config "
                 f"({unet_config.model_dump()})"]
        if wrong:
            k = wrong[0]
            lines.append(f"{len(wrong)} tensors differ in shape, e.g. {k}: config expects "
                         f"{tuple(expected[k].shape)}, weights have {tuple(state[k].shape)}")
        if missing:
            lines.append(f"{len(missing)} tensors missing from the weights, e.g. {missing[0]}")
        if unexpected:
            lines.append(f"{len(unexpected)} tensors in the weights that the config does not build, "
                         f"e.g. {unexpected[0]}")
        lines.append("Was config.json edited, or copied from another model?")
        raise CheckpointError("\n  ".join(lines))
    model.load_state_dict(state)
    return model


def load_model(uri: str, device: torch.device | str = "cpu") -> tuple[UNet, VPSDE, dict[str, Any]]:
    """Load a model folder written by :func:`save_model`; returns ``(model in eval mode, sde, meta)``."""
    if str(uri).lower().endswith(_PICKLE_SUFFIXES):
        read_tensors(str(uri))  # raises the pickle refusal
    cfg = read_json(join(uri, CONFIG))
    if cfg.get("format") != MODEL_FORMAT or "unet" not in cfg:
        raise CheckpointError(f"{join(uri, CONFIG)}: not a jointdiff model config "
                              f"(expected format '{MODEL_FORMAT}' with a 'unet' section)")
    try:
        unet_config = UNetConfig(**cfg["unet"])
        sde = VPSDE(**cfg.get("sde", {}))
    except Exception as exc:
        raise CheckpointError(f"{join(uri, CONFIG)}: invalid config ({exc})") from exc
    model = build_model(unet_config, read_tensors(join(uri, WEIGHTS)), str(uri))
    return model.to(device).eval(), sde, cfg.get("meta", {})
