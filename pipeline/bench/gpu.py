"""``jointdiff bench gpu``: the joint sampler on one GPU, in the paper's setting, in one prepared script.

Run it on a GPU machine that has nothing but torch (and numpy) installed::

    python pipeline/bench/gpu.py --json docs/bench/gpu.json        # about 5 minutes on one H200
    python pipeline/bench/gpu.py --quick                          # seconds, on a CPU (the CI smoke test)

It imports only torch and the plain-torch parts of this package (``pipeline.diffusion.nets``,
``pipeline.diffusion.sde``, ``pipeline.forward``, ``pipeline.posterior.sampler`` and its guidance, the
settings dataclasses ``NetConfig`` and ``SamplerSettings``): the very U-Net and the very sampler (both
forwards, Tweedie, the residual, the vector-Jacobian product through both networks, the Euler-Maruyama update,
per-image noise streams, the final projection) that ``jointdiff clean`` runs, without pydantic, Ray, Prefect
or pyarrow.

What it measures, printing each figure with a timestamp as it goes and rewriting ``--json`` after
every stage (a run cut short still leaves what it got):

1. **Reference**: the FLOP/s of a large bf16 matrix product on the card (8192^3), next to the 790
   TFLOP/s such a product reaches on an H200.
2. **The networks**: two U-Nets of the paper's size (64x64 RGB, ~9M parameters each, random weights:
   no downloads), and their FLOPs per image per step counted by ``torch.utils.flop_counter``: forward
   plus the vector-Jacobian product (gradient with respect to the input only).
3. **Batch**: sized from the free GPU memory (:func:`pipeline.posterior.core.auto_batch_size`: one step's
   peak measured at two small batches), capped by ``--max-batch``.
4. **The sampler** (``dps``, Euler-Maruyama, blend alpha 0.5) at 600 and 100 NFE, per setting: ``eager``
   (bf16 autocast + channels-last) and ``compiled`` (the same under ``torch.compile``; skipped with the
   error if compiling fails), then ``fp32`` (eager, float32, contiguous) over a few steps for contrast.
   Each gives images/s, peak memory (``torch.cuda.max_memory_allocated``) and the networks' achieved
   FLOP/s (their FLOPs over the sampler's wall time) as a fraction of 790 TFLOP/s. A run whose
   predicted time does not fit the budget runs fewer steps and is marked ``extrapolated`` (a step costs
   the same at every noise level, so images/s at N NFE is the per-step figure over N).
5. **The floor**: both networks' forward + vector-Jacobian product alone, no sampler around them, in the
   best setting: how much of the sampler's time is the networks.

A wall-clock budget (``--budget-s``, default 330 s) keeps the whole run under 6 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(ROOT))

from pipeline.diffusion.nets import NetConfig, UNet, count_parameters  # noqa: E402
from pipeline.diffusion.sde import VPSDE  # noqa: E402
from pipeline.forward import ForwardModel, make_forward  # noqa: E402
from pipeline.posterior.core import Runtime, auto_batch_size  # noqa: E402
from pipeline.posterior.guidance import GuidedDenoiser  # noqa: E402
from pipeline.posterior.sampler import Noise, SamplerSettings, project, solve  # noqa: E402

H200_BF16_FLOPS = 790e12  # what a large bf16 matrix product reaches on one H200
# configs/celeba_mnist.yaml: the paper's two U-Nets (~9M parameters each) for 64x64 RGB
PAPER_NET = dict(image_size=64, channels=3, base_channels=64, channel_mults=[1, 2, 2, 2], num_res_blocks=2,
                 attention_resolutions=[16], dropout=0.1)
QUICK_NET = dict(image_size=32, channels=3, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                 attention_resolutions=[16], dropout=0.0)
# the sampler of configs/celeba_mnist.yaml's clean section
SAMPLER = dict(rule="dps", lambda_x=7.0, kappa_n=3.5, schedule="constant", solver="euler-maruyama")


class Bench:
    """The run's log, JSON document and clock."""

    def __init__(self, json_path: str | None, budget_s: float):
        self.t0 = time.perf_counter()
        self.json_path = json_path
        self.budget_s = budget_s
        self.doc: dict[str, Any] = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                    "complete": False}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 2)
        if self.json_path:
            path = Path(self.json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.doc, indent=2, default=float) + "\n")
            os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype, seconds: float = 1.0) -> dict[str, Any]:
    """Achieved FLOP/s of ``A @ B`` (n x n, ``dtype``) over about ``seconds`` (after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(5):
            a @ b
        reps += 5
        _sync(device)
        if time.perf_counter() - t0 >= seconds:
            break
    s = time.perf_counter() - t0
    flops = 2.0 * n**3 * reps / s
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "reps": reps, "seconds": s, "flops_per_s": flops}


def count_flops(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> dict[str, int]:
    """FLOPs per image of one forward and of its vector-Jacobian product with respect to the input
    (``torch.utils.flop_counter``; float32 here: the count does not depend on precision)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *shape, device=device, requires_grad=True)
    t = torch.full((1,), 0.5, device=device)
    with torch.enable_grad():
        with FlopCounterMode(display=False) as fc:
            out = model(x, t)
        forward = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            torch.autograd.grad(out, x, grad_outputs=torch.randn_like(out))
        backward = fc.get_total_flops()
    return {"forward": int(forward), "backward": int(backward), "total": int(forward + backward)}


def build_nets(spec: dict[str, Any], device: torch.device, seed: int = 0) -> tuple[UNet, UNet]:
    """The image and the noise prior: random weights (as initialised for training), eval mode, no
    weight gradients (the sampler differentiates with respect to its inputs only)."""
    nets = []
    for k in range(2):
        torch.manual_seed(seed + k)
        net = UNet(NetConfig(**spec)).to(device).eval()
        net.requires_grad_(False)
        nets.append(net)
    return nets[0], nets[1]


def blend(batch: int, device: torch.device) -> ForwardModel:
    return make_forward("blend", batch, alpha=0.5).to(device)


def observations(batch: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, n = torch.rand(batch, *shape, generator=g), torch.rand(batch, *shape, generator=g)
    return blend(batch, torch.device("cpu")).apply(x, n).to(device)


def denoiser(nets: tuple[Any, Any], sde: VPSDE, y: torch.Tensor, steps: int) -> GuidedDenoiser:
    settings = SamplerSettings(steps=steps, **SAMPLER)
    return GuidedDenoiser(nets[0], nets[1], sde, blend(y.shape[0], y.device), y, settings)


def sample(nets: tuple[Any, Any], sde: VPSDE, y: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's sampler (``joint_sample`` less its metrics): per-image noise streams, ``steps``
    guided steps, the final projection; returns ``(x, n)`` in [0, 1]."""
    d = denoiser(nets, sde, y, steps)
    x, n = solve(d, Noise(list(range(y.shape[0])), None, y.device))
    return project(d.forward, y, (x + 1) / 2, (n + 1) / 2)


def timed_sampler(b: Bench, name: str, nets: tuple[Any, Any], sde: VPSDE, y: torch.Tensor, nfe: int,
                  step_s: float, flops_step_image: int, device: torch.device, share: float) -> dict[str, Any]:
    """One sampler run at ``nfe`` steps, or fewer (marked extrapolated) when the predicted time
    (``nfe * step_s``) exceeds ``share`` of what is left of the budget."""
    allowed = max(0.0, b.left() * share)
    steps = nfe if nfe * step_s <= allowed else max(2, int(allowed / max(step_s, 1e-9)))
    steps = min(steps, nfe)
    _reset_peak(device)
    t0 = time.perf_counter()
    x, n = sample(nets, sde, y, steps)
    _sync(device)
    s = time.perf_counter() - t0
    per_step = s / steps
    batch = y.shape[0]
    ips = batch / (per_step * nfe)
    flops = flops_step_image * batch / per_step
    row = {"setting": name, "nfe": nfe, "steps_run": steps, "extrapolated": steps < nfe, "batch": batch,
           "seconds": s, "seconds_per_step": per_step, "images_per_s": ips,
           "network_flops_per_s": flops, "fraction_of_790T": flops / H200_BF16_FLOPS,
           "peak_memory_mb": _peak_mb(device), "finite": bool(torch.isfinite(x).all() and torch.isfinite(n).all())}
    b.log(f"{name:9s} {nfe:4d} NFE: {ips:9.2f} images/s (batch {batch}, {steps} steps in {s:.1f} s"
          f"{', extrapolated' if steps < nfe else ''}), networks at {flops / 1e12:.2f} TFLOP/s = "
          f"{100 * flops / H200_BF16_FLOPS:.1f}% of 790 TFLOP/s"
          + (f", peak {row['peak_memory_mb']:.0f} MiB" if row["peak_memory_mb"] is not None else ""))
    return row


def step_seconds(nets: tuple[Any, Any], sde: VPSDE, y: torch.Tensor, device: torch.device, steps: int) -> float:
    """Seconds per sampler step (after the first call, which pays for warm-up or compilation)."""
    sample(nets, sde, y, 2)
    _sync(device)
    t0 = time.perf_counter()
    sample(nets, sde, y, steps)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def floor(nets: tuple[Any, Any], sde: VPSDE, y: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds per step of the networks alone: both forwards and the vector-Jacobian product through
    each (the DPS loss), with no noise draws, update or bookkeeping around them."""
    d = denoiser(nets, sde, y, steps)
    x, n = torch.randn_like(y), torch.randn_like(y)
    t = torch.full((y.shape[0],), 0.5, device=device)
    dt = torch.tensor(1.0 / steps, device=device)
    d(x, n, t, dt)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        d(x, n, t, dt)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    b = Bench(args.json, args.budget_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    quick = args.quick
    nfes = [int(v) for v in (args.nfe or ("3,2" if quick else "600,100")).split(",")]
    compile_on = {"on": True, "off": False, "auto": cuda and not quick}[args.compile]
    if args.threads or (quick and not cuda):
        torch.set_num_threads(args.threads or 1)  # --quick is a smoke test on a shared CPU: stay light
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "device": str(device), "quick": quick}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   memory_total_gb=total / 2**30, memory_free_gb=free / 2**30)
        torch.backends.cudnn.benchmark = True  # as the product's GPU workers set it (pipeline.run.shard)
    else:
        env.update(threads=torch.get_num_threads())
    b.doc["env"] = env
    b.log(f"jointdiff bench gpu on {env.get('gpu', device)} (torch {torch.__version__}); budget {args.budget_s:.0f} s")
    b.save()

    # 1. the card's reference
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    b.doc["matmul"] = matmul_flops(device, args.matmul_n or (256 if quick else 8192), mm_dtype,
                                   seconds=0.2 if quick else 1.0)
    b.log(f"matmul {b.doc['matmul']['n']}^3 {b.doc['matmul']['dtype']}: "
          f"{b.doc['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s (790 expected of a large bf16 product on an H200)")
    b.save()

    # 2. the networks and their FLOPs
    spec = QUICK_NET if quick else PAPER_NET
    shape = (spec["channels"], spec["image_size"], spec["image_size"])
    nets = build_nets(spec, device)
    params = count_parameters(nets[0])
    fl = [count_flops(net, shape, device) for net in nets]
    flops_step_image = sum(f["total"] for f in fl)
    b.doc["networks"] = {"config": spec, "parameters_each": params,
                         "flops_per_image": {"forward": fl[0]["forward"], "vjp": fl[0]["backward"]},
                         "flops_per_image_step_both": flops_step_image}
    b.log(f"two U-Nets of {params / 1e6:.2f}M parameters each at {shape}; per image per step, both networks: "
          f"{flops_step_image / 1e9:.2f} GFLOP (forward {fl[0]['forward'] / 1e9:.2f} + VJP "
          f"{fl[0]['backward'] / 1e9:.2f} GFLOP each)")
    b.save()

    # 3. batch size from the free memory, measured with the eager bf16 + channels-last networks
    sde = VPSDE()
    best = Runtime("bf16", channels_last=True, compile=False)
    eager = (best.wrap(nets[0], device), best.wrap(nets[1], device))
    if args.batch:
        batch, sizing = args.batch, {"how": "--batch"}
    elif cuda:
        free = torch.cuda.mem_get_info(device)[0]
        fits = auto_batch_size(eager[0], eager[1], sde, blend(1, device), shape, device, SamplerSettings(**SAMPLER),
                               cap=1 << 30)
        batch = min(fits, args.max_batch)
        sizing = {"how": "free memory", "free_gb": free / 2**30, "fits": fits, "cap": args.max_batch}
    else:
        batch, sizing = (2 if quick else 8), {"how": "CPU default"}
    b.doc["batch"] = {"batch": batch, **sizing}
    b.log(f"batch {batch} ({sizing['how']}{', memory fits ' + str(sizing['fits']) if 'fits' in sizing else ''})")
    b.save()
    y = observations(batch, shape, device)

    # 4. the sampler, per setting: eager first (its figures stand even if compiling fails), then compiled
    rows: list[dict[str, Any]] = []
    b.doc["sampler"] = rows
    pairs: dict[str, tuple[Any, Any]] = {"eager": eager}
    for name in ("eager", "compiled"):
        if name == "compiled":
            if not compile_on:
                b.doc["compile"] = {"skipped": "--compile off" if args.compile == "off" else
                                    "off by default on a CPU and with --quick (a CPU compile takes minutes)"}
                break
            if b.left() < 150:
                b.doc["compile"] = {"skipped": f"only {b.left():.0f} s of the budget left"}
                b.log(f"compile skipped: {b.doc['compile']['skipped']}")
                break
            b.log("compiling both networks (torch.compile, once per network) ...")
            t0 = time.perf_counter()
            try:
                comp = Runtime("bf16", channels_last=True, compile=True)
                pairs[name] = (comp.wrap(nets[0], device), comp.wrap(nets[1], device))
                sample(pairs[name], sde, y, 2)  # compiles forward and backward of both networks
                _sync(device)
            except Exception as exc:  # a failed compile leaves the eager figures standing
                pairs.pop(name, None)
                b.doc["compile"] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "seconds": time.perf_counter() - t0}
                b.log(f"compile failed after {time.perf_counter() - t0:.0f} s; keeping the eager figures: "
                      f"{b.doc['compile']['error'][:300]}")
                b.save()
                break
            b.doc["compile"] = {"seconds": time.perf_counter() - t0}
            b.log(f"compiled in {b.doc['compile']['seconds']:.0f} s")
        probe = 2 if quick else 5
        per_step = step_seconds(pairs[name], sde, y, device, probe)
        b.log(f"{name}: {per_step * 1e3:.1f} ms per step at batch {batch} (probe of {probe} steps)")
        later = 2 if name == "eager" and compile_on else 1  # settings still to run, this one included
        for k, nfe in enumerate(sorted(nfes, reverse=True)):
            share = (0.4 if k == 0 else 0.7) / later
            rows.append(timed_sampler(b, name, pairs[name], sde, y, nfe, per_step, flops_step_image, device, share))
            b.save()
    top = max(nfes)
    best_name = max(pairs, key=lambda k: next((r["images_per_s"] for r in rows
                                               if r["setting"] == k and r["nfe"] == top), 0.0))

    # the float32 contrast (eager, contiguous; a few steps) on copies of the same networks
    if b.left() > 30 or quick:
        nets32 = build_nets(spec, device)
        pair32 = (nets32[0], nets32[1])  # Runtime() (float32, as given) calls them unchanged
        per_step = step_seconds(pair32, sde, y, device, 2)
        rows.append(timed_sampler(b, "fp32", pair32, sde, y, top, per_step, flops_step_image, device, 0.2))
        del nets32, pair32
        b.save()

    # 5. the floor: the networks alone, in the best setting
    best_rows = [r for r in rows if r["setting"] == best_name]
    if b.left() > 10 or quick:
        per_step = floor(pairs[best_name], sde, y, 3 if quick else 20, device)
        flops = flops_step_image * batch / per_step
        b.doc["floor"] = {"setting": best_name, "seconds_per_step": per_step, "network_flops_per_s": flops,
                          "fraction_of_790T": flops / H200_BF16_FLOPS,
                          "sampler_overhead": best_rows[0]["seconds_per_step"] / per_step - 1 if best_rows else None}
        b.log(f"floor ({best_name}, networks alone): {per_step * 1e3:.1f} ms per step = {flops / 1e12:.2f} TFLOP/s "
              f"= {100 * flops / H200_BF16_FLOPS:.1f}% of 790 TFLOP/s")
    b.doc["headline"] = {
        "setting": best_name, "batch": batch,
        "images_per_s": {str(r["nfe"]): r["images_per_s"] for r in best_rows},
        "fraction_of_790T": max((r["fraction_of_790T"] for r in best_rows), default=None), "target_fraction": 0.25,
        "peak_memory_mb": max((r["peak_memory_mb"] or 0.0 for r in best_rows), default=None) if cuda else None,
        "peak_rss_mb": _rss_mb()}
    b.doc["complete"] = True
    b.log(f"done: {json.dumps(b.doc['headline'], default=float)}")
    b.save()
    return b.doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointdiff bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny networks, batch 2, 3 and 2 steps: a CPU smoke test")
    p.add_argument("--json", default=None, help="write the figures here (rewritten after every stage)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when torch sees a GPU)")
    p.add_argument("--nfe", default=None, help="comma-separated NFE per prior (default 600,100; --quick 3,2)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: from the free memory)")
    p.add_argument("--max-batch", type=int, default=256, help="cap on the memory-sized batch (default 256)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="also run the torch.compile setting (auto: on CUDA, not with --quick)")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the reference matmul (default 8192)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick: 1)")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget in seconds (default 330)")
    return p


def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
