"""Patch-wise joint sampling: tiles blended by windows (a partition of unity), their vector-Jacobian
products, no seams where the answer is known in closed form, results independent of the batch and of the
tile batch, and a dps step that means the same at every image size."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.tiles import Tiling, reflect_pad, tiled, tiled_vjp, window
from pipeline.diffusion.train import PatchPool
from pipeline.diffusion.unet import UNet, UNetConfig
from pipeline.forward import make_forward
from pipeline.posterior.guidance import GuidedDenoiser
from pipeline.posterior.priors import GaussianPrior
from pipeline.posterior.sampler import SamplerSettings, joint_sample, seed_for

SDE = VPSDE()


class OnlyTiles(torch.nn.Module):
    """A network that refuses any input but its own tile size, around a pointwise function."""

    def __init__(self, fn, tile: int):
        super().__init__()
        self.fn, self.tile = fn, tile

    def forward(self, x, t):
        assert x.shape[-2:] == (self.tile, self.tile), x.shape
        return self.fn(x, t)


def pointwise(z, t):
    return torch.tanh(1.5 * z) + t[:, None, None, None]


@pytest.mark.parametrize("h,w,offset", [(32, 32, (0, 0)), (70, 45, (3, 5)), (20, 13, (0, 0)), (20, 13, (7, 1)),
                                        (100, 33, (23, 0)), (1, 40, (2, 2))])
@pytest.mark.parametrize("batch", [1, 5, 1000])
def test_blended_tiles_of_a_pointwise_network_are_the_network(h, w, offset, batch):
    torch.manual_seed(0)
    z, t = torch.randn(2, 3, h, w), torch.tensor([0.3, 0.7])
    tiling = Tiling(h, w, 32, 8, offset)
    net = OnlyTiles(pointwise, 32)
    assert torch.allclose(tiled(net, z, t, tiling, batch), pointwise(z, t), atol=1e-5)
    # and the vector-Jacobian product is the pointwise derivative times the cotangent
    c = torch.randn_like(z)
    want = 1.5 * (1 - torch.tanh(1.5 * z) ** 2) * c
    assert torch.allclose(tiled_vjp(net, z, t, tiling, batch, c), want, atol=1e-5)


def test_tiled_vjp_matches_autograd_through_the_blend():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    net = OnlyTiles(lambda z, t: torch.tanh(conv(z)), 32)
    z, t, c = torch.randn(2, 3, 50, 41), torch.zeros(2), torch.randn(2, 3, 50, 41)
    tiling = Tiling(50, 41, 32, 8, (5, 9))
    zg = z.clone().requires_grad_(True)
    tiles, tt = tiling.cut(tiling.pad(zg), tiling.origins, t)
    acc = torch.zeros_like(z)
    tiling.add(acc, (net(tiles, tt) * window(32)).reshape(2, len(tiling.origins), 3, 32, 32), tiling.origins)
    blended = acc / tiling.weights("cpu")
    want = torch.autograd.grad((blended * c).sum(), zg)[0]
    assert torch.allclose(tiled(net, z, t, tiling, 3), blended.detach(), atol=1e-6)
    assert torch.allclose(tiled_vjp(net, z, t, tiling, 3, c), want, atol=1e-5)
    # a real network's tiles do not agree where they overlap: the blend is not the whole-image network
    assert not torch.allclose(blended, torch.tanh(conv(z)), atol=1e-3)


@pytest.mark.parametrize("h,w,offset", [(50, 41, (5, 3)), (20, 13, (4, 1)), (5, 3, (0, 0)), (1, 7, (2, 4))])
def test_gathered_tiles_are_the_padded_images_and_scatter_is_their_adjoint(h, w, offset):
    """Tiles are indexed through the reflection (no padded copy): the same tiles as cutting the padded image,
    also where the reflection goes beyond the image's own size, and scatter is gather's exact adjoint."""
    tiling = Tiling(h, w, 8, 2, offset)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    t = torch.zeros(2)
    tiles, _ = tiling.gather(z, tiling.origins, t)
    assert torch.equal(tiles, tiling.cut(tiling.pad(z), tiling.origins, t)[0])
    c = torch.randn(tiles.shape, generator=g, dtype=torch.float64)
    back = torch.zeros_like(z)
    tiling.scatter(back, c.reshape(2, len(tiling.origins), 3, 8, 8), tiling.origins)
    assert torch.allclose((back * z).sum(), (c * tiles).sum(), rtol=1e-12)


def test_tilings_cover_every_pixel_and_move_with_the_offset():
    for h, w in [(5, 7), (33, 64), (97, 31)]:
        for off in [(0, 0), (3, 11), (23, 23)]:
            tiling = Tiling(h, w, 32, 8, off)
            assert (tiling.weights("cpu") >= 1e-3).all()
            assert tiling.origins[0] == (-off[0], -off[1]) or (h <= 32 and w <= 32 and off == (0, 0))
    with pytest.raises(ValueError, match="offsets"):
        Tiling(64, 64, 32, 8, (24, 0))
    with pytest.raises(ValueError, match="overlap"):
        Tiling(64, 64, 32, 32)


def test_reflect_pad_reflects_beyond_the_image_and_repeats_a_single_pixel():
    z = torch.arange(3.0).repeat(2, 1)[None, None]
    assert reflect_pad(z, 0, 0, 0, 5)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert reflect_pad(torch.ones(1, 1, 1, 1), 2, 0, 0, 1).shape == (1, 1, 3, 2)


def _settings(**kw):
    return SamplerSettings(**{"lambda_x": 1.0, "kappa_n": 1.0, "steps": 6, "rule": "exact-gaussian", **kw})


def test_a_pointwise_prior_gives_the_same_posterior_tiled_and_whole():
    """A constant (per-pixel Gaussian) prior has a closed-form posterior (tests/test_posterior.py checks the
    whole-image sampler against it); tiled, it must give the very same samples: no seams anywhere."""
    g = torch.Generator().manual_seed(3)
    y = torch.rand(3, 1, 21, 38, generator=g)
    fwd = make_forward("blend", 3, alpha=[0.3, 0.5, 0.7], sigma_y=0.05)
    seeds = [seed_for(f"img-{i}") for i in range(3)]
    gx, gn = GaussianPrior(0.2, 0.3, SDE), GaussianPrior(-0.4, 0.2, SDE)
    whole = joint_sample(gx, gn, SDE, y, fwd, _settings(), seeds=seeds)
    for overlap in (0, 3):
        tiles = joint_sample(OnlyTiles(gx, 8), OnlyTiles(gn, 8), SDE, y, fwd, _settings(tile_overlap=overlap),
                             seeds=seeds, tile=8, tile_batch=5)
        assert torch.allclose(tiles.x, whole.x, atol=1e-4)
        assert torch.allclose(tiles.n, whole.n, atol=1e-4)


class TinyUNet(torch.nn.Module):
    """A small random U-Net of 16x16 tiles beside the exact N(0, 1) epsilon (a trained prior's shape)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.unet = UNet(UNetConfig(image_size=16, base_channels=8, channel_mults=[1, 2], attention_resolutions=[]))
        with torch.no_grad():
            for p in self.unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        self.gauss = GaussianPrior(0.0, 1.0, SDE)
        self.config = self.unet.config
        self.eval()

    def forward(self, x, t):
        assert x.shape[-2:] == (16, 16)
        return self.gauss(x, t) + 0.1 * self.unet(x, t)


@pytest.mark.parametrize("rule", ["dps", "projection"])
def test_tiled_results_do_not_depend_on_the_batch_or_the_tile_batch(rule):
    xm, nm = TinyUNet(1), TinyUNet(2)
    g = torch.Generator().manual_seed(5)
    y = torch.rand(3, 1, 21, 35, generator=g)
    seeds = [seed_for(f"img-{i}") for i in range(3)]
    settings = _settings(rule=rule, steps=3)
    together = joint_sample(xm, nm, SDE, y, make_forward("blend", 3, alpha=0.5), settings, seeds=seeds,
                            tile_batch=64)
    assert torch.isfinite(together.x).all()
    for k in range(3):
        for tile_batch in (1, 7):
            alone = joint_sample(xm, nm, SDE, y[k:k + 1], make_forward("blend", 1, alpha=0.5), settings,
                                 seeds=seeds[k:k + 1], tile_batch=tile_batch)
            assert torch.allclose(alone.x, together.x[k:k + 1], atol=1e-5)
            assert torch.allclose(alone.n, together.n[k:k + 1], atol=1e-5)
    # the tiles moved: another base seed shifts them, and the (non-pointwise) result changes
    other = joint_sample(xm, nm, SDE, y, make_forward("blend", 3, alpha=0.5), _settings(rule=rule, steps=3, seed=1),
                         seeds=seeds)
    assert not torch.allclose(other.x, together.x, atol=1e-4)


def test_the_dps_step_is_the_same_per_pixel_at_every_image_size():
    """An image and its 2x2 periodic repetition: the same residual per pixel, so the same step per pixel.
    Normalised by the whole image's ||r|| (DPS as written for one size), the large image's step would halve."""
    net = OnlyTiles(lambda z, t: 0.5 * z, 8)
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 8, 8, generator=g)
    x, n = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g)
    big = [v.repeat(1, 1, 2, 2) for v in (y, x, n)]
    t, dt = torch.full((1,), 0.5), torch.tensor(0.02)
    settings = _settings(rule="dps", lambda_x=2.0, kappa_n=3.0)
    small = GuidedDenoiser(net, net, SDE, make_forward("blend", 1, alpha=0.5), y, settings, tile=8)(x, n, t, dt)
    large = GuidedDenoiser(net, net, SDE, make_forward("blend", 1, alpha=0.5), big[0], settings, tile=8)(
        big[1], big[2], t, dt)
    assert torch.allclose(large.dx, small.dx.repeat(1, 1, 2, 2), atol=1e-5)
    assert torch.allclose(large.dn, small.dn.repeat(1, 1, 2, 2), atol=1e-5)


@pytest.mark.parametrize("forward", ["blend", "composite"])
def test_the_tiled_dps_gradient_is_the_one_graph_gradient_in_strips_and_tile_batches(forward, monkeypatch):
    """A large image's dps step is taken tile batch by tile batch, with the residual's gradient a strip of rows at
    a time (memory): it must be the gradient of one graph over all tiles and the whole image, to float precision.
    The composite's noise is RGBA over an RGB image: its forward model is not linear."""
    import pipeline.posterior.guidance as guidance

    xm, nm = TinyUNet(1), TinyUNet(2)
    channels = (3, 4) if forward == "composite" else (3, 3)
    xm.unet = UNet(UNetConfig(image_size=16, channels=channels[0], base_channels=8, channel_mults=[1, 2],
                              attention_resolutions=[]))
    nm.unet = UNet(UNetConfig(image_size=16, channels=channels[1], base_channels=8, channel_mults=[1, 2],
                              attention_resolutions=[]))
    g = torch.Generator().manual_seed(3)
    y = torch.rand(2, 3, 37, 29, generator=g)
    x, n = torch.randn(2, 3, 37, 29, generator=g), torch.randn(2, channels[1], 37, 29, generator=g)
    t = torch.tensor([0.3, 0.7])
    fm = make_forward(forward, 2, **({"a": 0.8} if forward == "composite" else {"alpha": 0.5}))
    settings = _settings(rule="dps", lambda_x=1.0, kappa_n=1.0)

    def step(tile_batch):
        g = GuidedDenoiser(xm, nm, SDE, fm, y, settings, tile=16, tile_batch=tile_batch)(x, n, t, torch.tensor(0.1))
        return g.dx, g.dn, g.residual

    whole = step(10_000)  # every tile in one call, one graph (tiles.blended)
    monkeypatch.setattr(guidance, "STRIP_PIXELS", 40)  # strips of one row
    parts = step(5)
    for a, b in zip(whole, parts):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_patch_pool_draws_patches_of_images_of_any_size():
    images = [torch.full((3, 40, 50), 0.5), torch.full((3, 5, 9), -0.5)]  # the second is smaller than a patch
    pool = PatchPool(images, 16)
    g = torch.Generator().manual_seed(0)
    batch = pool.draw(64, g)
    assert batch.shape == (64, 3, 16, 16)
    values = set(batch.flatten(1)[:, 0].tolist())
    assert values == {0.5, -0.5}  # both images drawn, the small one padded by reflection (same values)
    assert len(pool[0::2]) == 1
