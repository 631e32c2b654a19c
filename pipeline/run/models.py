"""The two priors of a run: checked, pinned and loaded.

A run resolves each model **once, on its driver**, to a :class:`PinnedModel`: the URI every worker loads and
the fingerprint every worker verifies, so a run's id, its images and its records all name one model:

* a shipped name (``faces``) stays the name: its files live inside the package, on every node;
* a registry's ``ROOT/models/NAME/latest`` becomes the version that ``latest.json`` names now: a version
  published later, even mid-run, is no part of this run;
* an existing local path becomes an absolute ``file://`` URI (a worker resolves a relative path against its
  own folder); any other URI is kept.

The fingerprint is the SHA-256 of ``config.json``'s bytes followed by ``weights.safetensors``'s. Weights
included: hashing the shipped priors' 2.7 MB takes milliseconds and the paper's 36 MB networks well under a
second, while a ``config.json`` alone would miss weights replaced under the same config. A worker reads both
files once, checks their fingerprint (:class:`ModelChanged`, naming both, fails the shard otherwise) and builds
the model from those same bytes (:func:`load_pinned`): what is hashed is what is loaded, whatever lands at the
URI in between.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.data.storage import absolute_uri, join, local_path, open_fs
from pipeline.priors import SHIPPED, SUPERVISED, resolve_model


@dataclass(frozen=True)
class PinnedModel:
    """A model as a run uses it: ``uri`` (a shipped name or one version's URI) and ``fingerprint`` (hex SHA-256
    of its ``config.json`` and weights)."""

    uri: str
    fingerprint: str

    @property
    def ref(self) -> str:
        """``URI@sha256:PREFIX``: what the outputs record (``model_ids``, the summary's ``models``)."""
        return f"{self.uri}@sha256:{self.fingerprint[:16]}"


class ModelChanged(RuntimeError):
    """A worker found other bytes at a pinned model's URI than the driver fingerprinted."""


def model_uri(name_or_uri: str) -> str:
    """A shipped prior's name unchanged; an existing local path as an absolute ``file://`` URI; a registry's
    ``.../latest`` as the version it names now; anything else unchanged (:func:`check_models` refuses, as the
    user wrote it, what does not resolve)."""
    from pipeline.registry import resolve_latest

    if name_or_uri in SHIPPED or name_or_uri in SUPERVISED.values():
        return name_or_uri
    uri = resolve_latest(name_or_uri)
    if "://" not in uri and Path(uri).expanduser().exists():
        uri = absolute_uri(uri)
    return uri


def _files(uri: str) -> tuple[bytes, bytes]:
    from pipeline.diffusion.checkpoint import CONFIG, WEIGHTS

    folder = resolve_model(uri)
    out = []
    for name in (CONFIG, WEIGHTS):
        fs, path = open_fs(join(folder, name))
        out.append(fs.cat_file(path))
    return out[0], out[1]


def fingerprint(uri: str) -> str:
    """The hex SHA-256 of the model's ``config.json`` bytes followed by its weights' bytes."""
    config, weights = _files(uri)
    return _digest(config, weights)


def _digest(config: bytes, weights: bytes) -> str:
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


def pin(name_or_uri: str) -> PinnedModel:
    """The model as this run will use it (see the module docstring). Call it on the driver, after
    :func:`check_models`."""
    uri = model_uri(name_or_uri)
    return PinnedModel(uri, fingerprint(uri))


def load_pinned(model: PinnedModel, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(network, sde, meta)`` of exactly the pinned model, on ``device``; :class:`ModelChanged` when the files
    at its URI are no longer those the driver fingerprinted."""
    from pipeline.diffusion.checkpoint import load_model

    config, weights = _files(model.uri)
    found = _digest(config, weights)
    if found != model.fingerprint:
        raise ModelChanged(f"{local_path(model.uri)} changed after the run pinned it: the run uses sha256 "
                           f"{model.fingerprint[:16]}, the files there now hash to {found[:16]}; run again to pin "
                           "the new version (a new run id)")
    return load_model(resolve_model(model.uri), device, files=(config, weights))  # the bytes hashed, not a re-read


def check_models(image: str, noise: str, storage: Any = None, forward: str = "blend") -> None:
    """:class:`ConfigError` unless both priors resolve to a folder holding ``config.json`` and
    ``weights.safetensors``, each ``config.json`` is valid (size, nesting, every key of ``unet`` and ``sde``:
    :func:`~pipeline.diffusion.checkpoint.read_model_config`), and the two fit together (:func:`check_pair`).
    Read here, on the driver, before any shard is touched or any network built."""
    from pipeline.data import storage as st
    from pipeline.diffusion.checkpoint import CONFIG, WEIGHTS, CheckpointError, read_model_config

    configs = {}
    for key, name in (("priors.image", image), ("priors.noise", noise)):
        try:
            uri = resolve_model(name)
            configs[key] = read_model_config(uri)
            fs, path = st.open_fs(join(uri, WEIGHTS))
            if not fs.exists(path):
                raise CheckpointError(f"{local_path(join(uri, WEIGHTS))}: no such file (a model folder holds "
                                      f"{CONFIG} and {WEIGHTS})")
        except (CheckpointError, FileNotFoundError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except Exception as exc:
            cause = st.describe_error(exc, storage)
            if cause is None:
                raise
            raise ConfigError(f"{key}: {name}: cannot read the model: {cause}") from None
    (x_unet, x_sde, _), (n_unet, n_sde, _) = configs["priors.image"], configs["priors.noise"]
    check_pair(x_unet, x_sde, n_unet, n_sde, forward)


def check_pair(x_unet: Any, x_sde: Any, n_unet: Any, n_sde: Any, forward: str = "blend") -> None:
    """:class:`ConfigError` unless the two priors share their SDE and image size, and the noise prior has the
    channels that the forward model ``forward`` gives the noise of the image prior's (the same, or for the
    composited overlay one more: an RGBA layer over RGB)."""
    from pipeline.forward import FORWARD_MODELS
    if x_sde != n_sde:
        differ = "; ".join(f"sde.{k} {getattr(x_sde, k)} vs {getattr(n_sde, k)}"
                           for k in ("beta_min", "beta_max", "eps") if getattr(x_sde, k) != getattr(n_sde, k))
        raise ConfigError(f"priors.image and priors.noise use different SDEs ({differ}); the joint sampler runs "
                          "both on one schedule: train them with the same sde section")
    extra = FORWARD_MODELS[forward].extra_noise_channels
    if extra and x_unet.image_size == n_unet.image_size and n_unet.channels != x_unet.channels + extra:
        raise ConfigError(f"forward.name={forward}: the noise is a layer of the image's {x_unet.channels} colour "
                          f"channel(s) and {extra} of coverage, so the noise prior needs {x_unet.channels + extra} "
                          f"channels but has {n_unet.channels}: use an RGBA noise prior (text) with an RGB image "
                          "prior (natural)")
    if not extra and n_unet.channels == x_unet.channels + 1:
        raise ConfigError(f"the noise prior has {n_unet.channels} channels, an RGBA layer over the image prior's "
                          f"{x_unet.channels}: composite it with --set forward.name=composite")
    if (x_unet.image_size, x_unet.channels + extra) != (n_unet.image_size, n_unet.channels):
        raise ConfigError(f"the image prior is {x_unet.channels}x{x_unet.image_size}x{x_unet.image_size} but the "
                          f"noise prior is {n_unet.channels}x{n_unet.image_size}x{n_unet.image_size}; they must match "
                          "(for grey noise on RGB images, train the noise prior on RGB noise, e.g. corrupt "
                          "--noise-channel random)")


def prior_shape(name_or_uri: str) -> tuple[int, int]:
    """``(channels, image size)`` of a prior, from its ``config.json`` alone (no weights loaded)."""
    from pipeline.diffusion.checkpoint import read_model_config

    unet = read_model_config(resolve_model(name_or_uri))[0]
    return unet.channels, unet.image_size



def check_supervised(recipe: Any) -> str:
    """The supervised network of a recipe with ``sampler.path`` fast or routed (``priors.supervised``, else the one
    shipped for the two priors); :class:`ConfigError` in one line unless it is a supervised network
    (``jointdiff train-supervised``) of the image prior's channels, and, for ``routed``, the weight is given (not
    ``auto``: routed sends the rows to estimate to the joint sampler), the forward model is linear in the noise and
    the card holds a calibration for these two priors. (``fast`` estimates a weight with the noise prior.)"""
    from pipeline.diffusion.checkpoint import CheckpointError, read_model_config
    from pipeline.forward import FORWARD_MODELS
    from pipeline.posterior.supervised import is_supervised
    from pipeline.priors import supervised_for

    path, p = recipe.sampler.path, recipe.priors
    where = f"sampler.path={path}"
    name = p.supervised or supervised_for(p.image, p.noise)
    if name is None:
        raise ConfigError(f"{where}: no supervised network ships for priors {p.image} + {p.noise}; train one with "
                          "jointdiff train-supervised and give it as priors.supervised")
    if path == "routed" and not FORWARD_MODELS[recipe.forward.name].linear:
        raise ConfigError(f"{where}: the router is calibrated for forward models linear in the noise only, not "
                          f"forward.name={recipe.forward.name}; use sampler.path=fast or joint")
    if recipe.forward.alpha == "auto" and path == "routed":
        raise ConfigError(f"{where} sends every image whose weight is estimated to the joint sampler; with "
                          "forward.alpha=auto use sampler.path=fast or joint")
    if recipe.sampler.n_samples > 1:
        raise ConfigError(f"{where}: the supervised network gives one answer, not posterior samples; leave "
                          "sampler.n_samples at 1, or use sampler.path=joint")
    try:
        net, _, meta = read_model_config(resolve_model(name))
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"priors.supervised: {exc}") from None
    if not is_supervised(meta):
        raise ConfigError(f"priors.supervised: {name} is a prior, not a supervised network (jointdiff "
                          "train-supervised writes one)")
    if meta.get("forward") != recipe.forward.name:
        raise ConfigError(f"priors.supervised: {name} was trained on the {meta.get('forward')} forward model, this run "
                          f"uses forward.name={recipe.forward.name}; train one for it with jointdiff train-supervised "
                          "or use sampler.path=joint")
    x_channels = prior_shape(p.image)[0]
    if net.channels != x_channels:
        raise ConfigError(f"priors.supervised: {name} has {net.channels} channel(s), the image prior "
                          f"{x_channels}")
    route = meta.get("route")
    if path == "routed" and not (isinstance(route, dict) and (route.get("image_prior"), route.get("noise_prior"))
                                 == (p.image, p.noise)):
        cal = f"{route.get('image_prior')} + {route.get('noise_prior')}" if isinstance(route, dict) else "no priors"
        raise ConfigError(f"sampler.path=routed: {name} is calibrated for {cal}, not {p.image} + {p.noise}; run "
                          f"jointdiff train-supervised OUTPUT ... --route-priors {p.image} {p.noise} to calibrate it")
    q = f"{recipe.sampler.route_quantile:g}"
    if path == "routed" and q not in route.get("quantiles", {}):
        raise ConfigError(f"sampler.route_quantile={q}: {name} is calibrated at "
                          f"{', '.join(route.get('quantiles', {}))}; use one of those")
    return name
