"""Run `python ilsgan.py` over several seeds (and variants) in parallel, then tabulate the results.

    python scripts/sweep.py --seeds 0 1 2 3 4 --jobs 5 --out runs/sweep
    python scripts/sweep.py --variant default= --variant no-ils="--ils none" --seeds 0 1 2

Each run is the full main job (train + U-Net evaluation) in its own folder <out>/<variant>-seed<N>;
a run counts as a success when its per-image test IoU reaches --success (default 0.85). The table
reads each run's results.json and the last line of its stats.jsonl (collapse flags).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=ARGS",
                    help='named extra arguments for ilsgan.py, e.g. no-ils="--ils none" (default: default=)')
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time; each gets cores / jobs threads (OMP_NUM_THREADS), which on 2 cores "
                         "gives more img/s in total than one run on both")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--success", type=float, default=0.85, help="per-image test IoU that counts as success")
    ap.add_argument("--table-only", action="store_true", help="only tabulate existing runs")
    args, common = ap.parse_known_args()
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    runs = [(name, seed, Path(args.out) / f"{name}-seed{seed}", shlex.split(extra) + common)
            for name, extra in variants for seed in args.seeds]
    if not args.table_only:
        pending, active, t0 = list(runs), [], time.time()
        while pending or active:
            while pending and len(active) < args.jobs:
                name, seed, out, extra = pending.pop(0)
                out.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(ROOT / "ilsgan.py"), "--seed", str(seed), "--out", str(out), *extra]
                env = dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                    "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs))))
                active.append(subprocess.Popen(cmd, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, env=env))
            time.sleep(2)
            active = [p for p in active if p.poll() is None]
        print(f"{len(runs)} runs in {time.time() - t0:.0f} s")
    print(f"{'run':28s} {'IoU':>6s} {'DICE':>6s} {'area':>6s} {'flags'}")
    summary = {}
    for name, seed, out, _ in runs:
        res, stats = out / "results.json", out / "stats.jsonl"
        if not res.exists():
            print(f"{out.name:28s} {'(no results.json: see log.txt)'}")
            continue
        seg = json.loads(res.read_text())["segmentation"]
        last = json.loads(stats.read_text().splitlines()[-1])
        print(f"{out.name:28s} {seg['test']['iou']:6.3f} {seg['test']['dice']:6.3f} {seg['gen_mask_area']:6.3f} "
              f"{' '.join(last['flags']) or '-'}")
        summary.setdefault(name, []).append(seg["test"]["iou"])
    for name, ious in summary.items():
        ok = sum(i >= args.success for i in ious)
        print(f"{name}: {ok}/{len(ious)} seeds reach IoU >= {args.success}; mean IoU {sum(ious) / len(ious):.3f}, "
              f"min {min(ious):.3f}, max {max(ious):.3f}")


if __name__ == "__main__":
    main()
