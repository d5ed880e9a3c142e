"""Segmentation scoring: IoU/DICE on hand-made masks, and the U-Net protocol on a tiny run."""
import json

import pytest
import torch

import unet_eval


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool)[None]


def test_identical_masks_score_one():
    m = masks([1, 1, 0, 0], [0, 1, 0, 0])
    r = unet_eval.seg_metrics(m, m)
    assert r["iou"] == r["dice"] == r["iou_dataset"] == r["miou"] == r["pacc"] == 1.0


def test_disjoint_masks_score_zero():
    r = unet_eval.seg_metrics(masks([1, 1, 0, 0]), masks([0, 0, 1, 1]))
    assert r["iou"] == r["dice"] == r["pacc"] == 0.0


def test_known_partial_overlap():
    pred, gt = masks([1, 1, 1, 0, 0, 0]), masks([0, 1, 1, 1, 0, 0])  # inter 2, union 4, sizes 3 + 3
    r = unet_eval.seg_metrics(pred, gt)
    assert r["iou"] == pytest.approx(0.5) and r["dice"] == pytest.approx(4 / 6)
    assert r["pacc"] == pytest.approx(4 / 6)
    assert r["miou"] == pytest.approx((0.5 + 2 / 4) / 2)  # bg: tn 2 / (2 + 1 + 1)
    assert r["missed"] == pytest.approx(1 / 4) and r["extra"] == pytest.approx(1 / 4)  # of the union 4


def test_iou_missed_and_extra_split_each_image():
    pred = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    r = unet_eval.seg_metrics(pred, gt)  # image 0 misses 2 of 4, image 1 adds 2 of 4, image 2 is empty
    assert r["missed"] == pytest.approx(0.5 / 3) and r["extra"] == pytest.approx(0.5 / 3)
    assert r["iou"] + r["missed"] + r["extra"] == pytest.approx(1.0)


def test_iou_by_size_groups_images_by_true_area():
    gt = torch.zeros(6, 4, 4, dtype=torch.bool)
    for i in range(6):
        gt[i].view(-1)[:i + 1] = True  # areas 1/16 ... 6/16
    pred = gt.clone()
    pred[4:] = False  # the two largest are missed
    r = unet_eval.iou_by_size(pred, gt)
    assert list(r.values()) == [1.0, 1.0, 0.0]
    assert list(r) == ["0.06-0.12", "0.19-0.25", "0.31-0.38"]


def test_both_empty_is_defined_not_nan():
    empty = masks([0, 0, 0, 0])
    r = unet_eval.seg_metrics(empty, empty)
    assert r["iou"] == 1.0 and r["dice"] == 1.0


def test_per_image_mean_differs_from_dataset_level():
    pred = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    r = unet_eval.seg_metrics(pred, gt)
    assert r["iou"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert r["iou_dataset"] == pytest.approx(4 / 6)


def test_unet_shapes_and_official_size():
    assert unet_eval.UNet(8)(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    n = sum(p.numel() for p in unet_eval.UNet(64).parameters())
    assert 13.0e6 < n < 13.8e6  # the official 13.4 M-parameter U-Net


def test_unet_smoke_fit_on_a_tiny_checkpoint_writes_results(tiny_run):
    out, _ = tiny_run
    seg = unet_eval.evaluate(unet_eval.EvalConfig(ckpt=str(out), n=128, width=4, iters=30, batch=16,
                                                  val_every=25, device="cpu"))
    assert seg["n_test"] == 1000 and seg["seg_res"] == 16
    assert {"all foreground", "mean training mask"} <= set(seg["baselines"])
    assert [h["iter"] for h in seg["unet_val"]] == [20, 25, 30]  # iteration 20, every val_every, the last
    assert 0.1 <= seg["kimg"] < 0.11  # how far the checkpoint trained (tiny: 0.1 kimg in batches of 8)
    results = json.loads((out / "results.json").read_text())
    assert results["segmentation"]["test"] == seg["test"]
    assert (out / "segmentation.png").exists()


def test_128px_runs_segment_at_64_and_upsample_logits():
    """The official 128 px protocol: logits computed at 64 px, upsampled x2 (bilinear) before the argmax.
    Hand-made: one foreground logit of +1 at pixel (10, 10) of 64x64 becomes positive on the 4x4 block
    19..22 of 128x128 (bilinear spreads it); nearest upsampling of the labels would give the 2x2 block 20..21."""
    class Spike(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1, 10, 10] = 1.0
            return logits
    pred = unet_eval.predict(Spike(), torch.zeros(2, 3, 64, 64), out_res=128)
    expect = torch.zeros(2, 128, 128, dtype=torch.bool)
    expect[:, 19:23, 19:23] = True
    assert pred.shape == (2, 128, 128) and torch.equal(pred, expect)


@pytest.mark.slow
def test_runs_above_seg_res_are_segmented_at_seg_res_and_scored_at_their_own(tmp_path, monkeypatch):
    """The official 128 px protocol, scaled down: a 32 px run with seg_res 16 trains the U-Net on
    16 px pairs and scores its upsampled predictions against 32 px masks."""
    import ilsgan
    out = ilsgan.train(ilsgan.make_config("tiny", resolution=32, kimg=0.016, out=str(tmp_path / "run"), device="cpu"))
    seen, train_unet = {}, unet_eval.train_unet
    monkeypatch.setattr(unet_eval, "train_unet", lambda x, m, ec, dev: seen.update(x=x.shape, m=m.shape) or train_unet(x, m, ec, dev))
    seg = unet_eval.evaluate(unet_eval.EvalConfig(ckpt=str(out), n=32, width=4, iters=2, batch=8, val_every=2,
                                                  seg_res=16, device="cpu"))
    assert seen == dict(x=(32, 3, 16, 16), m=(32, 1, 16, 16))
    assert seg["seg_res"] == 16 and "segmented at 16px, scored at 32px" in seg["protocol"]


@pytest.mark.slow
def test_oracle_trains_on_real_masks_and_learns_them(tiny_run):
    """Trained on the benchmark's real masks, the U-Net must segment the test split far better than
    calling everything foreground: the protocol can learn, and it scores what it learnt."""
    out, _ = tiny_run
    seg = unet_eval.evaluate(unet_eval.EvalConfig(ckpt=str(out), n=256, width=8, iters=150, batch=32, val_every=50,
                                                  device="cpu", oracle=True))
    assert seg["protocol"].startswith("ORACLE") and (out / "oracle.png").exists()
    assert seg["test"]["iou"] > seg["baselines"]["all foreground"]["iou"] + 0.2
    assert json.loads((out / "results.json").read_text())["oracle"]["test"] == seg["test"]


def test_preset_fills_the_defaults_but_not_the_flags_given():
    import ilsgan

    def resolved(argv):
        return ilsgan.companion_main(unet_eval.EvalConfig, unet_eval.PRESETS, "doc",
                                     ["--ckpt", "x", "--device", "cpu"] + argv, lambda c: c)
    cpu = resolved(["--preset", "cpu"])
    assert (cpu.n, cpu.width, cpu.iters) == (3000, 16, 600)
    mixed = resolved(["--preset", "cpu", "--n", "10000", "--iters", "50"])  # 10000 is also the default
    assert (mixed.n, mixed.width, mixed.iters) == (10000, 16, 50)
    assert cpu.flip_rotate and not resolved(["--preset", "cpu", "--no-flip-rotate"]).flip_rotate
    assert not resolved(["--preset", "official"]).flip_rotate  # the official protocol: colour only
    assert resolved([]) == cpu  # on a CPU, no --preset means the cpu preset
    assert ilsgan.preset_name(cpu, unet_eval.PRESETS) == "cpu" and ilsgan.preset_name(mixed, unet_eval.PRESETS) == "custom"


def test_flip_rotate_moves_image_and_mask_together():
    torch.manual_seed(0)
    m = torch.rand(4, 8, 8) < 0.3
    x = torch.cat([m[:, None].float(), torch.rand(4, 2, 8, 8)], 1)
    seen = set()
    for _ in range(40):
        xb, mb = unet_eval.flip_rotate(x, m)
        assert torch.equal(xb[:, 0].bool(), mb)
        seen.add(mb.numpy().tobytes())
    assert len(seen) == 8  # all eight flips / quarter-turns occur


def test_random_shadows_darken_each_image_beyond_one_straight_line():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 12, 12) * 1.5 - 0.5  # x + 1 >= 0.5: the gain is read back by a division
    gain = (unet_eval.random_shadows(x, lines=1, p=1.0) + 1) / (x + 1)
    assert torch.allclose(gain, gain[:, :1].expand_as(gain), atol=1e-5)  # the same for R, G and B
    assert gain.min() >= 0.7 - 1e-5 and gain.max() <= 1 + 1e-5
    for g in gain[:, 0]:  # two levels per image: lit (1) and shadowed (0.7-1), split by a line
        assert len(torch.unique(g.round(decimals=4))) == 2
    torch.testing.assert_close(unet_eval.random_shadows(x, p=0.0), x)  # no line drawn: unchanged
