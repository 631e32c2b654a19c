"""What jointdiff takes from people and teams it does not control, made safe before it is used.

Nightly runs read configs, overrides and flow parameters written by several teams, and datasets whose
row ids anyone could have chosen. Three rules, each in one place:

* **YAML is bounded** (:func:`load_yaml`, the only YAML reader): at most :data:`MAX_YAML_BYTES` of text,
  :data:`MAX_ALIASES` aliases, :data:`MAX_DEPTH` levels of nesting and :data:`MAX_VALUES` values once every
  alias is expanded. ``yaml.safe_load`` runs no code, but an alias repeats what it names without copying it:
  a 300-byte "billion laughs" (nine levels of nine aliases) loads in microseconds as a shared structure, then
  grows to gigabytes in whatever walks it (fsspec's instance cache tokenises its storage options with
  ``str()``). The bound is on the expanded size, counted while the document is composed, so nothing large is
  ever built; the alias count alone would not stop that bomb (it has 72).
* **Run ids are names, not paths** (:func:`check_run_id`, :data:`RunId`): a run id becomes the folder
  ``OUTPUT/runs/RUN_ID`` and part of file names, so it is 1 to 128 letters, digits, ``.``, ``_`` and ``-``,
  starting with a letter or digit, without ``..``. No ``/``, ``\\``, ``%`` or ``=`` (a Hive partition),
  nothing a shell or a URI would read differently.
* **Row ids never become paths** (:func:`safe_names`): a file named after a row id (an exported PNG, the
  ``path`` of an image struct) gets the id with path separators and ``..`` replaced by ``_``, a leading dot
  too, control characters escaped as ``%XX``, cut to :data:`MAX_NAME_BYTES` bytes with its suffix; ids that
  come out the same get ``~`` and a short hash of the raw id.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any

import yaml
from pydantic import StringConstraints


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


# ---------------------------------------------------------------- YAML
MAX_YAML_BYTES = 1024 * 1024
MAX_ALIASES = 100
MAX_DEPTH = 32  # mappings and sequences inside each other; the top-level mapping is one
MAX_VALUES = 100_000  # scalars, mappings and sequences, counting what every alias repeats


class YAMLSyntaxError(ConfigError):
    """Text that is not YAML; ``problem`` says what the parser found, ``line`` where (1-based, or None)."""

    def __init__(self, message: str, problem: str, line: int | None):
        super().__init__(message)
        self.problem, self.line = problem, line


class _Refused(Exception):
    def __init__(self, why: str, mark: Any):
        super().__init__(why)
        self.why, self.mark = why, mark


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts, while composing, the aliases, the nesting and the expanded size of
    every node (memoised per node, so an alias costs what it repeats without being walked again)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._open = 0  # collections being composed, the one being entered included
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name)", self.peek_event().start_mark)
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # an alias inside the collection it names
                raise _Refused("an alias refers to itself (a collection that holds itself)", node.start_mark)
            return node
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if collection:
            self._open += 1  # checked on the way in: deep text never reaches Python's recursion limit
            if self._open > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open -= collection
        self._measure(node)
        return node

    def _measure(self, node: Any) -> None:
        if isinstance(node, yaml.ScalarNode):
            size = (1, 0)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            known = [self._sizes.get(id(c)) for c in children]
            if any(k is None for k in known):
                raise _Refused("an alias refers to itself (a collection that holds itself)", node.start_mark)
            size = (1 + sum(k[0] for k in known), 1 + max((k[1] for k in known), default=0))
        if size[0] > MAX_VALUES:
            raise _Refused(f"expands to more than {MAX_VALUES:,} values (each alias repeats what it names)",
                           node.start_mark)
        if size[1] > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded", node.start_mark)
        self._sizes[id(node)] = size


def load_yaml(text: str, where: str) -> Any:
    """``text`` as plain Python values (YAML's safe subset), within the bounds above; else a one-line
    :class:`ConfigError` that starts with ``where`` (a file, ``--set KEY=...``) and says where in the text,
    never what the text holds (it may hold a secret). Not YAML: :class:`YAMLSyntaxError`."""
    if len(text) > MAX_YAML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: more than {MAX_YAML_BYTES // 2**20} MiB of YAML; a config is a few kB")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        at = f" (line {exc.mark.line + 1})" if exc.mark is not None else ""
        raise ConfigError(f"{where}: {exc.why}{at}; jointdiff refuses YAML that could expand without bound") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        at = f" at line {line}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise YAMLSyntaxError(f"{where}: not valid YAML{at}: {problem}", problem, line) from None
    finally:
        loader.dispose()


def read_yaml(path: Any, where: str | None = None) -> Any:
    """The YAML file at ``path`` through :func:`load_yaml`; its size is checked before it is read."""
    from pathlib import Path

    p = Path(path)
    where = where or str(p)
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: more than {MAX_YAML_BYTES // 2**20} MiB of YAML; a config is a few kB")
    return load_yaml(p.read_text(), where)


# ---------------------------------------------------------------- run ids
MAX_RUN_ID = 128
# no lookaround (JSON Schema, Rust's regex in pydantic-core and Python's re all read it alike): every '.' is
# followed by a character that is not one, so '..' cannot occur and the id does not end in '.'
RUN_ID_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*$"
RUN_ID_RULE = (f"a run id is 1 to {MAX_RUN_ID} characters: letters, digits, '.', '_' and '-', starting with a "
               "letter or digit, without '..' (it names the folder OUTPUT/runs/RUN_ID)")
RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN, max_length=MAX_RUN_ID)]
"""A run id as a type: a flow parameter of this type is checked by Prefect (its schema carries the rule)."""

_RUN_ID = re.compile(RUN_ID_PATTERN)


def check_run_id(run_id: str, what: str = "run id") -> str:
    """``run_id`` if it follows :data:`RUN_ID_RULE`; else a one-line :class:`ConfigError` naming ``what``
    (``--run-id``, a parameter) and the rule."""
    if isinstance(run_id, str) and len(run_id) <= MAX_RUN_ID and _RUN_ID.fullmatch(run_id):
        return run_id
    shown = repr(run_id) if not isinstance(run_id, str) or len(run_id) <= 40 else repr(run_id[:40]) + "..."
    raise ConfigError(f"{what} {shown}: {RUN_ID_RULE}")


# ---------------------------------------------------------------- file names from row ids
MAX_NAME_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control characters, lone surrogates


def printable(raw: object) -> str:
    """``raw`` for a log line: control characters (newlines, terminal escapes) as ``%XX``, so that an id chosen
    by someone else cannot forge or hide lines."""
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", str(raw))


def _escape(raw: str) -> str:
    name = printable(raw)
    name = name.replace("/", "_").replace("\\", "_").replace("..", "__")
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def _cut(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = name.encode("utf-8", "surrogatepass")
    return name if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _hash(raw: str, n: int = 8) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_stems(ids: Sequence[object], limit: int) -> list[str]:
    """A plain file name (no suffix) of at most ``limit`` bytes for each id: the id made safe (see the module
    docstring), different for different ids, the same for an id given twice."""
    raw = [str(i) for i in ids]
    unique = list(dict.fromkeys(raw))
    plain = {r: _cut(_escape(r), limit) for r in unique}
    counts = Counter(plain.values())
    out = {}
    for r in unique:
        name = plain[r]
        if counts[name] > 1:  # a collision: every id that comes out as this name gets its own hash
            tag = "~" + _hash(r)
            name = _cut(name, limit - len(tag)) + tag
        out[r] = name
    taken = Counter(out.values())  # an id whose plain name looks like another's hashed name: hash it longer
    for r, name in list(out.items()):
        if taken[name] > 1:
            tag = "~" + _hash(r, 32)
            out[r] = _cut(plain[r], limit - len(tag)) + tag
    if len(set(out.values())) != len(out):
        raise ValueError("two ids were given the same file name")
    return [out[r] for r in raw]


def safe_names(ids: Sequence[object], suffix: str = ".png") -> list[str]:
    """:func:`safe_stems` with ``suffix``: at most :data:`MAX_NAME_BYTES` bytes in all."""
    return [s + suffix for s in safe_stems(ids, MAX_NAME_BYTES - len(suffix.encode()))]


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is a file name that stays where it is put (what :func:`safe_names` makes)."""
    return bool(name) and not ("/" in name or "\\" in name or name.startswith(".") or ".." in name
                               or _CONTROL.search(name))
