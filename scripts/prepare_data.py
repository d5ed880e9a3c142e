"""Rebuild the paper's datasets from their public downloads, in the layouts `ilsgan.py --dataset` reads.

    python scripts/prepare_data.py cub  --cub CUB_200_2011.tgz --segmentations segmentations.tgz \\
                                        --split train_val_test_split.txt --out ~/data/birds
    python scripts/prepare_data.py cars --images cars_train.tgz cars_test.tgz --devkit car_devkit.tgz --out ~/data/cars
    python scripts/prepare_data.py dogs --images images.tar --annotations annotation.tar --lists lists.tar --out ~/data/dogs
    python scripts/prepare_data.py cub --check ~/data/birds   # load a dataset root as training will, and say what is there

Every input is the archive as downloaded, or the folder it unpacks to; nothing is downloaded. The
official locations: CUB_200_2011.tgz https://data.caltech.edu/records/65de6-vp158, segmentations.tgz
https://data.caltech.edu/records/w9d68-gec53, ReDO's split https://github.com/mickaelChen/ReDO
(datasplits/cub/train_val_test_split.txt), Stanford Dogs http://vision.stanford.edu/aditya86/ImageNetDogs
(images.tar, annotation.tar, lists.tar); Stanford Cars' own site no longer serves its archives.

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
import stat
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import ilsgan  # noqa: E402
import runs  # noqa: E402
from runs import InputError  # noqa: E402

VERSION = 1
COCO_CLASS = {"cars": ("car", 3), "dogs": ("dog", 18)}  # names and indices in torchvision's 91 COCO categories
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
        raise InputError(f"{path}: no such file or folder")
    target = into / f"{path.name}.unpacked"
    if (target / ".unpacked").is_file():
        return target
    try:
        with tarfile.open(path) as tar:
            tar.extractall(target, filter="data")  # no links out, no paths outside target
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable archive ({type(e).__name__}: {e}); download it again") from None
    (target / ".unpacked").write_text("")
    return target


def find(folder, name, what):
    """The shallowest path under folder ending in `name` (archives differ in their top folder)."""
    hits = [folder] if folder.name == name else sorted(folder.rglob(name), key=lambda p: len(p.parts))
    if not hits:
        raise InputError(f"{what}: no {name} in {folder}")
    return hits[0]


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
        raise InputError(f"--out {out} exists but holds no PREPARED.json: give a new or empty folder")
    stage = out.with_name(out.name + ".partial")
    runs.make_writable(stage)
    return stage


def finish(stage, out, record, dataset, check_res):
    (stage / "PREPARED.json").write_text(json.dumps(dict(version=VERSION, dataset=dataset, **record), indent=2))
    shutil.rmtree(stage / "downloads", ignore_errors=True)
    os.replace(stage, Path(out).expanduser())
    print(f"wrote {out}")
    if check_res:
        check(dataset, Path(out).expanduser(), check_res)


def check(dataset, root, res):
    """Load both splits of a dataset root as training and evaluation will, and say what was found."""
    for split in ("train", "test"):
        x, m = data.load(dataset, str(root), res, split)
        masks = f", masks {tuple(m.shape)}, mean foreground {m.float().mean():.3f}" if m is not None else ", no masks"
        print(f"{split}: images {tuple(x.shape)} uint8{masks}")


def copy_regular(src, dst):
    """Copy a folder tree of regular files; a link or a device in it is an error, never followed."""
    for folder, _, names in os.walk(src):
        for name in names:
            path = Path(folder) / name
            if not stat.S_ISREG(path.lstat().st_mode):
                raise InputError(f"{path} is not a regular file (a link or a device): only regular files are copied")
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def save_png(array, path):
    """Atomic: a killed run never leaves a half-written image that looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with runs.replaced(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# --- cub: an exact rebuild ------------------------------------------------------------------------

def prepare_cub(a):
    stage = begin(a.out)
    if stage is None:
        return
    cub, seg, split = a.cub, a.segmentations, a.split
    if not cub or not seg:
        raise InputError("cub needs --cub (CUB_200_2011.tgz or its folder) and --segmentations (segmentations.tgz or its folder)")
    root = find(unpack(cub, stage / "downloads"), "images.txt", "--cub").parent
    segs = find(unpack(seg, stage / "downloads"), "segmentations", "--segmentations")
    for name in ("images.txt", "bounding_boxes.txt", "train_test_split.txt"):
        shutil.copy(find(root, name, "--cub"), stage / name)
    if split:
        shutil.copy(Path(split).expanduser(), stage / "train_val_test_split.txt")
    else:
        print("no --split: the official train_test_split.txt is used, not the paper's (ReDO's) split")
    keys = [row[1][0].rsplit(".", 1)[0] for row in data.table(stage / "images.txt", "cub", str(root), 2).values()]
    for what, src, ext in (("images", root / "images", ".jpg"), ("segmentations", segs, ".png")):
        missing = [k for k in keys if not (src / f"{k}{ext}").is_file()]
        if missing:
            raise InputError(f"{src / (missing[0] + ext)} is missing ({len(missing)} of {len(keys)} {what} are)")
        copy_regular(src, stage / what)
    record = dict(sources=dict(cub=str(cub), segmentations=str(seg), split=str(split) if split else None),
                  images=len(keys), split_file="train_val_test_split.txt" if split else "train_test_split.txt")
    finish(stage, a.out, record, "cub", a.check_resolution)


# --- cars and dogs: Mask R-CNN selects and masks --------------------------------------------------

def load_mat(path, key):
    try:
        import scipy.io
    except ImportError:
        raise InputError(f"reading {path.name} needs scipy: pip install scipy") from None
    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key]
    except Exception as e:
        raise InputError(f"{path}: not a readable .mat file with {key!r} ({type(e).__name__}: {e})") from None


def cars_items(a, stage):
    """-> {split: [(token, image path, (x1, y1, x2, y2))]} from Stanford Cars' devkit."""
    if not a.images or not a.devkit:
        raise InputError("cars needs --images (cars_train.tgz cars_test.tgz, or their folders) and --devkit "
                                "(car_devkit.tgz or its folder); Stanford Cars' site no longer serves them")
    folders = [unpack(p, stage / "downloads") for p in a.images]
    devkit = unpack(a.devkit, stage / "downloads")
    items = {}
    for split, folder_name, annos in (("train", "cars_train", "cars_train_annos.mat"), ("test", "cars_test", "cars_test_annos.mat")):
        images = next((hit for f in folders for hit in [f] + sorted(f.rglob(folder_name)) if hit.name == folder_name), None)
        if images is None:
            raise InputError(f"--images: no {folder_name} folder in {', '.join(map(str, a.images))}")
        rows = []
        for r in np.atleast_1d(load_mat(find(devkit, annos, "--devkit"), "annotations")):
            box = tuple(int(r[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            rows.append((Path(str(r["fname"])).stem, images / str(r["fname"]), box))
        items[split] = rows
    return items


def dogs_items(a, stage):
    """-> {split: [(token, image path, box)]} from Stanford Dogs' lists and XML annotations (the
    largest annotated dog's box)."""
    if not (a.images and a.annotations and a.lists):
        raise InputError("dogs needs --images (images.tar), --annotations (annotation.tar) and --lists (lists.tar), or their folders")
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
                raise InputError(f"{xml}: the annotation of {rel} is missing")
            try:
                boxes = [tuple(int(float(o.find(f"bndbox/{k}").text)) for k in ("xmin", "ymin", "xmax", "ymax"))
                         for o in ET.parse(xml).getroot().iter("object")]
            except (ET.ParseError, AttributeError, ValueError) as e:
                raise InputError(f"{xml}: not a readable annotation ({e})") from None
            if not boxes:
                raise InputError(f"{xml}: no annotated object")
            rows.append((Path(rel).stem, images / rel, max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))))
        items[split] = rows
    return items


def load_detector(weights, device):
    """torchvision's COCO Mask R-CNN; weights: a local .pth, or None for the COCO_V1 download."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
    coco = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    model = maskrcnn_resnet50_fpn(weights=None if weights else coco, weights_backbone=None)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        print(f"Mask R-CNN weights: {coco.url} (cached by torch.hub)")
    return model.to(device).eval(), str(weights or coco.url)


def select(det, box, a):
    """The detection that stands for the annotated object, as a bool mask [H,W], or (None, why)."""
    from torchvision.ops import box_iou
    name, class_id = COCO_CLASS[a.dataset]
    overlap = box_iou(det["boxes"].float().cpu(), torch.tensor([box], dtype=torch.float32))[:, 0]
    ok = [i for i in range(len(det["scores"])) if int(det["labels"][i]) == class_id and float(det["scores"][i]) >= a.min_score
          and overlap[i] >= a.min_iou]
    if not ok:
        return None, f"no {name} with score >= {a.min_score} on the annotated box"
    return det["masks"][max(ok, key=lambda i: float(det["scores"][i])), 0].cpu().numpy() > 0.5, None


def prepare_detected(a):
    stage = begin(a.out)
    if stage is None:
        return
    items = (cars_items if a.dataset == "cars" else dogs_items)(a, stage)
    layout, device = LAYOUT[a.dataset], ilsgan.setup_device(ilsgan.parse_device(a.device))
    model, weights = load_detector(a.weights, device)
    dropped_log = stage / "dropped.jsonl"  # a torn last line (a killed write) is left out
    dropped = {(d["split"], d["token"]): d["why"] for d in runs.read_log(dropped_log, number=None)} if dropped_log.is_file() else {}
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
                raise InputError(f"{path}: the image of annotation {token} is missing")
            img = data.read_rgb(path)
            with torch.no_grad():
                det = model([torch.from_numpy(img).permute(2, 0, 1).float().div(255).to(device)])[0]
            mask, why = select(det, box, a)
            crop = data.drc_crop(box[0], box[1], box[2] - box[0], box[3] - box[1], img.shape[1], img.shape[0])
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
            raise InputError(f"no {split} image kept (see {dropped_log}): check the inputs and thresholds")
        np.save(stage / layout["tokens"][s], np.array(kept))
        reasons = [why for (sp, _), why in dropped.items() if sp == split]
        counts[split] = dict(annotated=len(rows), kept=len(kept), dropped=len(reasons),
                             dropped_why={w: reasons.count(w) for w in sorted(set(reasons))})
        print(f"{split}: kept {len(kept)} of {len(rows)}")
    record = dict(weights=weights, coco_class=COCO_CLASS[a.dataset][0], min_score=a.min_score, min_iou=a.min_iou,
                  min_area=a.min_area, size=a.size, limit=a.limit, counts=counts)
    finish(stage, a.out, record, a.dataset, a.check_resolution)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Inputs per dataset:\n  cub:  --cub, --segmentations, [--split]\n"
                                        "  cars: --images (train and test), --devkit\n"
                                        "  dogs: --images, --annotations, --lists")
    ap.add_argument("dataset", choices=["cub", "cars", "dogs", "folder"])
    ap.add_argument("--out", help="the dataset root to write (a new folder)")
    ap.add_argument("--check", metavar="ROOT", help="only load the dataset root ROOT (any of the four layouts) and say "
                    "what is there, at --check-resolution")
    ap.add_argument("--cub", help="cub: CUB_200_2011.tgz or its folder")
    ap.add_argument("--segmentations", help="cub: segmentations.tgz or its folder")
    ap.add_argument("--split", help="cub: ReDO's train_val_test_split.txt (the paper's split)")
    ap.add_argument("--images", nargs="+", help="cars: cars_train.tgz cars_test.tgz; dogs: images.tar (or folders)")
    ap.add_argument("--devkit", help="cars: car_devkit.tgz or its folder")
    ap.add_argument("--annotations", help="dogs: annotation.tar or its folder")
    ap.add_argument("--lists", help="dogs: lists.tar or its folder")
    ap.add_argument("--weights", help="cars, dogs: a local Mask R-CNN state dict (default: torchvision's COCO_V1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--min-score", type=float, default=0.9, help="cars, dogs: detection score to keep an image, in [0, 1]")
    ap.add_argument("--min-iou", type=float, default=0.5, help="cars, dogs: overlap of the detection with the annotated box")
    ap.add_argument("--min-area", type=float, default=0.05, help="cars, dogs: mask share of the crop, at least")
    ap.add_argument("--size", type=int, default=128, help="cars, dogs: side of the resized crops")
    ap.add_argument("--limit", type=int, default=0, help="cars, dogs: only the first N images of each split (a quick try)")
    ap.add_argument("--check-resolution", type=int, default=64, help="load the result at this size at the end (0: skip)")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))

    def body():
        r = a.check_resolution
        bad = [f"--{k} {v:g}: must be in [0, 1]" for k, v in (("min-score", a.min_score), ("min-iou", a.min_iou),
                                                                ("min-area", a.min_area)) if not (0 <= v <= 1)]
        bad += [f"--size {a.size}: must be 16 or more"] * (a.size < 16) + [f"--limit {a.limit}: must be 0 or more"] * (a.limit < 0)
        bad += [f"--check-resolution {r}: must be 0 or a power of two, 16 or more"] * (r != 0 and (r < 16 or r & (r - 1)))
        if bad:
            raise InputError("invalid settings:\n  " + "\n  ".join(bad))
        if a.check:
            return check(a.dataset, Path(a.check).expanduser(), r or 64)
        if a.dataset == "folder" or not a.out:
            raise InputError("--out ROOT builds cub, cars or dogs; --check ROOT loads any dataset root")
        check_out(a)
        (prepare_cub if a.dataset == "cub" else prepare_detected)(a)
    runs.error_boundary(body, lambda: f"python scripts/prepare_data.py {' '.join(argv)} (it resumes where it stopped)")


def check_out(a):
    """--out: a folder (not a file), and never inside one of the inputs, nor one inside it: the script
    would copy its own output into its input."""
    if not a.out.strip():
        raise InputError("--out is empty: give the dataset root to write")
    out = Path(a.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {a.out} is a file; give a folder")
    for given in filter(None, [a.cub, a.segmentations, a.split, *(a.images or []), a.devkit, a.annotations, a.lists, a.weights]):
        src = Path(given).expanduser().resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out) and src.is_dir():
            raise InputError(f"--out {a.out} and the input {given} lie one inside the other: the output goes "
                             "to a folder of its own")


if __name__ == "__main__":
    main()
