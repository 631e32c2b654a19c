"""MkDocs hooks for the documentation site (``mkdocs.yml``: ``hooks:``), and a Griffe extension.

Three reference pages are generated at build time, as virtual files that are never committed:

* ``reference/cli.md`` from the real argparse parser (:func:`pipeline.cli.build_parser`);
* ``reference/config.md`` from the pydantic models of the config files (:mod:`pipeline.config`);
* ``reference/api.md``, the mkdocstrings directives of the Python API.

:class:`RstRoles` (loaded by mkdocstrings' Python handler, ``extensions:`` in ``mkdocs.yml``) turns the
reStructuredText of the package's docstrings (``:class:`~a.B```, simple tables) into Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable
from typing import Any

GENERATED = ("reference/cli.md", "reference/config.md", "reference/api.md")
"""The pages this file writes; a committed file at one of these paths is an error."""


# ---------------------------------------------------------------------------------------------- helpers


_SPAN = re.compile(r"(`+)(?:.+?)\1")


def _cell(text: Any) -> str:
    """One Markdown table cell: one line, pipes escaped outside code spans (the tables extension leaves those
    alone, and shows an escape inside one as it is)."""
    text, out, at = " ".join(str(text).split()), [], 0
    for m in _SPAN.finditer(text):
        out += [text[at:m.start()].replace("|", "\\|"), m.group(0)]
        at = m.end()
    return "".join(out + [text[at:].replace("|", "\\|")])


def _code(value: str) -> str:
    """``value`` as an inline code span, whatever backticks it holds."""
    ticks = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{ticks}{pad}{value}{pad}{ticks}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


# ---------------------------------------------------------------------------------------------- the CLI


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _helps(sub: argparse._SubParsersAction) -> dict[str, str]:
    """Each subcommand's one-line help."""
    return {c.dest: c.help or "" for c in sub._choices_actions}


def _name(action: argparse.Action) -> str:
    """A positional argument's name as the synopsis and the table show it."""
    return action.metavar if isinstance(action.metavar, str) else action.dest.upper()


def _value(action: argparse.Action) -> str:
    """What a flag takes: nothing (a switch), its choices, or a metavar / type name."""
    if action.nargs == 0:
        return "switch"
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        one = " | ".join(_code(str(c)) for c in action.choices)
    elif action.metavar is not None:
        meta = action.metavar if isinstance(action.metavar, tuple) else (action.metavar,)
        one = " ".join(_code(m) for m in meta)
    else:
        kind = {int: "INT", float: "FLOAT", None: "TEXT", str: "TEXT"}.get(action.type, "VALUE")
        one = _code(kind)
        if isinstance(action.nargs, int) and action.nargs > 1:
            one = " ".join([one] * action.nargs)
    if action.nargs in ("*", "+"):
        one += " ..."
    if isinstance(action, argparse._AppendAction):
        one += " (repeatable)"
    return one


def _default(action: argparse.Action) -> str:
    """The default, only where argparse has a real one (not None, not SUPPRESS, not a switch's off)."""
    if action.required:
        return "required"
    d = action.default
    if d is None or d is argparse.SUPPRESS or action.nargs == 0 or d == []:
        return ""
    return _code(str(d))


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog}
    return text


def _command_section(path: list[str], parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    """One command's section: synopsis, positional arguments, flags; then its subcommands."""
    anchor = "-".join(path[1:]) or "jointdiff"
    out = [f"{'#' * level} {' '.join(path)} {{#{anchor}}}", ""]
    text = parser.description or summary
    if text:
        out += [text, ""]
    positionals = [a for a in parser._actions if not a.option_strings]
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    sub = _subparsers(parser)
    words = [a.dest.upper() if a is sub else _name(a) for a in positionals]  # no brackets: the table says which
    if parser.get_default("passthrough"):
        words.append("ARGS")
    synopsis = " ".join(path + words + (["OPTIONS"] if flags else []))
    out += ["```text", synopsis, "```", ""]
    if [a for a in positionals if a is not sub]:
        rows = []
        for a in positionals:
            if a is sub:
                continue
            takes = " | ".join(_code(str(c)) for c in a.choices) if a.choices else ""
            need = "optional" if a.nargs == "?" else "required"
            rows.append((_code(_name(a)), takes, need, _help(a, parser)))
        out += _table(("argument", "value", "needed", "meaning"), rows)
    if flags:
        rows = [(" ".join(_code(o) for o in a.option_strings), _value(a), _default(a), _help(a, parser))
                for a in flags]
        out += _table(("flag", "value", "default", "meaning"), rows)
    if sub is not None:
        helps = _helps(sub)
        out += [f"{sub.dest.upper()} is one of:", ""]
        out += [f"* [`{name}`](#{'-'.join(path[1:] + [name])}): {helps.get(name, '')}" for name in sub.choices]
        out.append("")
        for name, child in sub.choices.items():
            out += _command_section(path + [name], child, helps.get(name, ""), level + 1)
    return out


def cli_page() -> str:
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = _subparsers(parser)
    assert sub is not None
    out = [
        "# CLI reference", "",
        "Generated at build time from the `jointdiff` command's own argument parser "
        "(`pipeline.cli.build_parser`), so it lists exactly what the installed command accepts. "
        "`jointdiff COMMAND --help` prints the same. A default is shown only where the parser has one; "
        "where the default column is empty, the meaning says what applies when the flag is left out.", "",
        "```text", "jointdiff COMMAND ...", "```", "",
        "| command | what it does |", "|---|---|",
    ]
    helps = _helps(sub)
    out += [f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |" for name in sub.choices]
    out.append("")
    for name, child in sub.choices.items():
        out += _command_section(["jointdiff", name], child, helps.get(name, ""), 2)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- the configs


CONFIGS: tuple[tuple[str, str, str, str, str, tuple[str, ...]], ...] = (
    ("clean", "Cleaning config", "pipeline.config", "CleanConfig",
     "`jointdiff clean --config`, `jointdiff submit clean`, the `clean-dataset` flow and `jointdiff learn-prior` "
     "(its cleaning recipe); example: `configs/denoise.yaml`", ("Recipe", "Execution")),
    ("prior", "Prior training config", "pipeline.config", "PriorConfig",
     "`jointdiff train --config`, `jointdiff train-supervised` (`--image-config`, `--noise-config`) and "
     "`jointdiff learn-prior` (`--prior-config`); examples: `configs/prior_*.yaml`", ()),
    ("corrupt", "Corruption config", "pipeline.config", "CorruptConfig",
     "`jointdiff corrupt --config` (flags given on the command line win)", ()),
    ("ingest", "Ingest config", "pipeline.data.ingest", "IngestConfig", "`jointdiff ingest --config`", ()),
)
"""(anchor, title, module, model, who reads it, the models its keys are split into) of each config file."""


def _model_in(tp: Any) -> Any:
    from pipeline.config import _model_in as model_in

    return model_in(tp)


def _bounds(metadata: list[Any]) -> list[str]:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "max_length": "length ≤"}
    out = []
    for m in metadata:
        for key, sign in signs.items():
            v = getattr(m, key, None)
            if v is not None:
                out.append(f"{sign} {v:g}" if isinstance(v, float) else f"{sign} {v}")
    return out


def _type(tp: Any, bounds: list[str] | None = None) -> str:
    """A type annotation as a reader wants it: ``int ≥ 4``, ``blend | sum`` for literals, ``| null`` last.
    ``bounds`` (a field's own) go with the first type that is not null."""
    bounds = bounds or []
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        extra = []
        for m in meta:
            extra += _bounds(getattr(m, "metadata", [m]))
        return _type(inner, bounds + extra)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_type(a, bounds if i == 0 else None) for i, a in enumerate(x for x in args if x is not type(None))]
        if type(None) in args:
            parts.append("`null`")
        return " | ".join(parts)
    if origin is typing.Literal:
        text = " | ".join(_code(str(a).lower() if isinstance(a, bool) else str(a)) for a in typing.get_args(tp))
    elif origin in (list, tuple, set):
        args = typing.get_args(tp)
        text = f"list of {_type(args[0])}" if args else "list"
    elif origin is dict:
        text = "mapping"
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        text = " | ".join(_code(str(m.value)) for m in tp)
    elif isinstance(tp, type):
        names = {"str": "text", "SecretStr": "text (secret)", "bool": "`true` | `false`"}
        text = names.get(tp.__name__, tp.__name__)
    else:
        text = str(tp)
    return f"{text} {', '.join(bounds)}" if bounds else text


def _yaml(value: Any) -> str:
    import json

    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, (list, tuple, dict)):
        return _code(json.dumps(value))
    if isinstance(value, float):
        return _code(repr(value))
    return _code(str(value))


def _attribute_docs(model: type) -> dict[str, str]:
    """Docstrings written under the fields (``x: int = 0`` then a string) of ``model`` and its bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = _rst_to_md(inspect.cleandoc(b.value.value))
    return docs


def _settings_class(model: type) -> Any:
    """The dataclass a :func:`pipeline.settings.pydantic_model` model was built from, if any."""
    settings = getattr(model, "settings", None)
    for cell in getattr(settings, "__closure__", None) or ():
        if dataclasses.is_dataclass(cell.cell_contents):
            return cell.cell_contents
    return None


def _doc(obj: Any) -> str:
    """``obj``'s own docstring (not one inherited from ``BaseModel``, not a dataclass's generated signature)."""
    import inspect

    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not doc or (isinstance(obj, type) and doc.startswith(obj.__name__ + "(")):
        return ""
    return _rst_to_md(inspect.cleandoc(doc))


def _validator_docs(model: type) -> tuple[dict[str, list[str]], list[str]]:
    """The documented rules of ``model``'s validators: per field, and for the model as a whole."""
    decorators = model.__pydantic_decorators__
    per_field: dict[str, list[str]] = {}
    for dec in decorators.field_validators.values():
        doc = _doc(dec.func)
        for name in dec.info.fields if doc else ():
            per_field.setdefault(name, []).append(doc)
    whole = [d for d in (_doc(dec.func) for dec in decorators.model_validators.values()) if d]
    return per_field, whole


def _extra_keys(key: str) -> list[str]:
    """Keys a section accepts beyond its fields, which a validator expands: ``sampler.preset``."""
    if key != "sampler":
        return []
    from pipeline.posterior.sampler import PRESETS

    return [f"Presets: {', '.join(_code(n) for n in PRESETS.names())}.", ""]


class _Walk:
    def __init__(self) -> None:
        self.missing: list[str] = []

    def section(self, model: type, prefix: str, level: int, anchor: str, fields: list[str] | None = None) -> list[str]:
        """One table of ``model``'s plain keys (``fields`` only, if given), then a section per nested model."""
        attr_docs = _attribute_docs(_settings_class(model) or model) | _attribute_docs(model)
        rules, whole = _validator_docs(model)
        rows, nested = [], []
        for name, f in model.model_fields.items():
            if fields is not None and name not in fields:
                continue
            key = f"{prefix}{name}"
            sub = _model_in(f.annotation)
            if sub is not None and typing.get_origin(f.annotation) not in (list, dict):
                nested.append((name, key, sub, f))
                continue
            meaning = " ".join([f.description or attr_docs.get(name, "")] + rules.get(name, [])).strip()
            if not meaning:
                self.missing.append(f"{anchor}: {key}")
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                default = _yaml(f.default_factory())
            else:
                default = _yaml(f.default)
            rows.append((_code(key), _type(f.annotation, _bounds(f.metadata)), default, meaning))
        out = _table(("key", "type", "default", "meaning"), rows) if rows else []
        for text in whole if fields is None else ():
            out += [text, ""]
        for name, key, sub, f in nested:
            text = f.description or attr_docs.get(name, "")
            own = _doc(sub)
            if not text and not own:
                self.missing.append(f"{anchor}: {key}")
            if not f.is_required() and f.default is None and f.default_factory is None:
                text += " The whole section may be `null` (its default)."
            out += [f"{'#' * level} `{key}` {{#{anchor}-{key.replace('.', '-').replace('_', '-')}}}", ""]
            out += [t + "\n" for t in (text.strip(), own) if t]
            out += [t + "\n" for t in rules.get(name, [])]
            out += _extra_keys(key)
            out += self.section(sub, key + ".", level + 1, anchor)
        return out


def config_walk() -> tuple[str, list[str]]:
    """The configuration page and the keys that have no description."""
    import importlib

    walk = _Walk()
    out = [
        "# Configuration reference", "",
        "Generated at build time from the pydantic models that load the YAML config files, so every key, type "
        "and default is the code's. Every section refuses unknown keys. Any key can also be set on the "
        "command line with `--set KEY=VALUE` (the value read as YAML), e.g. `--set sampler.steps=100`; "
        "`--section NAME` picks one top-level mapping of a file that configures several commands "
        "(`configs/celeba_mnist.yaml`: `image_prior`, `noise_prior`, `corrupt`, `clean`). "
        "Where the default is `null`, the meaning says what applies.", "",
        "| config | model | read by |", "|---|---|---|",
    ]
    for anchor, title, module, name, who, _ in CONFIGS:
        out.append(f"| [{title}](#{anchor}) | `{module}.{name}` | {_cell(who)} |")
    out.append("")
    for anchor, title, module, name, who, parts in CONFIGS:
        mod = importlib.import_module(module)
        model = getattr(mod, name)
        out += [f"## {title} {{#{anchor}}}", "", f"Model `{module}.{name}`, read by {who}.", ""]
        out += [_doc(model), ""]
        if not parts:
            out += walk.section(model, "", 3, anchor)
        for part in parts:
            sub = getattr(mod, part)
            out += [f"### {part} {{#{anchor}-{part.lower()}}}", "", _doc(sub), ""]
            out += walk.section(model, "", 4, anchor, fields=list(sub.model_fields))
            out += [d + "\n" for d in _validator_docs(sub)[1]]
    return "\n".join(out), walk.missing


def config_page() -> str:
    return config_walk()[0]


# ---------------------------------------------------------------------------------------------- the API


API = (
    ("pipeline.run", ["members: false"]),  # the package: what each of its modules holds
    ("pipeline.run.run", ["members: [Run, RunFailed, RunInterrupted]"]),  # the run object, which pipeline.run exports
    ("pipeline.posterior.sampler", []),
)
"""The modules documented, each with its mkdocstrings options (beside those of ``mkdocs.yml``)."""


def api_page() -> str:
    out = [
        "# Python API", "",
        "Generated at build time from the docstrings of the package, read from the source (nothing is imported). "
        "The command line is the supported interface; these are the modules to call from Python: the cleaning "
        "run (`from pipeline.run import Run, RunFailed, RunInterrupted`) and the joint posterior sampler.", "",
    ]
    for module, options in API:
        options = [f"toc_label: {module}", *options]  # the table of contents names modules in full
        out += [f"::: {module}", "    options:"] + [f"      {o}" for o in options] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- MkDocs hooks


PAGES: dict[str, Callable[[], str]] = {"reference/cli.md": cli_page, "reference/config.md": config_page,
                                       "reference/api.md": api_page}


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        if files.get_file_from_path(path) is not None:
            raise PluginError(f"docs/{path} is generated at build time (mkdocs_hooks.py); remove the committed file")
        files.append(File.generated(config, path, content=make()))
    return files


# ---------------------------------------------------------------------------------------------- docstrings


_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|term|ref):`([^`]+)`")


def _role(m: re.Match[str]) -> str:
    target = m.group(1)
    label = re.match(r"(.*?)\s*<[^>]+>$", target)
    if label:
        target = label.group(1)
    elif target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return _code(target)


_BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _split(row: str, cols: list[tuple[int, int]]) -> list[str]:
    """A row of a simple table cut at its columns' starts (the last column runs to the end)."""
    return [row[a:(cols[n + 1][0] if n + 1 < len(cols) else len(row))].strip() for n, (a, _) in enumerate(cols)]


def _simple_tables(text: str) -> str:
    """reST simple tables (``====  ====`` borders) as Markdown: a table with a header row when the table has
    one, else a list of ``first column``: the rest."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        cols = [(s.start(), s.end()) for s in re.finditer(r"=+", border)]
        j = i + 1
        while j < len(lines) and lines[j] != border:
            j += 1
        if j == len(lines):
            out.append(lines[i])
            i += 1
            continue
        body = lines[i + 1:j]
        end = j
        header: list[str] | None = None
        if j + 1 < len(lines) and any(lines[k] == border for k in range(j + 1, len(lines))):
            k = next(k for k in range(j + 1, len(lines)) if lines[k] == border)
            header, body, end = body, lines[j + 1:k], k
        rows = [_split(r, cols) for r in body if r.strip()]
        if header is not None:
            head = tuple(" ".join(c) for c in zip(*[_split(h, cols) for h in header]))
            out += [""] + _table(head, [tuple(r) for r in rows])
        else:
            out += [""] + [f"* {r[0]}: {' '.join(r[1:])}" for r in rows] + [""]
        i = end + 1
    return "\n".join(out)


def _rst_to_md(text: str) -> str:
    return _simple_tables(_ROLE.sub(_role, text))


try:
    import griffe
except ImportError:  # only the mkdocs hooks are wanted (griffe comes with mkdocstrings)
    griffe = None

if griffe is not None:

    class RstRoles(griffe.Extension):
        """Griffe extension: the package's reStructuredText docstrings as Markdown (roles, simple tables)."""

        def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = _rst_to_md(obj.docstring.value)


if __name__ == "__main__":
    print("keys without a description:", ", ".join(config_walk()[1]) or "none")
