"""A guidance rule is one function and its registration: this file adds one (no other edit anywhere) and cleans a
dataset with it through ``jointdiff clean --set sampler.rule=NAME`` (docs/how-to/guidance-rule.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.data.shards import decode_image, to_float
from pipeline.posterior.guidance import dps, register_rule
from tests.test_clean_job import _observations


@register_rule("half-dps")
def half_dps(d, x, n, t):
    """DPS with half its gradients: at twice the weights it must give DPS's images exactly."""
    g = dps(d, x, n, t)
    return dataclasses.replace(g, grad_x=g.grad_x / 2, grad_n=g.grad_n / 2)


def _clean(tiny_priors, obs: str, out: str, rule: str, weight: float) -> np.ndarray:
    rc = main(["clean", obs, out, "--executor", "local", "--run-id", rule, "--quiet",
               "--set", f"priors.image={tiny_priors[0]}", "--set", f"priors.noise={tiny_priors[1]}",
               "--set", "sampler.steps=3", "--set", f"sampler.rule={rule}", "--set", f"sampler.lambda_x={weight}",
               "--set", f"sampler.kappa_n={weight}", "--set", "batch_size=3", "--set", "device=cpu"])
    assert rc == 0
    t = pq.read_table(f"{out}/runs/{rule}/cleaned").sort_by("id")
    assert {r for r in t.column("sampler").to_pylist()} == {t.column("sampler")[0].as_py()}
    assert f'"rule": "{rule}"' in t.column("sampler")[0].as_py()  # the outputs record the rule that ran
    return np.stack([to_float(decode_image(c["bytes"], c["path"])) for c in t.column("denoised").to_pylist()])


def test_a_rule_defined_in_a_test_file_cleans_through_the_cli(tiny_priors, tmp_path, capsys):
    obs = str(tmp_path / "obs")
    _observations(obs, n=3, shard_size=3, bad_row=False)
    half = _clean(tiny_priors, obs, str(tmp_path / "out"), "half-dps", 2.0)
    full = _clean(tiny_priors, obs, str(tmp_path / "out"), "dps", 1.0)
    assert half.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(half, full, atol=2 / 65535)  # 16-bit PNGs: at most a rounding step apart
    zero = _clean(tiny_priors, obs, str(tmp_path / "out2"), "half-dps", 0.0)
    assert np.abs(zero - full).max() > 1e-3  # the rule's guidance is what made them agree
