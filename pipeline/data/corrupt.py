"""Observation datasets: clean images hidden under structured noise, with the truth kept.

Observation ``k`` pairs clean image ``c = k mod N_clean`` with the ``(k div N_clean)``-th entry of a
random permutation of the noise images drawn for ``c`` (generator seeded by ``seed``), so a clean image
appears under several different noise images, no pair repeats, and the dataset is reproducible. Ids are
``<clean id>+<noise id>``. Grey noise on RGB images goes either into every channel or, as the paper
does with MNIST on CelebA, into one random colour channel (``noise_channel="random"``).

Text layers (``text``, RGBA) are composited (``forward="composite"``): the noise keeps its colour in the image's
channels (grey for grey images) and its coverage as alpha.

Columns (docs/concepts/outputs.md): ``id``, ``observation`` (16-bit PNG, or float32 ``.npy`` when
values leave [0, 1], e.g. the sum model), ``clean``, ``noise`` (8-bit PNG, the ground truth; RGBA for a layer),
``alpha`` (float32), ``forward`` (string).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.embedded import ImageSet
from pipeline.data.shards import write_dataset
from pipeline.forward import FORWARD_MODELS, make_forward


@dataclass
class Observations:
    ids: list[str]
    observation: np.ndarray | list[np.ndarray]  # (N, C, H, W) float32, or (C, H, W) each at its own size
    clean: np.ndarray | list[np.ndarray]
    noise: np.ndarray | list[np.ndarray]
    alpha: float
    forward: str


def pair_indices(n_clean: int, n_noise: int, n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """``(clean index, noise index)`` of each of ``n`` observations (see module docstring)."""
    if n_clean == 0 or n_noise == 0:
        raise ValueError("corrupt needs at least one clean and one noise image")
    if n > n_clean * n_noise:
        raise ValueError(f"{n} observations need more distinct (clean, noise) pairs than the "
                         f"{n_clean} x {n_noise} available")
    # clean image c takes its j-th noise image from its own permutation: pairs never repeat
    perms: dict[int, np.ndarray] = {}
    c_idx, order = [], []
    for k in range(n):
        c = k % n_clean
        if c not in perms:
            perms[c] = rng.permutation(n_noise)
        c_idx.append(c)
        order.append(int(perms[c][k // n_clean]))
    return c_idx, order


def pair_noise(clean: ImageSet, noise: ImageSet, n: int, seed: int,
               noise_channel: Literal["all", "random"] = "all") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pairs ``(ids, clean images, noise images)`` for ``n`` observations (see module docstring)."""
    rng = np.random.default_rng(seed)
    c_idx, order = pair_indices(len(clean), len(noise), n, rng)
    x = clean.images[c_idx]
    nz = noise.images[order[:n]]
    if nz.shape[1] == 4:  # RGBA layers (composited): colour in the image's channels, then coverage
        nz = np.stack([layer_for(v, x.shape[1]) for v in nz])
        if nz.shape[2:] != x.shape[2:]:
            raise ValueError(f"clean images are {x.shape[2:]} but noise layers are {nz.shape[2:]}; load both at "
                             "the same size")
        ids = [f"{clean.ids[c]}+{noise.ids[o]}" for c, o in zip(c_idx, order[:n])]
        return ids, x, nz
    if nz.shape[1] == 1 and x.shape[1] == 3:
        if noise_channel == "random":
            coloured = np.zeros((n, 3) + nz.shape[2:], dtype=nz.dtype)
            chan = rng.integers(0, 3, n)
            coloured[np.arange(n), chan] = nz[:, 0]
            nz = coloured
        else:
            nz = np.repeat(nz, 3, axis=1)
    if nz.shape[1:] != x.shape[1:]:
        raise ValueError(f"clean images are {x.shape[1:]} but noise images are {nz.shape[1:]}; "
                         "load both at the same size and channel count")
    ids = [f"{clean.ids[c]}+{noise.ids[o]}" for c, o in zip(c_idx, order[:n])]
    return ids, x, nz


def corrupt(clean: ImageSet, noise: ImageSet, n: int, alpha: float = 0.5, seed: int = 0,
            forward: str = "blend", sigma_y: float = 0.0,
            noise_channel: Literal["all", "random"] = "all") -> Observations:
    """``n`` observations of ``clean`` images under ``noise`` images through the forward model ``forward``
    (:mod:`pipeline.forward`); ``alpha`` is its mixing weight (the blend's alpha, the overlay's ``a``; the sum
    has none), stored in the ``alpha`` column (NaN without one)."""
    if forward not in FORWARD_MODELS:  # before pairing: the refusal names the models
        make_forward(forward, 0)
    layers = noise.images[0].shape[0] == 4 if len(noise) else False
    if layers != (FORWARD_MODELS[forward].extra_noise_channels == 1):
        _refuse_pairing(forward, "RGBA layers" if layers else "noise images")
    ids, x, nz = pair_noise(clean, noise, n, seed, noise_channel)
    weight = FORWARD_MODELS[forward].weight
    fm = make_forward(forward, len(ids), sigma_y=sigma_y, **({weight: alpha} if weight else {}))
    g = torch.Generator().manual_seed(seed + 1)
    y = fm.observe(torch.from_numpy(x), torch.from_numpy(nz), generator=g).numpy().astype(np.float32)
    if forward in ("blend", "composite"):
        y = np.clip(y, 0.0, 1.0)  # read-out noise cannot leave the sensor's range
    return Observations(ids, y, x, nz, alpha if weight else float("nan"), forward)


NATIVE_NOISE = ("stripes", "text")  # noise that can be rendered at any size


def default_forward(noise: str) -> str:
    """The forward model a noise is put on images with, unless one is given: text layers are composited."""
    return "composite" if noise == "text" else "blend"


def _refuse_pairing(forward: str, noise: str) -> None:
    from pipeline.untrusted import ConfigError

    raise ConfigError(f"--forward {forward} with {noise}: RGBA text layers go on with --forward composite, and "
                      "composite takes RGBA layers only (text)")


def layer_for(layer: np.ndarray, channels: int) -> np.ndarray:
    """An RGBA layer ``(4, H, W)`` for an image of ``channels``: as it is for RGB, grey colour and alpha for grey."""
    if channels == 3:
        return layer
    from pipeline.data.embedded import grey_of

    return grey_of(layer)


def corrupt_native(clean: ImageSet, noise: str, split: str, n: int, alpha: float = 0.5, seed: int = 0,
                   forward: str | None = None, sigma_y: float = 0.0) -> Observations:
    """``n`` observations of ``clean`` images kept at their own sizes (a list of ``(C, H, W)``), each under noise
    ``noise`` rendered at its size: ``stripes`` with the period in pixels that the 32x32 ``stripes`` prior
    learned, grey, in every channel; ``text``, an RGBA layer of random words in the training font families
    (:func:`pipeline.data.text.text_layer`), composited by default. Pairs are drawn as :func:`corrupt` draws them
    (the noise's ``split`` seeds)."""
    from pipeline.data.embedded import STRIPES_SPLITS, TEXT_SPLITS, stripe

    if noise not in NATIVE_NOISE:
        from pipeline.untrusted import ConfigError

        raise ConfigError(f"noise '{noise}' cannot be rendered at each image's size; at --size native the noise is "
                         f"one of {', '.join(NATIVE_NOISE)} (or give --size N for both)")
    forward = forward or default_forward(noise)
    if forward not in FORWARD_MODELS:
        make_forward(forward, 0)
    if (noise == "text") != (FORWARD_MODELS[forward].extra_noise_channels == 1):
        _refuse_pairing(forward, noise)
    start, count = (TEXT_SPLITS if noise == "text" else STRIPES_SPLITS)[split]
    rng = np.random.default_rng(seed)
    c_idx, order = pair_indices(len(clean), count, n, rng)
    weight = FORWARD_MODELS[forward].weight
    g = torch.Generator().manual_seed(seed + 1)
    ids, ys, xs, ns = [], [], [], []
    for c, o in zip(c_idx, order):
        x = np.asarray(clean.images[c], dtype=np.float32)
        if noise == "text":
            from pipeline.data.text import text_layer

            nz = layer_for(text_layer(start + o, x.shape[1:]), x.shape[0])
        else:
            nz = np.broadcast_to(stripe(start + o, 32, x.shape[1:]).astype(np.float32), x.shape).copy()
        fm = make_forward(forward, 1, sigma_y=sigma_y, **({weight: alpha} if weight else {}))
        y = fm.observe(torch.from_numpy(x)[None], torch.from_numpy(nz)[None], generator=g)[0].numpy()
        ys.append(np.clip(y, 0.0, 1.0) if forward in ("blend", "composite") else y.astype(np.float32))
        xs.append(x)
        ns.append(nz)
        ids.append(f"{clean.ids[c]}+{noise}-{split}-{start + o:07d}")
    return Observations(ids, ys, xs, ns, alpha if weight else float("nan"), forward)  # type: ignore[arg-type]


def write_observations(uri: str, obs: Observations, shard_size: int = 1000) -> list[str]:
    """Write an observation dataset as Parquet shards (16-bit observations, 8-bit truth)."""
    n = len(obs.ids)
    return write_dataset(
        uri, obs.ids, {"observation": obs.observation, "clean": obs.clean, "noise": obs.noise},
        bits={"observation": 16},
        extra={"alpha": pa.array([obs.alpha] * n, pa.float32()), "forward": pa.array([obs.forward] * n, pa.string())},
        shard_size=shard_size)
