"""Prefect flows: thin orchestration over pipeline.jobs (docs/concepts/architecture.md).

Both flows take config ``overrides`` (``key=value``, as ``--set``), and Prefect stores a flow run's
parameters in plain text -- before the flow's body runs, and before its parameters are validated. So storage
credentials are kept out of the parameters at both doors where a run is created:

- a deployment run (``prefect deployment run``, ``run_deployment``, a schedule, the UI): the ``overrides``
  parameter is typed :data:`Overrides`, whose JSON schema the Prefect server enforces
  (``enforce_parameter_schema``, on by default) before it creates the run: a run with such an override is
  refused with a 409 that does not repeat it, and nothing is stored;
- a call (``python -m flows.clean_dataset``, ``jointdiff demo``, from Python): the flows are
  :class:`RefusingFlow` s, which refuse before Prefect creates the run.

The rule itself is :func:`pipeline.config.credential_overrides`; the schema is its syntactic mirror, a little
stricter (only the dotted form ``storage.region=eu-west-1`` with a plain value passes it).
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from prefect import Flow
from pydantic import Field

from pipeline.config import STORAGE_SETTINGS, refuse_credentials

_PLAIN = r"[A-Za-z0-9._~/+-]"  # no @ (a password in a URL), no quotes, brackets, braces or YAML indicators
# an override that names storage (as credential_overrides' gate does) ...
_STORAGE = r"^\s*[Ss][Tt][Oo][Rr][Aa][Gg][Ee]\s*([.=:]|\s|$)"
# ... and is not an allowed setting with a plain value (one that YAML reads as a scalar: no trailing colon)
_ALLOWED = (rf"^\s*storage\.({'|'.join(STORAGE_SETTINGS)})\s*=\s*"
            rf"({_PLAIN.replace('-]', ']')}{_PLAIN}*)?(:{_PLAIN}+)*\s*$")

Overrides = Annotated[list[str], Field(
    description="config overrides, key=value (as --set); under storage only storage.endpoint_url, storage.region "
                "and storage.anon: credentials come from the environment or the config file, never a parameter",
    # "no item is such an override": maxContains fails with a message that does not repeat the item
    json_schema_extra={"contains": {"type": "string", "pattern": _STORAGE, "not": {"pattern": _ALLOWED}},
                       "minContains": 0, "maxContains": 0})]
"""The type of a flow's ``overrides`` parameter: a list of ``key=value`` strings whose JSON schema refuses
storage credentials (what the Prefect server checks before it creates a deployment run)."""


class RefusingFlow(Flow):
    """A flow that refuses storage credentials among its ``overrides`` (any parameter whose name ends so) when
    called, before Prefect creates (and stores) the run."""

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        try:
            bound = inspect.signature(self.fn).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}  # a call that does not fit the signature: Prefect says why
        for key, overrides in bound.items():  # overrides, and learn-prior's prior_overrides
            if key.endswith("overrides"):
                refuse_credentials([overrides] if isinstance(overrides, str) else overrides or [],
                                   "--prior-set" if key == "prior_overrides" else "--set")
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)

    def with_options(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`prefect.Flow.with_options`, keeping the refusal (Prefect's builds a plain ``Flow``)."""
        copy = super().with_options(*args, **kwargs)
        copy.__class__ = RefusingFlow
        return copy


def refusing_flow(**options: Any) -> Any:
    """``@flow(**options)``, making a :class:`RefusingFlow`."""
    return lambda fn: RefusingFlow(fn=fn, **options)


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from any text."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "run"
