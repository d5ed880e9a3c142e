"""Segmentation score of an ILSGAN run: distil a U-Net from generated pairs, test it on real masks.

ILSGAN only *generates* (image, mask) pairs. The paper ("Evaluation") and the official code
(qrzou/ILSGAN: gen_and_seg.py, analyze_whole_training_process.py, eval_segmentation*.py) measure
segmentation by training a U-Net on those pairs and scoring it on real images with ground truth:

    1. G_ema draws N pairs (official: 10,000), truncation 1, mask thresholded at 0.5.
    2. A U-Net (64-128-256-512-512 channels, BatchNorm, bilinear up-sampling, 2-class logits) is
       trained on the first 90%: Adam, batch 64, 6000 iterations at a constant lr of 1e-3 (the
       official scripts build a StepLR(4000, 0.2) but never call its step()), colour augmentation
       (brightness, contrast, luma flip, hue, saturation, each with p = 0.5).
    3. The weights with the best dataset-level foreground IoU on the last 10% are kept.
    4. They are scored once on the real test split. The paper's figures are per-image foreground
       IoU and DICE averaged over images (the DRC protocol); we also report dataset-level
       foreground IoU, mean IoU (fg, bg) and pixel accuracy. An image whose prediction and truth
       are both empty scores IoU = DICE = 1 (DRC would produce NaN there).
    For 128 px runs the official protocol segments at 64 px: generated pairs and test images are
    resized to 64, and the logits are upsampled x2 (bilinear) before the argmax at 128.

The `cpu` preset (fewer pairs, narrower U-Net, fewer iterations) serves the default demo; without
--preset, a CPU gets it and a GPU the official one. It also turns on two augmentations of ours: random
flips and quarter-turns of the training pairs (`--flip-rotate`) and random shadows (`--shadows`); the
official protocol augments colour only.

    python unet_eval.py --ckpt RUN_DIR_OR_CKPT [--dataset ...] [--data-root ...] [--preset official]

Writes results.json (fractions in [0, 1], protocol named) and segmentation.png (test images with
predicted outlines in red and true outlines in green) into the run folder.
"""
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import ilsgan


@dataclass
class EvalConfig:
    ckpt: str = ""  # run folder or checkpoint file
    dataset: str = ""  # test set; default: the run's own dataset
    data_root: str = ""  # default: the run's own data root
    n: int = 10000  # generated pairs (90% train, 10% validation)
    width: int = 64  # U-Net base width: channels width * (1, 2, 4, 8, 8)
    iters: int = 6000  # U-Net training iterations
    batch: int = 64  # U-Net batch size
    lr: float = 1e-3  # Adam learning rate
    lr_step: int = 0  # lr x0.2 at this iteration; 0 = constant (official: its StepLR is never stepped)
    val_every: int = 1000  # validate at iteration 20 and then every this many (official 1000)
    seg_res: int = 64  # official: segment at 64 px at most (128 px runs: upsample the logits)
    seed: int = 0  # generated pairs and U-Net
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    oracle: bool = False  # train on the dataset's real training masks instead: the U-Net's ceiling
    flip_rotate: bool = False  # ours: each batch of pairs gets one of the 8 flips / quarter-turns
    shadows: bool = False  # ours: darken each image beyond up to two random straight lines (random shadows)


PRESETS = {
    "official": dict(n=10000, width=64, iters=6000, lr_step=0, val_every=1000),
    "cpu": dict(n=3000, width=16, iters=600, lr_step=400, val_every=200, flip_rotate=True, shadows=True),
    "tiny": dict(n=64, width=4, iters=20, batch=16, val_every=10),  # seconds; for tests
}


def make_config(preset="auto", **overrides):
    """EvalConfig from a preset ('auto': cpu on a CPU, official on a GPU) and overrides."""
    return ilsgan.companion_config(EvalConfig, PRESETS, preset, **overrides)


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
        r = seg_metrics(pred[idx], gt[idx])
        out[f"{area[idx].min().item():.2f}-{area[idx].max().item():.2f}"] = r["iou"]
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
    if m.shape[-1] == res:
        return m
    return F.interpolate(m.float(), size=(res, res), mode="bilinear", align_corners=False, antialias=True) > 0.5


@torch.no_grad()
def generate_pairs(G, n, seed=0, batch=256):
    """n pairs from G: images uint8 [n,3,H,W] (as the official PNGs), masks bool [n,1,H,W] (m >= 0.5),
    and the mean soft-mask statistics (area, binarisation) of the generator."""
    from tqdm import tqdm
    xs, ms, area, binary = [], [], 0.0, 0.0
    for s in tqdm(ilsgan.sample(G, n, batch, seed), total=-(-n // batch), desc="generating pairs", leave=False):
        xs.append(((s["x"] * 127.5 + 128).clamp(0, 255)).to(torch.uint8).cpu())  # official: truncating cast
        ms.append((s["m"] >= 0.5).cpu())
        area += s["m"].sum().item()
        binary += torch.minimum(s["m"], 1 - s["m"]).sum().item()
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
    yy, xx = ilsgan.pixel_grid(H, dev)
    gain = torch.ones(B, 1, H, W, device=dev)
    for _ in range(lines):
        angle, offset = torch.rand(B, 1, 1, 1, device=dev) * 2 * math.pi, torch.rand(B, 1, 1, 1, device=dev) - 0.5
        factor, on = 0.7 + 0.3 * torch.rand(B, 1, 1, 1, device=dev), (torch.rand(B, 1, 1, 1, device=dev) < p).float()
        beyond = (xx * angle.cos() + yy * angle.sin() > offset).float()
        gain = gain * (1 - on * beyond * (1 - factor))
    return (x + 1) * gain - 1


def train_unet(x, m, ec, dev):
    """Train on the first 90% of (x, m), keep the weights with the best val dataset-level IoU."""
    from tqdm import tqdm
    n_train = int(len(x) * 0.9)
    x, m = x.to(dev), m[:, 0].long().to(dev)
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
        if it == 20 or it % ec.val_every == 0 or it == ec.iters:
            val = seg_metrics(predict(net, x[n_train:], x.shape[-1]), m[n_train:].bool().cpu())
            history.append(dict(iter=it, loss=loss.item(), **val))
            bar.set_postfix_str(f"loss {loss.item():.3f} val IoU {val['iou_dataset']:.3f}")
            if val["iou_dataset"] > best_iou:
                best_iou, best = val["iou_dataset"], copy.deepcopy(net.state_dict())
    net.load_state_dict(best)
    return net, history


def outline(m):
    """bool [N,1,H,W] -> its 1-pixel inner boundary."""
    mf = m.float()
    return (mf - -F.max_pool2d(-mf, 3, 1, 1)) > 0


def save_outlines(x, pred, gt, path, n=32):
    """Test images with predicted (red) and true (green) mask outlines, upscaled for viewing."""
    from torchvision.utils import save_image
    img = (ilsgan.to_float(x[:n]) + 1) / 2 if x.dtype == torch.uint8 else (x[:n] + 1) / 2
    res = gt.shape[-1]
    img = F.interpolate(img, size=(res, res), mode="bilinear", align_corners=False)
    scale = max(1, 128 // res)
    img = F.interpolate(img, scale_factor=scale, mode="nearest")
    p = F.interpolate(pred[:n, None].float(), scale_factor=scale, mode="nearest") > 0.5
    g = F.interpolate(gt[:n, None].float(), scale_factor=scale, mode="nearest") > 0.5
    red, green = torch.tensor([1.0, 0, 0])[None, :, None, None], torch.tensor([0, 1.0, 0])[None, :, None, None]
    img = torch.where(outline(g), green, img)
    img = torch.where(outline(p), red, img)
    with ilsgan.replaced(path) as tmp:  # a killed write leaves the previous picture
        save_image(img, tmp, nrow=8, padding=2, pad_value=1, format="png")


def evaluate(ec):
    """The whole protocol for one checkpoint; returns the 'segmentation' section of results.json."""
    ilsgan.validate_fields(ec, positive=("width", "iters", "batch", "lr", "val_every"), nonneg=("lr_step",),
                 rules=[("n", ec.n >= 10, "10 or more (90% train the U-Net, 10% validate it)"),
                        ("seg_res", ec.seg_res >= 16 and ec.seg_res & (ec.seg_res - 1) == 0, "a power of two, 16 or more")])
    dev = ilsgan.setup_device(ilsgan.parse_device(ec.device))
    ckpt_path = ilsgan.find_checkpoint(ec.ckpt, best=True)  # official: the lowest-FID snapshot if any
    with ilsgan.scoring(ckpt_path.parent, "oracle" if ec.oracle else "segmentation", "the U-Net distillation"):
        return score(ec, ckpt_path, dev)


def score(ec, ckpt_path, dev):
    """evaluate()'s work, in the run folder it holds."""
    cfg, G, kimg = ilsgan.load_generator(ckpt_path, dev)
    dataset, root = ec.dataset or cfg.dataset, ec.data_root or cfg.data_root
    seg_res = min(cfg.resolution, ec.seg_res)
    validate_sizes(ec, seg_res, dev)
    t0 = time.time()
    x_test, m_test = ilsgan.load_dataset(dataset, root, cfg.resolution, "test", cfg.n_train, cfg.bgr, cfg.skip_unmasked)
    if m_test is None:
        raise ilsgan.InputError(f"dataset {dataset!r} has no test masks to score against")
    if ec.oracle:  # same protocol, but supervised by real training masks: what the U-Net alone can reach
        x_gen, m_gen = ilsgan.load_dataset(dataset, root, cfg.resolution, "train", cfg.n_train, cfg.bgr)
        if m_gen is None:
            raise ilsgan.InputError(f"dataset {dataset!r} has no training masks for --oracle")
        x_gen, m_gen, gen_stats = x_gen[:ec.n], m_gen[:ec.n], {}
    else:
        x_gen, m_gen, gen_stats = generate_pairs(G, ec.n, ec.seed)
    net, history = train_unet(ilsgan.resize_images(x_gen, seg_res), resize_masks(m_gen, seg_res), ec, dev)
    pred = predict(net, ilsgan.resize_images(x_test, seg_res).to(dev), cfg.resolution)
    gt = m_test[:, 0]
    test = dict(seg_metrics(pred, gt), iou_by_size=iou_by_size(pred, gt))
    # trivial baselines on the same test split
    baselines = {"all foreground": seg_metrics(torch.ones_like(gt), gt)}
    _, m_train = ilsgan.load_dataset(dataset, root, cfg.resolution, "train", cfg.n_train, cfg.bgr)
    if m_train is not None:
        mean_mask = m_train[:, 0].float().mean(0) >= 0.5
        baselines["mean training mask"] = seg_metrics(mean_mask.expand_as(gt), gt)
    tag = "oracle" if ec.oracle else "segmentation"
    save_outlines(x_test, pred, gt, ckpt_path.parent / f"{tag}.png")
    extras = ", random flips and quarter-turns" if ec.flip_rotate else ""
    extras += ", random shadows" if ec.shadows else ""
    preset = ilsgan.preset_name(ec, PRESETS)
    out = dict(protocol=("ORACLE: U-Net trained on real training masks, not on generated pairs; " if ec.oracle else "")
               + f"U-Net distillation ({preset} preset: {ec.n} pairs, width {ec.width}, {ec.iters} iters{extras}), "
                        f"segmented at {seg_res}px, scored at {cfg.resolution}px on the {dataset} test split; "
                        "iou/dice: per-image foreground, averaged over images (DRC)",
               checkpoint=str(ckpt_path), kimg=kimg, seg_res=seg_res, test=test, baselines=baselines, **gen_stats,
               n_test=len(gt), unet_val=history, seconds=time.time() - t0)
    ilsgan.write_results(ckpt_path.parent, tag, out)
    return out


def validate_sizes(ec, res, dev):
    """The U-Net (built on the meta device) with its gradients and Adam's moments, the pairs, and a
    lower bound of a batch's activations must fit in the device's memory."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(ec.width).parameters())
    ilsgan.require_memory({"the U-Net with its gradients and Adam's moments": 4 * 4 * n_params,
                           "the generated pairs": ec.n * 3 * res**2 * 5,
                           "one batch's activations": ec.batch * ec.width * res**2 * 4 * 8}, dev, "--n, --width, --batch")


def print_table(seg):
    """The segmentation table of one evaluation (a results.json 'segmentation' or 'oracle' section)."""
    print(f"\n{'on the ' + str(seg['n_test']) + ' test images':34s} {'IoU':>6s} {'DICE':>6s}")
    name = "ORACLE: U-Net on real masks" if seg["protocol"].startswith("ORACLE") else "ILSGAN -> U-Net (per image)"
    print(f"{name:34s} {seg['test']['iou']:6.3f} {seg['test']['dice']:6.3f}")
    for name, b in seg["baselines"].items():
        print(f"{'baseline: ' + name:34s} {b['iou']:6.3f} {b['dice']:6.3f}")
    gen = (f"generator masks: area {seg['gen_mask_area']:.3f}, binarisation loss {seg['gen_mask_binary']:.3f} | "
           if "gen_mask_area" in seg else "")
    print(f"{gen}dataset-level IoU {seg['test']['iou_dataset']:.3f}, mIoU {seg['test']['miou']:.3f}, "
          f"pixel acc {seg['test']['pacc']:.3f}")
    t = seg["test"]
    sizes = ", ".join(f"{k} {v:.3f}" for k, v in t["iou_by_size"].items())
    print(f"IoU lost to missed foreground {t['missed']:.3f}, to false foreground {t['extra']:.3f} | "
          f"IoU by true object area: {sizes}")


def print_closing_table(run_dir):
    """The main job's last words: the segmentation table, MINE's MI and the best FID, all read from
    the run folder (results.json, fid.jsonl), where the evaluations wrote them."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    print_table(results["segmentation"])
    if "mi" in results:
        n = results["mi"]["nats"]
        print(f"MI (MINE, nats): visible fg ; hidden bg {n['vis_fg;inv_bg']:.3f}, visible bg ; hidden fg "
              f"{n['vis_bg;inv_fg']:.3f}, sum {n['sum (Eq. 11)']:.3f}, whole layers {n['whole f;b']:.3f}")
    fids = ilsgan.read_fid_log(run_dir)
    best = min(fids, key=lambda r: r["fid"]) if fids else None
    print(f"FID: {best['fid']:.2f} at {best['kimg']:.0f} kimg ({best['n']} samples, the best snapshot)" if best else
          "FID: off for this run (--fid-n N at training time computes it at every snapshot)")
    print(f"results: {Path(run_dir) / 'results.json'}, picture: {Path(run_dir) / 'segmentation.png'}")


def main(argv=None):
    print_table(ilsgan.companion_main(EvalConfig, PRESETS, __doc__, argv, evaluate))


if __name__ == "__main__":
    main()
