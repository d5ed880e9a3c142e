"""Real-data loaders on small fake trees built in the documented layouts (DRC cars/dogs, CUB, folder)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ilsgan
from conftest import ROOT, save_mask, save_rgb


def test_cars_shapes_ranges_and_split_sizes(cars):
    x, m = ilsgan.load_dataset("cars", str(cars), 16, "train")
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8 and m is None
    x, m = ilsgan.load_dataset("cars", str(cars), 16, "test")
    assert x.shape == (2, 3, 16, 16) and m.shape == (2, 1, 16, 16) and m.dtype == torch.bool
    assert m[0, 0, 8, 8] and not m[0, 0, 0, 0] and m.float().mean() == pytest.approx(0.25)


def test_training_crop_is_the_centred_square(cars):
    x, _ = ilsgan.load_dataset("cars", str(cars), 20, "train")
    # a1 is 60x40: the centre square is x in [10, 50), half blue (x < 30) and half red
    assert x[0, 2, 10, 2] > 200 and x[0, 0, 10, 17] > 150  # left blue, right red
    assert x[0, 2, 10, 9] > 150 and x[0, 0, 10, 11] > 150


def test_bgr_switch_reproduces_the_official_channel_order(cars):
    rgb, _ = ilsgan.load_dataset("cars", str(cars), 16, "test")
    bgr, _ = ilsgan.load_dataset("cars", str(cars), 16, "test", bgr=True)
    assert torch.equal(rgb.flip(1), bgr)


def test_dogs_layout(tmp_path):
    r = tmp_path / "dogs"
    r.mkdir()
    np.save(r / "data_tr_sel.npy", np.array(["d1", "d2"]))
    np.save(r / "data_te_sel.npy", np.array(["e1", "e2", "e3"]))
    for t in ["d1", "d2"]:
        save_rgb(r / f"train_orig/orig/{t}_orig.png", 30, 20)
    for t in ["e1", "e2", "e3"]:
        save_rgb(r / f"data_mrcnn/test/resized/{t}_resized.png", 24, 24)
        save_mask(r / f"data_mrcnn/test/resized/{t}_maskresized.png", 24, 24, (0, 0, 12, 24))
    assert len(ilsgan.load_dataset("dogs", str(r), 8, "train")[0]) == 2
    x, m = ilsgan.load_dataset("dogs", str(r), 8, "test")
    assert len(x) == 3 and m[:, 0, :, :4].all() and not m[:, 0, :, 4:].any()


def test_cub_drc_split_and_crop(cub):
    x, m = ilsgan.load_dataset("cub", str(cub), 16, "train")
    assert len(x) == 1 and m is None  # split 0 only; training needs no segmentations
    x, m = ilsgan.load_dataset("cub", str(cub), 30, "test")  # split 2: ids 3 and 4
    assert x.shape == (2, 3, 30, 30)
    # id 4: box (10,10,40,40) in 64x64 -> r = 30, centre 30 -> crop (0,0,60,60): the box fills 10..50 of 60
    assert m[1, 0, 15, 15] and not m[1, 0, 2, 2]
    frac = m[1].float().mean().item()
    assert frac == pytest.approx((40 / 60) ** 2, abs=0.08)


def test_drc_crop_geometry_clips_at_the_border():
    assert ilsgan.drc_crop(10.0, 10.0, 40.0, 40.0, 64, 64) == (0, 0, 60, 60)
    assert ilsgan.drc_crop(70.9, 10.0, 29.0, 30.0, 100, 50) == (62, 3, 100, 47)  # r 22, centre (84, 25): clipped, not square
    assert ilsgan.centre_square(40, 60) == (10, 0, 50, 40)


def test_cub_falls_back_to_the_official_split(cub, capsys):
    (cub / "train_val_test_split.txt").unlink()
    assert len(ilsgan.load_dataset("cub", str(cub), 8, "train")[0]) == 2
    assert "train_test_split.txt (official CUB split" in capsys.readouterr().out


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((5, 7), 90, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((5, 7, 4), 90, np.uint8)).save(tmp_path / "a.png")
    assert ilsgan.read_rgb(tmp_path / "g.png").shape == (5, 7, 3)
    assert ilsgan.read_rgb(tmp_path / "a.png").shape == (5, 7, 3)


def test_folder_of_images_with_optional_masks(tmp_path):
    for i in range(3):
        save_rgb(tmp_path / "images" / f"sub/{i}.jpg", 40, 30)
    save_mask(tmp_path / "masks" / "sub/1.png", 40, 30, (5, 5, 35, 25))
    assert len(ilsgan.load_dataset("folder", str(tmp_path), 8, "train")[0]) == 3
    with pytest.raises(FileNotFoundError, match=r"2 test images have no mask in masks/ \(e.g. .*0.jpg\).*--skip-unmasked"):
        ilsgan.load_dataset("folder", str(tmp_path), 8, "test")  # a mask left out is said, not silently dropped
    x, m = ilsgan.load_dataset("folder", str(tmp_path), 8, "test", skip_unmasked=True)
    assert len(x) == 1 and m.shape == (1, 1, 8, 8)


def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_mrcnn_train_select.npy"):
        ilsgan.load_dataset("cars", str(tmp_path / "nope"), 16, "train")


def test_missing_files_are_listed(cars):
    (cars / "data_mrcnn/train/orig/a2_orig.png").unlink()
    with pytest.raises(FileNotFoundError, match="a2_orig.png"):
        ilsgan.load_dataset("cars", str(cars), 16, "train")


@pytest.mark.slow
def test_print_data_command(cars):
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), "--dataset", "cars", "--data-root", str(cars),
                        "--resolution", "16", "--check-data"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: images (3, 3, 16, 16)" in r.stdout and "test: images (2, 3, 16, 16) uint8, masks" in r.stdout
    assert r.stdout.startswith("preset cpu (a real dataset on a CPU: the 32 px demo, since the paper's settings need a GPU")
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), "--dataset", "dogs", "--data-root", str(cars),
                        "--check-data"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "expected layout" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_real_layout_end_to_end_train_then_score(cars, tmp_path):
    import unet_eval
    out = tmp_path / "run"
    cfg = ilsgan.make_config("tiny", dataset="cars", data_root=str(cars), out=str(out), device="cpu", kimg=0.03)
    ilsgan.train(cfg)
    seg = unet_eval.evaluate(unet_eval.EvalConfig(ckpt=str(out), n=32, width=4, iters=5, batch=8, val_every=5,
                                                  device="cpu"))
    assert seg["n_test"] == 2 and "all foreground" in seg["baselines"] and "mean training mask" not in seg["baselines"]


def test_mask_threshold_is_explicit_at_one_half(tmp_path):
    save_rgb(tmp_path / "images" / "a.png", 8, 8)
    save_mask(tmp_path / "masks" / "a.png", 8, 8, (2, 0, 6, 8), gray_edge=True)  # col 2 = 100, col 5 = 180
    _, m = ilsgan.load_dataset("folder", str(tmp_path), 8, "test")
    assert m[0, 0, :, 2].sum() == 0 and m[0, 0, :, 5].all() and m[0, 0, :, 3:5].all() and not m[0, 0, :, :2].any()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ILSGAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_split_is_decoded_once_and_read_back_from_the_cache(cars, own_cache, monkeypatch):
    first = ilsgan.load_dataset("cars", str(cars), 16, "test")
    monkeypatch.setattr(ilsgan, "decode_items", lambda *a: pytest.fail("decoded again"))
    again = ilsgan.load_dataset("cars", str(cars), 16, "test")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert again[1].dtype == torch.bool
    assert len(list(own_cache.glob("decoded-cars-test-16px-*.npz"))) == 1


def test_a_changed_file_is_decoded_again(cars, own_cache):
    before, _ = ilsgan.load_dataset("cars", str(cars), 16, "train")
    save_rgb(cars / "data_mrcnn/train/orig/a2_orig.png", 40, 60, colour=(0, 250, 0))  # a new colour, a new mtime
    after, _ = ilsgan.load_dataset("cars", str(cars), 16, "train")
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and after[1, 1, 8, 12] > 200 and before[1, 1, 8, 12] < 100


@pytest.mark.parametrize("damage", ["truncated", "other values", "not ours"])
def test_a_cache_that_does_not_match_is_rebuilt_not_trusted(cars, own_cache, damage):
    truth, _ = ilsgan.load_dataset("cars", str(cars), 16, "train")
    (path,) = own_cache.glob("decoded-cars-train-16px-*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "other values":  # the right key and shape, wrong pixels: the checksum tells
        with np.load(path) as f:
            parts = dict(f)
        parts["images"] = np.zeros_like(parts["images"])
        np.savez(path, **parts)
    else:
        np.savez(path, images=np.zeros((3, 3, 16, 16), np.uint8))
    again, _ = ilsgan.load_dataset("cars", str(cars), 16, "train")
    assert torch.equal(again, truth)
    with np.load(path, allow_pickle=False) as f:  # and the cache is whole again
        assert np.array_equal(f["images"], truth.numpy())


def test_an_unwritable_cache_only_costs_the_decoding(cars, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ILSGAN_CACHE", str(tmp_path / "file" / "cache"))  # below a file: cannot be made
    x, _ = ilsgan.load_dataset("cars", str(cars), 16, "train")
    assert x.shape == (3, 3, 16, 16)
