"""Does ILS help? The paper's ablations (Tables 2 and 3) on the embedded benchmark, over seeds.

    python scripts/ablation.py                              # every variant over its seeds, 2 runs at a time
    python scripts/ablation.py --variants full no-ils --seeds 0 1 2 --jobs 2
    python scripts/ablation.py --table-only                 # tabulate what exists
    python scripts/ablation.py --variants full --seeds 0 1 2 3 4 --per-run   # the default job over seeds, run by run
    python scripts/ablation.py --variant lr4="--lr 0.004" --variants full lr4 --seeds 0 1 2   # a variant of your own
    python scripts/ablation.py --hidden-grid runs/ablation/full-seed0 runs/ablation/no-ils-seed0   # what each layer hides

Each run is the full default job (`python ilsgan.py --seed N` with the variant's flags, and any other
ilsgan.py flag given here: train, U-Net, MINE) in <out>/<variant>-seed<N>, one thread per run
(OMP_NUM_THREADS=1); --variant NAME="FLAGS" adds a variant of one's own. A run whose results.json
holds both scores is not run again; an interrupted one continues from its checkpoint. The table
(printed, and written to <out>/ablation.md) gives per variant the mean and standard deviation over
seeds of test IoU, DICE, the MINE estimates of the two Eq. (11) pairs, their sum and the whole-layer
MI, and the seeds the collapse watch flagged; then, per variant against `full` on the seeds both
have, the paired differences and on how many seeds the full model is better.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ilsgan  # noqa: E402
import runs  # noqa: E402
from runs import InputError  # noqa: E402

# named as the paper names them; Table 3's rows by their letter
VARIANTS = {
    "full": ([], "ILS-MI (Eq. 12): Laplace q, the two region pairs, all optimised (Table 3 row B)"),
    "no-ils": (["--ils", "none"], "without the ILS loss (Tables 2 and 3, row A)"),
    "ils-l1": (["--ils", "l1"], "ILS-L1 (Eq. 13)"),
    "C-no-opt-vis": (["--no-ils-opt-vis"], "row C: stop-gradient on the visible regions f_vis, b_vis"),
    "D-no-opt-mask": (["--no-ils-opt-mask"], "row D: stop-gradient on the mask"),
    "E-whole-layers": (["--no-ils-separate"], "row E: whole-layer I(b; f) instead of the two region pairs"),
    "F-gaussian": (["--ils-dist", "gaussian"], "row F: Gaussian q instead of Laplace"),
}
SEEDS = {"full": 5, "no-ils": 5, "ils-l1": 5, "F-gaussian": 5, "C-no-opt-vis": 3, "D-no-opt-mask": 3, "E-whole-layers": 3}
PAIRS = ("b_inv;f_vis", "b_vis;f_inv", "sum (Eq. 11)", "b;f")


def finished(folder):
    """Does the run hold both scores? (A results.json that is not one is an error naming it.)"""
    return {"segmentation", "mi"} <= set(runs.read_results(folder))


def machine():
    """Where and on what a run is made: the CPU, torch, the code's commit. Runs are deterministic in their
    seed only on one of these, so the table says which it drew from."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), None) if cpuinfo.is_file() else None
    return dict(cpu=cpu or "unknown", torch=torch.__version__, threads=1, code=runs.code_version())


def run_all(pending, jobs, common, variants):
    """Run the (variant, seed, folder) triples `jobs` at a time, one thread each; -> the folders that
    failed. An interrupt stops them too, each keeping its last checkpoint."""
    active, failed, t0, made = [], [], time.time(), json.dumps(machine()) + "\n"
    try:
        while pending or active:
            while pending and len(active) < jobs:
                variant, seed, folder = pending.pop(0)
                folder.mkdir(parents=True, exist_ok=True)
                if (folder / "checkpoint.pt").is_file():  # the saved config holds the variant and the common flags
                    cmd = ["--resume", str(folder)]
                else:  # new, or killed before its first snapshot: nothing worth keeping, so start it afresh
                    cmd = ["--seed", str(seed), "--out", str(folder), "--overwrite", *variants[variant][0], *common]
                    (folder / "machine.json").write_text(made)
                log = open(folder / "log.txt", "a")
                active.append((subprocess.Popen([sys.executable, str(ROOT / "ilsgan.py"), *cmd], stdout=log,
                                                stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")),
                               folder, log))
                print(f"started {folder.name}", flush=True)
            time.sleep(2)
            for proc, folder, log in [a for a in active if a[0].poll() is not None]:
                log.close()
                active.remove((proc, folder, log))
                failed += [folder] if proc.returncode else []
                print(f"{folder.name}: {'done' if proc.returncode == 0 else f'exit {proc.returncode}, see log.txt'} "
                      f"({(time.time() - t0) / 60:.0f} min)", flush=True)
    except runs.Interrupt as e:
        for proc, _, _ in active:
            proc.terminate()
            proc.wait()
        e.where, e.kept = "the ablation's runs", f"every run's last checkpoint ({len(active)} stopped with theirs)"
        raise
    return failed


def scores(folder):
    """One run's figures, or None if it has not finished."""
    if not finished(folder):
        return None
    results, stats = runs.read_results(folder), runs.read_log(folder / "stats.jsonl") or [{}]
    made = runs.read_json(folder / "machine.json") if (folder / "machine.json").is_file() else {}
    seg, mi = results["segmentation"], results["mi"]["nats"]
    return dict(iou=seg["test"]["iou"], dice=seg["test"]["dice"], area=seg.get("gen_mask_area", math.nan),
                **{k: mi[k] for k in PAIRS}, flags=stats[-1].get("flags", []),
                machine=f"{made.get('cpu', 'unrecorded machine')}, torch {made.get('torch', '?')}, code {made.get('code', '?')}")


def mean_sd(values):
    """'mean ± sample sd', or the value alone for one seed (no spread to show)."""
    m = sum(values) / len(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.3f}"


def paired(diffs, better):
    """Paired differences (variant minus full) as 'd1 / d2 / ... | mean | on how many seeds full is better'."""
    return f"{' / '.join(f'{d:+.3f}' for d in diffs)} | {sum(diffs) / len(diffs):+.3f} | {sum(map(better, diffs))} of {len(diffs)}"


def table(out, variants, seeds_of, per_run=False, success=None):
    """The Markdown table of the finished runs (also written to <out>/ablation.md); with per_run, each
    run's IoU, DICE, generated mask area and last flags, and with success how many reach that IoU."""
    got = {v: {s: r for s in seeds_of(v) if (r := scores(out / f"{v}-seed{s}")) is not None} for v in variants}
    lines = ["| variant | seeds | test IoU | test DICE | MI b_inv ; f_vis | MI b_vis ; f_inv | MI sum, Eq. (11) "
             "| MI whole layers b ; f | flagged |", "|---" * 9 + "|"]
    for v, rs in got.items():
        cells = [mean_sd([r[k] for r in rs.values()]) for k in ("iou", "dice", *PAIRS)] if rs else [""] * 6
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {sum(bool(r['flags']) for r in rs.values())} |")
    lines += ["", "Paired against `full` on the seeds both have (variant minus full; IoU higher is better, MI lower):",
              "", "| variant | seeds | IoU difference per seed | mean | full better on | MI sum difference per seed | mean "
              "| full lower on |", "|---" * 8 + "|"]
    for v in variants:
        common = sorted(set(got[v]) & set(got.get("full", {}))) if v != "full" else []
        if common:
            d = {k: [got[v][s][k] - got["full"][s][k] for s in common] for k in ("iou", "sum (Eq. 11)")}
            lines.append(f"| {v} | {' '.join(map(str, common))} | {paired(d['iou'], lambda x: x < 0)} | "
                         f"{paired(d['sum (Eq. 11)'], lambda x: x > 0)} |")
    say = sorted({r["machine"] for rs in got.values() for r in rs.values()})
    lines += [] if not say else ["", ("All runs on one machine and code: " if len(say) == 1 else
                   f"Runs from {len(say)} machines or code versions, so not all comparable seed by seed: ") + "; ".join(say) + "."]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    if per_run:
        lines += ["", "| run | test IoU | test DICE | generated mask area | collapse flags |", "|---|---|---|---|---|"]
        lines += [f"| {v}-seed{s} | {r['iou']:.3f} | {r['dice']:.3f} | {r['area']:.3f} | {' '.join(r['flags']) or '-'} |"
                  for v, rs in got.items() for s, r in rs.items()]
        if success is not None:
            lines += [""] + [f"{v}: {sum(r['iou'] >= success for r in rs.values())} of {len(rs)} runs reach IoU {success:g}; "
                             f"mean {sum(r['iou'] for r in rs.values()) / len(rs):.3f}, range "
                             f"{min(r['iou'] for r in rs.values()):.3f}-{max(r['iou'] for r in rs.values()):.3f}"
                             for v, rs in got.items() if rs]
    return "\n".join(lines) + "\n"


def hidden_grid(folders, path, n=8):
    """What each layer hides (Eq. 10): per run, rows f, f_inv = f(1-m), b, b_inv = b m for the same n
    latents, the hidden regions on grey. Leakage shows as the object echoed in b_inv."""
    rows, names = [], []
    for folder in folders:
        _, G, _ = ilsgan.load_generator(folder, "cpu", best=True)
        rows += ilsgan.grid_rows(G, torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(0)),
                                 ("f", "f_inv", "b", "b_inv"))
        names += [f"{Path(folder).name}: {ilsgan.ROWS[r]}" for r in ("f", "f_inv", "b", "b_inv")]
    ilsgan.save_rows(rows, names, path)
    print(f"wrote {path}: per run ({', '.join(map(str, folders))}) rows f, f_inv, b, b_inv")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="variants:\n" + "\n".join(f"  {k:15s} {' '.join(a) or '(defaults)':22s} {d}"
                                                                  for k, (a, d) in VARIANTS.items()))
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                    help='a variant of your own: ilsgan.py flags under a name, e.g. lr4="--lr 0.004" (repeatable)')
    ap.add_argument("--variants", nargs="+", default=None, metavar="VARIANT", help=f"the variants to run (default: {' '.join(VARIANTS)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds of every variant (default: 0-4 for full, no-ils, ils-l1, F-gaussian; 0-2 for C, D, E)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--table-only", action="store_true", help="only tabulate the finished runs")
    ap.add_argument("--per-run", action="store_true", help="also a table of each run: IoU, DICE, mask area, flags")
    ap.add_argument("--success", type=float, default=None, help="the per-run table, counting the runs whose test IoU reaches this")
    ap.add_argument("--hidden-grid", nargs="+", metavar="RUN", help="draw the hidden regions of these runs (folders, or "
                    "run names under --out) into <out>/hidden.png, then exit")
    args, common = ap.parse_known_args(argv)  # anything else goes to every ilsgan.py run
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    runs.error_boundary(lambda: run(args, common), lambda: f"python scripts/ablation.py {' '.join(argv)} "
                        "(finished runs are kept; the others continue from their checkpoints)")


def run(args, common):
    known, n_seeds = dict(VARIANTS), dict(SEEDS)
    for v in args.variant:
        name, _, flags = v.partition("=")
        if not name or not flags.strip() or name in known:
            raise InputError(f"--variant {v!r}: give NAME=\"FLAGS\" with a new name, e.g. lr4=\"--lr 0.004\"")
        known[name], n_seeds[name] = (shlex.split(flags), f"your own: {flags}"), 3
    variants = args.variants or list(known)
    unknown = [v for v in variants if v not in known]
    if unknown or args.jobs < 1 or not args.out.strip() or any(s < 0 or s >= 2**63 for s in args.seeds or []) or (args.table_only and common):
        raise InputError(f"--variants {' '.join(unknown)}: not one of {', '.join(known)} (add one with --variant)" if unknown
                         else f"{' '.join(common)}: not a flag of --table-only" if args.table_only and common
                         else "--jobs must be 1 or more, --out a folder, --seeds between 0 and 2^63")
    out = Path(args.out)
    runs.make_writable(out)
    if args.hidden_grid:
        return hidden_grid([Path(r) if Path(r).exists() or not (out / r).exists() else out / r for r in args.hidden_grid],
                           out / "hidden.png")

    def seeds_of(v):
        return args.seeds if args.seeds is not None else list(range(n_seeds[v]))
    folders = [(v, s, out / f"{v}-seed{s}") for v in variants for s in seeds_of(v)]
    pending = [f for f in folders if not finished(f[2])]
    print(f"{len(folders) - len(pending)} of {len(folders)} runs have their results; running {0 if args.table_only else len(pending)}")
    failed = run_all(pending, args.jobs, common, known) if pending and not args.table_only else []
    print(table(out, variants, seeds_of, args.per_run or args.success is not None, args.success), end="")
    if failed:
        sys.exit(f"{len(failed)} run(s) failed; their log.txt says why: {', '.join(str(f) for f in failed)}")


if __name__ == "__main__":
    main()
