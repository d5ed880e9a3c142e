"""The datasets: the embedded synthetic benchmark, and photos on disk (DRC Cars and Dogs, CUB, any folder).

Every dataset becomes one uint8 tensor of images [N,3,res,res] (and, for a test split, bool masks
[N,1,res,res]), decoded by a pool of threads when a script starts. `load(name, root, res, split)` is the one entry point. The layouts on
disk are LAYOUTS; `python scripts/prepare_data.py` rebuilds them from the public downloads and
checks them. Dataset files are untrusted: images and masks are read by value (any bit depth, EXIF
orientation applied, as a viewer shows them), every list is checked, and a bad file is named.
"""
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from runs import InputError

# --- the embedded benchmark ------------------------------------------------------------------------

# Colours shared by objects and backgrounds, so colour alone never tells them apart.
PALETTE = torch.tensor([[0.85, 0.20, 0.15], [0.95, 0.70, 0.10], [0.20, 0.60, 0.25], [0.15, 0.35, 0.80],
                        [0.60, 0.25, 0.65], [0.90, 0.90, 0.85], [0.25, 0.25, 0.25], [0.55, 0.40, 0.25]])
SYNTHETIC_TEST_SEED = 1_000_003  # the test split is drawn from its own stream, never from training


def pixel_grid(S, device=None):
    """Pixel-centre coordinates of an S x S image: yy, xx [S,S] in (-1, 1), row-major."""
    lin = (torch.arange(S, device=device) + 0.5) / S * 2 - 1
    return torch.meshgrid(lin, lin, indexing="ij")


def texture(u, v, kind, freq, c1, c2):
    """Object texture families in object coordinates u, v [B,S,S]: 0 stripes, 1 checker, 2 dots,
    3 radial shading. kind [B] long, freq [B], c1, c2 [B,3] -> RGB [B,3,S,S]."""
    fu, fv = u * freq[:, None, None], v * freq[:, None, None]
    t = torch.stack([(torch.sin(fu) > 0).float(),
                     ((torch.sin(fu) > 0) ^ (torch.sin(fv) > 0)).float(),
                     (torch.sin(fu) * torch.sin(fv) > 0.35).float(),
                     (u.square() + v.square()).sqrt().clamp(max=1)], dim=1)  # [B,4,S,S]
    t = t.gather(1, kind[:, None, None, None].expand(-1, 1, *u.shape[1:]))  # [B,1,S,S]
    return c1[:, :, None, None] * (1 - t) + c2[:, :, None, None] * t


def render(B, S, g, context=0.0):
    """One batch at S x S: images [B,3,S,S] in [0,1] and soft object coverage [B,1,S,S]."""
    def U(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def colour():
        return (PALETTE[torch.randint(len(PALETTE), (B,), generator=g)] + U(B, 3, lo=-0.1, hi=0.1)).clamp(0, 1)

    def colour_and_shade():  # a colour and a slightly darker shade of it, for a texture
        c = colour()
        return c, c * U(B, 1, lo=0.75, hi=0.9)

    yy, xx = pixel_grid(S)
    # object: a star-shaped region r < R * rho(theta) with area fraction A = pi R^2 / 4 exactly
    kind = torch.randint(4, (B,), generator=g)  # 0 ellipse, 1 polygon, 2 star, 3 blob
    A, rot = U(B, lo=0.15, hi=0.5), U(B, hi=2 * math.pi)
    cx, cy = U(B, lo=-0.3, hi=0.3), U(B, lo=-0.3, hi=0.3)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = rot.cos()[:, None, None], rot.sin()[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy  # object coordinates
    r, th = (u.square() + v.square()).sqrt(), torch.atan2(v, u)
    a = U(B, lo=0.7, hi=1.4)[:, None, None]  # ellipse aspect
    n = torch.randint(3, 7, (B,), generator=g).float()[:, None, None]  # polygon sides
    ph = U(2, B, hi=2 * math.pi)[:, :, None, None]
    rho = torch.stack([
        1 / ((th.cos() / a).square() + (th.sin() * a).square()).sqrt(),  # area pi
        torch.cos(math.pi / n) / torch.cos(torch.remainder(th, 2 * math.pi / n) - math.pi / n)
        / (n / 2 * torch.sin(2 * math.pi / n) / math.pi).sqrt(),  # n-gon, area normalised to pi
        (1 + 0.3 * torch.cos(5 * th)) / math.sqrt(1 + 0.3**2 / 2),
        (1 + 0.15 * torch.sin(2 * th + ph[0]) + 0.1 * torch.sin(3 * th + ph[1])) / math.sqrt(1 + 0.0325 / 2),
    ], dim=1).gather(1, kind[:, None, None, None].expand(-1, 1, S, S))[:, 0]
    R = (4 * A / math.pi).sqrt()[:, None, None]
    obj = (r < R * rho).float()[:, None]  # [B,1,S,S]
    # its texture: one colour and a slightly darker shade of it in one of four patterns, lit from one side
    tex_kind, freq = torch.randint(4, (B,), generator=g), U(B, lo=2.5, hi=4.5)  # periods of 5-10 px at 32 px
    f1, f2 = colour_and_shade()
    fg = texture(u / R, v / R, tex_kind, freq * R[:, 0, 0], f1, f2)
    fg = fg * (1 - 0.25 * (u / R).clamp(-1, 1)[:, None])
    # background, out of focus: two colours mixed by low-frequency waves, plus soft-edged clutter blobs
    b1, b2 = colour(), colour()
    waves = sum(torch.sin(U(B, lo=1, hi=3)[:, None, None] * (xx * kx + yy * (1 - kx)) * math.pi
                          + U(B, hi=6.3)[:, None, None])
                for kx in (1.0, 0.0, 0.5))
    t = torch.sigmoid(1.5 * waves)[:, None]
    img = b1[:, :, None, None] * t + b2[:, :, None, None] * (1 - t)
    for _ in range(3):
        ex, ey = U(B, lo=-1, hi=1)[:, None, None], U(B, lo=-1, hi=1)[:, None, None]
        rx, ry = U(B, lo=0.15, hi=0.4)[:, None, None], U(B, lo=0.15, hi=0.4)[:, None, None]
        d = (((xx - ex) / rx).square() + ((yy - ey) / ry).square()).sqrt()
        inside = torch.sigmoid((1 - d) / 0.2)[:, None]  # blurred edge
        img = img * (1 - inside) + colour()[:, :, None, None] * inside
    # leakage: sharp textured patches near the border, drawn like objects but independently of this
    # image's object (same palette and texture families: about a third share its colour or texture by
    # chance; only the radial shading's scale follows the object's size). They look like the object, so
    # a generator can mix up the layers, yet carry no information about it, as the layered model assumes
    # of a background.
    for _ in range(2):
        on = (U(B) < 0.35).float()[:, None, None, None]
        px = U(B, lo=0.55, hi=0.85) * torch.where(U(B) < 0.5, -1.0, 1.0)
        py = U(B, lo=0.55, hi=0.85) * torch.where(U(B) < 0.5, -1.0, 1.0)
        h = U(B, lo=0.15, hi=0.25)[:, None, None]
        du, dv = xx[None] - px[:, None, None], yy[None] - py[:, None, None]
        inside = ((du.abs() < h) & (dv.abs() < h)).float()[:, None] * on
        d1, d2 = colour_and_shade()
        d_kind, d_freq = torch.randint(4, (B,), generator=g), U(B, lo=2.5, hi=4.5)
        patch = texture(du / R, dv / R, d_kind, d_freq * R[:, 0, 0], d1, d2)
        img = img * (1 - inside) + patch * inside
    if context > 0:  # with probability `context`, a ground shadow under the object in a darker shade of its
        # colour: background that depends on the object, as a road does on a car (drawn only when asked, so
        # that context 0 is the benchmark as it always was, random numbers included)
        on = (U(B) < context).float()[:, None, None, None]
        ell = (((xx[None] - cx[:, None, None]) / (1.3 * R)).square()
               + ((yy[None] - cy[:, None, None] - 0.8 * R) / (0.45 * R)).square()).sqrt()
        ground = torch.sigmoid((1 - ell) / 0.15)[:, None] * on
        img = img * (1 - ground) + (0.55 * f1)[:, :, None, None] * ground
    img = img * (1 - obj) + fg * obj
    return img, obj


def make_synthetic(n, res, seed, context=0.0):
    """The embedded benchmark: n images [n,3,res,res] uint8 and masks [n,1,res,res] bool.

    Deterministic in (n, res, seed). Rendered at 2x and box-filtered (anti-aliased edges); the mask
    is object coverage >= 0.5. One centred, sharp-edged object (15-50% of the area) with its own
    shape, colour and texture family, over an out-of-focus background of waves and blobs in the same
    palette, with sharp textured distractor patches drawn from the same colours and texture families
    but independently of the object: a generator can mix them up with it (leakage), yet they carry
    no information about it. context > 0 makes the background depend on the object as in real photos:
    that share of the images has a ground shadow in the object's colour under it.
    """
    g = torch.Generator().manual_seed(seed)
    x, m = torch.empty(n, 3, res, res, dtype=torch.uint8), torch.empty(n, 1, res, res, dtype=torch.bool)
    for i in range(0, n, 256):
        img, obj = render(min(256, n - i), 2 * res, g, context)
        img = F.avg_pool2d(img, 2) + 0.01 * torch.randn(img.shape[0], 3, res, res, generator=g)
        x[i:i + 256] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        m[i:i + 256] = F.avg_pool2d(obj, 2) >= 0.5
    return x, m


def load(name, root, res, split, n_train=10000, bgr=False, skip_unmasked=False, context=0.0):
    """Images [N,3,res,res] uint8 and masks [N,1,res,res] bool (None where the split has none).
    split: 'train' (for the GAN) or 'test' (real images with ground-truth masks, for evaluation)."""
    if name == "synthetic":
        return make_synthetic(n_train, res, 0, context) if split == "train" else make_synthetic(1000, res, SYNTHETIC_TEST_SEED, context)
    items, note = real_items(name, root, split, skip_unmasked)
    if not items:
        raise layout_error(name, root, f"the {split} split is empty ({note})")
    missing = [str(p) for it in items for p in it[:2] if p is not None and not p.is_file()]
    if missing:
        raise InputError(f"{name} at {root}: {len(missing)} files missing, e.g. {missing[:3]}")
    print(f"{name} {split}: {len(items)} images ({note})")
    return decode(items, res, bgr, f"decoding {name} {split}")


def resize_images(x, res):
    """uint8 [0,255] or float [-1,1] images [N,3,H,W] -> float [-1,1] at res (bilinear, antialiased)."""
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
    return x if x.shape[-1] == res else F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)


# --- photos on disk: the layouts, and how a file is read ------------------------------------------------

LAYOUTS = {
    "cars": """DRC_processed/cars/  (from the DRC authors; Stanford Cars with Mask R-CNN pseudo ground truth)
    data_mrcnn_train_select.npy   data_mrcnn_test_select.npy       1-D arrays of tokens
    data_mrcnn/train/orig/<tok>_orig.png                            training images (full size)
    data_mrcnn/test/resized/<tok>_resized.png, <tok>_maskresized.png   test images and masks""",
    "dogs": """DRC_processed/dogs/  (from the DRC authors, plus dogs_raw_data.zip for the originals)
    data_tr_sel.npy   data_te_sel.npy                                1-D arrays of tokens
    train_orig/orig/<tok>_orig.png                                  training images (full size)
    data_mrcnn/test/resized/<tok>_resized.png, <tok>_maskresized.png   test images and masks""",
    "cub": """CUB_200_2011/ or DRC_processed/birds/  (CUB-200-2011 tarball + its segmentations archive)
    images.txt  bounding_boxes.txt  images/<class>/<name>.jpg  segmentations/<class>/<name>.png
    train_val_test_split.txt  (DRC/ReDO split: 0 train, 1 val, 2 test; from the ReDO repository)
      or train_test_split.txt (the official split: 1 train, 0 test) when the first is absent""",
    "folder": """<root>/  any images (.jpg .jpeg .png .bmp .webp), searched recursively, for training;
    optional: <root>/images/... with <root>/masks/<same relative path, .png> for testing""",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def layout_error(name, root, problem):
    return InputError(f"{name} data at {root!r}: {problem}\nexpected layout:\n    {LAYOUTS[name]}")


def open_image(path, what="image"):
    """An image file as a viewer shows it (EXIF orientation applied), as a loaded PIL image; a file that
    is not a regular, readable image is an InputError naming it."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not a regular file; expected an {what}")
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im)
    except Exception as e:  # a corrupt file names itself; nothing is skipped or replaced
        raise InputError(f"cannot read {what} {path}: {str(e)[:200]}") from None


def read_rgb(path, bgr=False):
    """An image file -> uint8 [H,W,3] RGB, by value: grey of any bit depth (16-bit, 32-bit, float)
    scaled to 8 bits, alpha dropped; bgr=True swaps the channels, as the official cv2 reads of cars
    and dogs do."""
    im = open_image(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # convert("RGB") would clip these to white
        a = np.asarray(im).astype(np.float64)
        top = a.max(initial=0)
        span = (1.0 if top <= 1 else 255.0) if im.mode == "F" else 255.0 if top <= 255 else 65535.0 if top <= 65535 else 2.0**32 - 1
        a = np.repeat(np.clip(np.round(a / span * 255), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        a = np.array(im.convert("RGB"))  # writable: it may become a tensor
    return np.ascontiguousarray(a[..., ::-1] if bgr else a)


def read_mask(path):
    """A mask file -> float [H,W] in [0,1], by value and without dithering: 0/255 or soft grey (CUB),
    0/1, 16-bit, palette (index 0 is background) or coloured (any channel). An alpha channel is the
    mask only when the colour channels are constant. A label map (values 0..k, 1 < k < 128) is refused."""
    im = open_image(path, "mask")
    mode, a = im.mode, np.asarray(im)
    if mode == "P":  # palette indices
        return (a > 0).astype(np.float32)
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        colour, alpha = a[..., :-1], a[..., -1]
        a = alpha if colour.min() == colour.max() and alpha.min() != alpha.max() else colour
    a = (a.max(axis=2) if a.ndim == 3 else a).astype(np.float32)  # RGB: any coloured channel
    top = float(a.max(initial=0))
    if mode not in ("F", "1") and 1 < top < 128 and len(np.unique(a)) <= top + 1:
        labels = np.unique(a).astype(int).tolist()
        raise InputError(f"mask {path} holds the labels {labels[:6]}{'...' if len(labels) > 6 else ''}: save masks as "
                         "0/255 (or 0/1) images, foreground = 255")
    return a / (1.0 if top <= 1 or mode == "1" else 255.0 if top <= 255 else 65535.0)


def resize(a, res, box=None):
    """uint8 [H,W,3] or float [H,W] -> [res,res], bilinear (antialiased), after an optional crop box."""
    im = Image.fromarray(a if a.dtype == np.uint8 else a.astype(np.float32), mode=None if a.dtype == np.uint8 else "F")
    return np.asarray(im.resize((res, res), Image.BILINEAR, box=box))


def centre_square(h, w):
    """official training crop: the largest centred square, as a (left, top, right, bottom) box."""
    s = min(h, w)
    return ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)


def drc_crop(x, y, bw, bh, W, H):
    """DRC test crop: a square of 1.5x the longer box side around the box centre, clipped to the image
    (so not always square). Box values are truncated to int first, as DRC does."""
    x, y, bw, bh = int(x), int(y), int(bw), int(bh)
    r, cx, cy = int(0.75 * max(bw, bh)), int((2 * x + bw) / 2), int((2 * y + bh) / 2)
    return (max(0, cx - r), max(0, cy - r), min(W, cx + r), min(H, cy + r))


# --- the lists a dataset names its files in ---------------------------------------------------------


def tokens(path, name, root):
    """A .npy token list: a non-empty 1-D array of strings or integers, each once. Object arrays
    (pickles, which can run code when loaded) are refused, never loaded."""
    if not path.is_file():
        raise layout_error(name, root, f"missing {path.name}")
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise InputError(f"{path}: not a .npy file (numpy.save writes them); expected a token list")
    try:
        t = np.load(path, allow_pickle=False)
    except ValueError as e:  # an object array: a pickle
        raise InputError(f"{path}: not a token list of strings or integers ({str(e).splitlines()[0]})") from None
    if t.ndim != 1 or len(t) == 0 or t.dtype.kind not in "USiu":
        raise InputError(f"{path}: expected a non-empty 1-D array of string or integer tokens, got {t.dtype} of shape {t.shape}")
    toks = [str(v) for v in t]
    bad = next((x for x in toks if not x.strip() or "\0" in x or toks.count(x) > 1), None)
    if bad is not None:
        raise InputError(f"{path}: the token {bad!r} is {'listed twice' if toks.count(bad) > 1 else 'not a file name'}")
    return toks


def table(path, name, root, cols):
    """A whitespace table '<id> <values...>' -> {id: (line number, [values])}, cols columns a line."""
    if not path.is_file():
        raise layout_error(name, root, f"missing {path.name}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = {}
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=cols - 1) if cols == 2 else line.split()
            if len(parts) != cols or not parts[0].isdigit():
                raise InputError(f"{path}:{i}: expected {cols} columns starting with an image id, got {line[:80]!r}")
            if int(parts[0]) in rows:
                raise InputError(f"{path}:{i}: image id {parts[0]} is listed twice")
            rows[int(parts[0])] = (i, parts[1:])
    return rows


def inside(path, root, where):
    """A file a list names must stay inside the data root."""
    if not Path(path).resolve().is_relative_to(Path(root).expanduser().resolve()):
        raise InputError(f"{where} names {path}, which is outside the data root {root}")
    return path


def cub_box(row, path, image_id):
    """A CUB box 'x y width height' -> [x, y, w, h, 'file:line']: at or right of and below 0, positive size."""
    line = f"{path}:{row[0]}"
    try:
        x, y, w, h = (float(v) for v in row[1])
    except ValueError:
        raise InputError(f"{line}: the box of image {image_id} is not 4 numbers: {' '.join(row[1])}") from None
    if not all(map(math.isfinite, (x, y, w, h))) or x < 0 or y < 0 or w <= 0 or h <= 0:
        raise InputError(f"{line}: the box of image {image_id} ({x:g} {y:g} {w:g} {h:g}) must start at 0 or more "
                         "and have a positive width and height")
    return [x, y, w, h, line]


def real_items(name, root, split, skip_unmasked=False):
    """-> list of (image path, mask path or None, crop kind, box) and a note on the split used."""
    r = Path(root).expanduser()
    if name not in LAYOUTS:
        raise InputError(f"unknown dataset {name!r}: synthetic | {' | '.join(LAYOUTS)}")
    if not root or not r.is_dir():
        raise layout_error(name, root, "no such folder (give the data root)")
    if name in ("cars", "dogs"):
        npy = {("cars", "train"): "data_mrcnn_train_select.npy", ("cars", "test"): "data_mrcnn_test_select.npy",
               ("dogs", "train"): "data_tr_sel.npy", ("dogs", "test"): "data_te_sel.npy"}[name, split]
        toks = tokens(r / npy, name, root)
        if split == "train":
            d = r / ("data_mrcnn/train/orig" if name == "cars" else "train_orig/orig")
            return [(inside(d / f"{t}_orig.png", r, f"{r / npy}: token {i}"), None, "centre", None)
                    for i, t in enumerate(toks)], npy
        d = r / "data_mrcnn/test/resized"
        return [(inside(d / f"{t}_resized.png", r, f"{r / npy}: token {i}"), d / f"{t}_maskresized.png", "full", None)
                for i, t in enumerate(toks)], npy
    if name == "cub":
        images, boxes = table(r / "images.txt", name, root, 2), table(r / "bounding_boxes.txt", name, root, 5)
        if (r / "train_val_test_split.txt").is_file():
            splits, want, note = table(r / "train_val_test_split.txt", name, root, 2), {"train": "0", "test": "2"}, \
                "train_val_test_split.txt (DRC/ReDO: 10k train / 1k test)"
        else:
            splits, want, note = table(r / "train_test_split.txt", name, root, 2), {"train": "1", "test": "0"}, \
                "train_test_split.txt (the official CUB split; train_val_test_split.txt not found)"
        missing = sorted(set(images) ^ set(boxes) | set(images) ^ set(splits))
        if missing:
            raise InputError(f"cub at {root}: images.txt, bounding_boxes.txt and the split file do not list the "
                             f"same ids (e.g. {missing[:5]})")
        ids = [i for i in sorted(images) if splits[i][1][0] == want[split]]
        image = {i: inside(r / "images" / images[i][1][0], r, f"{r / 'images.txt'}:{images[i][0]}") for i in ids}
        if split == "train":  # official: the full image, centre square crop, no box
            return [(image[i], None, "centre", None) for i in ids], note
        return [(image[i], r / "segmentations" / (images[i][1][0].rsplit(".", 1)[0] + ".png"), "drc",
                 cub_box(boxes[i], r / "bounding_boxes.txt", i)) for i in ids], note
    img_dir = r / "images" if (r / "images").is_dir() else r  # folder
    files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and "masks" not in p.relative_to(r).parts[:1])
    if split == "train":
        return [(p, None, "centre", None) for p in files], f"{len(files)} images"
    if not (r / "masks").is_dir():
        raise layout_error(name, root, "no masks/ folder, so there is no test split")
    items = [(p, (r / "masks" / p.relative_to(img_dir)).with_suffix(".png"), "centre", None) for p in files]
    unmasked = [it[0] for it in items if not it[1].is_file()]
    if unmasked and not skip_unmasked:
        raise layout_error(name, root, f"{len(unmasked)} test images have no mask in masks/ (e.g. {unmasked[0]}); "
                           "give each one, or --skip-unmasked to leave them out")
    return ([it for it in items if it[1].is_file()], "images with a mask in masks/"
            + (f"; {len(unmasked)} without one skipped (--skip-unmasked)" if unmasked else ""))


# --- decoding: a pool of threads ----------------------------------------------------------------------


def decode(items, res, bgr, desc):
    """(image, mask or None, crop, box) items -> uint8 [N,3,res,res] and bool [N,1,res,res] or None,
    decoded by a pool of threads (PIL releases the GIL while it decodes and resizes)."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    def one(item):
        img_path, mask_path, crop, box = item
        img = read_rgb(img_path, bgr)
        H, W = img.shape[:2]
        if crop == "drc" and (box[0] + box[2] > W + 1 or box[1] + box[3] > H + 1):
            raise InputError(f"{box[4]}: the box of {img_path} ({' '.join(f'{v:g}' for v in box[:4])}) leaves its "
                             f"{W}x{H} image")
        cbox = drc_crop(*box[:4], W, H) if crop == "drc" else centre_square(H, W) if crop == "centre" else None
        if mask_path is None:
            return resize(img, res, cbox), None
        m = read_mask(mask_path)
        if m.shape != (H, W):
            raise InputError(f"mask {mask_path} is {m.shape[1]}x{m.shape[0]}, its image is {W}x{H}")
        return resize(img, res, cbox), resize(m, res, cbox) > 0.5  # explicit threshold at 0.5, no dithering
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        out = list(tqdm(pool.map(one, items), total=len(items), desc=desc, leave=False))
    finally:  # on an error or an interrupt, the images not yet decoded are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    x = torch.from_numpy(np.stack([a for a, _ in out])).permute(0, 3, 1, 2).contiguous()
    return x, (torch.from_numpy(np.stack([b for _, b in out]))[:, None] if out[0][1] is not None else None)
