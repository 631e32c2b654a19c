"""Forward models (pipeline/forward.py): per-row parameters, the coefficients the sampler relies on, stacking
for K posterior samples, and the refusals a user's config meets."""

from __future__ import annotations

import pytest
import torch

from pipeline.forward import FORWARD_MODELS, make_forward

g = torch.Generator().manual_seed(0)
X, N = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
MODELS = [make_forward("blend", 3, alpha=[0.2, 0.5, 0.9]), make_forward("sum", 3),
          make_forward("overlay", 3, a=[0.0, 0.7, 2.5])]


@pytest.mark.parametrize("fwd", MODELS, ids=lambda f: f.name)
def test_each_row_is_observed_with_its_own_parameters_and_the_coefficients_say_how(fwd):
    y = fwd.apply(X, N)
    for i in range(3):  # a batch that mixes parameters is the rows observed one at a time
        assert torch.allclose(y[i:i + 1], fwd.take([i]).apply(X[i:i + 1], N[i:i + 1]))
        # a linear model: A(x, n) = c_x x + c_n n, per row (the projection and the removed energy use these)
        assert torch.allclose(y[i], fwd.coef_x[i] * X[i] + fwd.coef_n[i] * N[i], atol=1e-6)
    expected = {"blend": (1 - torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.2, 0.5, 0.9])),
                "sum": (torch.ones(3), torch.ones(3)),
                "overlay": (torch.ones(3), torch.tensor([0.0, 0.7, 2.5]))}[fwd.name]
    assert torch.allclose(fwd.coef_x, expected[0]) and torch.allclose(fwd.coef_n, expected[1])


def test_repeat_stacks_the_batch_as_y_repeat_does_and_take_selects_rows():
    fwd = make_forward("blend", 3, alpha=[0.2, 0.5, 0.9], sigma_y=[0.0, 0.1, 0.2])
    k = fwd.repeat(4)
    assert k.batch_size == 12
    x, n = X.repeat(4, 1, 1, 1), N.repeat(4, 1, 1, 1)
    assert torch.equal(k.apply(x, n), fwd.apply(X, N).repeat(4, 1, 1, 1))  # row j * B + i is image i
    assert torch.equal(k.alpha[7], fwd.alpha[1]) and torch.equal(k.sigma_y[11], fwd.sigma_y[2])
    assert k.take(slice(3, 6)).alpha.tolist() == fwd.alpha.tolist()
    assert fwd.take(torch.tensor([True, False, True])).sigma_y.tolist() == pytest.approx([0.0, 0.2])
    assert fwd.to("cpu").alpha.tolist() == fwd.alpha.tolist()


def test_observe_adds_read_out_noise_of_each_rows_sigma_y():
    fwd = make_forward("sum", 3, sigma_y=[0.0, 0.05, 0.2]).repeat(2000)
    x, n = X.repeat(2000, 1, 1, 1), N.repeat(2000, 1, 1, 1)
    e = (fwd.observe(x, n, generator=torch.Generator().manual_seed(1)) - fwd.apply(x, n)).reshape(2000, 3, -1)
    std = e.transpose(0, 1).reshape(3, -1).std(1)
    assert std[0] == 0 and std[1] == pytest.approx(0.05, rel=0.02) and std[2] == pytest.approx(0.2, rel=0.02)


def test_with_params_replaces_an_estimate_and_validates_it_like_the_constructor():
    fwd = make_forward("blend", 2, alpha=0.5)
    new = fwd.with_params(alpha=[0.3, 0.6])
    assert new.alpha.tolist() == pytest.approx([0.3, 0.6]) and fwd.alpha.tolist() == [0.5, 0.5]  # frozen
    assert "alpha" in fwd.estimable and fwd.weight == "alpha"
    with pytest.raises(ValueError, match=r"blend alpha must be in \(0, 1\), got 1"):
        fwd.with_params(alpha=[0.3, 1.0])
    with pytest.raises(ValueError, match="blend has no parameter a; it has sigma_y, alpha"):
        fwd.with_params(a=1.0)
    with pytest.raises(ValueError, match="alpha: 3 values for a batch of 2 rows"):
        fwd.with_params(alpha=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("name,sigma_y,params,message", [
    ("blur", 0.0, {}, "unknown forward model 'blur'; choose one of blend, sum, overlay"),
    ("sum", 0.0, {"alpha": 0.5}, "forward model 'sum' has no parameter alpha; it takes only sigma_y"),
    ("blend", 0.0, {"a": 0.5}, "forward model 'blend' has no parameter a; it has alpha"),
    ("overlay", 0.0, {}, "forward model 'overlay' needs a"),
    ("blend", 0.0, {"alpha": 0.0}, r"blend alpha must be in \(0, 1\), got 0"),
    ("blend", 0.0, {"alpha": [0.5]}, "alpha: 1 values for a batch of 2 rows"),
    ("overlay", 0.0, {"a": [1.0, float("inf")]}, "overlay a must be finite and >= 0, got inf"),
    ("overlay", 0.0, {"a": -1.0}, "overlay a must be finite and >= 0, got -1"),
    ("sum", -0.1, {}, "sigma_y must be >= 0"),
    ("sum", [[0.1, 0.1]], {}, r"sigma_y: expected one value per row, shape \(B,\), got shape \(1, 2\)"),
])
def test_make_forward_refuses_what_no_model_can_mean_naming_the_parameter(name, sigma_y, params, message):
    with pytest.raises(ValueError, match=message):
        make_forward(name, 2, sigma_y, **params)


def test_every_registered_model_has_its_parameters_defaults_and_weight_column():
    for name, cls in FORWARD_MODELS.items():
        assert cls.name == name and set(cls.estimable) <= set(cls.params)
        assert cls.weight is None or cls.weight in cls.params
    assert make_forward("blend", 2).alpha.tolist() == [0.5, 0.5]  # the paper's default


def test_explain_gives_the_noise_that_explains_y_and_the_composites_layer_of_least_coverage():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g)
    # linear: the noise itself
    blend = make_forward("blend", 3, alpha=[0.2, 0.5, 0.8])
    n = torch.rand(3, 3, 8, 8, generator=g)
    assert torch.allclose(blend.explain(blend.apply(x, n), x), n, atol=1e-5)
    # the composite: a layer (colour, coverage) that recomposites to y, with no more coverage than the true one,
    # and none where y is the image
    comp = make_forward("composite", 3, a=[0.5, 0.8, 1.0])
    layer = torch.rand(3, 4, 8, 8, generator=g)
    layer[:, 3:, :, :4] = 0  # no text on the left half
    y = comp.apply(x, layer)
    found = comp.explain(y, x)
    assert found.shape == layer.shape and found.min() >= 0 and found.max() <= 1
    assert (comp.apply(x, found) - y).abs().max() < 1e-5
    assert (found[:, 3:] <= layer[:, 3:] + 1e-5).all() and found[:, 3:, :, :4].abs().max() < 1e-6
