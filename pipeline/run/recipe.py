"""A run's recipe resolved on its driver, before anything is hashed or any worker starts.

:func:`resolve` is the one place where a recipe as written becomes the recipe a run uses: today it pins
both priors (:func:`pipeline.run.models.pin`); whatever else must be decided once per run, on the driver,
before the run's identity is computed, belongs here too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import Priors, Recipe
from pipeline.run.models import PinnedModel, pin


@dataclass(frozen=True)
class PinnedRecipe:
    """A recipe with its models pinned: ``recipe.priors`` hold the pinned URIs, ``image`` and ``noise`` the
    models with their fingerprints."""

    recipe: Recipe
    image: PinnedModel
    noise: PinnedModel

    def key(self) -> dict[str, Any]:
        """Everything that decides the pixels, as plain JSON: the whole recipe, each prior as its pinned URI and
        fingerprint. What :func:`pipeline.run.identity.identify` hashes."""
        out = self.recipe.model_dump(mode="json")
        out["priors"] = {"image": asdict(self.image), "noise": asdict(self.noise)}
        return out

    @property
    def model_ids(self) -> str:
        """``IMAGE+NOISE``, each ``URI@sha256:PREFIX``: the cleaned rows' ``model_ids``."""
        return f"{self.image.ref}+{self.noise.ref}"


def resolve(recipe: Recipe) -> PinnedRecipe:
    """Pin the recipe's models (on the driver, once per run; both must have passed
    :func:`pipeline.run.models.check_models`)."""
    image, noise = pin(recipe.priors.image), pin(recipe.priors.noise)
    pinned = recipe.model_copy(update={"priors": Priors(image=image.uri, noise=noise.uri)})
    return PinnedRecipe(pinned, image, noise)
