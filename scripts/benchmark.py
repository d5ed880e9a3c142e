"""Training speed and memory of ilsgan.py's presets on this machine, and the check of a GPU.

    python scripts/benchmark.py                          # every preset, fp32 and bf16 side by side
    python scripts/benchmark.py cpu paper64 --amp off,bf16 --batch 8   # any ilsgan.py flag overrides the presets
    python scripts/benchmark.py --ops cpu paper64         # and the aten calls a training step makes
    python scripts/benchmark.py --gpu-check               # once per GPU: the paper's job, every part of it
    python scripts/benchmark.py --gpu-check --device cpu --preset tiny --kimg 0.2   # its CPU-sized variant

The benchmark trains each preset on random data (ADA p = 0.2, so the augmentation is timed too, and
one R1 step in 16) after three warm-up steps. The precisions of one preset take turns in short
rounds, so that a drifting machine slows them alike and their ratio holds. Peak memory is CUDA's
peak allocation on a GPU and the process's peak RSS on a CPU, both read over the warm-up (which
includes an R1 step). `data img/s` times the training loop's data path (indexing a decoded uint8
tensor), to show that data never limits training. `--ops` adds the aten calls per training step, as
torch.profiler records them (every aten op, nested ones included), from one step with R1 and one
without, weighted 1:15 as R1 runs every 16 steps: on a GPU each op costs a launch or a CPU-side
dispatch, so when the kernels are small the step is bound by their count.

The GPU check trains the preset for --kimg on 2,000 rendered images with everything on (ADA p driven
above 0, R1, FID on a few hundred samples, checkpoints), resumes it, distils a U-Net and runs MINE at
a tiny size, trains through a one-process torchrun, and on CUDA confirms that a training step never
waits for the GPU. It prints pass, FAIL or skipped (with the reason: FID without its optional
package, the host-sync check off a GPU) per part with its time, then sec/kimg, peak GPU memory and the
projected time for 8,000 kimg whatever failed; --json PATH keeps all of it.
"""
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def aten_calls_per_step(state, x, cfg):
    """aten ops per training step (torch.profiler, nested ones included), R1 weighted 1 in r1_interval."""
    from torch.profiler import profile

    def count(step):
        state.step = step
        with profile() as prof:
            ilsgan.train_step(state, x, cfg)
        return sum(e.name.startswith("aten::") for e in prof.events())
    with_r1, plain = count(0), count(1)
    return (with_r1 + (cfg.r1_interval - 1) * plain) / cfg.r1_interval


def benchmark(presets, amps, device="auto", seconds=10.0, rounds=4, ops=False, **overrides):
    """img/s, sec/kimg and peak memory per (preset, precision), printed as a table; returns the rows."""
    dev = ilsgan.setup_device(device, overrides.get("tf32", False))
    rows = []
    for name in presets:
        runs = []
        for amp in amps:
            cfg = ilsgan.make_config(name, **overrides, amp=amp)
            gc.collect()
            peak_memory_reset(dev)
            state = ilsgan.State(cfg, dev)
            state.ada_p = torch.tensor(0.2, device=dev)  # time the augmentation too
            x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
            for _ in range(3):  # warm-up, with one R1 step
                ilsgan.train_step(state, x, cfg)
            sync(dev)
            runs.append(dict(cfg=cfg, state=state, x=x, peak=peak_memory_mb(dev), time=0.0, images=0))
        for _ in range(rounds):  # the precisions take turns
            for run in runs:
                steps, t0 = 0, time.time()
                while time.time() - t0 < seconds / rounds or steps < 1:
                    ilsgan.train_step(run["state"], run["x"], run["cfg"])
                    steps += 1
                sync(dev)
                run["time"] += time.time() - t0
                run["images"] += steps * run["cfg"].batch
        cfg = runs[0]["cfg"]
        data = torch.randint(0, 256, (2048, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8, device=dev)
        fetched, t0 = 0, time.time()  # the training loop's data path: index the decoded uint8 tensor
        while time.time() - t0 < 0.5:
            ilsgan.to_float(data[torch.randint(len(data), (cfg.batch,), device=dev)]).sum().item()
            fetched += cfg.batch
        data_ips = fetched / (time.time() - t0)
        base = runs[0]["images"] / runs[0]["time"]
        for run in runs:
            ips = run["images"] / run["time"]
            rows.append(dict(preset=name, res=run["cfg"].resolution, batch=run["cfg"].batch, amp=run["cfg"].amp,
                             img_s=ips, sec_kimg=1000 / ips, peak_mb=run["peak"], ratio=ips / base,
                             data_img_s=data_ips,
                             ops=aten_calls_per_step(run["state"], run["x"], run["cfg"]) if ops else None))
        del runs
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    compiled = " (G compiled)" if overrides.get("compile") else ""
    print(f"device: {dev} ({where}), torch {torch.__version__}{compiled}")
    print(f"{'preset':10s} {'res':>4s} {'batch':>5s} {'amp':>5s} {'img/s':>9s} {'sec/kimg':>9s} {'peak MB':>8s} "
          f"{'vs ' + amps[0]:>8s} {'data img/s':>11s}" + (f" {'aten/step':>10s}" if ops else ""))
    for r in rows:
        print(f"{r['preset']:10s} {r['res']:4d} {r['batch']:5d} {r['amp']:>5s} {r['img_s']:9.2f} {r['sec_kimg']:9.2f} "
              f"{r['peak_mb']:8.0f} {r['ratio']:7.2f}x {r['data_img_s']:11.0f}" + (f" {r['ops']:10.0f}" if ops else ""))
    return rows


def gpu_check(device, preset, kimg, fid_n, json_path=None, **overrides):
    """Every part of the paper's job on this device, each reported as pass, FAIL or skipped (with the
    reason); the speed figures are printed whatever fails. -> True when no part failed."""
    import mine
    import unet_eval
    dev = ilsgan.setup_device(device)
    work = Path(tempfile.mkdtemp(prefix="ilsgan-gpu-check-"))
    run = work / "run"
    fid_net = ilsgan.inception_network("cpu") if fid_n else None  # only to see whether FID can run here
    cfg = ilsgan.make_config(preset, **{**dict(
        device=str(dev), out=str(run), kimg=kimg, log_kimg=kimg / 4, snap_kimg=kimg / 2,
        fid_n=fid_n if fid_net is not None else 0, evaluate=False, n_train=2000,  # 2 kimg need no 10,000 images
        ada_target=-1.0, ada_kimg=max(kimg / 4, 0.01)), **overrides})  # ADA: r_t > -1 always, so p climbs fast
    results, figures = [], {}

    def part(name, fn):
        t0 = time.time()
        try:
            verdict, detail = "pass", fn() or ""
        except Skipped as e:
            verdict, detail = "skipped", str(e)
        except Exception as e:  # a check reports every failure and goes on to the next part
            verdict, detail = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
        results.append(dict(part=name, status=verdict, detail=detail, seconds=round(time.time() - t0, 1)))
        print(f"{verdict:7s}  {name}: {detail} ({time.time() - t0:.0f} s)", flush=True)

    def no_waits():
        if dev.type != "cuda":
            raise Skipped("not a GPU (on a CPU, tests/test_fake_cuda.py checks the step for host traffic)")
        c = ilsgan.with_overrides(cfg, amp=ilsgan.resolve_amp(cfg.amp, dev))
        state = ilsgan.State(c, dev)
        state.ada_p = torch.tensor(0.3, device=dev)
        x = torch.rand(c.batch, 3, c.resolution, c.resolution, device=dev) * 2 - 1
        ilsgan.train_step(state, x, c)  # first step: cuDNN's autotuner and lazy initialisation may wait
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            state.step = 0  # the checked steps cover G, D, R1 and an ADA adjustment
            for _ in range(max(c.ada_interval, 2)):
                ilsgan.train_step(state, x, c)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return f"{max(c.ada_interval, 2)} steps ({c.amp}) with R1 and an ADA adjustment, without a host sync"

    def train():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            ilsgan.train(cfg)
        finally:  # the figures of whatever was trained, even if a check below fails
            stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()] \
                if (run / "stats.jsonl").is_file() else []
            if len(stats) >= 2:  # the first log interval holds the start-up; the second does not
                first, second = stats[0], stats[1]
                figures["sec_kimg"] = (second["sec"] - first["sec"]) / (second["kimg"] - first["kimg"])
            figures["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            if (run / "config.json").is_file():
                figures["amp"] = json.loads((run / "config.json").read_text())["amp"]
        assert stats and stats[-1]["ada_p"] > 0, "ADA p stayed at 0"
        assert any("r1" in s for s in stats), "no R1 step was logged"
        assert (run / "checkpoint.pt").is_file(), "no checkpoint.pt"
        return f"{stats[-1]['kimg']:.2f} kimg, amp {figures['amp']}, ADA p {stats[-1]['ada_p']:.3f}, " + (
            f"{figures['sec_kimg']:.1f} sec/kimg" if "sec_kimg" in figures else "too short for a speed figure")

    def fid():
        if fid_n == 0:
            raise Skipped("--fid-n 0")
        if fid_net is None:
            raise Skipped(ilsgan.FID_HINT.replace("FID skipped: its", "its"))
        fids = ilsgan.read_fid_log(run)
        assert fids and all(f["fid"] > 0 for f in fids), "no FID was computed at the snapshots"
        assert (run / "best.pt").is_file(), "no best.pt"
        return f"FID {fids[-1]['fid']:.1f} ({fid_n} samples) at each of {len(fids)} snapshots, best.pt kept"

    def resume():
        _, ckpt = ilsgan.load_checkpoint(run)
        ilsgan.train(ilsgan.with_overrides(cfg, kimg=kimg * 1.5), ckpt=ckpt)
        _, after = ilsgan.load_checkpoint(run)
        assert after["state"]["nimg"] > ckpt["state"]["nimg"]
        return f"{ckpt['state']['nimg'] / 1000:.2f} -> {after['state']['nimg'] / 1000:.2f} kimg"

    def unet():
        seg = unet_eval.evaluate(unet_eval.make_config("cpu", ckpt=str(run), device=str(dev), n=256, width=8,
                                                       iters=20, val_every=10, batch=32))
        return f"test IoU {seg['test']['iou']:.3f} on {seg['n_test']} images (a tiny U-Net: a smoke test)"

    def mi():
        section = mine.evaluate(mine.make_config("cpu", ckpt=str(run), device=str(dev), n=256, iters=50,
                                                 eval_every=25, hidden=64))
        return f"MI sum {section['nats']['sum (Eq. 11)']:.3f} nats (a tiny MINE: a smoke test)"

    def torchrun():
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items() if not isinstance(v, bool)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(ROOT / "ilsgan.py"), "--preset", preset, "--device", str(dev), "--out", str(work / "ddp"),
               "--kimg", str(kimg / 4), "--n-train", str(cfg.n_train), "--no-evaluate", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stderr[-1000:]
        return "one process under torchrun trained and wrote its run folder"

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"GPU check of the {preset} preset on {dev} ({name}), torch {torch.__version__}")
    for title, fn in [("training step without host syncs", no_waits), ("train: ADA p > 0, R1, checkpoints", train),
                      ("FID at every snapshot, best.pt", fid), ("resume", resume), ("U-Net distillation", unet),
                      ("MINE", mi), ("torchrun, one process", torchrun)]:
        part(title, fn)
    print(f"\n{'part':40s} result")
    for r in results:
        print(f"{r['part']:40s} {r['status']}")
    if "sec_kimg" in figures:
        figures["days_8000_kimg"] = figures["sec_kimg"] * 8000 / 86400
        peak = f"{figures['peak_mb']:.0f} MB" if figures["peak_mb"] is not None else "n/a (CPU)"
        print(f"{preset} ({figures.get('amp', '?')}): {figures['sec_kimg']:.1f} sec/kimg, peak GPU memory {peak}; "
              f"8,000 kimg would take {figures['days_8000_kimg']:.1f} days (training alone, FID snapshots not counted)")
    else:
        print(f"{preset}: no speed figure (training did not log twice)")
    slowest = max(results, key=lambda r: r["seconds"])
    print(f"took {sum(r['seconds'] for r in results):.0f} s, most of it in '{slowest['part']}' ({slowest['seconds']:.0f} s); "
          f"run folders: {work}")
    if json_path:
        Path(json_path).write_text(json.dumps(dict(
            device=str(dev), name=name, torch=torch.__version__, preset=preset, kimg=kimg, parts=results,
            figures=figures), indent=2))
        print(f"wrote {json_path}")
    return all(r["status"] != "FAIL" for r in results)


class Skipped(Exception):
    """A part of the GPU check that cannot run here, and why."""


def main():
    ap = ilsgan.config_parser(ilsgan.Config, ilsgan.PRESETS, __doc__.split("\n")[0])  # every ilsgan.py flag
    ap.add_argument("presets", nargs="*", help=f"presets to time, any of {list(ilsgan.PRESETS)} (default: all)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed training per preset and precision")
    ap.add_argument("--ops", action="store_true", help="also count the aten calls per training step (torch.profiler)")
    ap.add_argument("--gpu-check", action="store_true", help="check the whole job on this device instead "
                    "(--preset, default paper64 on a GPU; --kimg, default 2; --fid-n, default 500)")
    ap.add_argument("--json", metavar="PATH", help="--gpu-check: write every part's status and figure to PATH")
    args = ap.parse_args()
    overrides = ilsgan.given(args, ilsgan.Config)
    device, amp = overrides.pop("device", "auto"), overrides.pop("amp", None)
    def body():
        if args.gpu_check:
            preset = args.preset or ("paper64" if ilsgan.pick_device(device).type == "cuda" else "tiny")
            kimg, fid_n = overrides.pop("kimg", 2.0), overrides.pop("fid_n", 500)
            sys.exit(0 if gpu_check(device, preset, kimg, fid_n, args.json, amp=amp or "auto", **overrides) else 1)
        benchmark(args.presets or list(ilsgan.PRESETS), (amp or "off,bf16").split(","), device, args.seconds, ops=args.ops,
                  **overrides)
    ilsgan.error_boundary(body, lambda: f"python scripts/benchmark.py {' '.join(sys.argv[1:])} (it starts over)")


if __name__ == "__main__":
    main()
