from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics import psnr, removed_energy, residual, spread, ssim


@pytest.mark.parametrize("channels,size,noise", [(1, 32, 0.1), (3, 32, 0.05), (1, 64, 0.3), (3, 17, 0.2)])
def test_psnr_and_ssim_match_scikit_image(channels, size, noise):
    g = torch.Generator().manual_seed(size + channels)
    a = torch.rand(4, channels, size, size, generator=g)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours_p, ours_s = psnr(b, a), ssim(b, a)
    for i in range(4):
        ref_a, ref_b = a[i].double().numpy(), b[i].double().numpy()
        ref_p = peak_signal_noise_ratio(ref_a, ref_b, data_range=1.0)
        ref_s = structural_similarity(ref_a, ref_b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1.0, channel_axis=0)
        assert ours_p[i].item() == pytest.approx(ref_p, abs=1e-4)
        assert abs(ours_s[i].item() - ref_s) < 1e-4, (ours_s[i].item(), ref_s)


def test_identical_images_are_perfect_and_ssim_falls_with_noise():
    a = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert torch.isinf(psnr(a, a)).all()
    noisy = [(a + s * torch.randn_like(a)).clamp(0, 1) for s in (0.05, 0.2)]
    assert (ssim(noisy[0], a) > ssim(noisy[1], a)).all()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_reference_free_figures():
    y = torch.full((2, 1, 4, 4), 0.5)
    assert torch.allclose(residual(y, y + 0.1), torch.full((2,), 0.1))
    samples = torch.stack([torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)])
    assert torch.allclose(spread(samples), torch.full((2,), float(np.std([0, 1], ddof=1))))
    assert torch.isnan(spread(samples[:1])).all()
    assert torch.allclose(removed_energy(y, torch.full_like(y, 0.6), 0.5), torch.full((2,), 0.2))


def test_quality_bench_reports_a_diverged_method_instead_of_crashing_or_hiding_it(tmp_path):
    import json

    from pipeline.bench.quality import score, table, write_json

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 16, 16, generator=g)
    x_hat = clean.clone()
    x_hat[2] = float("nan")
    row = {"scenario": "main", "method": "joint-tweedie", "steps": 50, "nfe": 50, "seconds_per_image": 0.1,
           **score(x_hat, clean)}
    assert row["n_diverged"] == 1 and row["psnr_mean"] != row["psnr_mean"]  # NaN: no mean over survivors
    assert "diverged on 1 of 4 images" in table([row])
    write_json([row], str(tmp_path / "q.json"), {})
    assert json.loads((tmp_path / "q.json").read_text())["rows"][0]["psnr_mean"] is None
