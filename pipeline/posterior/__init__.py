"""Joint posterior sampling of an image and its structured noise (knows nothing of Ray or storage): guidance
rules, solvers and presets; the ``paper`` preset registers itself here."""

from pipeline.posterior import paper as paper  # noqa: F401  (registers the paper solver, rule and preset)
