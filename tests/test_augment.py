"""ADA-lite: p = 0 is the identity, p > 0 changes images per sample and stays differentiable."""
import torch

import ilsgan


def test_p_zero_is_exactly_the_identity():
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(ilsgan.augment(x, 0.0), x)


def test_augmentation_is_per_sample_and_differentiable():
    x = torch.randn(64, 3, 16, 16, requires_grad=True)
    y = ilsgan.augment(x, 0.05)
    assert y.shape == x.shape and torch.isfinite(y).all()
    changed = (y - x).abs().flatten(1).amax(1) > 1e-4
    assert 8 < changed.sum() < 56  # 13 ops at p = 0.05: about half the samples are left untouched
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_colour_only_keeps_geometry():
    x = torch.zeros(16, 3, 8, 8)
    x[..., 2:4, 2:4] = 1.0
    y = ilsgan.augment(x, 1.0, geometric=False)
    # every colour op is affine per pixel, so pixels equal in x stay equal in y
    assert torch.allclose(y[..., 0, 0], y[..., 7, 7], atol=1e-5)
    assert torch.allclose(y[..., 2, 2], y[..., 3, 3], atol=1e-5)


def test_hue_and_saturation_keep_grey_pixels_grey():
    x = torch.full((32, 3, 4, 4), 0.3)
    torch.manual_seed(0)
    y = ilsgan.augment(x, 1.0, geometric=False)
    # brightness, contrast, luma flip, hue and saturation all map grey to grey
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 1], y[:, 2], atol=1e-5, rtol=0)
