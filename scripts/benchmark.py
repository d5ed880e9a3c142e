"""Training speed and memory of ilsgan.py's presets on this machine.

    python scripts/benchmark.py                          # every preset, fp32 and bf16 side by side
    python scripts/benchmark.py cpu paper64 --amp off,bf16 --batch 8   # any ilsgan.py flag overrides the presets

The benchmark trains each preset on random images (ADA p = 0.2, so the augmentation is timed too,
and one R1 step in 16) after three warm-up steps. The precisions of a preset take turns in short
rounds, so that a drifting machine slows them alike and their ratio holds. Peak memory is CUDA's
peak allocation on a GPU and the process's peak resident memory on a CPU.

On a GPU, docs/gpu.md gives the two commands that check the whole job (train, FID, resume, scores,
torchrun) at a small size.
"""
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ilsgan  # noqa: E402
import runs  # noqa: E402


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident memory (VmHWM) starts again


def peak_mb(dev):
    """CUDA's peak allocation on a GPU; on a CPU the peak resident memory since reset_peak (Linux)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    status = Path("/proc/self/status")
    hwm = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM")] if status.exists() else []
    return int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(presets, amps, dev, seconds, overrides, rounds=4):
    """img/s, sec/kimg and peak memory per (preset, precision), printed as a table; returns the rows."""
    rows = []
    for name in presets:
        runs_ = []
        for amp in amps:
            cfg = ilsgan.make_config(name, **overrides, device=str(dev), amp=amp)
            ilsgan.validate_config(cfg)
            cfg = runs.with_overrides(cfg, amp=ilsgan.resolve_amp(amp, dev))
            reset_peak(dev)
            state = ilsgan.State(cfg, dev)
            state.ada_p = torch.tensor(0.2, device=dev)  # time the augmentation too
            x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
            for _ in range(3):  # warm-up, with one R1 step
                ilsgan.train_step(state, x, cfg)
            runs_.append(dict(cfg=cfg, state=state, x=x, peak=peak_mb(dev), time=0.0, images=0))
        for _ in range(rounds):  # the precisions take turns
            for r in runs_:
                steps, t0 = 0, time.time()
                while time.time() - t0 < seconds / rounds or steps < 1:
                    ilsgan.train_step(r["state"], r["x"], r["cfg"])
                    steps += 1
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                r["time"], r["images"] = r["time"] + time.time() - t0, r["images"] + steps * r["cfg"].batch
        for r in runs_:
            ips = r["images"] / r["time"]
            rows.append(dict(preset=name, res=r["cfg"].resolution, batch=r["cfg"].batch, amp=r["cfg"].amp, img_s=ips,
                             sec_kimg=1000 / ips, peak_mb=r["peak"], ratio=ips / (runs_[0]["images"] / runs_[0]["time"])))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {dev} ({where}), torch {torch.__version__}{' (G compiled)' if overrides.get('compile') else ''}")
    print(f"{'preset':10s} {'res':>4s} {'batch':>5s} {'amp':>5s} {'img/s':>9s} {'sec/kimg':>9s} {'peak MB':>8s} "
          f"{'vs ' + amps[0]:>8s}")
    for r in rows:
        print(f"{r['preset']:10s} {r['res']:4d} {r['batch']:5d} {r['amp']:>5s} {r['img_s']:9.2f} {r['sec_kimg']:9.2f} "
              f"{r['peak_mb']:8.0f} {r['ratio']:7.2f}x")
    return rows


def main(argv=None):
    ap = runs.config_parser(ilsgan.Config, ilsgan.PRESETS, __doc__.split("\n")[0])  # every ilsgan.py flag
    ap.add_argument("presets", nargs="*", help=f"presets to time, any of {list(ilsgan.PRESETS)} (default: all)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed training per preset and precision")
    args = ap.parse_args(argv)
    overrides = runs.given(args, ilsgan.Config)

    def body():
        dev = ilsgan.setup_device(ilsgan.parse_device(overrides.pop("device", "auto")))
        amps = overrides.pop("amp", "off,bf16").split(",")
        bad = [p for p in args.presets if p not in ilsgan.PRESETS] + [a for a in amps if a not in ("auto", "off", "bf16", "fp16")]
        if bad or not (math.isfinite(args.seconds) and 0 < args.seconds <= 3600):
            raise runs.InputError(f"{' '.join(bad) or '--seconds ' + str(args.seconds)}: presets are "
                                  f"{' | '.join(ilsgan.PRESETS)}, --amp a list of auto | off | bf16 | fp16, --seconds in (0, 3600]")
        benchmark(args.presets or list(ilsgan.PRESETS), amps, dev, args.seconds, overrides)
    runs.error_boundary(body, lambda: f"python scripts/benchmark.py {' '.join(sys.argv[1:])} (it starts over)")


if __name__ == "__main__":
    main()
