"""Settings declared once, as plain frozen dataclasses; pydantic models built from them at the config boundary.

The torch-only core (the sampler's :class:`~pipeline.posterior.sampler.SamplerSettings`, the U-Net's
:class:`~pipeline.diffusion.nets.NetConfig`) must run where only torch and numpy are installed
(``pipeline/bench/gpu.py`` on a bare GPU machine), while a config file wants types, bounds, unknown keys
refused and one-line errors. So each group of settings is declared once, as a dataclass whose fields carry
their type, their default and, in ``field(metadata=...)``, their rules:

* ``ge``, ``gt``, ``le``, ``lt``, ``max_length``, ``allow_inf_nan``, ``description``: pydantic ``Field``
  keywords, applied by the config boundary; :func:`check_fields` applies the four bounds in the dataclass too;
* ``items``: the same keywords for the elements of a list field;
* ``check``: a function that returns the value or raises ``ValueError`` (e.g. a name looked up in a
  :class:`Registry`), run by both.

:func:`check_fields` (called from the dataclass's ``__post_init__``) needs no pydantic; :func:`pydantic_model`
(pydantic imported there, never at import time) builds the strict model whose fields, defaults and rules
are the dataclass's, and whose ``settings()`` returns the dataclass. A test asserts the two agree.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<"),
}


class Registry(Generic[T]):
    """Names of one kind (guidance rules, schedules, solvers) mapped to what they stand for.

    ``REG.register("name", obj)`` or ``@REG.register("name")``; ``REG.check(name)`` returns the name or
    raises a one-line ``ValueError`` listing the registered names (what a config error shows)."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        def add(o: T) -> T:
            self._items[name] = o
            return o
        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary entry)."""
        del self._items[self.check(name)]

    def check(self, name: str) -> str:
        if name not in self._items:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join(self._items)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._items[self.check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)


def check_fields(obj: Any) -> None:
    """Apply each field's ``check`` and numeric bounds (``ValueError`` naming the field); None passes."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        if "check" in f.metadata:
            f.metadata["check"](v)
        for key, (ok, sign) in BOUNDS.items():
            if key in f.metadata and isinstance(v, (int, float)) and not ok(v, f.metadata[key]):
                raise ValueError(f"{f.name} must be {sign} {f.metadata[key]}, got {v}")
        if f.metadata.get("allow_inf_nan") is False and isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name} must be finite, got {v}")


_FIELD_KEYS = ("ge", "gt", "le", "lt", "max_length", "allow_inf_nan", "description")


def pydantic_model(cls: type, name: str, module: str, doc: str | None = None, methods: type | None = None) -> Any:
    """A strict pydantic model (unknown keys refused) with ``cls``'s fields, defaults and rules, named
    ``name`` in ``module`` (where it is assigned, so that it pickles by reference).

    Its ``settings()`` builds the dataclass (so the dataclass's own ``__post_init__`` checks, e.g. across
    fields, run at validation and their ``ValueError`` becomes a validation error); ``methods``, a plain
    class, lends the model further methods and properties."""
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

    hints = typing.get_type_hints(cls)
    specs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        items = f.metadata.get("items")
        if items is not None:
            (inner,) = typing.get_args(tp)
            tp = list[typing.Annotated[inner, Field(**items)]]  # type: ignore[valid-type]
        if "check" in f.metadata:
            check = f.metadata["check"]
            tp = typing.Annotated[tp, AfterValidator(lambda v, check=check: v if v is None else check(v))]
        kw = {k: f.metadata[k] for k in _FIELD_KEYS if k in f.metadata}
        if f.default is not dataclasses.MISSING:
            specs[f.name] = (tp, Field(f.default, **kw))
        else:
            specs[f.name] = (tp, Field(default_factory=f.default_factory, **kw))  # type: ignore[arg-type]

    class Base(BaseModel):
        model_config = ConfigDict(extra="forbid")

        def settings(self) -> Any:
            """The plain dataclass these validated settings describe."""
            return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

        @model_validator(mode="after")
        def _dataclass_checks(self) -> Any:
            self.settings()  # cross-field rules live in the dataclass's __post_init__
            return self

    bases: tuple[type, ...] = (Base,) if methods is None else (methods, Base)
    return create_model(name, __base__=bases, __module__=module, __doc__=doc or cls.__doc__, **specs)
