"""scripts/prepare_data.py on small fake downloads in each public layout (the CUB tarball and its
segmentations; Stanford Cars' image archives and devkit; Stanford Dogs' images, XML annotations and
lists), end to end, then loaded with load_dataset. Cars and Dogs use a Mask R-CNN built without
pretrained weights whose detections are replaced by a stub: a known mask for a known image."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import ilsgan
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_data  # noqa: E402


def jpg(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def tar_of(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


@pytest.fixture
def cub_downloads(tmp_path):
    src = tmp_path / "src"
    root, segs = src / "CUB_200_2011", src / "segmentations"
    names = ["001.A/a_1", "001.A/a_2", "002.B/b_1", "002.B/b_2"]
    root.mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i + 1} {n}.jpg\n" for i, n in enumerate(names)))
    (root / "bounding_boxes.txt").write_text("".join(f"{i + 1} 4.0 4.0 20.0 16.0\n" for i in range(4)))
    (root / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n4 0\n")
    for i, n in enumerate(names):
        jpg(root / f"images/{n}.jpg", 40, 32, i)
        m = np.zeros((32, 40), np.uint8)
        m[4:20, 4:24] = 255
        (segs / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(segs / f"{n}.png")
    (tmp_path / "split.txt").write_text("1 0\n2 1\n3 2\n4 0\n")
    return tar_of(root, tmp_path / "CUB_200_2011.tgz"), tar_of(segs, tmp_path / "segmentations.tgz"), tmp_path / "split.txt"


def test_cub_rebuild_is_the_layout_the_loader_reads(cub_downloads, tmp_path):
    cub, segs, split = cub_downloads
    out = tmp_path / "birds"
    prepare_data.main(["cub", "--cub", str(cub), "--segmentations", str(segs), "--split", str(split), "--out", str(out),
                       "--check-resolution", "16"])
    x, m = ilsgan.load_dataset("cub", str(out), 16, "test")
    assert x.shape == (1, 3, 16, 16) and m.shape == (1, 1, 16, 16) and m.float().mean() > 0.2
    assert len(ilsgan.load_dataset("cub", str(out), 16, "train")[0]) == 2  # ids 1 and 4: split 0
    record = json.loads((out / "PREPARED.json").read_text())
    assert record["images"] == 4 and record["split_file"] == "train_val_test_split.txt"
    assert not (tmp_path / "birds.partial").exists() and not (out / "downloads").exists()
    prepare_data.main(["cub", "--cub", str(cub), "--segmentations", str(segs), "--out", str(out)])  # done: nothing to do


def test_cub_missing_segmentation_names_the_file(cub_downloads, tmp_path):
    cub, _, split = cub_downloads
    segs = tmp_path / "src/segmentations"
    (segs / "002.B/b_2.png").unlink()
    with pytest.raises(SystemExit, match=r"error: .*b_2.png is missing \(1 of 4 segmentations are\)"):
        prepare_data.main(["cub", "--cub", str(cub), "--segmentations", str(segs), "--out", str(tmp_path / "birds")])
    assert not (tmp_path / "birds").exists()  # nothing that looks complete


@pytest.mark.slow
def test_a_truncated_archive_is_one_clear_line(cub_downloads, tmp_path):
    cub, segs, _ = cub_downloads
    data = cub.read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "cub", "--cub", str(cut),
                        "--segmentations", str(segs), "--out", str(tmp_path / "birds")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {cut}: not a readable archive"), r.stderr


class Stub:
    """Detections for a known image: a `car`/`dog` instance over the object's box, with a known mask.
    Images with a black top-left corner get no detection (they must be dropped)."""

    def __init__(self, class_id):
        self.class_id = class_id

    def __call__(self, images):
        out = []
        for img in images:
            _, H, W = img.shape
            if img[:, 1, 1].sum() < 0.1:
                out.append(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0),
                                masks=torch.zeros(0, 1, H, W)))
                continue
            mask = torch.zeros(1, 1, H, W)
            mask[..., 8:24, 10:30] = 1.0
            out.append(dict(boxes=torch.tensor([[10.0, 8.0, 30.0, 24.0], [0.0, 0.0, 5.0, 5.0]]),
                            labels=torch.tensor([self.class_id, self.class_id]), scores=torch.tensor([0.99, 0.999]),
                            masks=torch.cat([mask, torch.ones(1, 1, H, W)])))
        return out


@pytest.fixture
def stub_detector(monkeypatch):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    def load(weights, device):
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
        model.forward = Stub(prepare_data.COCO_CLASS_ID[dataset["name"]])  # a real model, stubbed detections
        return model, "stub"
    dataset = {}
    monkeypatch.setattr(prepare_data, "load_detector", load)
    return dataset


def picture(path, seed, black_corner=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(30, 255, (32, 40, 3), dtype=np.uint8)
    if black_corner:
        a[:6, :6] = 0
    Image.fromarray(a).save(path, quality=100)


@pytest.fixture
def cars_args(tmp_path, stub_detector):
    """Stanford Cars as downloaded (a train archive, a test folder, the devkit's .mat files) -> the
    prepare_data arguments for it; the third training image gets no detection."""
    scipy_io = pytest.importorskip("scipy.io")
    stub_detector["name"] = "cars"
    src = tmp_path / "src"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            picture(src / f"cars_{split}/{i + 1:05d}.jpg", i, black_corner=(split == "train" and i == 2))
        annos = np.zeros(n, dtype=[(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")])
        for i in range(n):
            annos[i] = (11, 9, 29, 23, 1, f"{i + 1:05d}.jpg")
        (src / "devkit").mkdir(exist_ok=True)
        scipy_io.savemat(src / f"devkit/cars_{split}_annos.mat", {"annotations": annos})
    return ["cars", "--images", str(tar_of(src / "cars_train", tmp_path / "cars_train.tgz")), str(src / "cars_test"),
            "--devkit", str(src / "devkit"), "--device", "cpu", "--check-resolution", "16"]


@pytest.mark.slow
def test_cars_end_to_end(tmp_path, cars_args):
    out = tmp_path / "cars"
    prepare_data.main([*cars_args, "--out", str(out)])
    record = json.loads((out / "PREPARED.json").read_text())
    assert record["counts"]["train"]["kept"] == 2 and record["counts"]["train"]["dropped"] == 1
    assert record["counts"]["test"] == dict(annotated=2, kept=2, dropped=0, dropped_why={})
    assert list(np.load(out / "data_mrcnn_train_select.npy")) == ["00001", "00002"]
    x, m = ilsgan.load_dataset("cars", str(out), 16, "test")
    crop = ilsgan.drc_crop(11, 9, 18, 14, 40, 32)  # the annotated box; the stub's mask is [10:30] x [8:24]
    expect = np.zeros((32, 40))
    expect[8:24, 10:30] = 1
    expect = np.asarray(Image.fromarray((expect * 255).astype(np.uint8)).crop(crop).resize((16, 16), Image.NEAREST)) > 127
    assert np.array_equal(m[0, 0].numpy(), expect)  # the highest-scoring instance off the box was passed over
    assert ilsgan.load_dataset("cars", str(out), 16, "train")[0].shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_an_interrupted_run_continues_where_it_stopped(tmp_path, cars_args, monkeypatch):
    out, real_save, saved = tmp_path / "cars", prepare_data.save_png, []

    def save_then_die(array, path):
        real_save(array, path)
        saved.append(path)
        if len(saved) == 5:  # the second image's crop written, its mask not yet
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main([*cars_args, "--out", str(out)])
    assert not out.exists() and (tmp_path / "cars.partial/data_mrcnn/train/resized/00001_maskresized.png").is_file()
    monkeypatch.setattr(prepare_data, "save_png", real_save)
    seen, load = [], prepare_data.load_detector

    def counting(weights, device):
        model, source = load(weights, device)
        detect = model.forward
        model.forward = lambda images: seen.append(len(images)) or detect(images)
        return model, source
    monkeypatch.setattr(prepare_data, "load_detector", counting)
    prepare_data.main([*cars_args, "--out", str(out)])
    assert len(seen) == 4  # the first training image was not detected again; the other four were
    assert json.loads((out / "PREPARED.json").read_text())["counts"]["train"]["kept"] == 2


@pytest.mark.slow
def test_dogs_end_to_end_and_missing_annotation(tmp_path, stub_detector):
    scipy_io = pytest.importorskip("scipy.io")
    stub_detector["name"] = "dogs"
    src = tmp_path / "src"
    files = {"train": ["n01-a/n01_1.jpg", "n01-a/n01_2.jpg"], "test": ["n02-b/n02_1.jpg"]}
    for split, rels in files.items():
        for i, rel in enumerate(rels):
            picture(src / "Images" / rel, i)
            xml = src / "Annotation" / rel[:-4]
            xml.parent.mkdir(parents=True, exist_ok=True)
            xml.write_text("<annotation><object><name>dog</name><bndbox><xmin>10</xmin><ymin>8</ymin><xmax>30</xmax>"
                           "<ymax>24</ymax></bndbox></object><object><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>4</xmax>"
                           "<ymax>4</ymax></bndbox></object></annotation>")
        (src / "lists").mkdir(exist_ok=True)
        scipy_io.savemat(src / f"lists/{split}_list.mat", {"file_list": np.array(rels, dtype=object)})
    args = ["dogs", "--images", str(tar_of(src / "Images", tmp_path / "images.tar")), "--annotations",
            str(src / "Annotation"), "--lists", str(src / "lists"), "--device", "cpu", "--check-resolution", "16"]
    prepare_data.main([*args, "--out", str(tmp_path / "dogs")])
    assert ilsgan.load_dataset("dogs", str(tmp_path / "dogs"), 16, "train")[0].shape == (2, 3, 16, 16)
    assert ilsgan.load_dataset("dogs", str(tmp_path / "dogs"), 16, "test")[1].shape == (1, 1, 16, 16)
    (src / "Annotation/n02-b/n02_1").unlink()
    with pytest.raises(SystemExit, match="n02_1: the annotation of n02-b/n02_1.jpg is missing"):
        prepare_data.main([*args, "--out", str(tmp_path / "dogs2")])


@pytest.mark.slow
def test_help_lists_the_three_datasets_and_their_inputs():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "{cub,cars,dogs}" in r.stdout
    assert all(k in r.stdout for k in ("--segmentations", "--devkit", "--annotations", "--lists"))


def test_tar_members_outside_the_folder_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        data = b"x"
        info = tarfile.TarInfo("../outside.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ilsgan.InputError, match="not a readable archive"):
        prepare_data.unpack(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()
