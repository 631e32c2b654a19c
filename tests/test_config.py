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
    natural = load_config(PriorConfig, "configs/prior_natural.yaml")  # patches of photos of any size
    assert natural.data.patch == natural.data.size == natural.unet.image_size == 32 and natural.unet.channels == 3
    stripes_rgb = load_config(PriorConfig, "configs/prior_stripes-rgb.yaml")
    assert stripes_rgb.data.channels == stripes_rgb.unet.channels == 3


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


def test_the_product_samples_with_the_tuned_weights_and_says_when_there_are_none():
    """The defaults (and configs/denoise.yaml) are the rule, solver and step count chosen on the validation split;
    their weights come from the table shipped in the package, resolved once on the driver and recorded in the
    run's recipe. A step count that was never tuned runs with the rule's defaults and one line says so, with the
    command that tunes it; weights given explicitly win without a note."""
    from pipeline.config import CleanConfig
    from pipeline.posterior.guidance import RULES
    from pipeline.posterior.tuned import load_table
    from pipeline.run.recipe import resolve

    table = load_table()
    default = table["default_sampler"]
    entry = next(e for e in table["entries"] if (e["image_prior"], e["noise_prior"], e["forward"], e["rule"],
                                                  e["solver"], e["steps"]) == ("faces", "digits", "blend",
                                                                               table["default_rule"],
                                                                               default["solver"], default["steps"]))
    for cfg in (load_config(CleanConfig, None, []), load_config(CleanConfig, ROOT / "configs" / "denoise.yaml")):
        assert (cfg.sampler.rule, cfg.sampler.solver, cfg.sampler.steps) == (
            table["default_rule"], default["solver"], default["steps"])
        assert cfg.sampler.lambda_x is None and cfg.sampler.kappa_n is None  # from the table, not typed twice
        s = resolve(cfg.recipe).recipe.sampler
        assert (s.lambda_x, s.kappa_n) == (entry["lambda_x"], entry["kappa_n"])
        assert resolve(cfg.recipe).note is None
    # 100 steps of DDIM were tuned too: weights differ from the 50-step ones (--set sampler.steps=100 follows)
    p100 = resolve(load_config(CleanConfig, None, ["sampler.steps=100"]).recipe)
    assert p100.note is None
    assert (p100.recipe.sampler.lambda_x, p100.recipe.sampler.kappa_n) != (entry["lambda_x"], entry["kappa_n"])
    p37 = resolve(load_config(CleanConfig, None, ["sampler.steps=37"]).recipe)
    assert (p37.recipe.sampler.lambda_x, p37.recipe.sampler.kappa_n) == RULES["dps"].weights
    assert len(p37.note.splitlines()) == 1 and "no tuned weights" in p37.note
    assert "jointdiff bench nfe" in p37.note
    given = resolve(load_config(CleanConfig, None, ["sampler.steps=37", "sampler.lambda_x=3",
                                                    "sampler.kappa_n=4"]).recipe)
    assert (given.recipe.sampler.lambda_x, given.recipe.sampler.kappa_n) == (3.0, 4.0) and given.note is None


def test_one_identity_from_the_recipe_alone():
    """The run id and the config hash come from :func:`pipeline.run.identity.identify` over the pinned recipe
    (and the input, for the run id): any recipe key changes both, no execution key changes either."""
    from pipeline.config import CleanConfig, Execution, Recipe
    from pipeline.run.identity import identify
    from pipeline.run.recipe import resolve

    def ident(*sets: str, input_uri: str = "file:///data/obs"):
        return identify(resolve(load_config(CleanConfig, None, list(sets)).recipe), input_uri)

    base = ident()
    assert base.run_id.startswith("run-") and len(base.config_hash) == 12
    assert ident(input_uri="/data/obs/") == base  # one dataset, however its path is written
    assert ident(input_uri="file:///data/other").run_id != base.run_id
    assert ident(input_uri="file:///data/other").config_hash == base.config_hash  # the recipe alone
    recipe = ["priors.noise=stripes", "forward.sigma_y=0.01", "forward.alpha=0.4", "sampler.eta=0.5",
              "sampler.clip_denoised=false", "sampler.steps=7", "sampler.seed=1", "policy.alpha=white",
              "policy.max_bytes=1000", "policy.convert_channels=false", "sampler.tile_overlap=4",
              "policy.oversize=downscale"]
    seen = {base.run_id}
    for key in recipe:
        changed = ident(key)
        assert changed.run_id not in seen and changed.config_hash != base.config_hash, key
        seen.add(changed.run_id)
    execution = ["batch_size=3", "batch_size=auto", "batch_pixels=4096", "threads=1", "device=cpu",
                 "storage.region=eu-west-1", "storage.anon=true", "ray.actors=3", "ray.gpus_per_actor=0",
                 "gpu.precision=fp32", "gpu.compile=true", "max_rejected_fraction=0.9", "input=s3://x/obs", "output=s3://x/out"]
    for key in execution:
        assert ident(key) == base, key
    # the two parts are the whole config, and nothing is in both
    assert set(Recipe.model_fields) | set(Execution.model_fields) == set(CleanConfig.model_fields)
    assert not set(Recipe.model_fields) & set(Execution.model_fields)


def test_the_old_prior_keys_are_refused_naming_the_new_ones(tmp_path):
    from pipeline.config import CleanConfig

    with pytest.raises(ConfigError) as err:
        load_config(CleanConfig, None, ["image_prior=faces"])
    assert str(err.value) == ("invalid config: --set image_prior=...: use priors.image (renamed before 1.0; see "
                              "docs/changelog.md)")
    old = tmp_path / "old.yaml"
    old.write_text("image_prior: faces\nnoise_prior: digits\nsampler: {steps: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(CleanConfig, old)
    assert str(err.value) == (f"{old}: invalid config: image_prior: use priors.image (renamed before 1.0; see "
                              "docs/changelog.md); noise_prior: use priors.noise (renamed before 1.0; see "
                              "docs/changelog.md)")
    assert "\n" not in str(err.value)
    cfg = load_config(CleanConfig, ROOT / "configs" / "celeba_mnist.yaml", section="clean")
    assert cfg.priors.image.endswith("/celeba/model") and cfg.priors.noise.endswith("/mnist-rgb/model")
