"""A model registry in storage: ``<root>/models/<name>/<version>/{weights.safetensors, config.json, card.json}``.

``publish`` copies an exported model folder (``<output>/model`` of a training run) to a new version
and then, last, points ``<root>/models/<name>/latest.json`` at it, so readers never see a half-copied
version as ``latest``. ``card.json`` records the dataset and a hash of the training images, steps,
final and held-out loss, wall time, git commit, who and when. Anywhere a model is expected,
``<root>/models/<name>/latest`` names the newest version (:func:`resolve_latest`).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pipeline.data.storage import join, open_fs, write_atomic
from pipeline.diffusion.checkpoint import CONFIG, WEIGHTS, read_json
from pipeline.untrusted import is_plain_name

CARD_KEYS = ("name", "dataset", "split", "dataset_hash", "n_train_images", "steps", "final_loss", "heldout_loss",
             "train_seconds", "workers", "git_commit", "created_by", "created_at")


def publish(model_uri: str, root: str, name: str | None = None, version: str | None = None,
            move_latest: bool = True) -> str:
    """Copy the model folder ``model_uri`` into the registry under ``root`` and (``move_latest``) point ``latest``
    at it; returns the version's URI."""
    cfg = read_json(join(model_uri, CONFIG))
    meta = cfg.get("meta", {})
    name = name or meta.get("name")
    if not name:
        raise ValueError(f"{model_uri}: its config.json names no model; pass a name")
    version = version or "v" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for what, value in (("name", name), ("version", version)):  # folders under ROOT/models/: never paths
        if not isinstance(value, str) or not is_plain_name(value):
            raise ValueError(f"{model_uri}: model {what} {str(value)[:40]!r} is not a plain folder name (no '/', "
                             "'\\', '..', leading '.' or control characters)")
    dest = join(root, "models", name, version)
    src_fs, src = open_fs(join(model_uri, WEIGHTS))
    write_atomic(join(dest, WEIGHTS), src_fs.cat_file(src))
    write_atomic(join(dest, CONFIG), json.dumps(cfg, indent=2, sort_keys=True).encode())
    card = {k: meta.get(k) for k in CARD_KEYS} | {"version": version, "source": str(model_uri)}
    write_atomic(join(dest, "card.json"), json.dumps(card, indent=2, sort_keys=True).encode())
    if move_latest:
        point_latest(root, name, version)
    return dest


def point_latest(root: str, name: str, version: str) -> None:
    """Point ``<root>/models/<name>/latest`` at ``version`` (a published one: its ``config.json`` must exist)."""
    fs, path = open_fs(join(root, "models", name, version, CONFIG))
    if not fs.exists(path):
        raise FileNotFoundError(f"{join(root, 'models', name, version)}: no such published version")
    write_atomic(join(root, "models", name, "latest.json"), json.dumps({"version": version}).encode())


def resolve_latest(uri: str) -> str:
    """``.../models/<name>/latest`` -> the version folder ``latest.json`` names; other URIs unchanged."""
    if not str(uri).rstrip("/").endswith("/latest"):
        return uri
    parent = str(uri).rstrip("/").rsplit("/", 1)[0]
    try:
        version = read_json(join(parent, "latest.json"))["version"]
        if not isinstance(version, str) or not is_plain_name(version):
            raise ValueError("its version is not a plain folder name")
    except Exception as exc:
        raise FileNotFoundError(f"{uri}: no published version ({join(parent, 'latest.json')}: {exc})") from None
    return join(parent, version)


def card(version_uri: str) -> dict[str, Any]:
    return read_json(join(version_uri, "card.json"))
