"""``jointdiff bench speed``: where a cleaning run's time goes, every figure measured side by side in one run.

1. **The compute floor.** The networks alone: per step, a forward pass of both priors and (for rules
   that need it) the vector-Jacobian product through both, for ``steps`` steps at batch ``B``. Against
   it, the whole joint sampler as the product runs it (:class:`~pipeline.posterior.denoise.Denoiser`:
   per-image noise streams, guidance, the solver's update, the final projection) at the same steps and
   batch. Their ratio is the sampler's overhead; timings alternate floor and sampler and keep each
   one's median, so a busy machine slows both alike.
2. **Images/s** against batch size (1, 8, 32, 128) and against guidance rule (batch 32), timed over
   ``steps`` steps and also stated per image at the default step count (the cost of a step does not
   depend on how many there are).
3. **Ray against one process.** The same observation shards cleaned by ``jointdiff denoise`` (this
   process, ``threads`` threads) and by the Ray job (``jointdiff clean`` with its own CPU actor layout,
   on an in-process local Ray of ``threads`` CPUs), alternately (twice each; once with ``--quick``):
   images/s with start-up (whole wall time) and without it (first shard's start to last shard's end,
   on each side), from each side's fastest run.
4. **Peak memory** (resident set) of the Ray actor and of this process, and CUDA memory when on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.quality import SCENARIOS, observations
from pipeline.diffusion.checkpoint import load_model
from pipeline.forward import make_forward
from pipeline.posterior.denoise import Denoiser
from pipeline.posterior.guidance import RULES
from pipeline.posterior.sampler import SamplerSettings
from pipeline.posterior.tuned import BENCH_SETTING, resolve_weights
from pipeline.priors import resolve_model

BATCHES = (1, 8, 32, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_floor(x_model: torch.nn.Module, n_model: torch.nn.Module, sde: Any, batch: int, steps: int,
                  device: torch.device, backward: bool = True) -> float:
    """Seconds for ``steps`` evaluations of both networks at ``batch`` (with the vector-Jacobian product
    through each when ``backward``): the work no sampler can avoid."""
    size, ch = x_model.config.image_size, x_model.config.channels
    x = torch.randn(batch, ch, size, size, device=device)
    n = torch.randn(batch, ch, size, size, device=device)
    vx, vn = torch.randn_like(x), torch.randn_like(n)
    ts = sde.timesteps(steps - 1, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        t = ts[i].expand(batch)
        if backward:
            with torch.enable_grad():
                xg, ng = x.requires_grad_(True), n.requires_grad_(True)
                ex, en = x_model(xg, t), n_model(ng, t)
                torch.autograd.grad((ex * vx).sum() + (en * vn).sum(), [xg, ng])
            x, n = x.detach(), n.detach()
        else:
            with torch.no_grad():
                x_model(x, t), n_model(n, t)
    _sync(device)
    return time.perf_counter() - t0


def default_rules() -> list[str]:
    """The registered guidance rules that run with the sampler's own solvers (not a preset's, like ``paper``)."""
    from pipeline.posterior.sampler import PRESETS

    return [r for r in RULES.names() if r not in {p["rule"] for p in (PRESETS[n] for n in PRESETS)}]


def settings_for(rule: str, steps: int) -> SamplerSettings:
    """The sampler the product would run for ``rule`` at ``steps`` on the main scenario (tuned weights)."""
    return resolve_weights(SamplerSettings(rule=rule, steps=steps), *BENCH_SETTING)[0]


def sampler_seconds(x_model: torch.nn.Module, n_model: torch.nn.Module, sde: Any, y: torch.Tensor,
                    settings: SamplerSettings, device: torch.device) -> float:
    """Seconds for the :class:`Denoiser` (the product's path) on the batch ``y``."""
    denoiser = Denoiser(x_model, n_model, sde, settings)
    ids = [f"bench-{i}" for i in range(len(y))]
    y = y.to(device)
    forward = make_forward("blend", len(y), alpha=0.5)
    _sync(device)
    t0 = time.perf_counter()
    denoiser(ids, y, forward)
    _sync(device)
    return time.perf_counter() - t0


def _observations(n: int) -> Any:
    """The quality benchmark's main-scenario test observations (32x32, what the shipped priors take)."""
    return observations(SCENARIOS[0], "test", n)


def overhead(x_model: Any, n_model: Any, sde: Any, batch: int, steps: int, rule: str, device: torch.device,
             repeats: int) -> dict[str, Any]:
    """Floor and sampler timed alternately ``repeats`` times; medians and their ratio."""
    y = torch.from_numpy(_observations(batch).observation)
    cfg = settings_for(rule, steps)
    backward = RULES[rule].backward
    compute_floor(x_model, n_model, sde, batch, 2, device, backward)  # warm-up (allocator, kernels)
    sampler_seconds(x_model, n_model, sde, y[:batch], dataclasses.replace(cfg, steps=2), device)
    floors, samplers = [], []
    for _ in range(repeats):
        floors.append(compute_floor(x_model, n_model, sde, batch, steps, device, backward))
        samplers.append(sampler_seconds(x_model, n_model, sde, y, cfg, device))
    f, s = statistics.median(floors), statistics.median(samplers)
    return {"batch": batch, "steps": steps, "rule": rule, "floor_s": f, "sampler_s": s, "ratio": s / f,
            "floor_runs": floors, "sampler_runs": samplers}


def throughput(x_model: Any, n_model: Any, sde: Any, batch: int, steps: int, rule: str, device: torch.device,
               per_image_steps: int) -> dict[str, Any]:
    y = torch.from_numpy(_observations(batch).observation)
    cfg = settings_for(rule, steps)
    sampler_seconds(x_model, n_model, sde, y, dataclasses.replace(cfg, steps=2), device)  # warm-up
    sec = sampler_seconds(x_model, n_model, sde, y, cfg, device)
    per_step = sec / steps
    return {"batch": batch, "rule": rule, "steps": steps, "seconds": sec, "images_per_s": batch / sec,
            "nfe_default": per_image_steps, "images_per_s_at_default": batch / (per_step * per_image_steps)}


def ray_vs_single(n_images: int, shard_size: int, steps: int, threads: int, log: Callable[[str], None],
                  repeats: int = 1) -> dict[str, Any]:
    """The same shards through ``run_local`` (``threads`` threads) and the Ray job (its own CPU actor
    layout on a local Ray of ``threads`` CPUs), alternately ``repeats`` times; each side's figures are from
    its fastest run (the run least disturbed by the rest of the machine), and every run is listed."""
    from pipeline.config import CleanConfig, RayConfig, SamplerConfig
    from pipeline.data.corrupt import write_observations
    from pipeline.jobs.clean import run_clean
    from pipeline.run.local import run_local

    def span(shards: list[dict[str, Any]]) -> float:
        return max(s["finished"] for s in shards) - min(s["started"] for s in shards)

    runs: dict[str, list[dict[str, Any]]] = {"single": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="jointdiff-bench-speed-") as tmp:
        write_observations(f"{tmp}/obs", _observations(n_images), shard_size=shard_size)
        sampler = SamplerConfig(steps=steps)
        single_cfg = CleanConfig(sampler=sampler, device="cpu", threads=threads)
        # the Ray job's own CPU layout (jobs.clean.actor_layout) on a local Ray of `threads` CPUs
        ray_cfg = CleanConfig(sampler=sampler, device="cpu", ray=RayConfig(gpus_per_actor=0))
        prev = torch.get_num_threads()
        for k in range(repeats):
            for side in ("single", "ray"):
                out_uri = f"{tmp}/{side}-{k}"
                t0 = time.perf_counter()
                if side == "single":
                    res = run_local(f"{tmp}/obs", out_uri, single_cfg, progress=False)
                    torch.set_num_threads(prev)
                else:
                    import ray

                    started = not ray.is_initialized()  # a Ray this process already runs is used as it is
                    if started:
                        ray.init(address="local", num_cpus=threads, include_dashboard=False)
                    ray_cpus = int(ray.cluster_resources().get("CPU", threads))
                    try:
                        res = run_clean(f"{tmp}/obs", out_uri, ray_cfg, progress=False)
                    finally:
                        if started:
                            ray.shutdown()
                wall = time.perf_counter() - t0
                shards = res["job"]["shards"]
                runs[side].append({"images": res["cleaned"], "shards": len(shards), "wall_s": wall,
                                   "span_s": span(shards), "peak_rss_mb": max(s["peak_rss_mb"] for s in shards),
                                   "peak_cuda_mb": max(s.get("peak_cuda_mb", 0.0) for s in shards),
                                   "actors": res["job"].get("actors") or 1,
                                   "threads_per_actor": res["job"].get("threads_per_actor") or threads,
                                   "cpus": ray_cpus if side == "ray" else threads})
                r = runs[side][-1]
                log(f"  {'single process' if side == 'single' else 'Ray job':14s} run {k + 1}/{repeats}: "
                    f"{r['images']} images, {r['span_s']:.1f} s from first shard to last ({r['wall_s']:.1f} s "
                    "with start-up)")
    single = min(runs["single"], key=lambda r: r["span_s"])
    ray = min(runs["ray"], key=lambda r: r["span_s"])
    out = {"images": single["images"], "shards": single["shards"], "steps": steps, "threads": threads,
           "ray_actors": ray["actors"], "ray_threads_per_actor": ray["threads_per_actor"], "ray_cpus": ray["cpus"],
           "repeats": repeats, "runs": runs,
           "single_wall_s": min(r["wall_s"] for r in runs["single"]),
           "ray_wall_s": min(r["wall_s"] for r in runs["ray"]),
           "single_span_s": single["span_s"], "ray_span_s": ray["span_s"],
           "ray_actor_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ray"]),
           "ray_actor_peak_cuda_mb": max(r["peak_cuda_mb"] for r in runs["ray"]),
           "single_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["single"])}
    out["single_images_per_s"] = single["images"] / out["single_span_s"]
    out["ray_images_per_s"] = ray["images"] / out["ray_span_s"]
    out["single_images_per_s_with_startup"] = single["images"] / out["single_wall_s"]
    out["ray_images_per_s_with_startup"] = ray["images"] / out["ray_wall_s"]
    out["ratio"] = out["ray_images_per_s"] / out["single_images_per_s"]
    out["ratio_with_startup"] = out["ray_images_per_s_with_startup"] / out["single_images_per_s_with_startup"]
    return out


def speed(quick: bool = False, steps: int | None = None, batches: tuple[int, ...] | None = None,
          rules: list[str] | None = None, threads: int | None = None, device: str = "cpu",
          repeats: int | None = None, image_prior: str = "faces", noise_prior: str = "digits",
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the speed benchmark; returns the JSON document (figures under the keys docs/bench/speed.md names)."""
    t_start = time.perf_counter()
    dev = torch.device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    steps = steps or (3 if quick else 20)
    batches = batches or ((1, 8) if quick else BATCHES)
    rules = rules or default_rules()
    repeats = repeats or (1 if quick else 3)
    per_image_steps = SamplerSettings().steps
    x_model, sde, _ = load_model(resolve_model(image_prior), device=dev)
    n_model, _, _ = load_model(resolve_model(noise_prior), device=dev)
    floor_batch = 8 if quick else 32
    log(f"compute floor vs sampler: batch {floor_batch}, {steps} steps, {repeats} alternating run(s)")
    floor = {r: overhead(x_model, n_model, sde, floor_batch, steps, r, dev, repeats) for r in rules}
    for r, f in floor.items():
        log(f"  {r:10s} networks {f['floor_s']:.3f} s, sampler {f['sampler_s']:.3f} s: {f['ratio']:.3f}x")
    log(f"images/s by batch size (dps, {steps} steps)")
    by_batch = []
    for b in batches:
        by_batch.append(throughput(x_model, n_model, sde, b, steps, "dps", dev, per_image_steps))
        log(f"  batch {b:4d}: {by_batch[-1]['images_per_s']:.2f} images/s")
    log(f"images/s by rule (batch {floor_batch}, {steps} steps)")
    by_rule = [throughput(x_model, n_model, sde, floor_batch, steps, r, dev, per_image_steps) for r in rules]
    log("Ray job against one process (same shards, same threads)")
    rv = ray_vs_single(8 if quick else 64, 4 if quick else 16, 3 if quick else 50, threads, log,
                       repeats=1 if quick else 2)
    doc = {
        "meta": {"command": "jointdiff bench speed" + (" --quick" if quick else ""), "device": str(dev),
                 "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
                 "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
                 "date": time.strftime("%Y-%m-%d"), "steps_timed": steps, "nfe_default": per_image_steps,
                 "seconds": None, "priors": [image_prior, noise_prior]},
        "overhead_ratio": floor["dps"]["ratio"] if "dps" in floor else next(iter(floor.values()))["ratio"],
        "overhead": floor,
        "images_per_s": {"by_batch": {str(r["batch"]): r["images_per_s"] for r in by_batch},
                         "by_rule": {r["rule"]: r["images_per_s"] for r in by_rule},
                         "by_batch_at_default_nfe": {str(r["batch"]): r["images_per_s_at_default"] for r in by_batch},
                         "by_rule_at_default_nfe": {r["rule"]: r["images_per_s_at_default"] for r in by_rule}},
        "throughput_rows": by_batch + by_rule,
        "ray_vs_single_ratio": rv["ratio"],
        "ray_vs_single_ratio_with_startup": rv["ratio_with_startup"],
        "ray_vs_single": rv,
        "peak_memory_mb": {"ray_actor_rss": rv["ray_actor_peak_rss_mb"], "single_process_rss": rv["single_peak_rss_mb"],
                           "ray_actor_cuda": rv["ray_actor_peak_cuda_mb"]},
    }
    doc["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    return doc


def table(doc: dict[str, Any]) -> str:
    """The benchmark's figures as Markdown tables."""
    m = doc["meta"]
    lines = [f"Compute floor against the sampler (batch {next(iter(doc['overhead'].values()))['batch']}, "
             f"{m['steps_timed']} steps, {m['threads']} threads, {m['device']}):", "",
             "| rule | networks alone (s) | joint sampler (s) | overhead |", "| --- | ---: | ---: | ---: |"]
    for r, f in doc["overhead"].items():
        lines.append(f"| {r} | {f['floor_s']:.3f} | {f['sampler_s']:.3f} | {f['ratio']:.3f}x |")
    lines += ["", f"Images/s (timed over {m['steps_timed']} steps; per image at the default {m['nfe_default']} NFE):",
              "", "| batch | rule | images/s at the timed steps | images/s at the default NFE |",
              "| ---: | --- | ---: | ---: |"]
    for r in doc["throughput_rows"]:
        lines.append(f"| {r['batch']} | {r['rule']} | {r['images_per_s']:.2f} | {r['images_per_s_at_default']:.3f} |")
    rv = doc["ray_vs_single"]
    lines += ["", f"Ray job against one process ({rv['images']} images in {rv['shards']} shards, {rv['steps']} steps, "
              f"one process of {rv['threads']} threads against a Ray of {rv['ray_cpus']} CPUs: "
              f"{rv['ray_actors']} actor(s) of {rv['ray_threads_per_actor']} thread(s); fastest of "
              f"{rv['repeats']} alternating run(s) per side):", "",
              "| | one process | Ray job | Ray / one process |", "| --- | ---: | ---: | ---: |",
              f"| images/s without start-up | {rv['single_images_per_s']:.3f} | {rv['ray_images_per_s']:.3f} | "
              f"{rv['ratio']:.3f} |",
              f"| images/s with start-up | {rv['single_images_per_s_with_startup']:.3f} | "
              f"{rv['ray_images_per_s_with_startup']:.3f} | {rv['ratio_with_startup']:.3f} |",
              f"| peak resident memory (MiB) | {rv['single_peak_rss_mb']:.0f} (whole process) | "
              f"{rv['ray_actor_peak_rss_mb']:.0f} (actor) | |"]
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
