"""A recorded run's verdict: it fails (:class:`~pipeline.data.accounting.RejectedRowsError`, exit 4) when it
rejected more than ``max_rejected_fraction`` of its input rows, or cleaned none, with the reasons grouped
(row-specific parts normalised) and the most frequent first. The counts are the whole run's, so a resumed
run is judged as a whole; the verdict comes after the outputs, summary row and report are written."""

from __future__ import annotations

import re
from typing import Any

from pipeline.data.accounting import RejectedRowsError
from pipeline.data.shards import list_parts, read_table
from pipeline.data.storage import join

MAX_REASON_GROUPS = 10
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def reason_key(stage: str, reason: str) -> str:
    """What a reason says with its row-specific parts (quoted ids and values, numbers) normalised, so
    that ``512x512 pixels`` and ``300x451 pixels`` fall in one group."""
    return f"{stage}: " + _NUMBER.sub("#", _QUOTED.sub("'…'", reason or ""))


def reason_groups(run_uri: str) -> list[dict[str, Any]]:
    """The run's error rows grouped by :func:`reason_key`, most frequent first (then in shard and row
    order): ``rows``, ``stage``, ``reason`` and ``id`` of the first row of the group, ``variants``
    (distinct reasons in the group)."""
    groups: dict[str, dict[str, Any]] = {}
    for part in list_parts(join(run_uri, "errors")):
        t = read_table(part, ["id", "stage", "reason"], attempts=3)
        for id_, stage, reason in zip(*(t.column(c).to_pylist() for c in ("id", "stage", "reason"))):
            g = groups.setdefault(reason_key(stage, reason), {"rows": 0, "stage": stage, "reason": reason,
                                                              "id": id_, "seen": set()})
            g["rows"] += 1
            g["seen"].add(reason)
    out = [{**{k: v for k, v in g.items() if k != "seen"}, "variants": len(g["seen"])} for g in groups.values()]
    return sorted(out, key=lambda g: -g["rows"])  # stable: equal counts keep shard and row order


def judge(summary: dict[str, Any], max_rejected_fraction: float) -> None:
    """Raise :class:`RejectedRowsError` when the recorded run (its ``summary`` row, with ``output``: the run's
    URI) rejected more than ``max_rejected_fraction`` of its input rows, or cleaned none."""
    inputs, errors, cleaned = summary["inputs"], summary["errors"], summary["cleaned"]
    limit = max_rejected_fraction
    if not inputs or (cleaned and errors <= limit * inputs):
        return
    why = "no row was cleaned" if not cleaned else f"more than max_rejected_fraction={limit:g}"
    groups = reason_groups(summary["output"])
    lines = [f"run {summary['run_id']}: {errors} of {inputs} input rows rejected ({errors / inputs:.0%}), "
             f"{cleaned} cleaned: {why}. Reasons, most frequent first:"]
    for g in groups[:MAX_REASON_GROUPS]:
        example = f"e.g. id {g['id']!r}" if g["id"] is not None else "e.g. a whole shard"
        vary = f"; {g['variants']} variants of this reason" if g["variants"] > 1 else ""
        lines.append(f"  {g['rows']:>6} x {g['stage']}: {g['reason']}  ({example}{vary})")
    rest = groups[MAX_REASON_GROUPS:]
    if rest:
        lines.append(f"  ... and {sum(g['rows'] for g in rest)} more row(s) for {len(rest)} other reason(s)")
    lines.append(f"every rejected row, with its id and reason: {summary['output']}/errors/ "
                 f"(the run's outputs and summary row are written)")
    raise RejectedRowsError("\n".join(lines), summary)
