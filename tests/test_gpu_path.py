"""The GPU path on the CPU: bf16 autocast, channels-last, compile caching, memory-sized batches, and the
standalone ``pipeline/bench/gpu.py`` running with nothing but torch importable."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import CleanConfig, ConfigError, load_config
from pipeline.diffusion.nets import NetConfig, UNet
from pipeline.diffusion.sde import VPSDE
from pipeline.forward import make_forward
from pipeline.posterior import core
from pipeline.posterior.core import Runtime, auto_batch_size, batch_from_memory
from pipeline.posterior.guidance import RULES, GuidedDenoiser
from pipeline.posterior.sampler import SamplerSettings, joint_sample

ROOT = Path(__file__).resolve().parents[1]
SDE = VPSDE()
MiB, GiB = 2**20, 2**30


class Prior(torch.nn.Module):
    """The epsilon of N(0, 1) data (``s_t x``) plus a small random U-Net: a sampler that stays stable
    while every step still runs real convolutions, attention and their vector-Jacobian products."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.unet = UNet(NetConfig(image_size=16, channels=1, base_channels=8, channel_mults=[1, 2],
                                   attention_resolutions=[8]))
        for p in self.unet.parameters():  # the zero-initialised output convolutions: make them do something
            if p.ndim > 1 and not p.abs().any():
                torch.nn.init.normal_(p, std=0.05)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return SDE.sigma(t).reshape(-1, 1, 1, 1) * x + 0.2 * self.unet(x, t)


class BF16State(VPSDE):
    """A broken GPU path: the state ``x, n`` stored in bf16 between steps."""

    def reverse_step(self, *args, **kwargs) -> torch.Tensor:
        return super().reverse_step(*args, **kwargs).bfloat16().float()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny networks: a second thread only fights the other processes for the cores


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = Blend().apply(torch.rand(4, 1, 16, 16, generator=g), torch.rand(4, 1, 16, 16, generator=g))
    # Euler-Maruyama: the broken variant below stores its state in bf16 through `reverse_step`
    cfg = SamplerConfig(solver="euler-maruyama", steps=10, lambda_x=10.0, kappa_n=5.0, final_projection=False)
    ref = joint_sample(Prior(0), Prior(1), SDE, y, Blend(), cfg, seeds=range(4))
    return y, cfg, ref


def Blend(rows: int = 4):  # noqa: N802 (reads as the forward model it builds)
    return make_forward("blend", rows, alpha=0.5)


def SamplerConfig(**settings):  # noqa: N802 (the sampler's settings, with the default rule's default weights)
    return SamplerSettings(**{"lambda_x": 20.0, "kappa_n": 20.0, **settings})


def guidance(rule, xm, nm, sde, forward, y, x, n, t, cfg):
    g = rule.fn(GuidedDenoiser(xm, nm, sde, forward, y, cfg), x, n, t)
    return g.eps_x, g.eps_n, g.grad_x, g.grad_n, g.residual


def _rms(a: torch.Tensor) -> float:
    return float(a.pow(2).mean().sqrt())


def test_bf16_autocast_stays_close_to_fp32_and_keeps_the_state_in_fp32(setting):
    y, cfg, ref = setting
    dtypes = set()
    out = joint_sample(Prior(0), Prior(1), SDE, y, Blend(), cfg, seeds=range(4), runtime=Runtime("bf16"),
                       callback=lambda i, x, n: dtypes.update({x.dtype, n.dtype}))
    assert dtypes == {torch.float32} and out.x.dtype == torch.float32
    err_x, err_n = _rms(out.x - ref.x), _rms(out.n - ref.n)
    # bf16 really ran (the networks' rounding shows) but moved the result by a fraction of a grey level
    assert 1e-6 < err_x < 6e-4 and 1e-6 < err_n < 6e-4, (err_x, err_n)
    assert (out.x - ref.x).abs().max() < 3e-3

    # broken paths miss by far more: the state kept in bf16 between steps, or the guidance skipped
    bad = joint_sample(Prior(0), Prior(1), BF16State(), y, Blend(), cfg, seeds=range(4), runtime=Runtime("bf16"))
    assert _rms(bad.x - ref.x) > 1e-3 and (bad.x - ref.x).abs().max() > 3e-3
    unguided = dataclasses.replace(cfg, lambda_x=0.0, kappa_n=0.0)
    bad = joint_sample(Prior(0), Prior(1), SDE, y, Blend(), unguided, seeds=range(4), runtime=Runtime("bf16"))
    assert _rms(bad.x - ref.x) > 0.05


def test_bf16_guidance_gradients_are_fp32_and_close(setting):
    y = setting[0]
    xm, nm = Prior(0), Prior(1)
    g = torch.Generator().manual_seed(3)
    x, n = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    t = torch.full((4,), 0.4)
    cfg = SamplerConfig()
    ex, en, gx, gn, _ = guidance(RULES["dps"], xm, nm, SDE, Blend(), y, x, n, t, cfg)
    rt = Runtime("bf16")
    ex16, en16, gx16, gn16, _ = guidance(RULES["dps"], rt.wrap(xm, "cpu"), rt.wrap(nm, "cpu"), SDE, Blend(), y, x, n,
                                         t, cfg)
    assert {ex16.dtype, gx16.dtype, gn16.dtype} == {torch.float32}
    for a, b in ((ex16, ex), (gx16, gx), (gn16, gn)):
        rel = _rms(a - b) / _rms(b)
        assert 1e-6 < rel < 2e-2, rel


def test_channels_last_gives_the_same_result(setting):
    y, cfg, ref = setting
    xm, nm = Prior(0), Prior(1)
    out = joint_sample(xm, nm, SDE, y, Blend(), cfg, seeds=range(4), runtime=Runtime(channels_last=True))
    assert xm.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert out.x.is_contiguous() and out.x.dtype == torch.float32
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.n, ref.n, rtol=0, atol=1e-5)


def test_the_default_runtime_calls_the_networks_as_given():
    m = Prior(0)
    assert Runtime().wrap(m, "cpu") is m
    assert Runtime.resolve("cpu") == Runtime()  # auto on a CPU: nothing changes
    assert Runtime.resolve("cuda") == Runtime("bf16", channels_last=True, compile=False)
    assert Runtime.resolve("cuda:1", compile="auto").compile
    assert Runtime.resolve("cuda", precision="fp32", channels_last=False) == Runtime()
    with pytest.raises(ValueError, match="precision"):
        Runtime("fp16")  # type: ignore[arg-type]


def test_compile_wraps_each_network_once():
    m = Prior(0)
    rt = Runtime(compile=True)
    a, b = rt.wrap(m, "cpu"), rt.wrap(m, "cpu")  # torch.compile is lazy: nothing compiles here
    assert a.fn is b.fn and a.fn is core.compiled(m)  # one torch.compile per network, reused
    assert rt.wrap(Prior(1), "cpu").fn is not a.fn


@pytest.mark.skipif(not os.environ.get("JOINTDIFF_TEST_COMPILE"),
                    reason="set JOINTDIFF_TEST_COMPILE=1 to run: compiling these two tiny networks (forward and "
                           "backward, inductor) took 103 s on this project's shared 2-core CPU; the GPU benchmark "
                           "(pipeline/bench/gpu.py) runs the compiled sampler")
def test_compiled_sampler_matches_eager():
    g = torch.Generator().manual_seed(0)
    y = Blend().apply(torch.rand(4, 1, 16, 16, generator=g), torch.rand(4, 1, 16, 16, generator=g))
    cfg = SamplerConfig(steps=3, final_projection=False)
    ref = joint_sample(Prior(0), Prior(1), SDE, y, Blend(), cfg, seeds=range(4))
    out = joint_sample(Prior(0), Prior(1), SDE, y, Blend(), cfg, seeds=range(4), runtime=Runtime(compile=True))
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-4)


def test_batch_from_memory_fills_the_margin_and_rounds():
    # (10 GiB * 0.8 - 1 GiB) / 100 MiB = 71.7 -> 71 -> a multiple of 8
    assert batch_from_memory(10 * GiB, 100 * MiB, fixed_bytes=GiB, margin=0.8, cap=512) == 64
    assert batch_from_memory(10 * GiB, 100 * MiB, margin=0.8, cap=512, multiple=1) == 81
    assert batch_from_memory(140 * GiB, 50 * MiB, cap=512) == 512  # the cap
    assert batch_from_memory(100 * MiB, 300 * MiB) == 1  # never below one
    assert batch_from_memory(10 * GiB, 2 * GiB, margin=0.8) == 4  # below one multiple: not rounded to 0
    with pytest.raises(ValueError, match="per_sample_bytes"):
        batch_from_memory(GiB, 0)


def test_auto_batch_size_uses_injected_figures_and_defaults_on_a_cpu():
    m = Prior(0)
    args = (m, m, SDE, Blend(), (1, 16, 16))
    assert auto_batch_size(*args, "cpu", SamplerConfig(), default=32) == 32  # no GPU: the configured default
    # injected figures (as a GPU would report them): rows from memory, divided among posterior samples
    kw = dict(free_bytes=40 * GiB, per_sample_bytes=150 * MiB, fixed_bytes=2 * GiB, margin=0.8, cap=512)
    assert auto_batch_size(*args, "cpu", SamplerConfig(), **kw) == 200  # (32 - 2) GiB / 150 MiB = 204.8 -> 200
    assert auto_batch_size(*args, "cpu", SamplerConfig(), n_samples=4, **kw) == 50
    with pytest.raises(ValueError, match="CUDA"):
        core.measure_step_bytes(m, m, SDE, Blend(), (1, 16, 16), "cpu", SamplerConfig())


def test_clean_config_gpu_section(tmp_path):
    cfg = CleanConfig()
    assert cfg.batch_size == 32 and cfg.gpu.precision == "auto" and cfg.gpu.compile is False
    assert cfg.gpu.runtime("cpu") == Runtime()
    assert cfg.gpu.runtime("cuda") == Runtime("bf16", channels_last=True)
    cfg = load_config(CleanConfig, None, ["batch_size=auto", "gpu.compile=auto", "gpu.channels_last=false"])
    assert cfg.batch_size == "auto" and cfg.gpu.runtime("cuda") == Runtime("bf16", False, True)
    for bad in ("batch_size=0", "batch_size=big", "gpu.precision=fp16", "gpu.compile=maybe"):
        with pytest.raises(ConfigError):
            load_config(CleanConfig, None, [bad])


def test_shard_cleaner_resolves_auto_batch_and_runtime_on_a_cpu():
    from pipeline.run.recipe import resolve
    from pipeline.run.shard import ShardCleaner

    cfg = CleanConfig(device="cpu", batch_size="auto")
    cleaner = ShardCleaner(cfg, resolve(cfg.recipe))
    assert cleaner.batch_size == 32 and cleaner.runtime == Runtime()
    assert not any(p.requires_grad for p in cleaner.x_model.parameters())


BLOCKER = """
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = {"pydantic", "ray", "prefect", "pyarrow", "torchmetrics", "yaml", "safetensors", "skimage", "sklearn",
           "PIL", "png", "s3fs", "tqdm", "duckdb", "moto"}
class Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (not on the GPU machine)", name=spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):  # as if not installed: no origin, and importing fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Absent(), origin=None)
        return None
sys.meta_path.insert(0, Block())
script = %r
sys.argv = [script, *sys.argv[1:]]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m == "pipeline.config")
assert not loaded, loaded
"""


def test_gpu_bench_runs_quick_with_only_torch(tmp_path):
    """The script runs as a file, with pydantic, Ray, Prefect, pyarrow (and the rest) made unimportable."""
    out = tmp_path / "gpu.json"
    script = str(ROOT / "pipeline" / "bench" / "gpu.py")
    proc = subprocess.run([sys.executable, "-c", BLOCKER % script, "--quick", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["env"]["device"] == "cpu"
    nets = doc["networks"]
    assert nets["parameters_each"] > 1e5
    f = nets["flops_per_image"]
    assert f["forward"] > 1e7 and 0.5 < f["vjp"] / f["forward"] < 3  # input-gradient VJP ~ one more forward
    assert nets["flops_per_image_step_both"] == 2 * (f["forward"] + f["vjp"])
    rows = {(r["setting"], r["nfe"]): r for r in doc["sampler"]}
    assert {("eager", 3), ("eager", 2), ("fp32", 3)} <= set(rows)
    for r in rows.values():
        assert r["finite"] and r["images_per_s"] > 0 and r["network_flops_per_s"] > 0
        assert r["fraction_of_790T"] == pytest.approx(r["network_flops_per_s"] / 790e12)
    assert doc["compile"]["skipped"] and doc["floor"]["network_flops_per_s"] > 0
    assert doc["matmul"]["flops_per_s"] > 0 and "[" in proc.stdout  # timestamped progress lines


def test_paper_networks_have_about_9m_parameters():
    from pipeline.bench import gpu
    from pipeline.diffusion.nets import count_parameters

    assert 8e6 < count_parameters(UNet(NetConfig(**gpu.PAPER_NET))) < 10e6


def test_cli_bench_gpu_runs_the_script(monkeypatch):
    from pipeline import cli
    from pipeline.bench import gpu

    seen = []
    monkeypatch.setattr(gpu, "main", lambda argv=None: seen.append(argv) or 0)
    assert cli.main(["bench", "gpu", "--quick", "--json", "x.json", "--device", "cpu"]) == 0
    assert seen == [["--quick", "--json", "x.json", "--device", "cpu"]]
