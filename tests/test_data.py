"""The embedded synthetic benchmark: deterministic, the promised statistics, a separate test split."""
import torch

import ilsgan


def test_synthetic_is_deterministic_and_well_formed():
    x1, m1 = ilsgan.make_synthetic(64, 32, seed=7)
    x2, m2 = ilsgan.make_synthetic(64, 32, seed=7)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.uint8
    assert m1.shape == (64, 1, 32, 32) and m1.dtype == torch.bool
    x3, _ = ilsgan.make_synthetic(64, 32, seed=8)
    assert not torch.equal(x1, x3)


def test_one_object_per_image_of_the_promised_size_roughly_centred():
    _, m = ilsgan.make_synthetic(512, 32, seed=0)
    area = m.float().mean(dim=[1, 2, 3])
    assert area.min() > 0.10 and area.max() < 0.55 and 0.25 < area.mean() < 0.4
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = (m[:, 0] * ys).sum(dim=[1, 2]) / m[:, 0].sum(dim=[1, 2])
    cx = (m[:, 0] * xs).sum(dim=[1, 2]) / m[:, 0].sum(dim=[1, 2])
    assert ((cy - 15.5).abs() < 8).all() and ((cx - 15.5).abs() < 8).all()


def test_foreground_and_background_colours_overlap():
    x, m = ilsgan.make_synthetic(256, 32, seed=1)
    fg = x.permute(0, 2, 3, 1)[m[:, 0]].float()
    bg = x.permute(0, 2, 3, 1)[~m[:, 0]].float()
    # colour alone does not separate them: their mean colours are close
    assert (fg.mean(0) - bg.mean(0)).abs().max() < 30


def test_test_split_is_separate_and_has_masks():
    xtr, mtr = ilsgan.load_dataset("synthetic", "", 16, "train", n_train=100)
    xte, mte = ilsgan.load_dataset("synthetic", "", 16, "test")
    assert len(xtr) == 100 and len(xte) == 1000 and mte is not None
    assert not any(torch.equal(xte[0], a) for a in xtr)


def test_to_float_range():
    x = torch.tensor([0, 255], dtype=torch.uint8)
    assert ilsgan.to_float(x).tolist() == [-1.0, 1.0]
