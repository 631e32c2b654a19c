from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, PriorConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_configs_load():
    for name in ("faces", "digits", "stripes"):
        cfg = load_config(PriorConfig, f"configs/prior_{name}.yaml")
        assert cfg.name == name and cfg.data.source == name
        assert cfg.unet.image_size == cfg.data.size == 32


def test_overrides_are_typed_and_nested():
    cfg = load_config(PriorConfig, "configs/prior_faces.yaml",
                      ["train.steps=7", "data.hflip=false", "unet.attention_resolutions=[16, 8]", "output=/x"])
    assert cfg.train.steps == 7 and cfg.data.hflip is False
    assert cfg.unet.attention_resolutions == [16, 8] and cfg.output == "/x"


def test_unknown_and_bad_keys_name_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lerning_rate") as err:
        load_config(PriorConfig, "configs/prior_faces.yaml", ["train.lerning_rate=1"])
    assert "configs/prior_faces.yaml" in str(err.value)
    with pytest.raises(ConfigError, match=r"unet\.image_size"):
        load_config(PriorConfig, "configs/prior_faces.yaml", ["unet.image_size=48"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PriorConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PriorConfig, bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PriorConfig, "configs/prior_faces.yaml", ["train.steps"])


def test_default_sampler_and_denoise_config_use_the_tuned_winner():
    """The defaults are the rule, solver, step count and weights chosen on the validation split: the
    rule by `jointdiff bench tune`, the solver's weights by `jointdiff bench nfe` (configs/guidance.yaml)."""
    from pipeline.bench.quality import load_guidance
    from pipeline.config import CleanConfig
    from pipeline.posterior.sampler import SamplerConfig

    tuned = load_guidance()
    assert tuned["status"] == "tuned"
    default = tuned["default_sampler"]
    for cfg in (SamplerConfig(), load_config(CleanConfig, ROOT / "configs" / "denoise.yaml").sampler):
        entry = tuned["solvers"][default["curve"]][default["steps"]]
        assert (cfg.rule, cfg.steps, cfg.schedule) == (tuned["default_rule"], default["steps"], "constant")
        assert {k: getattr(cfg, k) for k in entry} == entry


def test_run_id_changes_with_the_sampler_settings_that_matter_only():
    """``clip_denoised`` is part of a DDIM run's id and no part of an Euler-Maruyama run's, whose id stays
    what it was before the setting existed: a setting that cannot change the results must not restart a
    nightly run."""
    from pipeline.clean import run_id_for
    from pipeline.config import CleanConfig
    from pipeline.posterior.sampler import SamplerConfig

    def rid(**sampler: object) -> str:
        return run_id_for("file:///data/obs", CleanConfig(sampler=SamplerConfig(**sampler)))

    em = {"solver": "euler-maruyama", "steps": 200}
    assert rid(**em) == rid(**em, clip_denoised=False)
    before = SamplerConfig(**em).model_dump()
    before.pop("clip_denoised")  # the sampler's fields before clipping was added
    assert SamplerConfig(**em).identity() == before
    assert rid(**em) != rid(**{**em, "steps": 100})
    ddim = {"solver": "ddim", "steps": 100}
    assert len({rid(**ddim), rid(**ddim, clip_denoised=False), rid(**ddim, eta=0.5), rid(**em)}) == 4
