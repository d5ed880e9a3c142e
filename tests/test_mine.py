"""MINE against known answers: correlated Gaussians, MI = -d/2 log(1 - rho^2); independent pairs ~ 0."""
import math

import pytest
import torch

import mine


def gaussian_pairs(n, d, rho, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * e


FAST = dict(hidden=128, lr=1e-3, batch=512, iters=1500, eval_every=100, last=5)


@pytest.mark.slow
@pytest.mark.parametrize("d, rho", [(4, 0.8), (2, 0.95), (8, 0.7)])  # 2.04, 2.33, 2.69 nats
def test_mine_within_15_percent_of_the_true_mi(d, rho):
    true = -d / 2 * math.log(1 - rho**2)
    est, history = mine.estimate_mi(*gaussian_pairs(20000, d, rho), mine.MineConfig(**FAST))
    assert len(history) == FAST["iters"] // FAST["eval_every"]
    assert abs(est - true) < 0.15 * true, (est, true)


@pytest.mark.slow
def test_mine_with_moving_average_correction():
    true = -4 / 2 * math.log(1 - 0.8**2)
    est, _ = mine.estimate_mi(*gaussian_pairs(20000, 4, 0.8), mine.MineConfig(**FAST, ma_rate=0.01))
    assert abs(est - true) < 0.15 * true, (est, true)


@pytest.mark.slow
def test_mine_near_zero_for_independent_pairs():
    x, _ = gaussian_pairs(20000, 4, 0.0, seed=1)
    _, y = gaussian_pairs(20000, 4, 0.0, seed=2)
    est, _ = mine.estimate_mi(x, y, mine.MineConfig(**FAST))
    assert abs(est) < 0.05


def test_dv_bound_known_answer():
    t_joint, t_marg = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    assert mine.dv_bound(t_joint, t_marg).item() == pytest.approx(2.0)  # mean 2 - log mean e^0
    t_marg = torch.tensor([0.0, math.log(3.0)])  # log mean(1, 3) = log 2, not the mean log 3 / 2
    assert mine.dv_bound(t_joint, t_marg).item() == pytest.approx(2.0 - math.log(2.0))


def test_layer_pairs_cut_the_regions_of_eq_11(monkeypatch):
    """A mask that is 1 on the left half: the first pair is (f, b) on the left and zero on the right
    (the foreground visible, the background hidden under it), the second the reverse on the right."""
    import ilsgan
    f, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    m = torch.zeros(2, 1, 8, 8)
    m[..., :4] = 1
    monkeypatch.setattr(ilsgan, "sample", lambda G, n, batch, seed: iter([dict(f=f, b=b, m=m)]))
    pairs = mine.layer_pairs(*mine.generated_layers(None, 2, 8))
    (vis_f, inv_b), (vis_b, inv_f) = pairs["vis_fg;inv_bg"], pairs["vis_bg;inv_fg"]
    assert torch.equal(vis_f[..., :4], f[..., :4]) and torch.equal(inv_b[..., :4], b[..., :4])
    assert not vis_f[..., 4:].any() and not inv_b[..., 4:].any()
    assert torch.equal(vis_b[..., 4:], b[..., 4:]) and torch.equal(inv_f[..., 4:], f[..., 4:])
    assert not vis_b[..., :4].any() and not inv_f[..., :4].any()
    assert torch.equal(pairs["whole f;b"][0], f) and torch.equal(pairs["whole f;b"][1], b)


def test_mine_on_a_tiny_run_writes_results(tiny_run):
    import json
    out, _ = tiny_run
    section = mine.evaluate(mine.make_config("tiny", ckpt=str(out), device="cpu"))
    assert set(section["nats"]) == {"vis_fg;inv_bg", "vis_bg;inv_fg", "whole f;b", "sum (Eq. 11)"}
    assert section["protocol"].startswith("MINE (tiny preset: 64 samples at 8px")
    assert json.loads((out / "results.json").read_text())["mi"] == section


def test_a_non_finite_batch_is_skipped_not_learned_from(monkeypatch):
    """Official: a batch whose bound is not finite is skipped. Here the check stays on the device (fused
    Adam takes the flag): with every loss after the 5th made NaN, the weights stay those of step 5, so
    the estimates stay finite and do not move; without the skip they would be NaN."""
    real = mine.mine_step
    calls = []

    def poisoned(T, x, y, ma, ma_rate):
        loss, bound, ma = real(T, x, y, ma, ma_rate)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 5 else loss), bound, ma
    monkeypatch.setattr(mine, "mine_step", poisoned)
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    mc = mine.make_config("tiny", iters=40, eval_every=10, batch=32, device="cpu")
    _, history = mine.estimate_mi(x, x + 0.1 * torch.randn(256, 4), mc)
    assert all(math.isfinite(h) for h in history) and max(history) - min(history) < 0.5
