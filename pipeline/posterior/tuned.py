"""The tuned guidance weights, shipped with the package (``tuned.yaml`` beside this module).

Guidance weights depend on everything around them: the two priors, the forward model, the rule, the solver
and the number of steps (fewer steps need a larger pull per step). The table is keyed by exactly that,
``(image_prior, noise_prior, forward, rule, solver, steps)``, and each entry also records, under ``with``,
the other settings it was tuned with (:data:`TUNED_WITH`: schedule, ``eta``, clipping, time spacing, the
prior variances of ``Sigma_t``): a request that differs in any of them was not tuned.

:func:`resolve_weights` is what every builder of sampler settings calls (the cleaning run, the
benchmarks): weights given explicitly always win; otherwise the matching entry's; otherwise the rule's
documented default (:func:`pipeline.posterior.guidance.register_rule`), with a one-line note saying so and
naming the command that tunes the combination. ``jointdiff bench tune`` and ``jointdiff bench nfe`` (faces +
digits) and ``jointdiff bench large`` (natural + text, natural + stripes-rgb) write their winners here with
:func:`record` (validation split only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline.posterior.guidance import RULES
from pipeline.posterior.sampler import SamplerSettings
from pipeline.untrusted import load_yaml, read_yaml

TABLE = Path(__file__).with_name("tuned.yaml")
KEY = ("image_prior", "noise_prior", "forward", "rule", "solver", "steps")
TUNED_WITH = ("schedule", "eta", "clip_denoised", "time_power", "data_var_x", "data_var_n")
# what `jointdiff bench tune` / `bench nfe` tune: the quality benchmark's main scenario
BENCH_SETTING = ("faces", "digits", "blend")
NFE_CURVES = {"euler-maruyama": "em", "ddim": "ddim"}  # bench nfe's name for a solver
# what `jointdiff bench large` tunes (its scenarios' priors and forward models)
LARGE_SETTINGS = (("natural", "text", "composite"), ("natural", "stripes-rgb", "blend"))


def load_table(path: Path = TABLE) -> dict[str, Any]:
    return read_yaml(path) or {}


def _key(image_prior: str, noise_prior: str, forward: str, settings: SamplerSettings) -> dict[str, Any]:
    return {"image_prior": image_prior, "noise_prior": noise_prior, "forward": forward, "rule": settings.rule,
            "solver": settings.solver, "steps": settings.steps}


def entry(settings: SamplerSettings, image_prior: str, noise_prior: str, forward: str) -> dict[str, Any]:
    """The table entry for ``settings`` (whose weights must be set) under the given priors and forward model."""
    if settings.lambda_x is None or settings.kappa_n is None:
        raise ValueError("an entry needs both weights")
    return {**_key(image_prior, noise_prior, forward, settings), "lambda_x": float(settings.lambda_x),
            "kappa_n": float(settings.kappa_n), "with": {k: getattr(settings, k) for k in TUNED_WITH}}


def entries_for(table: dict[str, Any], key: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's entries of the combination ``key`` (the fields of :data:`KEY`), whatever they were tuned with."""
    return [e for e in table.get("entries") or [] if all(e.get(k) == v for k, v in key.items())]


def lookup(settings: SamplerSettings, image_prior: str, noise_prior: str, forward: str,
           table: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The entry tuned for exactly this combination and these settings, or None."""
    table = load_table() if table is None else table
    return next((e for e in entries_for(table, _key(image_prior, noise_prior, forward, settings))
                 if all(getattr(settings, k) == v for k, v in (e.get("with") or {}).items())), None)


def _how_to_tune(settings: SamplerSettings, image_prior: str, noise_prior: str, forward: str) -> str:
    if (image_prior, noise_prior, forward) == BENCH_SETTING:
        if settings.solver == "euler-maruyama":
            return f"`jointdiff bench tune --rules {settings.rule} --steps {settings.steps}` tunes it"
        if settings.rule == "dps" and settings.solver in NFE_CURVES:
            return (f"`jointdiff bench nfe --solvers {NFE_CURVES[settings.solver]} --steps {settings.steps}` "
                    "tunes it")
    if (image_prior, noise_prior, forward) in LARGE_SETTINGS:
        return f"`jointdiff bench large --steps {settings.steps} --rules {settings.rule}` tunes it"
    return ("no benchmark tunes it (bench tune / bench nfe tune faces + digits, blend; bench large natural + text, "
            "composite and natural + stripes-rgb, blend)")


def resolve_weights(settings: SamplerSettings, image_prior: str, noise_prior: str, forward: str,
                    table: dict[str, Any] | None = None) -> tuple[SamplerSettings, str | None]:
    """``settings`` with ``lambda_x`` / ``kappa_n`` filled in, and a one-line note when they are not tuned.

    Weights given explicitly win (no note). The others come from the table entry of ``(image_prior,
    noise_prior, forward, settings.rule, settings.solver, settings.steps)`` tuned with the same other settings;
    without one, from the rule's default weights, and the note says so and how to tune them."""
    if settings.lambda_x is not None and settings.kappa_n is not None:
        return settings, None
    found = lookup(settings, image_prior, noise_prior, forward, table)
    note = None
    if found is not None:
        lam, kap = found["lambda_x"], found["kappa_n"]
    else:
        lam, kap = RULES[settings.rule].weights
        note = (f"sampler: no tuned weights for {settings.rule} / {settings.solver} / {settings.steps} steps with "
                f"{image_prior} + {noise_prior} ({forward}) and these settings; using the rule's defaults "
                f"lambda_x={lam:g} kappa_n={kap:g}; {_how_to_tune(settings, image_prior, noise_prior, forward)}, "
                "or set sampler.lambda_x and sampler.kappa_n")
    lam = settings.lambda_x if settings.lambda_x is not None else lam
    kap = settings.kappa_n if settings.kappa_n is not None else kap
    return dataclasses.replace(settings, lambda_x=float(lam), kappa_n=float(kap)), note


def record(entries: list[dict[str, Any]], path: Path = TABLE, **fields: Any) -> None:
    """Write ``entries`` into the table, replacing any with the same key and ``with``; ``fields`` set
    top-level keys (``scores`` is merged). The header comment is kept."""
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    doc = load_yaml(text, str(path)) or {}
    def identity(e: dict[str, Any]) -> tuple[Any, ...]:
        return (*(e.get(k) for k in KEY), repr(sorted((e.get("with") or {}).items())))

    new = {identity(e) for e in entries}
    kept = [e for e in doc.get("entries") or [] if identity(e) not in new]
    if "scores" in fields:
        fields["scores"] = {**(doc.get("scores") or {}), **fields["scores"]}
    doc.update(fields)
    doc["entries"] = kept + entries
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=200))
