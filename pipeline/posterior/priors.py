"""Priors with a closed-form score, for the ``gaussian`` baseline and for testing the sampler:
:class:`~pipeline.diffusion.gaussian.GaussianPrior` (a per-pixel Gaussian, which a model folder can also hold)."""

from __future__ import annotations

from pipeline.diffusion.gaussian import GaussianPrior

__all__ = ["GaussianPrior"]
