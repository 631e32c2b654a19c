"""Demo priors shipped with the package (EMA weights + config; see docs/reference/priors.md).

``faces`` (image prior) and ``digits`` / ``stripes`` (noise priors), all 32x32 grey, ``natural`` /
``stripes-rgb`` (image and noise priors for photos of any size: 32x32 RGB patches) and ``text`` (32x32 RGBA text
layers, the noise prior of the composited overlay), trained with
``configs/prior_<name>.yaml``. A model argument anywhere in jointdiff may be one of these names, the
folder or URI of a model (``config.json`` + ``weights.safetensors``, what ``jointdiff train`` writes to
``OUTPUT/model``), or a registry's ``ROOT/models/NAME/latest``; anything else is refused with a line
that lists these forms.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = ("faces", "digits", "stripes", "natural", "stripes-rgb", "text")
# the supervised competitors (``jointdiff train-supervised``), one per pair of shipped priors
SUPERVISED = {("faces", "digits"): "supervised-faces-digits", ("faces", "stripes"): "supervised-faces-stripes",
              ("natural", "text"): "supervised-natural-text",
              ("natural", "stripes-rgb"): "supervised-natural-stripes"}


def supervised_for(image_prior: str, noise_prior: str) -> str | None:
    """The name of the shipped supervised network for a pair of shipped priors (a model argument like a prior's
    name); None when there is none (not trained yet, or not a shipped pair)."""
    name = SUPERVISED.get((image_prior, noise_prior))
    return name if name is not None and _ships(name) else None


def _ships(name: str) -> bool:
    return (_HERE / name / "weights.safetensors").exists()


_HERE = Path(__file__).resolve().parent


def resolve_model(name_or_uri: str) -> str:
    """A shipped prior's folder for a bare name; a registry's ``.../models/<name>/latest`` resolved to
    its newest version; else the URI unchanged, when it holds a ``config.json``. Anything else raises
    :class:`~pipeline.diffusion.checkpoint.CheckpointError` naming the shipped priors and the accepted forms."""
    if name_or_uri in SUPERVISED.values() and _ships(name_or_uri):
        return str(_HERE / name_or_uri)
    if name_or_uri in SHIPPED:
        folder = _HERE / name_or_uri
        if not (folder / "weights.safetensors").exists():
            raise FileNotFoundError(
                f"shipped prior '{name_or_uri}' is missing from {folder}; reinstall jointdiff or train it "
                f"with: jointdiff train --config configs/prior_{name_or_uri}.yaml")
        return str(folder)
    from pipeline.data.storage import open_fs
    from pipeline.diffusion.checkpoint import _PICKLE_SUFFIXES, CONFIG, WEIGHTS, CheckpointError
    from pipeline.registry import resolve_latest

    uri = resolve_latest(name_or_uri)
    if str(uri).lower().endswith(_PICKLE_SUFFIXES):
        return uri  # load_model refuses it, saying why
    fs, path = open_fs(uri)
    if fs.exists(f"{path.rstrip('/')}/{CONFIG}"):
        return uri
    what = ("is a folder without config.json" if fs.isdir(path) else "is a file, not a model folder"
            if fs.exists(path) else "does not exist")
    raise CheckpointError(
        f"unknown model '{name_or_uri}': not a shipped prior ({', '.join(SHIPPED)}), and {uri} {what}. A model "
        f"is a shipped name, a folder or URI holding {CONFIG} + {WEIGHTS} (jointdiff train writes OUTPUT/model), "
        "or a registry's ROOT/models/NAME/latest")
