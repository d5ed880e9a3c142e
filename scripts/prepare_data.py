"""Rebuild the paper's datasets from their public downloads, in the layouts `ilsgan.py --dataset` reads.

    python scripts/prepare_data.py cub  --cub CUB_200_2011.tgz --segmentations segmentations.tgz \\
                                        --split train_val_test_split.txt --out ~/data/birds
    python scripts/prepare_data.py cars --images cars_train.tgz cars_test.tgz --devkit car_devkit.tgz --out ~/data/cars
    python scripts/prepare_data.py dogs --images images.tar --annotations annotation.tar --lists lists.tar --out ~/data/dogs
    python ilsgan.py --dataset cub --data-root ~/data/birds --check-data      # what the script checks at the end

Every input is the archive as downloaded or the folder it unpacks to. Nothing is downloaded unless
--download is given, and then only from the official locations (printed first) into --cache.

cub: an exact rebuild of the paper's Birds: the CUB-200-2011 root with its segmentations and ReDO's
  train_val_test_split.txt (without it, the official train_test_split.txt, and the run says so).
cars, dogs: DRC made the test masks of Stanford Cars and Stanford Dogs with a COCO Mask R-CNN and kept
  the images where it found the object; we do the same with torchvision's maskrcnn_resnet50_fpn (COCO
  weights): the highest-scoring `car` / `dog` instance with score >= --min-score whose box overlaps the
  dataset's own box (IoU >= --min-iou) and covers at least --min-area of the crop. Kept images are
  written in the DRC layout: the original image (training), and the 1.5x box crop resized to --size
  with its mask (test, and train for completeness). PREPARED.json records the thresholds, the weights
  and the counts kept and dropped per split. The selection is ours, not DRC's (their lists are not
  public), so scores on these rebuilds are comparable to the paper's in kind, not to the decimal.
  Reading the .mat annotation files needs scipy (`pip install scipy`).

Resumable: the work happens in OUT.partial, each image's files written atomically, and a second run
skips what is done; OUT appears (a rename) only once everything, PREPARED.json last, is written.
"""
import argparse
import json
import os
import shutil
import sys
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ilsgan  # noqa: E402

VERSION = 1
OFFICIAL = {  # where each public file comes from
    "cub": "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    "segmentations": "https://data.caltech.edu/records/w9d68-gec53/files/segmentations.tgz",
    "split": "https://raw.githubusercontent.com/mickaelChen/ReDO/master/datasplits/cub/train_val_test_split.txt",
    "dogs-images": "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",
    "dogs-annotations": "http://vision.stanford.edu/aditya86/ImageNetDogs/annotation.tar",
    "dogs-lists": "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar",
}  # Stanford Cars' own site no longer serves its archives: give them with --images and --devkit
COCO_CLASS = {"cars": "car", "dogs": "dog"}
COCO_CLASS_ID = {"cars": 3, "dogs": 18}  # their indices in torchvision's 91 COCO categories
LAYOUT = {  # token files and where the original training / test images go
    "cars": dict(tokens=("data_mrcnn_train_select.npy", "data_mrcnn_test_select.npy"),
                 orig=("data_mrcnn/train/orig", None)),
    "dogs": dict(tokens=("data_tr_sel.npy", "data_te_sel.npy"), orig=("train_orig/orig", "test_orig/orig")),
}


# --- inputs: an archive or a folder --------------------------------------------------------------

def unpack(path, into):
    """An archive (tar, tgz) is unpacked into `into` (safely: no links or paths outside it); a folder
    is used as it is. -> the folder holding the files."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if not path.is_file():
        raise ilsgan.InputError(f"{path}: no such file or folder")
    target = into / f"{path.name}.unpacked"
    if (target / ".unpacked").is_file():
        return target
    try:
        with tarfile.open(path) as tar:
            tar.extractall(target, filter="data") if hasattr(tarfile, "data_filter") else safe_extract(tar, target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ilsgan.InputError(f"{path}: not a readable archive ({type(e).__name__}: {e}); download it again") from None
    (target / ".unpacked").write_text("")
    return target


def safe_extract(tar, target):
    for m in tar.getmembers():
        if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
            raise tarfile.TarError(f"refusing the member {m.name!r}")
    tar.extractall(target)


def find(folder, name, what):
    """The shallowest path under folder ending in `name` (archives differ in their top folder)."""
    hits = [folder] if folder.name == name else sorted(folder.rglob(name), key=lambda p: len(p.parts))
    if not hits:
        raise ilsgan.InputError(f"{what}: no {name} in {folder}")
    return hits[0]


def fetch(key, cache):
    """--download: one official file into the cache folder (kept for the next run)."""
    url = OFFICIAL[key]
    path = Path(cache).expanduser() / url.rsplit("/", 1)[1]
    if not path.is_file():
        print(f"downloading {url}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            urllib.request.urlretrieve(url, f"{path}.part")
        except OSError as e:
            raise ilsgan.InputError(f"cannot download {url} ({e}): download it by hand and give its path") from None
        os.replace(f"{path}.part", path)
    return path


# --- the output folder ----------------------------------------------------------------------------

def begin(out):
    """-> the staging folder OUT.partial, or None if OUT is already complete."""
    out = Path(out).expanduser()
    if (out / "PREPARED.json").is_file():
        print(f"{out} is already prepared (PREPARED.json); delete it to build it again")
        return None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder made beforehand: the finished dataset takes its place
    if out.exists():
        raise ilsgan.InputError(f"--out {out} exists but holds no PREPARED.json: give a new or empty folder")
    stage = out.with_name(out.name + ".partial")
    ilsgan.make_writable(stage)
    return stage


def finish(stage, out, record, dataset, check_res):
    (stage / "PREPARED.json").write_text(json.dumps(dict(version=VERSION, dataset=dataset, **record), indent=2))
    shutil.rmtree(stage / "downloads", ignore_errors=True)
    os.replace(stage, Path(out).expanduser())
    print(f"wrote {out}")
    if check_res:  # `ilsgan.py --check-data` on the result
        ilsgan.print_data(ilsgan.make_config(dataset=dataset, data_root=str(Path(out).expanduser()), resolution=check_res))


def save_png(array, path):
    """Atomic: a killed run never leaves a half-written image that looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


# --- cub: an exact rebuild ------------------------------------------------------------------------

def prepare_cub(a):
    stage = begin(a.out)
    if stage is None:
        return
    cub = a.cub or (fetch("cub", a.cache) if a.download else None)
    seg = a.segmentations or (fetch("segmentations", a.cache) if a.download else None)
    split = a.split or (fetch("split", a.cache) if a.download else None)
    if not cub or not seg:
        raise ilsgan.InputError("cub needs --cub (CUB_200_2011.tgz or its folder) and --segmentations "
                                "(segmentations.tgz or its folder), or --download")
    root = find(unpack(cub, stage / "downloads"), "images.txt", "--cub").parent
    segs = find(unpack(seg, stage / "downloads"), "segmentations", "--segmentations")
    for name in ("images.txt", "bounding_boxes.txt", "train_test_split.txt"):
        shutil.copy(find(root, name, "--cub"), stage / name)
    if split:
        shutil.copy(Path(split).expanduser(), stage / "train_val_test_split.txt")
    else:
        print("no --split: the official train_test_split.txt is used, not the paper's (ReDO's) split")
    keys = [line.split()[1][:-4] for line in (stage / "images.txt").read_text().split("\n") if line.strip()]
    for what, src, ext in (("images", root / "images", ".jpg"), ("segmentations", segs, ".png")):
        missing = [k for k in keys if not (src / f"{k}{ext}").is_file()]
        if missing:
            raise ilsgan.InputError(f"{src / (missing[0] + ext)} is missing ({len(missing)} of {len(keys)} {what} are)")
        shutil.copytree(src, stage / what, dirs_exist_ok=True)
    record = dict(sources=dict(cub=str(cub), segmentations=str(seg), split=str(split) if split else None),
                  images=len(keys), split_file="train_val_test_split.txt" if split else "train_test_split.txt")
    finish(stage, a.out, record, "cub", a.check_resolution)


# --- cars and dogs: Mask R-CNN selects and masks --------------------------------------------------

def load_mat(path, key):
    try:
        import scipy.io
    except ImportError:
        raise ilsgan.InputError(f"reading {path.name} needs scipy: pip install scipy") from None
    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key]
    except Exception as e:
        raise ilsgan.InputError(f"{path}: not a readable .mat file with {key!r} ({type(e).__name__}: {e})") from None


def cars_items(a, stage):
    """-> {split: [(token, image path, (x1, y1, x2, y2))]} from Stanford Cars' devkit."""
    if not a.images or not a.devkit:
        raise ilsgan.InputError("cars needs --images (cars_train.tgz cars_test.tgz, or their folders) and --devkit "
                                "(car_devkit.tgz or its folder); Stanford Cars' site no longer serves them")
    folders = [unpack(p, stage / "downloads") for p in a.images]
    devkit = unpack(a.devkit, stage / "downloads")
    items = {}
    for split, folder_name, annos in (("train", "cars_train", "cars_train_annos.mat"), ("test", "cars_test", "cars_test_annos.mat")):
        images = next((hit for f in folders for hit in [f] + sorted(f.rglob(folder_name)) if hit.name == folder_name), None)
        if images is None:
            raise ilsgan.InputError(f"--images: no {folder_name} folder in {', '.join(map(str, a.images))}")
        rows = []
        for r in np.atleast_1d(load_mat(find(devkit, annos, "--devkit"), "annotations")):
            box = tuple(int(r[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            rows.append((Path(str(r["fname"])).stem, images / str(r["fname"]), box))
        items[split] = rows
    return items


def dogs_items(a, stage):
    """-> {split: [(token, image path, box)]} from Stanford Dogs' lists and XML annotations (the
    largest annotated dog's box)."""
    if a.download:
        a.images = a.images or [fetch("dogs-images", a.cache)]
        a.annotations = a.annotations or fetch("dogs-annotations", a.cache)
        a.lists = a.lists or fetch("dogs-lists", a.cache)
    if not (a.images and a.annotations and a.lists):
        raise ilsgan.InputError("dogs needs --images (images.tar), --annotations (annotation.tar) and --lists "
                                "(lists.tar), or their folders, or --download")
    images = find(unpack(a.images[0], stage / "downloads"), "Images", "--images")
    annos = find(unpack(a.annotations, stage / "downloads"), "Annotation", "--annotations")
    lists = unpack(a.lists, stage / "downloads")
    items = {}
    for split in ("train", "test"):
        rows = []
        for rel in np.atleast_1d(load_mat(find(lists, f"{split}_list.mat", "--lists"), "file_list")):
            rel = str(rel)
            xml = annos / rel[:-4]
            if not xml.is_file():
                raise ilsgan.InputError(f"{xml}: the annotation of {rel} is missing")
            try:
                boxes = [tuple(int(float(o.find(f"bndbox/{k}").text)) for k in ("xmin", "ymin", "xmax", "ymax"))
                         for o in ET.parse(xml).getroot().iter("object")]
            except (ET.ParseError, AttributeError, ValueError) as e:
                raise ilsgan.InputError(f"{xml}: not a readable annotation ({e})") from None
            if not boxes:
                raise ilsgan.InputError(f"{xml}: no annotated object")
            rows.append((Path(rel).stem, images / rel, max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))))
        items[split] = rows
    return items


def load_detector(weights, device):
    """torchvision's COCO Mask R-CNN; weights: a local .pth, or None for the COCO_V1 download."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
    if weights:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        source = str(weights)
    else:
        print(f"Mask R-CNN weights: {MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url} (cached by torch.hub)")
        model = maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1)
        source = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url
    return model.to(device).eval(), source


def box_iou(a, b):
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select(det, box, class_id, a):
    """The detection that stands for the annotated object, as a bool mask [H,W], or (None, why)."""
    ok = [i for i in range(len(det["scores"])) if int(det["labels"][i]) == class_id and float(det["scores"][i]) >= a.min_score
          and box_iou(det["boxes"][i].tolist(), box) >= a.min_iou]
    if not ok:
        return None, f"no {COCO_CLASS[a.dataset]} with score >= {a.min_score} on the annotated box"
    return det["masks"][max(ok, key=lambda i: float(det["scores"][i])), 0].cpu().numpy() > 0.5, None


def prepare_detected(a):
    stage = begin(a.out)
    if stage is None:
        return
    items = (cars_items if a.dataset == "cars" else dogs_items)(a, stage)
    layout, device = LAYOUT[a.dataset], ilsgan.setup_device(ilsgan.parse_device(a.device))
    model, weights = load_detector(a.weights, device)
    class_id = COCO_CLASS_ID[a.dataset]
    dropped_log = stage / "dropped.jsonl"
    dropped = {(d["split"], d["token"]): d["why"] for d in map(json.loads, dropped_log.read_text().splitlines())} \
        if dropped_log.is_file() else {}
    from tqdm import tqdm
    counts = {}
    for s, (split, rows) in enumerate(items.items()):
        rows = rows[:a.limit] if a.limit else rows
        kept = []
        for token, path, box in tqdm(rows, desc=f"{a.dataset} {split}"):
            resized = stage / f"data_mrcnn/{split}/resized/{token}"
            if Path(f"{resized}_maskresized.png").is_file():
                kept.append(token)
                continue
            if (split, token) in dropped:
                continue
            if not path.is_file():
                raise ilsgan.InputError(f"{path}: the image of annotation {token} is missing")
            try:
                img = np.array(Image.open(path).convert("RGB"))
            except OSError as e:
                raise ilsgan.InputError(f"cannot read image {path}: {e}") from None
            with torch.no_grad():
                det = model([torch.from_numpy(img).permute(2, 0, 1).float().div(255).to(device)])[0]
            mask, why = select(det, box, class_id, a)
            crop = ilsgan.drc_crop(box[0], box[1], box[2] - box[0], box[3] - box[1], img.shape[1], img.shape[0])
            if mask is not None and mask[crop[1]:crop[3], crop[0]:crop[2]].mean() < a.min_area:
                mask, why = None, f"mask below {a.min_area} of the crop"
            if mask is None:
                dropped[split, token] = why
                with open(dropped_log, "a") as f:
                    f.write(json.dumps(dict(split=split, token=token, why=why)) + "\n")
                continue
            if layout["orig"][s]:
                save_png(img, stage / layout["orig"][s] / f"{token}_orig.png")
            size = (a.size, a.size)
            save_png(np.asarray(Image.fromarray(img).crop(crop).resize(size, Image.BILINEAR)), Path(f"{resized}_resized.png"))
            m = Image.fromarray(mask.astype(np.uint8) * 255).crop(crop).resize(size, Image.NEAREST)
            save_png(np.asarray(m), Path(f"{resized}_maskresized.png"))  # last: marks the token done
            kept.append(token)
        if not kept:
            raise ilsgan.InputError(f"no {split} image kept (see {dropped_log}): check the inputs and thresholds")
        np.save(stage / layout["tokens"][s], np.array(kept))
        reasons = [why for (sp, _), why in dropped.items() if sp == split]
        counts[split] = dict(annotated=len(rows), kept=len(kept), dropped=len(reasons),
                             dropped_why={w: reasons.count(w) for w in sorted(set(reasons))})
        print(f"{split}: kept {len(kept)} of {len(rows)}")
    record = dict(weights=weights, coco_class=COCO_CLASS[a.dataset], min_score=a.min_score, min_iou=a.min_iou,
                  min_area=a.min_area, size=a.size, limit=a.limit, counts=counts)
    finish(stage, a.out, record, a.dataset, a.check_resolution)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Inputs per dataset:\n  cub:  --cub, --segmentations, [--split]\n"
                                        "  cars: --images (train and test), --devkit\n"
                                        "  dogs: --images, --annotations, --lists")
    ap.add_argument("dataset", choices=["cub", "cars", "dogs"])
    ap.add_argument("--out", required=True, help="the dataset root to write (a new folder)")
    ap.add_argument("--cub", help="cub: CUB_200_2011.tgz or its folder")
    ap.add_argument("--segmentations", help="cub: segmentations.tgz or its folder")
    ap.add_argument("--split", help="cub: ReDO's train_val_test_split.txt (the paper's split)")
    ap.add_argument("--images", nargs="+", help="cars: cars_train.tgz cars_test.tgz; dogs: images.tar (or folders)")
    ap.add_argument("--devkit", help="cars: car_devkit.tgz or its folder")
    ap.add_argument("--annotations", help="dogs: annotation.tar or its folder")
    ap.add_argument("--lists", help="dogs: lists.tar or its folder")
    ap.add_argument("--download", action="store_true", help="fetch the missing inputs from the official locations (cub, dogs)")
    ap.add_argument("--cache", default="~/.cache/ilsgan-data", help="where --download keeps the archives")
    ap.add_argument("--weights", help="cars, dogs: a local Mask R-CNN state dict (default: torchvision's COCO_V1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--min-score", type=float, default=0.9, help="cars, dogs: detection score to keep an image")
    ap.add_argument("--min-iou", type=float, default=0.5, help="cars, dogs: overlap of the detection with the annotated box")
    ap.add_argument("--min-area", type=float, default=0.05, help="cars, dogs: mask share of the crop, at least")
    ap.add_argument("--size", type=int, default=128, help="cars, dogs: side of the resized crops")
    ap.add_argument("--limit", type=int, default=0, help="cars, dogs: only the first N images of each split (a quick try)")
    ap.add_argument("--check-resolution", type=int, default=64, help="load the result at this size at the end (0: skip)")
    a = ap.parse_args(argv)
    if a.download:
        urls = [v for k, v in OFFICIAL.items() if (k in ("cub", "segmentations", "split")) == (a.dataset == "cub")
                and not (a.dataset == "cars")]
        print("--download fetches from: " + (", ".join(urls) if urls else "nowhere: Stanford Cars has no official download any more"))
    def body():
        check_out(a)
        (prepare_cub if a.dataset == "cub" else prepare_detected)(a)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    ilsgan.error_boundary(body, lambda: f"python scripts/prepare_data.py {' '.join(argv)} (it resumes where it stopped)")


def check_out(a):
    """--out: a folder (not a file, not empty), and never inside one of the inputs, nor one inside it:
    the script would copy its own output into its input."""
    if not a.out.strip():
        raise ilsgan.InputError("--out is empty: give the dataset root to write")
    out = Path(a.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ilsgan.InputError(f"--out {a.out} is a file; give a folder")
    inputs = [a.cub, a.segmentations, a.split, *(a.images or []), a.devkit, a.annotations, a.lists, a.weights]
    for given in filter(None, inputs):
        src = Path(given).expanduser().resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out) and src.is_dir():
            raise ilsgan.InputError(f"--out {a.out} and the input {given} lie one inside the other: the output goes "
                                    "to a folder of its own")


if __name__ == "__main__":
    main()
