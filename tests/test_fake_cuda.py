"""The GPU path without a GPU: paper64's networks and every forward pass of a training step on FAKE
CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices, no data, no GPU needed). A dispatch
mode records every op that copies a CPU tensor to the device (on a GPU, a blocking copy that makes the
step wait) and every read of a device value on the host; a CPU tensor meeting a CUDA one raises, as on
a GPU. Backward passes need a GPU runtime and are checked by ../shared/tools/fakecuda/run.sh instead."""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ilsgan
import mine
import unet_eval

COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default,
          torch.ops.aten.copy.default, torch.ops.aten._copy_from_and_resize.default}
PROJECT = {str(Path(m.__file__).resolve()) for m in (ilsgan, mine, unet_eval)}


class HostTraffic(TorchDispatchMode):
    """Counts CPU -> CUDA copies and host reads of CUDA values, each by the project line that made it."""

    def __init__(self):
        super().__init__()
        self.events = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devs = [t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and devs[0] == "cuda":
            self.events["host read " + self.where()] += 1
        elif func in COPIES:
            dst = kwargs.get("device")
            dst = torch.device(dst).type if dst is not None else (devs[0] if func is not torch.ops.aten._to_copy.default else None)
            src = devs[1] if func is torch.ops.aten.copy_.default and len(devs) > 1 else devs[0]
            if src == "cpu" and dst == "cuda":
                self.events["copy cpu->cuda " + self.where()] += 1
        return func(*args, **kwargs)

    @staticmethod
    def where():
        frame = sys._getframe(2)
        while frame is not None and str(Path(frame.f_code.co_filename).resolve()) not in PROJECT:
            frame = frame.f_back
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}" if frame else "(outside)"


def on_fake_cuda(module, mode):
    """module (built on the CPU, as State builds it) with every parameter and buffer a fake CUDA
    tensor, as .to('cuda') leaves them on a GPU."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(mode.from_tensor(p.detach()).to("cuda"), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = mode.from_tensor(b).to("cuda")
    return module


def fake_cuda_needs_a_driver():
    """Older PyTorch (2.4 among them) initialises CUDA for a fake CUDA tensor; 2.14 does not."""
    try:
        with FakeTensorMode() as mode:
            mode.from_tensor(torch.zeros(1)).to("cuda")
    except (RuntimeError, AssertionError):
        return True
    return False


@pytest.mark.skipif(fake_cuda_needs_a_driver(), reason="this PyTorch initialises CUDA for fake CUDA tensors")
def test_forward_passes_of_a_training_step_stay_on_the_device():
    cfg = ilsgan.make_config("paper64", mask_max=0.6, mask_spread=0.2, mask_spread_max=0.5, lambda_border=2.0)
    nets = ilsgan.Generator(cfg), ilsgan.Discriminator(cfg), unet_eval.UNet(64), mine.StatisticsNetwork(3 * 64 * 64, 3 * 64 * 64, 3000)
    mode, dev, B, res = FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"), cfg.batch, cfg.resolution
    spy = HostTraffic()
    with mode, torch.device("cuda"):
        G, D, unet, T = (on_fake_cuda(net, mode) for net in nets)
        p = torch.zeros([]) + 0.3  # ADA's p, on the device
    with mode, torch.device("cuda"), spy:
        f, b, m = G(torch.randn(B, cfg.z_dim))  # train mode: the shared-weight path
        x_fake, f_s, m_s = ilsgan.perturbed_composite(f, b, m, *ilsgan.random_shifts(B, res, cfg.shift, dev))
        x_real = ilsgan.to_float(torch.randint(0, 256, (B, 3, res, res), dtype=torch.uint8))
        d_fake, d_real = D(ilsgan.augment(x_fake, p)), D(ilsgan.augment(x_real, p))
        losses = [ilsgan.g_adversarial_loss(d_fake), ilsgan.d_adversarial_loss(d_real, d_fake),
                  ilsgan.mask_area_loss(m_s, cfg.eta), ilsgan.binarization_loss(m_s), ilsgan.ils_mi_loss(f, b, m),
                  ilsgan.ils_mi_loss(f, b, m, separate=False, q="gaussian"), ilsgan.ils_l1_loss(f, b, m),
                  ilsgan.guard_loss(m, m_s, cfg), *ilsgan.watch_stats(m, x_fake, x_real).values()]
        p = ilsgan.ada_adjust(p, d_real.sign().mean(), cfg.ada_target, B, cfg.ada_interval, cfg.ada_kimg)
        G.eval()  # G_ema's path (sample(), whose RNG fork needs a real GPU, calls it): one grouped conv a layer
        f, b, m = G(torch.randn(8, cfg.z_dim))
        s = dict(x=ilsgan.composite(f, b, m), f=f, b=b, m=m)
        logits = unet(ilsgan.augment(unet_eval.random_shadows(s["x"]), 0.5, geometric=False))
        bound = mine.dv_bound(T(s["f"] * s["m"], s["b"] * s["m"]), T(s["f"] * s["m"], mine.shuffled(s["b"] * s["m"])))
    outputs = [*losses, p, logits, bound]
    assert all(t.device.type == "cuda" for t in outputs)
    assert not spy.events, dict(spy.events)
