"""Training throughput (img/s) and peak memory of ilsgan.py's presets on this machine.

    python scripts/benchmark.py                         # every preset
    python scripts/benchmark.py tiny cpu                # some of them
    python scripts/benchmark.py cpu --device cuda --batch 64   # any ilsgan.py flag overrides the presets

Each preset trains on random data for --seconds (ADA p = 0.2, so the augmentation is timed too, and
one R1 step in 16) after three warm-up steps. Peak memory is CUDA's peak allocation on a GPU and the
process's peak RSS on a CPU. `data img/s` times the training loop's data path (indexing a decoded
uint8 tensor), to show that data never limits training.
"""
import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ilsgan  # noqa: E402


def peak_memory_reset(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset the peak RSS (VmHWM)
            fh.write("5")


def peak_memory_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource  # Linux reports ru_maxrss in KiB; VmHWM honours the reset above
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(presets, device="auto", seconds=10.0, **overrides):
    """Training throughput (img/s) and peak memory per preset, on random data, printed as a table."""
    dev = ilsgan.setup_device(device)
    rows = []
    for name in presets:
        cfg = ilsgan.make_config(name, **overrides)
        gc.collect()
        peak_memory_reset(dev)
        state = ilsgan.State(cfg, dev)
        state.ada_p = 0.2  # time the augmentation too
        x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
        for _ in range(3):  # warm-up (includes one R1 step)
            ilsgan.train_step(state, x, cfg)
        steps, t0 = 0, time.time()
        while time.time() - t0 < seconds or steps < 2:
            ilsgan.train_step(state, x, cfg)
            steps += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        peak = peak_memory_mb(dev)
        data = torch.randint(0, 256, (2048, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8, device=dev)
        fetched, t0 = 0, time.time()  # the training loop's data path: index the decoded uint8 tensor
        while time.time() - t0 < 0.5:
            ilsgan.to_float(data[torch.randint(len(data), (cfg.batch,), device=dev)]).sum().item()
            fetched += cfg.batch
        rows.append((name, cfg.resolution, cfg.batch, steps * cfg.batch / dt, peak, fetched / (time.time() - t0)))
        del state
    print(f"device: {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"{'preset':10s} {'res':>4s} {'batch':>5s} {'train img/s':>11s} {'peak MB':>9s} {'data img/s':>11s}")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:4d} {r[2]:5d} {r[3]:11.1f} {r[4]:9.0f} {r[5]:11.0f}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="*", help=f"any of {list(ilsgan.PRESETS)} (default: all)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed training per preset")
    args, rest = ap.parse_known_args()
    flags = ilsgan.config_parser(ilsgan.Config, ilsgan.PRESETS, "").parse_args(rest)
    overrides = ilsgan.given(flags, ilsgan.Config)
    device = overrides.pop("device", "auto")
    benchmark(args.presets or list(ilsgan.PRESETS), device, args.seconds, **overrides)


if __name__ == "__main__":
    main()
