"""The datasets: the embedded benchmark (deterministic, the promised statistics, a separate test split),
the real layouts on small fake trees (DRC cars and dogs, CUB, a folder), and every file read by value as
untrusted input: a bad list, box, image or mask is an InputError naming the file (and line)."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
import ilsgan
from conftest import save_mask, save_rgb
from runs import InputError


# --- the embedded benchmark ----------------------------------------------------------------------

def test_synthetic_is_deterministic_and_well_formed():
    x1, m1 = data.make_synthetic(64, 32, seed=7)
    x2, m2 = data.make_synthetic(64, 32, seed=7)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.uint8
    assert m1.shape == (64, 1, 32, 32) and m1.dtype == torch.bool
    assert not torch.equal(x1, data.make_synthetic(64, 32, seed=8)[0])


def test_one_object_per_image_of_the_promised_size_roughly_centred():
    _, m = data.make_synthetic(512, 32, seed=0)
    area = m.float().mean(dim=[1, 2, 3])
    assert area.min() > 0.10 and area.max() < 0.55 and 0.25 < area.mean() < 0.4
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy = (m[:, 0] * ys).sum(dim=[1, 2]) / m[:, 0].sum(dim=[1, 2])
    cx = (m[:, 0] * xs).sum(dim=[1, 2]) / m[:, 0].sum(dim=[1, 2])
    assert ((cy - 15.5).abs() < 8).all() and ((cx - 15.5).abs() < 8).all()


def test_foreground_and_background_colours_overlap():
    x, m = data.make_synthetic(256, 32, seed=1)
    fg = x.permute(0, 2, 3, 1)[m[:, 0]].float()
    bg = x.permute(0, 2, 3, 1)[~m[:, 0]].float()
    assert (fg.mean(0) - bg.mean(0)).abs().max() < 30  # colour alone does not separate them


def test_test_split_is_separate_and_has_masks():
    xtr, _ = data.load("synthetic", "", 16, "train", n_train=100)
    xte, mte = data.load("synthetic", "", 16, "test")
    assert len(xtr) == 100 and len(xte) == 1000 and mte is not None
    assert not any(torch.equal(xte[0], a) for a in xtr)


def test_to_float_range():
    assert ilsgan.to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


# --- the real layouts --------------------------------------------------------------------------------

def test_cars_shapes_ranges_split_sizes_and_the_training_crop(cars):
    x, m = data.load("cars", str(cars), 16, "train")
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8 and m is None
    x, m = data.load("cars", str(cars), 16, "test")
    assert x.shape == (2, 3, 16, 16) and m.shape == (2, 1, 16, 16) and m.dtype == torch.bool
    assert m[0, 0, 8, 8] and not m[0, 0, 0, 0] and m.float().mean() == pytest.approx(0.25)
    x, _ = data.load("cars", str(cars), 20, "train")  # a1 is 60x40: the centre square is x in [10, 50)
    assert x[0, 2, 10, 2] > 200 and x[0, 0, 10, 17] > 150  # left blue, right red
    rgb, bgr = data.load("cars", str(cars), 16, "test")[0], data.load("cars", str(cars), 16, "test", bgr=True)[0]
    assert torch.equal(rgb.flip(1), bgr)  # --bgr: the official cv2 channel order


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
    assert len(data.load("dogs", str(r), 8, "train")[0]) == 2
    x, m = data.load("dogs", str(r), 8, "test")
    assert len(x) == 3 and m[:, 0, :, :4].all() and not m[:, 0, :, 4:].any()


def test_cub_drc_split_and_crop(cub, capsys):
    x, m = data.load("cub", str(cub), 16, "train")
    assert len(x) == 1 and m is None  # split 0 only; training needs no segmentations
    x, m = data.load("cub", str(cub), 30, "test")  # split 2: ids 3 and 4
    # id 4: box (10,10,40,40) in 64x64 -> r = 30, centre 30 -> crop (0,0,60,60): the box fills 10..50 of 60
    assert x.shape == (2, 3, 30, 30) and m[1, 0, 15, 15] and not m[1, 0, 2, 2]
    assert m[1].float().mean().item() == pytest.approx((40 / 60) ** 2, abs=0.08)
    assert data.drc_crop(70.9, 10.0, 29.0, 30.0, 100, 50) == (62, 3, 100, 47)  # clipped, not square
    (cub / "train_val_test_split.txt").unlink()
    assert len(data.load("cub", str(cub), 8, "train")[0]) == 2
    assert "train_test_split.txt (the official CUB split" in capsys.readouterr().out


def test_folder_of_images_with_optional_masks_thresholded_at_one_half(tmp_path):
    for i in range(3):
        save_rgb(tmp_path / "images" / f"sub/{i}.jpg", 40, 30)
    save_mask(tmp_path / "masks" / "sub/1.png", 40, 30, (5, 5, 35, 25))
    assert len(data.load("folder", str(tmp_path), 8, "train")[0]) == 3
    with pytest.raises(InputError, match=r"2 test images have no mask in masks/ \(e.g. .*0.jpg\).*--skip-unmasked"):
        data.load("folder", str(tmp_path), 8, "test")  # a mask left out is said, not silently dropped
    x, m = data.load("folder", str(tmp_path), 8, "test", skip_unmasked=True)
    assert len(x) == 1 and m.shape == (1, 1, 8, 8)
    save_rgb(tmp_path / "t" / "images" / "a.png", 8, 8)
    save_mask(tmp_path / "t" / "masks" / "a.png", 8, 8, (2, 0, 6, 8), gray_edge=True)  # col 2 = 100, col 5 = 180
    _, m = data.load("folder", str(tmp_path / "t"), 8, "test")
    assert m[0, 0, :, 2].sum() == 0 and m[0, 0, :, 5].all() and m[0, 0, :, 3:5].all() and not m[0, 0, :, :2].any()


def test_a_missing_root_or_file_names_the_expected_layout(cars, tmp_path):
    with pytest.raises(InputError, match="(?s)no such folder.*data_mrcnn_train_select.npy"):
        data.load("cars", str(tmp_path / "nope"), 16, "train")
    (cars / "data_mrcnn/train/orig/a2_orig.png").unlink()
    with pytest.raises(InputError, match="a2_orig.png"):
        data.load("cars", str(cars), 16, "train")


# --- files read by value -------------------------------------------------------------------------------

def test_grey_16_bit_and_rgba_images_become_8_bit_rgb(tmp_path):
    Image.fromarray(np.full((5, 7), 90, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((5, 7, 4), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((5, 7, 2), 90, np.uint8), "LA").save(tmp_path / "la.png")
    assert all(data.read_rgb(tmp_path / n).shape == (5, 7, 3) for n in ("g.png", "a.png", "la.png"))
    Image.fromarray(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).save(tmp_path / "x.png")
    a = data.read_rgb(tmp_path / "x.png")
    assert a.dtype == np.uint8 and np.array_equal(a[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))  # not white


def test_an_image_is_read_as_a_viewer_shows_it_its_exif_orientation_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white, stored 20 wide and 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a viewer shows it 10 wide and 20 high
    Image.fromarray(a).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    shown = data.read_rgb(tmp_path / "photo.jpg")
    assert shown.shape == (20, 10, 3) and shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the white half on top


@pytest.mark.parametrize("kind", ["0/255", "0/1", "palette", "rgb", "16-bit", "alpha only", "opaque alpha"])
def test_masks_are_read_by_value(tmp_path, kind):
    """The same box saved seven ways reads as the same mask: an alpha channel carries the mask only when
    the colour is constant."""
    box = np.zeros((32, 32), np.uint8)
    box[8:24, 4:20] = 1
    path = tmp_path / "m.png"
    if kind == "0/255":
        save_mask(path, 32, 32, (4, 8, 20, 24))
    elif kind == "0/1":
        Image.fromarray(box).save(path)
    elif kind == "palette":
        im = Image.fromarray(box, mode="L").convert("P")
        im.putpalette([0, 0, 0, 128, 64, 0] + [0] * 762)  # index 1 drawn dark: its value is the index
        im.save(path)
    elif kind == "rgb":
        Image.fromarray(np.stack([box * 200, box * 10, box * 0], -1)).save(path)
    elif kind == "16-bit":
        Image.fromarray(box.astype(np.uint16) * 65535).save(path)
    elif kind == "alpha only":
        Image.fromarray(np.dstack([np.zeros_like(box)] * 3 + [box * 255])).save(path)
    else:
        Image.fromarray(np.dstack([box * 255] * 3 + [np.full_like(box, 255)])).save(path)
    assert np.array_equal(data.read_mask(path) > 0.5, box.astype(bool))


def test_a_corrupt_image_a_label_map_and_a_link_to_a_device_are_named(cars, tmp_path):
    (cars / "data_mrcnn/test/resized/8_resized.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="cannot read image .*8_resized.png"):
        data.load("cars", str(cars), 16, "test")
    a = np.zeros((32, 32), np.uint8)
    a[8:16, 8:24], a[16:24, 8:24] = 3, 7  # class labels, not a foreground mask
    Image.fromarray(a).save(tmp_path / "labels.png")
    with pytest.raises(InputError, match=r"holds the labels \[0, 3, 7\]"):
        data.read_mask(tmp_path / "labels.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="zero.png: not a regular file"):
        data.read_rgb(tmp_path / "zero.png")


@pytest.mark.parametrize("tokens, says", [
    ("text", "data_mrcnn_test_select.npy: not a .npy file"),
    (np.zeros((2, 2)), "expected a non-empty 1-D array"),
    (np.array([7, 8, 7]), "the token '7' is listed twice"),
    (np.array(["7", "a\0b"]), "is not a file name"),
    (np.array(["7", "../../../../x"]), "which is outside the data root"),
])
def test_a_token_list_that_is_not_one(cars, tokens, says):
    path = cars / "data_mrcnn_test_select.npy"
    path.write_text("7\n8\n") if isinstance(tokens, str) else np.save(path, tokens)
    with pytest.raises(InputError, match=says.replace("(", r"\(").replace("[", r"\[")):
        data.load("cars", str(cars), 16, "test")


def test_a_pickled_token_list_runs_nothing(cars, tmp_path):
    class Marker:  # unpickling it would write a file: proof that code ran
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))
    np.save(cars / "data_mrcnn_train_select.npy", np.array([Marker()], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="data_mrcnn_train_select.npy: not a token list"):
        data.load("cars", str(cars), 16, "train")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("table, text, says", [
    ("images.txt", "2 001.A/a_2.jpg\n", "images.txt:5: image id 2 is listed twice"),
    ("images.txt", "5\n", "images.txt:5: expected 2 columns"),
    ("images.txt", b"\xff\xfe junk\n", "images.txt is not UTF-8 text"),
    ("bounding_boxes.txt", None, "do not list the same ids"),
    ("bounding_boxes.txt", "1 0 0 5\n", "bounding_boxes.txt:1: expected 5 columns"),
])
def test_cub_tables_that_are_not_what_they_say(cub, table, text, says):
    path = cub / table
    if text is None:
        path.write_text("1 0 0 5 5\n2 0 0 5 5\n3 0 0 5 5\n")  # id 4 has no box
    elif isinstance(text, bytes):
        path.write_bytes(path.read_bytes() + text)
    else:
        path.write_text((path.read_text() + text) if table == "images.txt" else text)
    with pytest.raises(InputError, match=says):
        data.load("cub", str(cub), 16, "test")


@pytest.mark.parametrize("box, says", [("x 10 30 30", "is not 4 numbers"), ("-5 10 30 30", "must start at 0 or more"),
                                       ("10 10 0 30", "a positive width"), ("nan 1 2 3", "must start at 0"),
                                       ("70 10 60 30", "leaves its 100x50 image")])
def test_a_bad_cub_box_names_the_file_and_line(cub, box, says):
    (cub / "bounding_boxes.txt").write_text("1 20.0 10.0 30.0 30.0\n2 0 0 20 30\n3 " + box + "\n4 10 10 40 40\n")
    with pytest.raises(InputError, match=f"bounding_boxes.txt:3.*{says}"):
        data.load("cub", str(cub), 16, "test")


def test_a_cub_name_that_leaves_the_data_root_is_refused(cub):
    (cub / "images.txt").write_text("1 001.A/a_1.jpg\n2 001.A/a_2.jpg\n3 ../../../etc/x.jpg\n4 002.B/b_2.jpg\n")
    with pytest.raises(InputError, match="images.txt:3 names"):
        data.load("cub", str(cub), 16, "test")
