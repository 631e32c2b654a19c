"""Checkpoints: ``safetensors`` weights plus a JSON config, on any fsspec URI. Never pickles.

A *model* is a folder with ``weights.safetensors`` (the EMA weights) and ``config.json``
(``{"format": "jointdiff-model", "unet": {...}, "sde": {...}, "meta": {...}}``). A per-pixel Gaussian prior
(:mod:`pipeline.diffusion.gaussian`) is a model too: a ``gaussian`` section (``image_size``, ``channels``) in place
of ``unet``, and the weights ``mean`` and ``var``.
A *training state* (for resuming) is a folder with ``model``, ``ema`` and ``optimizer``
safetensors files and ``state.json`` (step, RNG state, configs).

Loading refuses anything that is not this layout: a ``.pt``/``.pth``/``.ckpt``/``.pkl`` file or a
file that starts like a pickle or a ``torch.save`` zip, and a config whose architecture does not
match the stored tensors, with a message that says which.

Priors come from other teams and registries, so their JSON is checked before anything is built from it
(:func:`read_json`, :func:`read_model_config`, :func:`check_state`): a file of at most 1 MiB (a training
state's ``state.json``, which lists every step's loss, 64 MiB), nested at most 32 levels, then every key of
``unet`` and ``sde`` by type, range and finiteness (:class:`~pipeline.diffusion.unet.UNetConfig`, strictly:
no ``"20"`` for 20; :class:`~pipeline.diffusion.sde.VPSDE`). A problem is one line naming the file and the
key (:class:`CheckpointConfigError`, a :class:`~pipeline.untrusted.ConfigError` too: exit 2 at the command
line). The architecture is then compared with the weights on PyTorch's ``meta`` device, so a config that
does not match its weights never allocates a network.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.data.storage import join, local_path, makedirs, open_fs, write_atomic
from pipeline.diffusion.gaussian import GaussianConfig, GaussianPrior, GaussianShape
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.unet import NetConfig, UNet, UNetConfig
from pipeline.untrusted import ConfigError

MODEL_FORMAT = "jointdiff-model"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")


MAX_CONFIG_BYTES = 1024 * 1024  # a model's config.json is about 1 kB
MAX_STATE_BYTES = 64 * 1024 * 1024  # state.json keeps every step's loss: ~20 bytes a step
MAX_JSON_DEPTH = 32


class CheckpointError(ValueError):
    """A checkpoint is missing, is a pickle, or does not match its config."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """A checkpoint's JSON (``config.json``, ``state.json``) is too large, too deep, or has a key of the wrong
    type or out of range; the message (one line) names the file and the key."""


def write_tensors(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    fs, path = open_fs(uri)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_tensors(uri: str, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``uri`` (or of ``data``, its bytes read already: ``uri`` then only
    names it in messages); :class:`CheckpointError` for a pickle or anything else that is not safetensors."""
    if uri.lower().endswith(_PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{uri}: refusing to load a pickle-format checkpoint; jointdiff only loads "
            f"'{WEIGHTS}' + '{CONFIG}' folders (convert the weights with safetensors first)")
    if data is None:
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


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')


def _too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The keys (dotted) above the first value of ``text`` nested more than ``limit`` levels deep, or None.

    A scan of the text, before it is parsed: Python's parser recurses, and 100,000 ``[`` end in a
    ``RecursionError``."""
    keys: list[str | None] = []  # for each open collection, the key it is the value of
    pending: str | None = None
    for m in _JSON_TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            pending = tok[1:tok.rindex('"')][:40] if tok.endswith(":") else pending
        elif tok in "[{":
            keys.append(pending)
            pending = None
            if len(keys) > limit:
                return ".".join(k for k in keys if k is not None) or "the top level"
        else:
            if keys:
                keys.pop()
            pending = None
    return None


def read_json(uri: str, max_bytes: int = MAX_CONFIG_BYTES, data: bytes | None = None) -> dict[str, Any]:
    """A JSON object from ``uri`` (or from ``data``, its bytes read already): at most ``max_bytes``, nested at
    most :data:`MAX_JSON_DEPTH` levels (:class:`CheckpointConfigError` otherwise, naming the file and where; a
    missing file, :class:`CheckpointError`)."""
    shown = local_path(uri)
    if data is None:
        fs, path = open_fs(uri)
        if not fs.exists(path):
            raise CheckpointError(f"{shown}: no such file")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # never more, whatever the file's size
    if len(data) > max_bytes:
        raise CheckpointConfigError(f"{shown}: larger than {max_bytes // 2**20} MiB; a jointdiff "
                                    f"{uri.rsplit('/', 1)[-1]} is far smaller")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointConfigError(f"{shown}: not UTF-8 text") from None
    deep = _too_deep(text)
    if deep is not None:
        raise CheckpointConfigError(f"{shown}: {deep}: nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        obj = json.loads(text)  # NaN and Infinity are read, and refused by key below
    except json.JSONDecodeError as exc:
        raise CheckpointConfigError(f"{shown}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointConfigError(f"{shown}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def _problems(exc: ValidationError, section: str) -> str:
    """Pydantic's errors as ``section.key: problem; ...`` (never the value: it may be huge)."""
    out = []
    for err in exc.errors()[:3]:
        key = ".".join([section, *(str(p) for p in err["loc"])])
        out.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(out)


def read_model_config(uri: str, data: bytes | None = None) -> tuple[UNetConfig | GaussianConfig, VPSDE, dict[str, Any]]:
    """The validated ``(net config, sde, meta)`` of the model folder ``uri``, from its ``config.json`` alone
    (``data``: that file's bytes, read already; no weights read, nothing built); :class:`CheckpointConfigError`
    naming the file and the key otherwise. The net config is a ``UNetConfig``, or a ``GaussianConfig`` for a
    Gaussian prior; both have ``image_size`` and ``channels``."""
    where = join(uri, CONFIG)
    shown = local_path(where)
    cfg = read_json(where, data=data)
    kinds = [k for k in ("unet", "gaussian") if k in cfg]
    if cfg.get("format") != MODEL_FORMAT or len(kinds) != 1:
        raise CheckpointConfigError(f"{shown}: not a jointdiff model config (expected format '{MODEL_FORMAT}' "
                                    "with a 'unet' or a 'gaussian' section)")
    kind = kinds[0]
    for section in (kind, "sde", "meta"):
        if not isinstance(cfg.get(section, {}), dict):
            raise CheckpointConfigError(f"{shown}: {section}: expected a mapping, found a "
                                        f"{type(cfg[section]).__name__}")
    try:  # strictly: a config.json is written by save_model, so "32" for 32 is damage, not a convenience
        net = (UNetConfig if kind == "unet" else GaussianConfig).model_validate(cfg[kind], strict=True)
    except ValidationError as exc:
        raise CheckpointConfigError(f"{shown}: {_problems(exc, kind)}") from None
    sde_cfg = cfg.get("sde", {})
    unknown = sorted(set(sde_cfg) - {"beta_min", "beta_max", "eps"})
    if unknown:
        raise CheckpointConfigError(f"{shown}: sde.{unknown[0][:40]}: unknown key; sde has beta_min, beta_max, eps")
    try:
        sde = VPSDE(**sde_cfg)
    except ValueError as exc:
        raise CheckpointConfigError(f"{shown}: sde.{exc}") from None
    return net, sde, cfg.get("meta", {})


def check_state(meta: dict[str, Any], uri: str) -> None:
    """:class:`CheckpointConfigError` naming the key unless a training state's ``state.json`` (read from ``uri``)
    has what resuming uses, of the right types."""
    shown = local_path(uri)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    checks = [("step", count, "a whole number >= 0"), ("ema_updates", count, "a whole number >= 0"),
              ("losses", lambda v: isinstance(v, list) and all(map(number, v)), "a list of numbers"),
              ("train_seconds", lambda v: number(v) and v >= 0, "a number >= 0"),
              ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
               and all(isinstance(g, dict) for g in v["param_groups"]), "a mapping with a list of param_groups"),
              ("config", lambda v: isinstance(v, dict) and all(isinstance(v.get(s, {}), dict) for s in ("unet", "sde")),
               "a mapping with unet and sde sections")]
    for key, ok, what in checks:
        if key not in meta:
            if key == "train_seconds":
                continue
            raise CheckpointConfigError(f"{shown}: {key}: missing; a training state's state.json has {what}")
        value = meta[key]
        if not ok(value):
            bad = next((i for i, v in enumerate(value) if not number(v)), None) if isinstance(value, list) else None
            found = f"item {bad} is a {type(value[bad]).__name__}" if bad is not None else \
                f"found a {type(value).__name__}"
            raise CheckpointConfigError(f"{shown}: {key}: expected {what}; {found}")


def save_model(uri: str, model: UNet | GaussianPrior, sde: VPSDE, meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and config to the folder ``uri`` (a U-Net, or a per-pixel Gaussian prior)."""
    fs, path = open_fs(uri)
    makedirs(fs, path)
    kind = "gaussian" if isinstance(model, GaussianPrior) else "unet"
    if kind == "gaussian" and getattr(model, "config", None) is None:  # before anything is written
        raise ValueError(f"a Gaussian prior of mean shape {tuple(model.mean.shape)} has no image shape: only a "
                         "per-pixel prior of square images (C, S, S) can be saved")
    net = model.config
    write_tensors(join(uri, WEIGHTS), {k: v.contiguous() for k, v in model.state_dict().items()},
                  metadata={"format": MODEL_FORMAT})
    write_json(join(uri, CONFIG), {"format": MODEL_FORMAT, kind: asdict(net),
                                   "sde": asdict(sde), "meta": meta or {}})


def build_gaussian(shape: GaussianShape | GaussianConfig, state: dict[str, torch.Tensor], sde: VPSDE,
                   source: str) -> GaussianPrior:
    """A per-pixel Gaussian prior from its weights ``mean`` and ``var`` (each (C, S, S), finite, ``var`` > 0)."""
    if not isinstance(shape, GaussianShape):
        shape = shape.settings()
    want = (shape.channels, shape.image_size, shape.image_size)
    if sorted(state) != ["mean", "var"]:
        raise CheckpointError(f"{source}: a Gaussian prior's weights are 'mean' and 'var'; found "
                              f"{sorted(state)[:4]}")
    for k in ("mean", "var"):
        v = state[k]
        if tuple(v.shape) != want:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config says {want}")
        if not torch.isfinite(v).all() or (k == "var" and not (v > 0).all()):
            raise CheckpointError(f"{source}: {k} has {'non-positive or ' if k == 'var' else ''}non-finite values")
    return GaussianPrior(state["mean"].float(), state["var"].float(), sde)


def build_model(unet_config: NetConfig | UNetConfig, state: dict[str, torch.Tensor], source: str) -> UNet:
    """Instantiate a U-Net and load ``state``, explaining any mismatch in terms of the config.

    The architecture is compared with ``state`` on the ``meta`` device first (shapes, no memory), so a
    network is allocated only when the weights fill it: never more than the weights file holds."""
    if not isinstance(unet_config, NetConfig):
        unet_config = unet_config.settings()
    with torch.device("meta"):
        expected = UNet(unet_config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source}: the weights do not match the architecture in the config "
                 f"({asdict(unet_config)})"]
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
    model = UNet(unet_config)
    model.load_state_dict(state)
    return model


def load_model(uri: str, device: torch.device | str = "cpu",
               files: tuple[bytes, bytes] | None = None) -> tuple[UNet | GaussianPrior, VPSDE, dict[str, Any]]:
    """Load a model folder written by :func:`save_model`; returns ``(model in eval mode, sde, meta)``.
    ``files``: the bytes of its ``config.json`` and weights, read already (a caller that hashed them loads
    exactly those; nothing is read from ``uri`` then)."""
    if str(uri).lower().endswith(_PICKLE_SUFFIXES):
        read_tensors(str(uri))  # raises the pickle refusal
    config, weights = files if files is not None else (None, None)
    net, sde, meta = read_model_config(uri, config)  # checked before the weights are read or anything built
    state = read_tensors(join(uri, WEIGHTS), weights)
    model = build_gaussian(net, state, sde, str(uri)) if isinstance(net, GaussianConfig) else \
        build_model(net, state, str(uri))
    return model.to(device).eval(), sde, meta
