"""ADA-lite: p = 0 is the identity, p > 0 changes images per sample and stays differentiable, and the
composed maps equal stock augment.py's matrices, built one op at a time."""
import math

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
    second derivative goes through ADA's grid_sample (PyTorch differentiates it twice from 2.12)."""
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


def stock_augment(x, p, geometric=True):
    """Reference: stock augment.py's 'bgc' construction, one homogeneous matrix per op (3x3 geometric,
    4x4 colour) multiplied in its order, drawing the random numbers as augment() does."""
    B, _, H, W = x.shape
    x_in, fired = x, torch.zeros(B, dtype=torch.bool)

    def fire(q=p):
        nonlocal fired
        f = torch.rand(B) < q
        fired = fired | f
        return f

    def gauss(std):
        return torch.randn(B) * std

    def mat(rows):  # [B] entries, row-major -> [B,n,n]
        n = int(math.isqrt(len(rows)))
        return torch.stack([r if torch.is_tensor(r) else torch.full([B], float(r)) for r in rows], 1).reshape(B, n, n)

    def rot(t):
        return mat([t.cos(), -t.sin(), 0, t.sin(), t.cos(), 0, 0, 0, 1])

    if geometric:
        one = torch.ones(B)
        G = mat([1, 0, 0, 0, 1, 0, 0, 0, 1])
        G = G @ mat([torch.where(fire() & (torch.rand(B) < 0.5), -one, one), 0, 0, 0, 1, 0, 0, 0, 1])
        G = G @ rot(torch.randint(0, 4, (B,)) * fire() * (math.pi / 2))
        t = (torch.rand(2, B) * 2 - 1) * 0.125 * 2 * fire()
        G = G @ mat([1, 0, torch.round(t[0] * W / 2) * 2 / W, 0, 1, torch.round(t[1] * H / 2) * 2 / H, 0, 0, 1])
        s = torch.exp2(gauss(0.2) * fire())
        G = G @ mat([s, 0, 0, 0, s, 0, 0, 0, 1])
        p_rot = 1 - math.sqrt(1 - p)
        G = G @ rot((torch.rand(B) * 2 - 1) * math.pi * fire(p_rot))
        s = torch.exp2(gauss(0.2) * fire())
        G = G @ mat([s, 0, 0, 0, 1 / s, 0, 0, 0, 1])
        G = G @ rot((torch.rand(B) * 2 - 1) * math.pi * fire(p_rot))
        G = G @ mat([1, 0, gauss(0.125) * 2 * fire(), 0, 1, gauss(0.125) * 2 * fire(), 0, 0, 1])
        grid = F.affine_grid(G[:, :2], [B, 3, H, W], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)
    I4, vv = torch.eye(4), torch.outer(v, v)
    b = gauss(0.2) * fire()
    T = I4.repeat(B, 1, 1)
    T[:, :3, 3] = b[:, None]
    C = T
    c = torch.exp2(gauss(0.5) * fire())
    C = torch.diag_embed(torch.stack([c, c, c, torch.ones(B)], 1)) @ C
    i = (torch.randint(0, 2, (B,)) * fire()).float()
    C = (I4 - 2 * vv * i[:, None, None]) @ C
    th = (torch.rand(B) * 2 - 1) * math.pi * fire()
    K = torch.zeros(4, 4)
    K[0, 1], K[0, 2], K[1, 0], K[1, 2], K[2, 0], K[2, 1] = -v[2], v[1], v[2], -v[0], -v[1], v[0]
    C = (I4 + th.sin()[:, None, None] * K + (1 - th.cos())[:, None, None] * (K @ K)) @ C
    sat = torch.exp2(gauss(1.0) * fire())
    C = (vv + (I4 - vv) * sat[:, None, None]) @ C
    x = torch.einsum("bij,bjhw->bihw", C[:, :3, :3], x) + C[:, :3, 3, None, None]
    return torch.where(fired[:, None, None, None], x, x_in)


@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("geometric", [True, False])
def test_composed_maps_equal_stocks_matrices_op_by_op(p, geometric):
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    torch.manual_seed(7)
    ours, after_ours = ilsgan.augment(x, torch.tensor(p), geometric), torch.rand(1)
    torch.manual_seed(7)
    ref, after_ref = stock_augment(x, p, geometric), torch.rand(1)
    assert torch.equal(after_ours, after_ref)  # the same random numbers were drawn
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
