"""A run's plan, made once on its driver: the input's shards (those complete for this run id are skipped),
the rows that repeat an earlier id, and a check that the configuration would not reject every row.

Repeated ids are decided from the ``id`` column of every input shard, done or not, read alone, in sorted
shard order and row order: the second and later copies of an id are rejected. The answer depends on the
input only, not on which shards a previous session finished, so shards can be cleaned in any order, by any
worker, and a resumed run decides exactly as a fresh one would. A shard whose ids cannot be read (not
Parquet after 3 attempts, or no ``id`` column) is left to the shard's work, which rejects its rows saying why.

:func:`check_inputs` reads the schema and the first rows' image headers of the first pending shard and stops
with a :class:`~pipeline.config.ConfigError` naming the ``--set`` that fixes what would reject every row: an
overlay or composite without an ``alpha`` column or ``forward.alpha`` (a blend's weight is estimated instead:
:mod:`pipeline.posterior.estimate`); images that do not fit the priors and a policy that
would not convert them (``policy.convert_channels``, ``policy.alpha``, ``policy.max_pixels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from pipeline.data.accounting import PlannedShard, input_rows, plan
from pipeline.data.shards import ShardError, read_table
from pipeline.data.storage import local_path, open_fs
from pipeline.data.validate import DOWNSCALE_LIMIT
from pipeline.forward import FORWARD_MODELS
from pipeline.posterior.estimate import ESTIMABLE
from pipeline.run.models import prior_shape
from pipeline.run.rows import peek_image

if TYPE_CHECKING:
    from pipeline.run.run import Run

PREFLIGHT_ROWS = 8  # rows of the first pending shard whose image headers check_inputs reads


@dataclass
class Plan:
    shards: list[PlannedShard]
    duplicates: dict[str, dict[int, str]]  # shard -> {row: reason} for later copies of an id
    rows: dict[str, int]  # rows of each pending shard (an unreadable shard counts as one)


def plan_shards(input_uri: str, run_uri: str) -> Plan:
    """The shards of ``input_uri`` (those with a marker under ``run_uri`` done) and the repeated ids."""
    shards = plan(input_uri, run_uri)
    seen: set[str] = set()
    duplicates: dict[str, dict[int, str]] = {}
    rows: dict[str, int] = {}
    for s in shards:
        try:
            ids = read_table(s.uri, ["id"], attempts=3).column("id").to_pylist()
        except ShardError:  # unreadable, or no id column (MissingColumnError)
            if not s.done:
                rows[s.name] = input_rows(s.uri) or 1
            continue
        if not s.done:
            rows[s.name] = len(ids)
        for row, id_ in enumerate(ids):
            if id_ is None:
                continue
            key = str(id_)
            if key in seen:
                duplicates.setdefault(s.name, {})[row] = f"duplicate id {key!r} (an earlier row of this run has it)"
            seen.add(key)
    return Plan(shards, duplicates, rows)


def check_inputs(run: Run) -> None:
    """Stop before any work when the configuration would reject every row: a :class:`ConfigError` of one
    line that names the ``--set`` to add.

    Cheap and on the driver: the schema of the first pending shard and the image headers of its first
    :data:`PREFLIGHT_ROWS` rows. It stops when a model whose weight cannot be estimated has neither
    ``forward.alpha`` nor an ``alpha`` column, or when none of the rows read fits the priors' size and channel
    count under ``policy`` and a policy setting would convert them; a dataset with a few odd rows goes ahead (they
    are rejected one by one). A shard that cannot be read, or has no ``observation`` column, is left to
    the shard's work (its rows become error rows that say why)."""
    import pyarrow.parquet as pq

    if not run.pending:
        return
    shard = run.pending[0]
    fs, path = open_fs(shard.uri)
    cells: list[tuple[Any, Any]] = []
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "observation" in names and pf.metadata.num_rows:  # the first rows' image headers
                cols = [c for c in ("id", "observation") if c in names]
                batch = next(pf.iter_batches(batch_size=PREFLIGHT_ROWS, columns=cols, use_threads=False))
                ids = batch.column("id").to_pylist() if "id" in names else [None] * batch.num_rows
                cells = list(zip(ids, batch.column("observation").to_pylist()))
    except Exception:
        return
    if "observation" not in names:  # not an observation shard: the shard's work rejects its rows, saying so
        return
    cfg = run.cfg
    problems, fixes = [], []
    weight = FORWARD_MODELS[cfg.forward.name].weight
    if weight is not None and cfg.forward.alpha is None and "alpha" not in names and cfg.forward.name not in ESTIMABLE:
        problems.append(f"it has no 'alpha' column and forward.alpha is not set (the {cfg.forward.name} model "
                        f"needs the noise's weight {weight})")
        fixes.append("--set forward.alpha=0.5")
    channels, size = prior_shape(cfg.priors.image)
    p = cfg.policy
    fits, needs = 0, {}  # needs: the --set -> why, for the first row that needs it
    heads = [(id_, peek_image(cell)) for id_, cell in cells]
    largest = max((head[4] for _, head in heads if head is not None), default=0)
    sized = [min(head[4], p.max_pixels) for _, head in heads if head is not None]
    run.mean_pixels = sum(sized) / len(sized) if sized else None  # for the time estimate (pipeline.run.shard)
    for id_, head in heads:
        if head is None:
            continue
        h, w, c, alpha, pixels = head
        mine = {}
        if pixels > p.decode_pixels:  # one fix for all: the largest image read
            fix = f"--set policy.max_pixels={largest}" + (" (or policy.oversize=downscale)" if p.oversize == "refuse"
                                                           and largest <= p.max_pixels * DOWNSCALE_LIMIT else "")
            mine[fix] = f"{pixels:,} pixels, over policy.max_pixels={p.max_pixels:,}"
        if alpha and p.alpha == "error":
            mine["--set policy.alpha=drop"] = "an alpha channel, and policy.alpha is 'error'"
        if c == 3 and channels == 1 and not p.convert_channels:
            mine["--set policy.convert_channels=true"] = f"{c} channel(s), and policy.convert_channels is off"
        fits += not mine
        for fix, why in mine.items():
            needs.setdefault(fix, f"{id_}: {why}" if id_ is not None else why)
    if needs and not fits:
        problems.append(f"none of its first {len(cells)} images fits the priors ({channels}x{size}x{size} tiles) "
                        f"under the input policy ({'; '.join(needs.values())})")
        fixes += list(needs)
    if problems:
        raise ConfigError(f"{local_path(run.dataset)}: every row of {shard.name} would be rejected: "
                          f"{'; '.join(problems)}. Add {' '.join(fixes)}")
