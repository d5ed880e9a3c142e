"""Mutual information between the layers of an ILSGAN run, by MINE (Belghazi et al., ICML 2018).

The paper reports "MI" (Tables 2-3) as a MINE estimate: a statistics network T(x, y) trained to
maximise the Donsker-Varadhan lower bound

    I(X; Y) >= E_joint[T(x, y)] - log E_marginal[exp T(x, y')],     y' = y of a shuffled pair

on generated layers, for the two region pairs of Eq. (11), summed, and for the whole layers:

    I(b_inv; f_vis):  x = f*m (the visible foreground), y = b*m (the background hidden under it)
    I(b_vis; f_inv):  x = b*(1-m) (the visible background), y = f*(1-m) (the foreground hidden under it)
    I(b; f):          x = f, y = b (the whole layers; Table 3 row E's quantity)

Official protocol (qrzou/ILSGAN eval_MI_MINE.py): 10k samples, everything resized to 64x64, soft
mask, T = an MLP on the flattened pair (24576 -> 3000 -> 1); the two region networks trained
jointly (one Adam at 2e-4 over both, their losses summed on the same batch of 64, one
ReduceLROnPlateau stepped with the sum of their estimates, a non-finite batch skipped and not
counted), 100k iterations, the marginal drawn with replacement; the bound evaluated on all samples in
order every 400 iterations, and the mean of the last 20 evaluations reported for each pair. The
whole layers are a run of their own. No moving-average gradient correction (the MINE paper's
`--ma-rate 0.01` turns it on, but the paper's figures did not use it). The `cpu` preset (16x16,
2,000 samples, a narrower MLP, fewer iterations; the default on a CPU) runs in seconds; its numbers
compare only with each other.

    python mine.py --ckpt RUN_DIR_OR_CKPT [--preset official]

Results are merged into the run's results.json under "mi" (nats).
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import data
import ilsgan
import runs
from runs import InputError


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
    ma_rate: float = 0.0  # MINE bias-corrected gradient with this moving-average rate, in [0, 1]; 0 = off (official)
    seed: int = 0  # generated samples and T
    device: str = "auto"  # auto | cpu | cuda | cuda:N


PRESETS = {
    "official": dict(n=10000, res=64, hidden=3000, iters=100000, eval_every=400),
    "cpu": dict(n=2000, res=16, hidden=512, iters=1000, eval_every=50, last=10),
    "tiny": dict(n=64, res=8, hidden=16, iters=20, eval_every=10, batch=16),  # seconds; for tests
}


def make_config(preset="auto", **overrides):
    """MineConfig from a preset ('auto': cpu on a CPU, official on a GPU) and overrides."""
    if preset == "auto":
        preset = "cpu" if ilsgan.parse_device(overrides.get("device") or "auto").type == "cpu" else "official"
    return runs.with_overrides(MineConfig(**PRESETS[preset]), **overrides)


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
    """The DV bound over all samples in batches, in order (official), averaged over batches."""
    bounds = [dv_bound(T(x[i:i + batch], y[i:i + batch]), T(x[i:i + batch], shuffled(y[i:i + batch]))).item()
              for i in range(0, len(x), batch)]
    return sum(bounds) / len(bounds)


def estimate_mi(pairs, mc, desc="MINE"):
    """Train one statistics network per (x, y) pair [N,...] jointly (one Adam over all of them, their
    losses summed on the same batch, one plateau scheduler on the sum of their estimates) ->
    ([mean of the last `mc.last` evaluations, per pair], history of the evaluations)."""
    from tqdm import tqdm
    torch.manual_seed(mc.seed)
    dev = pairs[0][0].device
    Ts = [StatisticsNetwork(x[0].numel(), y[0].numel(), mc.hidden).to(dev) for x, y in pairs]
    opt = torch.optim.Adam([p for T in Ts for p in T.parameters()], lr=mc.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=10, threshold=1e-4)
    ma, history, it, lost = [None] * len(Ts), [], 0, 0
    bar = tqdm(total=mc.iters, desc=desc, leave=False)
    while it < mc.iters:
        idx = torch.randint(len(pairs[0][0]), (mc.batch,), device=dev)
        steps = [mine_step(T, x[idx], y[idx], a, mc.ma_rate) for T, (x, y), a in zip(Ts, pairs, ma)]
        loss = sum(s[0] for s in steps)
        if not torch.isfinite(loss):  # official: the batch is skipped and not counted
            lost += 1
            if lost > 100:
                raise InputError("MINE's bound was non-finite on 100 batches in a row: lower --lr")
            continue
        lost, ma = 0, [s[2] for s in steps]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        bar.update()
        if it % mc.eval_every == 0:
            history.append([evaluate_bound(T, x, y) for T, (x, y) in zip(Ts, pairs)])
            sched.step(sum(history[-1]))
            bar.set_postfix_str("MI " + " + ".join(f"{v:.3f}" for v in history[-1]))
    bar.close()
    tail = history[-mc.last:]
    estimates = [sum(h[j] for h in tail) / len(tail) for j in range(len(pairs))]
    if not all(map(math.isfinite, estimates)):
        raise InputError(f"MINE's estimates are not finite ({estimates}): lower --lr")
    return estimates, history


@torch.no_grad()
def generated_layers(G, n, res, seed=0):
    """n generated layers f, b, m (each layer's fixed noise, official) resized to res, f and b clamped
    to the image range [-1, 1] (the official estimator reads them back from PNGs)."""
    s = [{k: data.resize_images(v, res) for k, v in s.items()} for s in ilsgan.sample(G, n, 256, seed, noise="const")]
    return torch.cat([x["f"] for x in s]).clamp(-1, 1), torch.cat([x["b"] for x in s]).clamp(-1, 1), torch.cat([x["m"] for x in s])


def layer_pairs(f, b, m):
    """The Eq. (11) region pairs, each (x, y) = (a visible region, the hidden region under or over it)."""
    return {"b_inv;f_vis": (f * m, b * m), "b_vis;f_inv": (b * (1 - m), f * (1 - m))}


def evaluate(mc):
    """Estimate the region MIs and the whole layers' for one checkpoint (its run's best.pt if FID kept
    one, official) -> the 'mi' section, written into the run's results.json."""
    runs.validate_fields(mc, positive=("res", "hidden", "lr", "eval_every", "last"), nonneg=("ma_rate", "seed"),
                         rules=[("n", mc.n >= 2, "2 or more"), ("batch", mc.batch >= 2, "2 or more (pairs are shuffled within it)"),
                                ("iters", mc.iters >= mc.eval_every, f"at least --eval-every ({mc.eval_every}), or nothing is measured"),
                                ("ma_rate", mc.ma_rate <= 1, "at most 1 (a moving average's rate)"),
                                ("lr", mc.lr <= 1, "at most 1"), ("seed", mc.seed < 2**63, "below 2^63")])
    dev = ilsgan.setup_device(ilsgan.parse_device(mc.device))
    _, G, kimg = ilsgan.load_generator(mc.ckpt, dev, best=True)
    folder = Path(mc.ckpt) if Path(mc.ckpt).is_dir() else Path(mc.ckpt).parent
    with runs.scoring(folder, "mi", "MINE"):
        t0, (f, b, m) = time.time(), generated_layers(G, mc.n, mc.res, mc.seed)
        (e1, e2), _ = estimate_mi(list(layer_pairs(f, b, m).values()), mc, desc="MINE, Eq. (11) pairs")
        (whole,), _ = estimate_mi([(f, b)], mc, desc="MINE, whole layers")
        section = dict(protocol=f"MINE ({runs.preset_name(mc, PRESETS)} preset: {mc.n} samples at {mc.res}px, MLP "
                                f"{mc.hidden}, {mc.iters} iters, the two region pairs trained jointly, mean of the last "
                                f"{mc.last} evaluations, ma_rate {mc.ma_rate})", kimg=kimg,
                       nats={"b_inv;f_vis": e1, "b_vis;f_inv": e2, "sum (Eq. 11)": e1 + e2, "b;f": whole},
                       seconds=time.time() - t0)
        runs.write_results(folder, "mi", section)
    return section


def main(argv=None):
    args = runs.config_parser(MineConfig, PRESETS, __doc__.split("\n")[0]).parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(map(str, argv))

    def body():
        mc = make_config(args.preset or "auto", **runs.given(args, MineConfig))
        if not mc.ckpt:
            raise InputError("--ckpt RUN_DIR_OR_CKPT is required")
        for k, v in evaluate(mc)["nats"].items():
            print(f"MI {k:14s} {v:7.3f} nats")
    runs.error_boundary(body, lambda: f"python mine.py {' '.join(argv)} (it starts over)")


if __name__ == "__main__":
    main()
