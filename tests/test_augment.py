"""ADA-lite: p = 0 is the identity, p > 0 changes images per sample and stays differentiable."""
import pytest
import torch
import torch.nn.functional as F

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


def test_p_as_a_device_tensor_and_samples_left_alone_are_exact():
    x = torch.randn(64, 3, 16, 16)
    assert torch.equal(ilsgan.augment(x, torch.tensor(0.0)), x)  # the training loop's p, still zero
    y = ilsgan.augment(x, torch.tensor(0.02))
    same = (y == x).flatten(1).all(1)
    assert 8 < same.sum() < 64  # at p = 0.02 most samples see no op, and come back bit for bit


def test_r1_through_ada_matches_finite_differences():
    """R1 differentiates D(A(x)) with respect to x, and the optimiser differentiates that again: the
    second derivative goes through ADA's grid_sample (which PyTorch lacked for years)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        D = ilsgan.Discriminator(ilsgan.make_config("tiny"))
        x = torch.rand(4, 3, 16, 16) * 2 - 1

        def penalty():
            torch.manual_seed(5)  # the same augmentation every time; p = 1: every op fires
            xr = x.clone().requires_grad_(True)
            return ilsgan.r1_penalty(D(ilsgan.augment(xr, 1.0)), xr)

        penalty().backward()
        w = D.fromrgb.weight
        for idx in [(0, 0, 0, 0), (3, 1, 0, 0), (7, 2, 0, 0)]:
            w.data[idx] += 1e-6
            up = penalty().item()
            w.data[idx] -= 2e-6
            down = penalty().item()
            w.data[idx] += 1e-6
            assert abs((up - down) / 2e-6 - w.grad[idx].item()) < 1e-4 * max(1.0, abs(w.grad[idx].item()))
    finally:
        torch.set_default_dtype(torch.float32)


def test_grid_sample_gradfix_gives_the_native_second_derivative():
    x, grid = torch.rand(2, 3, 8, 8, requires_grad=True), torch.rand(2, 8, 8, 2) * 2 - 1
    w = torch.randn(3, requires_grad=True)

    def second_derivative(sample):
        y = sample(x, grid)
        (g,) = torch.autograd.grad((y * w[None, :, None, None]).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), w)[0]

    ours = second_derivative(ilsgan.GridSample.apply)
    try:
        native = second_derivative(lambda x, grid: F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                                                                 align_corners=False))
    except RuntimeError as e:  # older PyTorch: no native second derivative to compare with
        pytest.skip(str(e))
    torch.testing.assert_close(ours, native)
