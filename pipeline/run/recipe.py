"""A run's recipe resolved on its driver, before anything is hashed or any worker starts.

:func:`resolve` is the one place where a recipe as written becomes the recipe a run uses: it pins both priors
(:func:`pipeline.run.models.pin`) and fills in the sampler's weights that the recipe leaves unset from the
tuned table shipped in the package (:func:`pipeline.posterior.tuned.resolve_weights`; for a combination that
was never tuned, the rule's documented defaults, with one line on standard error saying so and how to tune
it). Both happen once per run, on the driver, before the run's identity is computed, so the run id and the
outputs record the weights the sampler ran with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import Priors, Recipe, SamplerConfig
from pipeline.posterior.tuned import resolve_weights
from pipeline.run.models import PinnedModel, check_supervised, pin


@dataclass(frozen=True)
class PinnedRecipe:
    """A recipe with its models pinned: ``recipe.priors`` hold the pinned URIs, ``image`` and ``noise`` the
    models with their fingerprints."""

    recipe: Recipe
    image: PinnedModel
    noise: PinnedModel
    note: str | None = None  # one line when the sampler's weights were not tuned for this combination
    supervised: PinnedModel | None = None  # sampler.path fast / routed: the supervised network

    def key(self) -> dict[str, Any]:
        """Everything that decides the pixels, as plain JSON: the whole recipe, each model as its pinned URI and
        fingerprint. What :func:`pipeline.run.identity.identify` hashes."""
        out = self.recipe.model_dump(mode="json")
        out["priors"] = {"image": asdict(self.image), "noise": asdict(self.noise)}
        if self.supervised is not None:
            out["priors"]["supervised"] = asdict(self.supervised)
        return out

    @property
    def model_ids(self) -> str:
        """``IMAGE+NOISE[+SUPERVISED]``, each ``URI@sha256:PREFIX``: the cleaned rows' ``model_ids``."""
        return f"{self.image.ref}+{self.noise.ref}" + (f"+{self.supervised.ref}" if self.supervised else "")


def resolve(recipe: Recipe) -> PinnedRecipe:
    """Pin the recipe's models and resolve the sampler's weights (on the driver, once per run; both models
    must have passed :func:`pipeline.run.models.check_models`). The tuned table is keyed by the priors as the
    recipe names them (``faces``, ``digits``); ``note`` says when it has no entry (the run prints it once it
    has work to do: :meth:`pipeline.run.Run.plan`)."""
    image, noise = pin(recipe.priors.image), pin(recipe.priors.noise)
    settings, note = resolve_weights(recipe.sampler.settings(), recipe.priors.image, recipe.priors.noise,
                                     recipe.forward.name)
    supervised = None
    if settings.path != "joint":
        supervised = pin(check_supervised(recipe))
    pinned = recipe.model_copy(update={"priors": Priors(image=image.uri, noise=noise.uri,
                                                        supervised=supervised.uri if supervised else None),
                                       "sampler": SamplerConfig.model_validate(asdict(settings))})
    return PinnedRecipe(pinned, image, noise, note, supervised)
