"""The run's row of the run history (:mod:`pipeline.summary`): counts from the accounting, metric aggregates over the
cleaned images of the run's plan, the pinned models and the recipe's hash."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.data.accounting import Accounting
from pipeline.data.storage import join
from pipeline.summary import read_parts, stats

if TYPE_CHECKING:
    from pipeline.run.run import Run


def summary_row(run: Run, acc: Accounting, processed: int, executor: str, wall_seconds: float) -> dict[str, Any]:
    """The run's summary row (see the module docstring for what each aggregate covers)."""
    metrics = read_parts(join(run.run_uri, "metrics"))
    if metrics is not None:  # the run's plan only: not the outputs of shards removed from the input (orphaned)
        import pyarrow.compute as pc

        planned = [s.name for s in run.shards if s.name not in acc.orphaned]
        metrics = metrics.filter(pc.is_in(metrics.column("shard"), pa.array(planned, pa.string())))

    def col(name: str) -> list[Any]:
        return metrics.column(name).to_pylist() if metrics is not None and name in metrics.column_names else []
    psnr, ssim = stats(col("psnr")), stats(col("ssim"))
    return {
        "run_id": run.run_id, "started_at": run.started_at.replace(microsecond=0),
        "finished_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0), "dataset": run.dataset,
        "inputs": acc.inputs, "cleaned": acc.cleaned, "errors": acc.errors, "processed": processed,
        "psnr_mean": psnr[0], "psnr_median": psnr[1], "psnr_p05": psnr[2],
        "ssim_mean": ssim[0], "ssim_median": ssim[1], "ssim_p05": ssim[2],
        "psnr_input_mean": stats(col("psnr_input"))[0], "ssim_input_mean": stats(col("ssim_input"))[0],
        "residual_mean": stats(col("residual"))[0], "spread_mean": stats(col("spread"))[0],
        "removed_energy_mean": stats(col("removed_energy"))[0],
        **_alpha_stats(col("alpha"), col("alpha_hat"), col("alpha_error")),
        "wall_seconds": float(wall_seconds),
        "images_per_s": processed / wall_seconds if wall_seconds > 0 and processed else None,
        "nfe": _nfe(run, col("nfe")),
        "models": json.dumps({"image": run.pinned.image.ref, "noise": run.pinned.noise.ref,
                              **({"supervised": run.pinned.supervised.ref} if run.pinned.supervised else {})}),
        "sampler": json.dumps(run.cfg.sampler.model_dump(mode="json"), sort_keys=True),
        "config_hash": run.config_hash, "executor": executor, "output": run.run_uri,
        # not a history column: how many rows each path cleaned (sampler.path fast / routed), for the printed summary
        "paths": {p: col("path").count(p) for p in sorted(set(col("path")))} if run.cfg.sampler.path != "joint"
        else None,
    }


def _nfe(run: Any, per_row: list[Any]) -> int:
    """Network evaluations per image: the sampler's steps times its posterior samples; under ``sampler.path`` fast
    or routed, the rows' mean over every network (1 for the network alone; more where the noise prior estimated the
    weight, the router checked the answer or sent the image on), rounded."""
    if run.cfg.sampler.path == "joint" or not per_row:
        return run.cfg.sampler.nfe * run.cfg.sampler.n_samples
    return round(sum(per_row) / len(per_row))


def _alpha_stats(alpha: list[Any], hat: list[Any], err: list[Any]) -> dict[str, Any]:
    """How many images had their weight estimated (none given, or ``forward.alpha: auto``: an error against the
    given one), the estimates' median and the errors' median."""
    est = [h for a, h, e in zip(alpha, hat, err) if h is not None and (a is None or e is not None)]
    return {"alpha_estimated": len(est), "alpha_hat_median": stats(est)[1],
            "alpha_error_median": stats([e for e in err if e is not None])[1]}
