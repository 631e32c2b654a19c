"""Demo priors shipped with the package (EMA weights + config; see README "Shipped priors").

``faces`` (image prior) and ``digits`` / ``stripes`` (noise priors), all 32x32 grey, trained with
``configs/prior_<name>.yaml``. A model argument anywhere in jointdiff may be one of these names or
the URI of a model folder.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = ("faces", "digits", "stripes")
_HERE = Path(__file__).resolve().parent


def resolve_model(name_or_uri: str) -> str:
    """A shipped prior's folder for a bare name; a registry's ``.../models/<name>/latest`` resolved to
    its newest version; else the URI unchanged."""
    if name_or_uri in SHIPPED:
        folder = _HERE / name_or_uri
        if not (folder / "weights.safetensors").exists():
            raise FileNotFoundError(
                f"shipped prior '{name_or_uri}' is missing from {folder}; reinstall jointdiff or train it "
                f"with: jointdiff train --config configs/prior_{name_or_uri}.yaml")
        return str(folder)
    from pipeline.registry import resolve_latest

    return resolve_latest(name_or_uri)
