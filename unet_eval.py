"""Segmentation score of an ILSGAN run: distil a U-Net from generated pairs, test it on real masks.

ILSGAN only *generates* (image, mask) pairs. The paper ("Evaluation") and the official code
(qrzou/ILSGAN: gen_and_seg.py, analyze_whole_training_process.py, eval_segmentation*.py) measure
segmentation by training a U-Net on those pairs and scoring it on real images with ground truth:

    1. G_ema draws N pairs (official: 10,000 after a 64 px run, 50,000 for a 128 px one), truncation 1,
       each layer's fixed noise (noise_mode 'const'), the mask thresholded at 0.5.
    2. A U-Net (64-128-256-512-512 channels, BatchNorm, bilinear up-sampling, 2-class logits) is
       trained on the first 90%: Adam, batch 64, 6000 iterations at a constant lr of 1e-3 (the
       official scripts build a StepLR(4000, 0.2) but never call its step()), colour augmentation
       (brightness, contrast, luma flip, hue, saturation, each with p = 0.5).
    3. Validated at iterations 20, 1020, 2020, ... and the last, the weights with the best dataset-level
       foreground IoU on the last 10% are kept (unet.pt in the run folder, for --segment).
    4. They are scored once on the real test split. The paper's figures are per-image foreground
       IoU and DICE averaged over images (the DRC protocol); we also report dataset-level
       foreground IoU, mean IoU (fg, bg) and pixel accuracy. An image whose prediction and truth
       are both empty scores IoU = DICE = 1 (DRC would produce NaN there).
    For 128 px runs the official protocol segments at 64 px: generated pairs and test images are
    resized to 64, and the logits are upsampled x2 (bilinear) before the argmax at 128, against the
    128 px masks in validation and in the test.

The `cpu` preset (fewer pairs, narrower U-Net, fewer iterations) serves the default demo; without
--preset, a CPU gets it and a GPU the official one. It also turns on two augmentations of ours: random
flips and quarter-turns of the training pairs (`--flip-rotate`) and random shadows (`--shadows`); the
official protocol augments colour only.

    python unet_eval.py --ckpt RUN_DIR_OR_CKPT [--dataset ...] [--data-root ...] [--preset official]
    python unet_eval.py --ckpt RUN_DIR --segment PHOTOS_OR_FOLDERS --out MASKS [--soft]   # your own images

Writes results.json (fractions in [0, 1], protocol named), segmentation.png (test images with
predicted outlines in red and true outlines in green) and unet.pt (the U-Net kept) into the run
folder. --segment applies unet.pt to images (files or folders, searched recursively; `test`: the run's
test split): one mask per image under --out, its relative name with .png, 0/255 (--soft: the
probability) at the image's own size, segmented at the U-Net's resolution with the logits upsampled
before the threshold, and contact.png, the first images with their outlines.
"""
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import ilsgan
import runs
from runs import InputError


@dataclass
class EvalConfig:
    ckpt: str = ""  # run folder or checkpoint file
    dataset: str = ""  # test set; default: the run's own dataset
    data_root: str = ""  # default: the run's own data root
    n: int = 0  # generated pairs (90% train, 10% validation); 0 = official: 10,000, or 50,000 for a run above seg_res (128 px)
    width: int = 64  # U-Net base width: channels width * (1, 2, 4, 8, 8)
    iters: int = 6000  # U-Net training iterations
    batch: int = 64  # U-Net batch size
    lr: float = 1e-3  # Adam learning rate
    lr_step: int = 0  # lr x0.2 at this iteration; 0 = constant (official: its StepLR is never stepped)
    val_every: int = 1000  # validate at iteration 20 and every this many after it (official 1000: 20, 1020, ...)
    seg_res: int = 64  # official: segment at 64 px at most (128 px runs: upsample the logits)
    seed: int = 0  # generated pairs and U-Net
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    oracle: bool = False  # train on the dataset's real training masks instead: the U-Net's ceiling
    flip_rotate: bool = False  # ours: each batch of pairs gets one of the 8 flips / quarter-turns
    shadows: bool = False  # ours: darken each image beyond up to two random straight lines (random shadows)
    skip_unmasked: bool = False  # folder datasets: skip (and count) test images without a mask; default: an error


PRESETS = {
    "official": dict(n=0, width=64, iters=6000, lr_step=0, val_every=1000),
    "cpu": dict(n=3000, width=16, iters=300, lr_step=200, val_every=140, flip_rotate=True, shadows=True),
    "tiny": dict(n=64, width=4, iters=20, batch=16, val_every=10),  # seconds; for tests
}


def make_config(preset="auto", **overrides):
    """EvalConfig from a preset ('auto': cpu on a CPU, official on a GPU) and overrides."""
    if preset == "auto":
        preset = "cpu" if ilsgan.parse_device(overrides.get("device") or "auto").type == "cpu" else "official"
    return runs.with_overrides(EvalConfig(**PRESETS[preset]), **overrides)


# --- metrics ---------------------------------------------------------------------------------


def seg_metrics(pred, gt):
    """pred, gt bool [N,H,W] (True = foreground) -> dict of fractions in [0, 1].

    iou, dice: per image, then averaged (DRC protocol; the paper's figures). Both empty -> 1.
    iou_dataset: foreground TP / (TP + FP + FN) over all pixels; miou: mean of fg and bg IoU;
    pacc: pixel accuracy. missed, extra: where the per-image IoU is lost, the shares of each image's
    union that are true foreground predicted as background and the reverse, averaged over images
    (iou + missed + extra = 1 per image; both 0 when both masks are empty).
    """
    pred, gt = pred.flatten(1), gt.flatten(1)
    inter = (pred & gt).sum(1).double()
    union = (pred | gt).sum(1).double()
    size = pred.sum(1).double() + gt.sum(1).double()
    fp_img, fn_img = (pred & ~gt).sum(1).double(), (~pred & gt).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    dice = torch.where(size > 0, 2 * inter / size.clamp(min=1), torch.ones_like(inter))
    tp, fp, fn = inter.sum(), fp_img.sum(), fn_img.sum()
    tn = (~pred & ~gt).sum().double()
    iou_fg = tp / (tp + fp + fn).clamp(min=1)
    iou_bg = tn / (tn + fp + fn).clamp(min=1)
    return dict(iou=iou.mean().item(), dice=dice.mean().item(), iou_dataset=iou_fg.item(),
                miou=((iou_fg + iou_bg) / 2).item(), pacc=((tp + tn) / pred.numel()).item(),
                missed=(fn_img / union.clamp(min=1)).mean().item(), extra=(fp_img / union.clamp(min=1)).mean().item())


def iou_by_size(pred, gt, groups=3):
    """Per-image IoU averaged within equal-count groups of the true mask's area, smallest first:
    {"0.12-0.25": iou, ...} keyed by each group's area range (fractions of the image)."""
    area = gt.flatten(1).double().mean(1)
    out = {}
    for idx in area.argsort().chunk(groups):
        out[f"{area[idx].min().item():.2f}-{area[idx].max().item():.2f}"] = seg_metrics(pred[idx], gt[idx])["iou"]
    return out


# --- U-Net (milesial-style, as the official evaluation) --------------------------------------


def double_conv(cin, cout):
    """(conv3x3 -> BatchNorm -> ReLU) x 2."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    """x2 bilinear up-sampling (align_corners=True), concatenate the skip, double conv."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = double_conv(cin, cout)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """[B,3,H,W] in [-1,1] -> 2-class logits [B,2,H,W]. width 64 is the official 13.4 M net."""

    def __init__(self, width=64):
        super().__init__()
        c = [width, width * 2, width * 4, width * 8, width * 8]
        self.inc = double_conv(3, c[0])
        self.downs = nn.ModuleList([double_conv(c[i], c[i + 1]) for i in range(4)])
        self.ups = nn.ModuleList([Up(c[4] + c[3], c[2]), Up(c[2] * 2, c[1]), Up(c[1] * 2, c[0]), Up(c[0] * 2, c[0])])
        self.outc = nn.Conv2d(c[0], 2, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


# --- the protocol ----------------------------------------------------------------------------


def resize_masks(m, res):
    """bool [N,1,H,W] -> bool [N,1,res,res] (bilinear, then > 0.5, as the official loaders)."""
    return F.interpolate(m.float(), size=(res, res), mode="bilinear", align_corners=False, antialias=True) > 0.5


@torch.no_grad()
def generate_pairs(G, n, seed=0, batch=256):
    """n pairs from G: images uint8 [n,3,H,W] (as the official PNGs), masks bool [n,1,H,W] (m >= 0.5),
    and the mean soft-mask statistics (area, binarisation) of the generator."""
    xs, ms, area, binary = [], [], 0.0, 0.0
    for s in tqdm(ilsgan.sample(G, n, batch, seed, noise="const"), total=-(-n // batch), desc="generating pairs", leave=False):
        xs.append(((s["x"] * 127.5 + 128).clamp(0, 255)).to(torch.uint8).cpu())  # official: truncating cast
        ms.append((s["m"] >= 0.5).cpu())
        area += s["m"].sum().item()
        binary += ilsgan.binarization_loss(s["m"]).item() * s["m"].numel()
    x, m = torch.cat(xs), torch.cat(ms)
    return x, m, dict(gen_mask_area=area / m.numel(), gen_mask_binary=binary / m.numel())


@torch.no_grad()
def predict(net, x, out_res, batch=64):
    """Images [N,3,h,w] float -> bool foreground [N,out_res,out_res]; logits upsampled if needed."""
    net.eval()
    preds = []
    for i in range(0, len(x), batch):
        logits = net(x[i:i + batch])
        if logits.shape[-1] != out_res:  # official 128 protocol: x2 bilinear on the logits
            logits = F.interpolate(logits, size=(out_res, out_res), mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1).bool().cpu())
    return torch.cat(preds)


def flip_rotate(x, m):
    """The same random flip / quarter-turn of images x [B,C,H,W] and masks m [B,H,W] (one per batch)."""
    k = torch.randint(4, (1,)).item()
    x, m = torch.rot90(x, k, (2, 3)), torch.rot90(m, k, (1, 2))
    if torch.rand(1).item() < 0.5:
        x, m = x.flip(3), m.flip(2)
    return x, m


def random_shadows(x, lines=2, p=0.5):
    """Images x [B,3,H,W] in [-1,1], each darkened (x0.7-1) beyond up to `lines` random straight lines,
    each line with probability p: a brightness edge inside an object is then not always its boundary."""
    B, _, H, W = x.shape
    dev = x.device
    yy, xx = data.pixel_grid(H, dev)
    gain = torch.ones(B, 1, H, W, device=dev)
    for _ in range(lines):
        angle, offset = torch.rand(B, 1, 1, 1, device=dev) * 2 * math.pi, torch.rand(B, 1, 1, 1, device=dev) - 0.5
        factor, on = 0.7 + 0.3 * torch.rand(B, 1, 1, 1, device=dev), (torch.rand(B, 1, 1, 1, device=dev) < p).float()
        beyond = (xx * angle.cos() + yy * angle.sin() > offset).float()
        gain = gain * (1 - on * beyond * (1 - factor))
    return (x + 1) * gain - 1


def train_unet(x, m, ec, dev, m_val):
    """Train on the first 90% of (x, m), keep the weights with the best dataset-level IoU on the last 10%
    of m_val, the same masks at the run's resolution (the U-Net's logits are upsampled to it)."""
    n_train = int(len(x) * 0.9)
    x, m, m_val = x.to(dev), m[:, 0].long().to(dev), m_val[n_train:, 0]
    torch.manual_seed(ec.seed)
    net = UNet(ec.width).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=ec.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=ec.lr_step or ec.iters + 1, gamma=0.2)
    best, best_iou, history = None, -1.0, []
    bar = tqdm(range(1, ec.iters + 1), desc="U-Net", leave=False)
    for it in bar:
        net.train()
        idx = torch.randint(n_train, (ec.batch,), device=dev)
        xb, mb = flip_rotate(x[idx], m[idx]) if ec.flip_rotate else (x[idx], m[idx])
        xb = random_shadows(xb) if ec.shadows else xb
        xb = ilsgan.augment(xb, 0.5, geometric=False)  # official: colour augmentation only
        loss = F.cross_entropy(net(xb), mb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it >= 20 and (it - 20) % ec.val_every == 0) or it == ec.iters:  # official: iterations 20, 1020, ...
            val = seg_metrics(predict(net, x[n_train:], m_val.shape[-1]), m_val)
            history.append(dict(iter=it, loss=loss.item(), **val))
            bar.set_postfix_str(f"loss {loss.item():.3f} val IoU {val['iou_dataset']:.3f}")
            if val["iou_dataset"] > best_iou:
                best_iou, best = val["iou_dataset"], copy.deepcopy(net.state_dict())
    if best is None:
        raise InputError("the U-Net's validation IoU was never a number (its loss became non-finite): lower --lr")
    net.load_state_dict(best)
    return net.eval(), history


def outline(m):
    """bool [N,1,H,W] -> its 1-pixel inner boundary."""
    mf = m.float()
    return (mf - -F.max_pool2d(-mf, 3, 1, 1)) > 0


def save_outlines(x, pred, gt, path, n=32):
    """Test images with predicted (red) and true (green) mask outlines, upscaled for viewing."""
    from torchvision.utils import save_image
    res = gt.shape[-1]
    img = (data.resize_images(x[:n], res) + 1) / 2
    scale = max(1, 128 // res)
    img = F.interpolate(img, scale_factor=scale, mode="nearest")
    p = F.interpolate(pred[:n, None].float(), scale_factor=scale, mode="nearest") > 0.5
    g = F.interpolate(gt[:n, None].float(), scale_factor=scale, mode="nearest") > 0.5
    red, green = torch.tensor([1.0, 0, 0])[None, :, None, None], torch.tensor([0, 1.0, 0])[None, :, None, None]
    img = torch.where(outline(p), red, torch.where(outline(g), green, img))
    with runs.replaced(path) as tmp:
        save_image(img, tmp, nrow=8, padding=2, pad_value=1, format="png")


def evaluate(ec):
    """The whole protocol for one checkpoint (its run's best.pt if FID kept one, official) -> the
    'segmentation' (or 'oracle') section, written into the run's results.json."""
    runs.validate_fields(ec, positive=("width", "iters", "batch", "lr", "val_every"), nonneg=("lr_step", "seed"),
                         rules=[("dataset", ec.dataset in ("", "synthetic", *data.LAYOUTS), "synthetic | " + " | ".join(data.LAYOUTS)),
                                ("n", ec.n == 0 or ec.n >= 10, "0 (official) or 10 or more (90% train the U-Net, 10% validate it)"),
                                ("seg_res", ec.seg_res >= 16 and ec.seg_res & (ec.seg_res - 1) == 0, "a power of two, 16 or more"),
                                ("lr", ec.lr <= 1, "at most 1"), ("seed", ec.seed < 2**63, "below 2^63")])
    dev = ilsgan.setup_device(ilsgan.parse_device(ec.device))
    cfg, G, kimg = ilsgan.load_generator(ec.ckpt, dev, best=True)
    folder = Path(ec.ckpt) if Path(ec.ckpt).is_dir() else Path(ec.ckpt).parent
    dataset, root = ec.dataset or cfg.dataset, ec.data_root or cfg.data_root
    if dataset != "synthetic" and root and folder.resolve().is_relative_to(Path(root).expanduser().resolve()):
        raise InputError(f"{folder} lies inside the data root {root}: the scores go into the run folder, never into data")
    tag = "oracle" if ec.oracle else "segmentation"
    with runs.scoring(folder, tag, "the U-Net distillation"):
        t0, seg_res = time.time(), min(cfg.resolution, ec.seg_res)
        x_test, m_test = data.load(dataset, root, cfg.resolution, "test", cfg.n_train, cfg.bgr, ec.skip_unmasked, cfg.context)
        if m_test is None:
            raise InputError(f"dataset {dataset!r} has no test masks to score against")
        x_train, m_train = data.load(dataset, root, cfg.resolution, "train", cfg.n_train, cfg.bgr, context=cfg.context)
        n = ec.n or (50000 if cfg.resolution > ec.seg_res else 10000)  # official: 50,000 for 128 px runs
        if ec.oracle:  # the same protocol supervised by real training masks: what the U-Net alone reaches
            if m_train is None:
                raise InputError(f"dataset {dataset!r} has no training masks for --oracle")
            x_gen, m_gen, gen_stats = x_train[:n], m_train[:n], {}
        else:
            x_gen, m_gen, gen_stats = generate_pairs(G, n, ec.seed)
        net, history = train_unet(data.resize_images(x_gen, seg_res), resize_masks(m_gen, seg_res), ec, dev, m_gen)
        pred, gt = predict(net, data.resize_images(x_test, seg_res).to(dev), cfg.resolution), m_test[:, 0]
        baselines = {"all foreground": seg_metrics(torch.ones_like(gt), gt)}  # trivial ones, same test split
        if m_train is not None:
            baselines["mean training mask"] = seg_metrics((m_train[:, 0].float().mean(0) >= 0.5).expand_as(gt), gt)
        save_outlines(x_test, pred, gt, folder / f"{tag}.png")
        if not ec.oracle:  # the U-Net kept for --segment: tensors and plain values (weights_only=True)
            with runs.replaced(folder / "unet.pt") as tmp:
                torch.save(dict(weights=net.state_dict(), width=ec.width, seg_res=seg_res, inputs="RGB in [-1, 1]",
                                kimg=kimg, code=runs.code_version()), tmp)
        extras = (", random flips and quarter-turns" if ec.flip_rotate else "") + (", random shadows" if ec.shadows else "")
        section = dict(protocol=("ORACLE: U-Net trained on real training masks, not on generated pairs; " if ec.oracle
                                 else "") + f"U-Net distillation ({runs.preset_name(ec, PRESETS)} preset: {n} pairs, "
                       f"width {ec.width}, {ec.iters} iters{extras}, each layer's fixed noise), segmented at {seg_res}px, scored at "
                       f"{cfg.resolution}px on the {dataset} test split; iou/dice: per-image foreground, averaged over images (DRC)",
                       kimg=kimg, seg_res=seg_res, test=dict(seg_metrics(pred, gt), iou_by_size=iou_by_size(pred, gt)),
                       baselines=baselines, **gen_stats, n_test=len(gt), unet_val=history, seconds=time.time() - t0)
        runs.write_results(folder, tag, section)
    return section


@torch.no_grad()
def segment(run, inputs, out, soft=False, device="auto"):
    """The run's unet.pt applied to images: files, folders (searched recursively) or `test`, the run's
    test split -> one mask per image under `out` and contact.png; unreadable files are skipped, named."""
    dev, out = ilsgan.setup_device(ilsgan.parse_device(device)), Path(out)
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    try:
        saved = torch.load(folder / "unet.pt", map_location=dev, weights_only=True)
        net = UNet(saved["width"]).to(dev).eval()
        net.load_state_dict(saved["weights"])
    except Exception as e:
        raise InputError(f"{folder / 'unet.pt'} is not a U-Net this program kept ({str(e)[:160]}): score the run first") from None
    if inputs == ["test"]:
        cfg = ilsgan.read_checkpoint(folder)[0]
        x = data.load(cfg.dataset, cfg.data_root, cfg.resolution, "test", cfg.n_train, cfg.bgr, True, cfg.context)[0]
        items = [(f"{i:04d}.png", x[i]) for i in range(len(x))]
    else:
        paths = [Path(p).expanduser() for p in inputs]
        for p in paths:
            if not p.exists() or out.resolve().is_relative_to(p.resolve()) or p.resolve().is_relative_to(out.resolve()):
                raise InputError(f"{p}: no such file or folder" if not p.exists() else
                                 f"--out {out} and the input {p} lie one inside the other: the masks go to a folder of their own")
        items = [(str(f.relative_to(p)) if p.is_dir() else f.name, f) for p in paths for f in
                 (sorted(q for q in p.rglob("*") if q.suffix.lower() in data.IMAGE_EXTS) if p.is_dir() else [p])]
    runs.make_writable(out)
    sheet, skipped = [], []
    for name, item in tqdm(items, desc="segmenting", leave=False):
        try:
            img = torch.from_numpy(data.read_rgb(item)).permute(2, 0, 1) if isinstance(item, Path) else item
        except InputError as e:
            skipped.append(str(e))
            continue
        logits = net(data.resize_images(img[None].to(dev), saved["seg_res"]))
        prob = F.interpolate(logits, size=img.shape[1:], mode="bilinear", align_corners=False).softmax(1)[0, 1].cpu()
        mask = (prob * 255).round() if soft else (prob > 0.5) * 255.0  # > 0.5: the argmax of two classes
        target = (out / name).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with runs.replaced(target) as tmp:
            Image.fromarray(mask.to(torch.uint8).numpy()).save(tmp, format="PNG")
        if len(sheet) < 32:
            sheet.append((data.resize_images(img[None], 128)[0], F.interpolate(prob[None, None], size=(128, 128))[0, 0] > 0.5))
    if sheet:
        xs, ms = torch.stack([a for a, _ in sheet]), torch.stack([b for _, b in sheet])
        save_outlines(xs, ms, ms, out / "contact.png")
    print(f"wrote {len(items) - len(skipped)} masks to {out}" + (f"; skipped {len(skipped)} unreadable: " + "; ".join(skipped)
                                                                 if skipped else ""))
    return len(items) - len(skipped), skipped


def main(argv=None):
    ap = runs.config_parser(EvalConfig, PRESETS, __doc__.split("\n")[0])
    ap.add_argument("--segment", nargs="+", metavar="PATH", help="apply the run's unet.pt to these images or folders "
                    "(`test`: its test split) instead of scoring it")
    ap.add_argument("--out", help="--segment: the folder of the masks")
    ap.add_argument("--soft", action="store_true", help="--segment: write the probability (0-255), not 0/255")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))

    def body():
        ec = make_config(args.preset or "auto", **runs.given(args, EvalConfig))
        if not ec.ckpt:
            raise InputError("--ckpt RUN_DIR_OR_CKPT is required")
        if args.segment:
            if not (args.out or "").strip():
                raise InputError("--segment needs --out, the folder of the masks")
            return segment(ec.ckpt, args.segment, args.out, args.soft, ec.device)
        folder = Path(ec.ckpt) if Path(ec.ckpt).is_dir() else Path(ec.ckpt).parent
        runs.print_scores(folder, {"oracle" if ec.oracle else "segmentation": evaluate(ec)})
    runs.error_boundary(body, lambda: f"python unet_eval.py {' '.join(argv)} (it starts over)")


if __name__ == "__main__":
    main()
