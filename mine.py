"""Mutual information between the layers of an ILSGAN run, by MINE (Belghazi et al., ICML 2018).

The paper reports "MI" (Tables 2-3) as a MINE estimate: a statistics network T(x, y) trained to
maximise the Donsker-Varadhan lower bound

    I(X; Y) >= E_joint[T(x, y)] - log E_marginal[exp T(x, y')],     y' = y of a shuffled pair

on generated layers, separately for the two region pairs of Eq. (11) and summed:

    pair 1: x = f*m (visible foreground),   y = b*m (the background hidden under it)
    pair 2: x = b*(1-m) (visible background), y = f*(1-m) (the foreground hidden under it)
    whole:  x = f, y = b (the whole layers; Table 3 row E's quantity)

Official protocol (qrzou/ILSGAN eval_MI_MINE.py): 10k samples, everything resized to 64x64, soft
mask, T = an MLP on the flattened pair (24576 -> 3000 -> 1), Adam 2e-4, batch 64, 100k iterations,
shuffling with replacement, ReduceLROnPlateau on the estimate, the DV bound evaluated on the whole
training set every 400 iterations, and the mean of the last 20 evaluations reported. No moving-
average gradient correction: that is the default here too, so that numbers compare with the paper;
`--ma-rate 0.01` turns on the MINE paper's bias-corrected gradient, which is less biased for small
batches but is not what the paper's figures used. The `cpu` preset (16x16, 2,000 samples, a
narrower MLP, 3,000 iterations; the default on a CPU) runs in a few minutes on a 2-core CPU; its
numbers are not comparable with the paper's, only with each other.

    python mine.py --ckpt RUN_DIR_OR_CKPT [--preset official]

Results are merged into the run's results.json under "mi" (nats).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import ilsgan


@dataclass
class MineConfig:
    ckpt: str = ""  # run folder or checkpoint file
    n: int = 10000  # generated samples
    res: int = 64  # layers are resized to res x res (official 64)
    hidden: int = 3000  # hidden units of the statistics MLP
    lr: float = 2e-4  # Adam learning rate
    batch: int = 64  # pairs per step
    iters: int = 100000  # training iterations of T
    eval_every: int = 400  # evaluate the DV bound on all samples every this many iterations
    last: int = 20  # report the mean of the last this many evaluations
    ma_rate: float = 0.0  # MINE bias-corrected gradient with this moving-average rate; 0 = off (official)
    seed: int = 0  # generated samples and T
    device: str = "auto"  # auto | cpu | cuda | cuda:N


PRESETS = {
    "official": dict(n=10000, res=64, hidden=3000, iters=100000, eval_every=400),
    "cpu": dict(n=2000, res=16, hidden=512, iters=3000, eval_every=100),
    "tiny": dict(n=64, res=8, hidden=16, iters=20, eval_every=10, batch=16),  # seconds; for tests
}


def make_config(preset="auto", **overrides):
    """MineConfig from a preset ('auto': cpu on a CPU, official on a GPU) and overrides."""
    return ilsgan.companion_config(MineConfig, PRESETS, preset, **overrides)


class StatisticsNetwork(nn.Module):
    """T(x, y): an MLP on the concatenated, flattened pair (official: one hidden layer)."""

    def __init__(self, dim_x, dim_y, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_x + dim_y, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x, y):  # [B,...], [B,...] -> [B]
        return self.net(torch.cat([x.flatten(1), y.flatten(1)], dim=1)).squeeze(1)


def dv_bound(t_joint, t_marginal):
    """Donsker-Varadhan: mean T(joint) - log mean exp T(marginal). [B],[B] -> []."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, 0) - math.log(t_marginal.numel()))


def shuffled(y):
    """Samples of the marginal: y re-drawn from the batch with replacement (official torch.randint)."""
    return y[torch.randint(len(y), (len(y),), device=y.device)]


def mine_step(T, x, y, ma, ma_rate):
    """One loss for T on a batch; returns (loss to minimise, DV bound, new moving average)."""
    t_joint, t_marg = T(x, y), T(x, shuffled(y))
    bound = dv_bound(t_joint, t_marg)
    if ma_rate <= 0:
        return -bound, bound, ma
    # MINE's bias correction: the gradient of log E[e^T] uses a moving average in the denominator
    et = t_marg.exp().mean()
    ma = et.detach() if ma is None else (1 - ma_rate) * ma + ma_rate * et.detach()
    return -(t_joint.mean() - et / ma), bound, ma


@torch.no_grad()
def evaluate_bound(T, x, y, batch=128):
    """DV bound over all samples in batches, fresh shuffle, averaged over batches (official)."""
    T.eval()
    perm, bounds = torch.randperm(len(x), device=x.device), []
    for i in range(0, len(x), batch):
        xb, yb = x[perm[i:i + batch]], y[perm[i:i + batch]]
        bounds.append(dv_bound(T(xb, yb), T(xb, shuffled(yb))).item())
    T.train()
    return sum(bounds) / len(bounds)


def estimate_mi(x, y, mc, desc="MINE"):
    """Train T on (x, y) pairs [N,...] and return (mean of the last `mc.last` evaluations, history)."""
    from tqdm import tqdm
    torch.manual_seed(mc.seed)
    T = StatisticsNetwork(x[0].numel(), y[0].numel(), mc.hidden).to(x.device)
    opt = torch.optim.Adam(T.parameters(), lr=mc.lr, fused=True, foreach=None)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=10, threshold=1e-4)
    ma, history, skipped = None, [], torch.zeros([], dtype=torch.long, device=x.device)
    bar = tqdm(range(1, mc.iters + 1), desc=desc, leave=False)
    for it in bar:
        idx = torch.randint(len(x), (mc.batch,), device=x.device)
        loss, bound, ma = mine_step(T, x[idx], y[idx], ma, mc.ma_rate)
        # official: a non-finite batch is skipped. Decided on the device, so no step waits to read the
        # loss: fused Adam takes the flag as GradScaler hands it over (found_inf) and then changes
        # nothing, neither the weights nor its moments nor its step count
        bad = ~torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.found_inf, skipped = bad.float(), skipped + bad
        opt.step()
        if it % mc.eval_every == 0:
            history.append(evaluate_bound(T, x, y))
            sched.step(history[-1])
            bar.set_postfix_str(f"MI {history[-1]:.3f}" + (f", {skipped.item()} non-finite batches skipped" if skipped else ""))
    tail = history[-mc.last:] or [float("nan")]
    return sum(tail) / len(tail), history


@torch.no_grad()
def generated_layers(G, n, res, seed=0):
    """n generated layers f, b, m resized to res, f and b clamped to the image range [-1, 1] (the
    official estimator reads them back from PNGs)."""
    f, b, m = [], [], []
    for batch in ilsgan.sample(G, n, 256, seed):
        for lst, v in ((f, batch["f"]), (b, batch["b"]), (m, batch["m"])):
            lst.append(ilsgan.resize_images(v, res))
    return torch.cat(f).clamp(-1, 1), torch.cat(b).clamp(-1, 1), torch.cat(m)


def layer_pairs(f, b, m):
    """The Eq. (11) region pairs and the whole layers of generated layers f, b, m."""
    return {"vis_fg;inv_bg": (f * m, b * m), "vis_bg;inv_fg": (b * (1 - m), f * (1 - m)), "whole f;b": (f, b)}


def evaluate(mc):
    """Estimate all three MIs for one checkpoint; merge them into results.json; return the section."""
    ilsgan.validate_fields(mc, positive=("res", "hidden", "lr", "eval_every", "last"), nonneg=("ma_rate",),
                 rules=[("n", mc.n >= 2, "2 or more"), ("batch", mc.batch >= 2, "2 or more (pairs are shuffled within it)"),
                        ("iters", mc.iters >= mc.eval_every, f"at least --eval-every ({mc.eval_every}), or nothing is measured")])
    dev = ilsgan.setup_device(ilsgan.parse_device(mc.device))
    ckpt_path = ilsgan.find_checkpoint(mc.ckpt, best=True)  # official: the lowest-FID snapshot if any
    dim = 3 * mc.res**2
    ilsgan.require_memory({"the statistics network with its gradients and Adam's moments": 4 * 4 * (2 * dim + 2) * mc.hidden,
                           "the layers and their pairs": mc.n * dim * 4 * 9}, dev, "--n, --res, --hidden")
    with ilsgan.scoring(ckpt_path.parent, "mi", "MINE"):
        return measure(mc, ckpt_path, dev)


def measure(mc, ckpt_path, dev):
    """evaluate()'s work, in the run folder it holds."""
    _, G, _ = ilsgan.load_generator(ckpt_path, dev)
    t0, out = time.time(), {}
    for name, (x, y) in layer_pairs(*generated_layers(G, mc.n, mc.res, mc.seed)).items():
        out[name], _ = estimate_mi(x, y, mc, desc=f"MINE {name}")
    out["sum (Eq. 11)"] = out["vis_fg;inv_bg"] + out["vis_bg;inv_fg"]
    section = dict(protocol=f"MINE ({ilsgan.preset_name(mc, PRESETS)} preset: {mc.n} samples at {mc.res}px, MLP {mc.hidden}, "
                            f"{mc.iters} iters, mean of the last {mc.last} evaluations, ma_rate {mc.ma_rate})",
                   nats=out, seconds=time.time() - t0)
    ilsgan.write_results(ckpt_path.parent, "mi", section)
    return section


def main(argv=None):
    section = ilsgan.companion_main(MineConfig, PRESETS, __doc__, argv, evaluate)
    for k, v in section["nats"].items():
        print(f"MI {k:16s} {v:7.3f} nats")


if __name__ == "__main__":
    main()
