"""Every equation's function against known answers (an instructor can blank one and grade it here), and
our guards beside them."""

import pytest
import torch
import torch.nn.functional as F

import ilsgan
import runs


# --- Eq. (1), (3): composition and the perturbation T -------------------------------------------

def test_composite_identities():
    f, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    one, zero = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    assert torch.equal(ilsgan.composite(f, b, one), f)
    assert torch.equal(ilsgan.composite(f, b, zero), b)
    half = ilsgan.composite(f, b, one * 0.5)
    torch.testing.assert_close(half, (f + b) / 2)


def test_shift_image_known_answer():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = ilsgan.shift_image(x, torch.tensor([1]), torch.tensor([-1]))  # right 1, up 1
    expect = torch.tensor([[0, 4, 5, 6], [0, 8, 9, 10], [0, 12, 13, 14], [0, 0, 0, 0.0]])
    assert torch.equal(y[0, 0], expect)
    assert torch.equal(ilsgan.shift_image(x, torch.tensor([0]), torch.tensor([0])), x)


def test_perturbed_composite_moves_f_and_m_but_not_b():
    f, b = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    m = torch.zeros(3, 1, 8, 8)
    m[..., 3:5, 3:5] = 1
    dx, dy = torch.tensor([2, 0, -1]), torch.tensor([0, 1, -2])
    x, f_s, m_s = ilsgan.perturbed_composite(f, b, m, dx, dy)
    assert torch.equal(m_s.sum(dim=[1, 2, 3]), m.sum(dim=[1, 2, 3]))  # object fully inside: no loss
    assert m_s[0, 0, 3, 5] == 1 and m_s[0, 0, 3, 3] == 0
    torch.testing.assert_close(x, m_s * f_s + (1 - m_s) * b)
    assert torch.equal(x[m_s.expand_as(x) == 0], b[m_s.expand_as(b) == 0])


def test_random_shifts_range():
    dx, dy = ilsgan.random_shifts(10000, 64, 0.125, "cpu")
    assert dx.min() == -8 and dx.max() == 8 and dy.abs().max() == 8
    counts = torch.bincount(dx + 8).float()
    assert counts[0] < 0.7 * counts[8]  # endpoints have half the probability (rounding)


# --- Eq. (2), R1 --------------------------------------------------------------------------------

def test_adversarial_losses_equal_binary_cross_entropy():
    d_real, d_fake = torch.randn(16), torch.randn(16)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(ilsgan.g_adversarial_loss(d_fake), bce(d_fake, torch.ones(16)))
    torch.testing.assert_close(ilsgan.d_adversarial_loss(d_real, d_fake),
                               bce(d_real, torch.ones(16)) + bce(d_fake, torch.zeros(16)))


def test_r1_of_a_linear_discriminator_is_squared_weight_norm():
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    d = (x * w).sum(dim=[1, 2, 3]) + 0.3
    torch.testing.assert_close(ilsgan.r1_penalty(d, x), w.square().sum())


# --- Eq. (4): mask area and binarisation ---------------------------------------------------------

def test_mask_area_loss_known_answers():
    m = torch.zeros(2, 1, 4, 4)
    m[0] = 1.0  # area 1 -> no penalty; area 0 -> eta
    assert ilsgan.mask_area_loss(m, 0.25).item() == pytest.approx(0.125)
    m[1, :, :2, :2] = 1.0  # area 0.25 -> exactly at the threshold
    assert ilsgan.mask_area_loss(m, 0.25).item() == pytest.approx(0.0)


def test_the_guards_known_answers_each_off_at_zero():
    off = ilsgan.make_config("paper64")  # every guard 0: the paper's losses alone
    full, same, half = torch.ones(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    same[..., 2:6, 2:6] = 1  # one centred mask for every sample: spread 0
    half[:2] = 1  # every pixel on in two samples of four: spread (unbiased std) sqrt(1/3)
    for m in (full, same, half):
        assert ilsgan.guard_loss(m, m, off).item() == 0
    area = runs.with_overrides(off, mask_max=0.6, lambda_guard=2.0)
    assert ilsgan.guard_loss(full, full, area).item() == pytest.approx(2 * 0.4)  # area 1, 0.4 over the hinge
    spread = runs.with_overrides(off, min_spread=0.2, lambda_guard=2.0)
    assert ilsgan.guard_loss(same, same, spread).item() == pytest.approx(2 * 0.2)
    assert ilsgan.guard_loss(half, half, spread).item() == 0 and ilsgan.mask_spread(half).item() == pytest.approx(3 ** -0.5)
    border = runs.with_overrides(off, lambda_border=2.0)
    assert ilsgan.guard_loss(same, same, border).item() == 0 and ilsgan.guard_loss(full, full, border).item() == 2.0


def test_binarization_loss_known_answers():
    assert ilsgan.binarization_loss(torch.tensor([0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)) == 0
    assert ilsgan.binarization_loss(torch.full((1, 1, 2, 2), 0.5)).item() == pytest.approx(0.5)
    assert ilsgan.binarization_loss(torch.tensor([0.1, 0.8, 0.5, 0.0]).reshape(1, 1, 2, 2)).item() == pytest.approx(0.2)


def test_border_loss_counts_only_the_band():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1
    assert ilsgan.border_loss(m, 2).item() == 0
    assert ilsgan.border_loss(torch.ones(1, 1, 8, 8), 2).item() == pytest.approx(1.0)
    two = torch.ones(2, 1, 8, 8)  # per sample: band means 1 and 0.25 (a quarter of the band)
    two[1, ..., :4, :] = 0
    two[1, ..., :, :4] = 0  # only the bottom-right quadrant: 12 of the 48 band pixels
    assert ilsgan.border_loss(two, 2).item() == pytest.approx((1 + 0.25) / 2)


# --- Eq. (8)-(12): CLUB and ILS-MI -------------------------------------------------------------

def test_club_is_zero_for_independent_and_large_for_copied_layers():
    y = torch.randn(512, 64)
    perm = torch.randperm(512)
    independent = ilsgan.club(torch.randn(512, 64), y, perm)
    copied = ilsgan.club(y.clone(), y, perm)
    assert abs(independent.item()) < 0.05
    assert copied.item() > 1.0  # mean |y_k - y_i| = 2/sqrt(pi) ~ 1.13 for unit Gaussians


def test_club_known_answer_laplace_and_gaussian():
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    perm = torch.tensor([1, 0])
    # pos: (0.5, 1.0); neg: d(x1, y0) = (1 + 2)/2 = 1.5, d(x0, y1) = (1 + 1)/2 = 1
    assert ilsgan.club(x, y, perm).item() == pytest.approx(((1.5 - 0.5) + (1.0 - 1.0)) / 2)
    # Gaussian: 0.5 * mse; pos (0.25, 1.0), neg (0.5*(1+4)/2 = 1.25, 0.5)
    assert ilsgan.club(x, y, perm, "gaussian").item() == pytest.approx(((1.25 - 0.25) + (0.5 - 1.0)) / 2)


def test_ils_mi_loss_equals_two_club_terms_on_regions():
    f, b = torch.rand(6, 3, 4, 4) * 1.8 - 0.9, torch.rand(6, 3, 4, 4) * 1.8 - 0.9
    m = torch.rand(6, 1, 4, 4)
    torch.manual_seed(3)
    loss = ilsgan.ils_mi_loss(f, b, m)
    torch.manual_seed(3)
    p1, p2 = torch.randperm(6), torch.randperm(6)
    expect = ilsgan.club(b * m, f * m, p1) + ilsgan.club(f * (1 - m), b * (1 - m), p2)
    torch.testing.assert_close(loss, expect)


def test_ils_mi_is_lower_for_independent_layers():
    f = torch.rand(64, 3, 8, 8) * 1.8 - 0.9
    m = torch.zeros(64, 1, 8, 8)
    m[..., 2:6, 2:6] = 1
    leaky = ilsgan.ils_mi_loss(f, f.clone(), m)  # background copies the foreground
    indep = ilsgan.ils_mi_loss(f, torch.rand(64, 3, 8, 8) * 1.8 - 0.9, m)
    assert leaky.item() > indep.item() + 0.1


def test_ils_mi_ablation_switches_route_gradients():
    def grads(**kw):
        f = (torch.rand(8, 3, 4, 4) - 0.5).requires_grad_(True)
        b = (torch.rand(8, 3, 4, 4) - 0.5).requires_grad_(True)
        m = (torch.rand(8, 1, 4, 4) < 0.5).float().requires_grad_(True)  # binary: each pixel visible in one layer
        ilsgan.ils_mi_loss(f, b, m, **kw).backward()
        vis = m.detach().bool().expand(-1, 3, -1, -1)  # where f is visible and b hidden
        return f.grad, b.grad, m.grad, vis
    f_g, b_g, m_g, vis = grads()
    assert (f_g[vis] != 0).any() and (b_g[~vis] != 0).any() and m_g is not None  # Table 3 row B: all optimised
    f_g, b_g, m_g, vis = grads(opt_vis=False)  # row C: f_vis and b_vis detached, the hidden parts still pushed
    assert (f_g[vis] == 0).all() and (b_g[~vis] == 0).all()
    assert (f_g[~vis] != 0).any() and (b_g[vis] != 0).any()
    assert grads(opt_mask=False)[2] is None  # row D
    assert grads(separate=False)[2] is None  # row E: whole layers, no mask


def test_ils_gradients_are_gated_outside_minus_one_one():
    f = torch.tensor([[0.5, 1.5, -2.0, -0.5]], requires_grad=True)
    g = ilsgan.gate_gradients(f)
    assert torch.equal(g, f)
    g.sum().backward()
    assert f.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]


# --- Eq. (13): ILS-L1 ---------------------------------------------------------------------------

def test_ils_l1_known_answer_and_detached_visible_layer():
    f = torch.zeros(1, 3, 2, 2, requires_grad=True)
    b = torch.full((1, 3, 2, 2), 0.5, requires_grad=True)
    m = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    loss = ilsgan.ils_l1_loss(f, b, m)
    assert loss.item() == pytest.approx(-(0.5 * 0.5) - (0.5 * 0.5))  # two halves of the image
    loss.backward()
    assert m.grad is None  # official: mask detached
    assert (b.grad[..., 0, :] < 0).all() and (b.grad[..., 1, :] == 0).all()  # only b_inv is pushed


def test_ils_l1_counts_a_pixel_outside_minus_one_one_as_zero():
    """official 'l1_distance': the pushed layer's pixels outside (-1, 1) count 0 in the value too."""
    f, m = torch.zeros(1, 3, 1, 2), torch.ones(1, 1, 1, 2)  # b hidden everywhere
    b = torch.tensor([0.5, 3.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2).clone().requires_grad_(True)
    loss = ilsgan.ils_l1_loss(f, b, m)
    assert loss.item() == pytest.approx(-0.5 / 2)  # the pixel at 3.0 is not counted
    loss.backward()
    assert (b.grad[..., 1] == 0).all() and (b.grad[..., 0] != 0).all()


# --- Eq. (5) schedule, ADA controller -----------------------------------------------------------

def test_ils_weight_schedule_matches_official_at_8000_kimg():
    cfg = ilsgan.make_config("paper64")
    assert ilsgan.ils_weight(0, cfg) == 0.2 and ilsgan.ils_weight(400, cfg) == 0.2
    assert ilsgan.ils_weight(401, cfg) == 1.0
    short = ilsgan.make_config("cpu")  # shorter runs leave the warm-up after 5% of their length
    assert ilsgan.ils_weight(short.total_kimg * 0.06, short) == 1.0


def test_ada_adjust_step_and_clamp():
    step, t = 32 * 4 / 500_000, torch.tensor
    assert ilsgan.ada_adjust(t(0.1), t(0.9), 0.6, 32, 4, 500).item() == pytest.approx(0.1 + step)
    assert ilsgan.ada_adjust(t(0.1), t(0.1), 0.6, 32, 4, 500).item() == pytest.approx(0.1 - step)
    assert ilsgan.ada_adjust(t(0.1), t(0.6), 0.6, 32, 4, 500).item() == pytest.approx(0.1)  # official np.sign(0) = 0
    assert ilsgan.ada_adjust(t(0.0), t(0.1), 0.6, 32, 4, 500).item() == 0.0
    assert ilsgan.ada_adjust(t(1.0), t(0.9), 0.6, 32, 4, 500).item() == 1.0

