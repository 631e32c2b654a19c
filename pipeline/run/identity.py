"""A run's identity: its run id and its config hash, both from the pinned recipe alone, by one function.

The config hash is the SHA-256 of the whole pinned recipe (:meth:`PinnedRecipe.key`: priors as pinned URI
and fingerprint, forward model, sampler, input policy), every key of it: no list of keys to include or
leave out is kept by hand, so a setting added to the recipe is part of the identity the day it exists. The
run id hashes the input URI (absolute, so ``obs``, ``./obs`` and ``file:///abs/obs`` are one dataset) with
that hash. The execution (storage, Ray, GPU, threads, batch size, device, the verdict threshold) is no part
of either: a nightly run over a growing bucket keeps its id, and cleans only the new shards, however it runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.data.storage import absolute_uri
from pipeline.run.recipe import PinnedRecipe


@dataclass(frozen=True)
class Identity:
    run_id: str  # run-<12 hex>: names OUTPUT/runs/<run_id>/
    config_hash: str  # <12 hex>: the summary row's config_hash


def identify(pinned: PinnedRecipe, input_uri: str) -> Identity:
    """The run id and config hash of cleaning ``input_uri`` with ``pinned``."""
    recipe = hashlib.sha256(json.dumps(pinned.key(), sort_keys=True).encode()).hexdigest()
    key = json.dumps({"input": absolute_uri(input_uri).rstrip("/"), "recipe": recipe}, sort_keys=True)
    return Identity("run-" + hashlib.sha256(key.encode()).hexdigest()[:12], recipe[:12])
