"""Does ILS help? The paper's ablations (Tables 2 and 3) on the embedded benchmark, over seeds.

    python scripts/ablation.py                              # every variant over its seeds, 2 runs at a time
    python scripts/ablation.py --variants full no-ils --seeds 0 1 2 --jobs 2
    python scripts/ablation.py --table-only                 # tabulate what exists
    python scripts/ablation.py --report --out docs/ablation  # a page: the table, the paired dot plot, the grids
    python scripts/ablation.py --variants full --seeds 0 1 2 3 4 --per-run   # the default job over seeds, run by run
    python scripts/ablation.py --variant lr4="--lr 0.004" --variants full lr4 --seeds 0 1 2   # a variant of your own
    python scripts/ablation.py --mine-spread runs/ablation/full-seed0   # MINE's own spread on one checkpoint
    python scripts/ablation.py --hidden-grid runs/ablation/full-seed0 runs/ablation/no-ils-seed0   # what each layer hides
    python scripts/ablation.py --mask-share runs/ablation/full-seed0 runs/ablation/ils-l1-seed0    # how much of the MI is the mask

Each run is the full default job (`python ilsgan.py --seed N` with the variant's flags: train, U-Net,
MINE) in <out>/<variant>-seed<N>, one thread per run (OMP_NUM_THREADS=1); --variant NAME="FLAGS"
adds a variant of one's own. A run whose results.json
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
PAIRS = ("vis_fg;inv_bg", "vis_bg;inv_fg", "sum (Eq. 11)", "whole f;b")


def finished(folder):
    """Does the run hold both scores? (A results.json that is not one is an error naming it.)"""
    return {"segmentation", "mi"} <= set(ilsgan.read_results(folder))


def machine():
    """Where and on what a run is made: the CPU, torch, the code's commit. Runs are deterministic in their
    seed only on one of these, so the table says which it drew from."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return dict(cpu=cpu or "unknown", torch=torch.__version__, threads=1, code=ilsgan.code_version())


def run_all(runs, jobs, common):
    """Run the pending (variant, seed, folder) triples, `jobs` at a time, one thread each; return the
    folders of the runs that failed."""
    pending = [r for r in runs if not finished(r[2])]
    print(f"{len(runs) - len(pending)} of {len(runs)} runs already have their results; running {len(pending)}")
    active, failed, t0, made = [], [], time.time(), json.dumps(machine()) + "\n"
    try:
        supervise(pending, active, failed, jobs, common, made, t0)
    except ilsgan.Interrupt as e:  # the runs stop too, each keeping its last checkpoint
        for proc, _, _ in active:
            proc.terminate()
        for proc, _, _ in active:
            proc.wait()
        e.where, e.kept = "the ablation's runs", f"every run's last checkpoint ({len(active)} stopped with theirs)"
        raise
    return failed


def supervise(pending, active, failed, jobs, common, made, t0):
    """Start the pending runs `jobs` at a time and wait for them."""
    while pending or active:
        while pending and len(active) < jobs:
            variant, seed, folder = pending.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            if (folder / "checkpoint.pt").is_file():
                start = ["--resume", str(folder)]
            else:  # new, or killed before its first snapshot: nothing worth keeping, so start it afresh
                start = ["--out", str(folder), "--overwrite"]
                (folder / "machine.json").write_text(made)
            cmd = [sys.executable, str(ROOT / "ilsgan.py"), "--seed", str(seed), *start, *VARIANTS[variant][0], *common]
            if start[0] == "--resume":  # the saved config already holds the variant and the common flags
                cmd = [sys.executable, str(ROOT / "ilsgan.py"), *start]
            log = open(folder / "log.txt", "a")
            active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, OMP_NUM_THREADS="1")), folder, log))
            print(f"started {folder.name}", flush=True)
        time.sleep(2)
        for proc, folder, log in list(active):
            if proc.poll() is not None:
                log.close()
                active.remove((proc, folder, log))
                if proc.returncode != 0:
                    failed.append(folder)
                print(f"{folder.name}: {'done' if proc.returncode == 0 else f'exit {proc.returncode}, see log.txt'} "
                      f"({(time.time() - t0) / 60:.0f} min)", flush=True)


def scores(folder):
    """One run's figures, or None if it has not finished."""
    if not finished(folder):
        return None
    results = ilsgan.read_results(folder)
    try:
        last = json.loads((folder / "stats.jsonl").read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        raise ilsgan.InputError(f"{folder / 'stats.jsonl'} has no readable last record ({e})") from None
    seg, mi = results["segmentation"]["test"], results["mi"]["nats"]
    made = json.loads((folder / "machine.json").read_text()) if (folder / "machine.json").is_file() else {}
    return dict(iou=seg["iou"], dice=seg["dice"], **{k: mi[k] for k in PAIRS}, flagged=bool(last["flags"]), flags=last["flags"],
                machine=f"{made.get('cpu', 'unrecorded machine')}, torch {made.get('torch', '?')}, code {made.get('code', '?')}")


def mean_sd(values):
    """'mean ± sample sd', or the value alone for one seed (no spread to show)."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.3f}"


def table(out, variants, seeds_of):
    """The Markdown table of the finished runs; also written to <out>/ablation.md."""
    got = {v: {s: scores(out / f"{v}-seed{s}") for s in seeds_of(v)} for v in variants}
    got = {v: {s: r for s, r in runs.items() if r is not None} for v, runs in got.items()}
    lines = ["| variant | seeds | test IoU | test DICE | MI vis fg ; hidden bg | MI vis bg ; hidden fg | MI sum, Eq. (11) "
             "| MI whole layers | flagged |", "|---" * 9 + "|"]
    for v in variants:
        runs = list(got[v].values())
        if not runs:
            lines.append(f"| {v} | 0 | | | | | | | |")
            continue
        cells = [mean_sd([r[k] for r in runs]) for k in ("iou", "dice", *PAIRS)]
        lines.append(f"| {v} | {len(runs)} | " + " | ".join(cells) + f" | {sum(r['flagged'] for r in runs)} |")
    lines += ["", "Paired against `full` on the seeds both have (variant minus full; IoU higher is better, MI lower):",
              "", "| variant | seeds | IoU difference per seed | mean | full better on | MI sum difference per seed | mean "
              "| full lower on |", "|---" * 8 + "|"]
    for v in variants:
        if v == "full":
            continue
        common = sorted(set(got[v]) & set(got.get("full", {})))
        if not common:
            continue
        d_iou = [got[v][s]["iou"] - got["full"][s]["iou"] for s in common]
        d_mi = [got[v][s]["sum (Eq. 11)"] - got["full"][s]["sum (Eq. 11)"] for s in common]
        lines.append(f"| {v} | {' '.join(map(str, common))} | {' / '.join(f'{d:+.3f}' for d in d_iou)} | "
                     f"{sum(d_iou) / len(d_iou):+.3f} | {sum(d < 0 for d in d_iou)} of {len(common)} | "
                     f"{' / '.join(f'{d:+.3f}' for d in d_mi)} | {sum(d_mi) / len(d_mi):+.3f} | "
                     f"{sum(d > 0 for d in d_mi)} of {len(common)} |")
    say = sorted({r["machine"] for runs in got.values() for r in runs.values()})
    lines += [] if not say else ["", ("All runs on one machine and code: " if len(say) == 1 else
                   f"Runs from {len(say)} machines or code versions, so not all comparable seed by seed: ") + "; ".join(say) + "."]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    return text


def per_run_table(out, variants, seeds_of, success=None):
    """Each run's test IoU and DICE, its generated masks' mean area and its last collapse flags; with
    `success`, how many runs of each variant reach that IoU."""
    lines = ["| run | test IoU | test DICE | generated mask area | collapse flags |", "|---|---|---|---|---|"]
    counts = {}
    for v in variants:
        for s in seeds_of(v):
            folder = out / f"{v}-seed{s}"
            if not finished(folder):
                lines.append(f"| {folder.name} | (not finished) | | | |")
                continue
            seg = ilsgan.read_results(folder)["segmentation"]
            flags = scores(folder)["flags"]
            lines.append(f"| {folder.name} | {seg['test']['iou']:.3f} | {seg['test']['dice']:.3f} | "
                         f"{seg.get('gen_mask_area', float('nan')):.3f} | {' '.join(flags) or '-'} |")
            counts.setdefault(v, []).append(seg["test"]["iou"])
    if success is not None:
        lines += [""] + [f"{v}: {sum(i >= success for i in ious)} of {len(ious)} runs reach IoU {success:g}; mean "
                         f"{sum(ious) / len(ious):.3f}, range {min(ious):.3f}-{max(ious):.3f}" for v, ious in counts.items()]
    return "\n".join(lines) + "\n"


def mine_spread(run, seeds):
    """MINE (its cpu preset) with several seeds on one checkpoint: the estimator's own spread.
    Nothing is written to the run folder."""
    import mine
    print(f"MINE on {run}, seeds {seeds} (samples and statistics network drawn anew for each)")
    rows = []
    _, G, _ = ilsgan.load_generator(ilsgan.find_checkpoint(run, best=True), "cpu")
    for seed in seeds:
        mc = mine.make_config("cpu", ckpt=str(run), seed=seed, device="cpu")
        pairs = mine.layer_pairs(*mine.generated_layers(G, mc.n, mc.res, seed))
        est = {k: mine.estimate_mi(x, y, mc, desc=f"MINE {k}")[0] for k, (x, y) in pairs.items()}
        est["sum (Eq. 11)"] = est["vis_fg;inv_bg"] + est["vis_bg;inv_fg"]
        rows.append(est)
        print(f"seed {seed}: " + ", ".join(f"{k} {est[k]:.3f}" for k in PAIRS), flush=True)
    for k in PAIRS:
        values = [r[k] for r in rows]
        print(f"{k:14s} {mean_sd(values)} (range {max(values) - min(values):.3f})")


def mask_share(runs, seed=0, preset="cpu"):
    """Both variables of an Eq. (11) pair are cut out by the same mask, so each pair shares the mask's
    information whatever the layers hold. Per run: MINE (mine.py's `preset`) on each region pair and
    on the same visible region against the mask alone; and how far the hidden foreground, which no
    loss bounds, leaves the image range [-1, 1] (MINE sees it clamped). Returns one dict per run."""
    import mine
    rows = []
    for run in runs:
        mc = mine.make_config(preset, ckpt=str(run), seed=seed, device="cpu")
        _, G, _ = ilsgan.load_generator(ilsgan.find_checkpoint(run, best=True), "cpu")
        f, b, m = mine.generated_layers(G, mc.n, mc.res, seed)
        eq11, m3 = mine.layer_pairs(f, b, m), m.expand_as(f).contiguous()
        pairs = {"vis fg ; hidden bg": eq11["vis_fg;inv_bg"], "vis fg ; mask": (f * m, m3),
                 "vis bg ; hidden fg": eq11["vis_bg;inv_fg"], "vis bg ; mask": (b * (1 - m), 1 - m3)}
        row = {k: mine.estimate_mi(x, y, mc, desc=f"MINE {k}")[0] for k, (x, y) in pairs.items()}
        s = next(ilsgan.sample(G, 512, batch=512, seed=seed))
        hidden_f = s["f"][(s["m"] < 0.5).expand_as(s["f"])].abs()
        row["hidden f outside [-1, 1]"] = (hidden_f > 1).float().mean().item()
        row["hidden f median |value|"] = hidden_f.median().item()
        rows.append(row)
        print(f"{run}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return rows


def hidden_grid(runs, path, n=8):
    """What each layer hides (Eq. 10): per run, rows f, f_hidden = f(1-m), b, b_hidden = b m for the
    same n latents (ilsgan.grid_rows); hidden regions are drawn on grey. Leakage shows as the object
    echoed in b's hidden part."""
    rows, names = [], []
    for run in runs:
        _, G, _ = ilsgan.load_generator(ilsgan.find_checkpoint(run, best=True), "cpu")
        z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(0))
        rows += ilsgan.grid_rows(G, z, ("f", "f_hidden", "b", "b_hidden"))
        names += [f"{Path(run).name}: {ilsgan.ROW_NAMES[r]}" for r in ("f", "f_hidden", "b", "b_hidden")]
    ilsgan.save_rows(rows, names, path)
    print(f"wrote {path}: per run ({', '.join(map(str, runs))}) rows f, hidden f, b, hidden b")


def dot_plot(out, variants, seeds_of):
    """The paired per-seed differences against `full` (IoU: higher is better; region-MI sum: lower is
    better) as an SVG dot plot: one row per variant, one dot per seed, the zero line dashed."""
    got = {v: {s: scores(out / f"{v}-seed{s}") for s in seeds_of(v)} for v in variants}
    full = {s: r for s, r in got.get("full", {}).items() if r}
    rows = [v for v in variants if v != "full" and any(r and s in full for s, r in got[v].items())]
    W, row_h, left, panel = 900, 26, 130, 360
    H = 60 + row_h * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">']
    for j, (key, title, span) in enumerate([("iou", "test IoU, variant - full (higher: better)", 0.12),
                                             ("sum (Eq. 11)", "region-MI sum, variant - full (lower: better), nats", 1.2)]):
        x0 = left + j * (panel + 40)
        zero = x0 + panel / 2
        parts += [f'<text x="{x0}" y="16" font-weight="bold">{title}</text>',
                  f'<line x1="{zero}" y1="24" x2="{zero}" y2="{H - 24}" stroke="#888" stroke-dasharray="4 3"/>',
                  f'<text x="{x0}" y="{H - 8}" fill="#555">-{span:g}</text><text x="{x0 + panel}" y="{H - 8}" '
                  f'text-anchor="end" fill="#555">+{span:g}</text><text x="{zero}" y="{H - 8}" text-anchor="middle" fill="#555">0</text>']
        for i, v in enumerate(rows):
            y = 40 + i * row_h
            if j == 0:
                parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{v}</text>')
            parts.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + panel}" y2="{y}" stroke="#eee"/>')
            for s, r in got[v].items():
                if r and s in full:
                    d = r[key] - full[s][key]
                    cx = zero + max(-1.0, min(1.0, d / span)) * panel / 2
                    parts.append(f'<circle cx="{cx:.1f}" cy="{y}" r="4" fill="#1f77b4" data-variant="{v}" data-seed="{s}" '
                                 f'data-difference="{d:.4f}"><title>{v} seed {s}: {d:+.3f}</title></circle>')
    return "".join(parts) + "</svg>\n"


def report_page(out, variants, seeds_of):
    """<out>/report.html: the ablation table, the dot plot (also <out>/ablation-dots.svg) and each run's
    last grid side by side, where the run folder still holds it."""
    import html
    dots = dot_plot(out, variants, seeds_of)
    ilsgan.write_text(out / "ablation-dots.svg", dots)
    tables = []
    for block in table(out, variants, seeds_of).split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
        if lines:
            cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
            tables.append("<table>" + "".join("<tr>" + "".join(f"<{t}>{c}</{t}>" for c in row) + "</tr>"
                                              for row, t in zip(cells, ["th"] + ["td"] * len(cells))) + "</table>")
        else:
            tables.append(f"<p>{html.escape(block)}</p>")
    grids = []
    for v in variants:
        for s in seeds_of(v):
            last = sorted((out / f"{v}-seed{s}").glob("grid-*.png"))[-1:]
            grids += [f"<figure><figcaption>{v} seed {s}</figcaption><img src='{g.relative_to(out)}' alt='{v} seed {s}'>"
                      "</figure>" for g in last]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ILSGAN ablation</title>"
            f"<style>{ilsgan.REPORT_CSS}</style></head><body><h1>The paper's ablations on the embedded benchmark</h1>"
            + "".join(tables) + "<h2>Paired against full, seed by seed</h2><img src='ablation-dots.svg' alt='paired differences'>"
            + "<h2>Each run's last grid</h2>" + ("".join(grids) or "<p>No run folder here keeps its grids.</p>")
            + "</body></html>\n")
    ilsgan.write_text(out / "report.html", page)
    return out / "report.html"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="variants:\n" + "\n".join(f"  {k:15s} {' '.join(a) or '(defaults)':22s} {d}"
                                                                  for k, (a, d) in VARIANTS.items()))
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                    help='a variant of your own: ilsgan.py flags under a name, e.g. lr4="--lr 0.004" (repeatable)')
    ap.add_argument("--variants", nargs="+", default=None, metavar="VARIANT", help=f"the variants to run (default: {' '.join(VARIANTS)})")
    ap.add_argument("--per-run", action="store_true", help="also a table of each run: IoU, DICE, mask area, flags")
    ap.add_argument("--success", type=float, default=None, help="with --per-run: count the runs whose test IoU reaches this")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds of every variant (default: 0-4 for full, no-ils, ils-l1, F-gaussian; 0-2 for C, D, E)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--table-only", action="store_true", help="only tabulate the finished runs")
    ap.add_argument("--report", action="store_true", help="only write <out>/report.html (table, dot plot, grids) "
                    "and <out>/ablation-dots.svg from the finished runs")
    ap.add_argument("--mine-spread", metavar="RUN", help="MINE with --mine-seeds on this run's checkpoint, then exit "
                    "(RUN: a run folder, or a run's name under --out)")
    ap.add_argument("--mine-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden-grid", nargs="+", metavar="RUN", help="draw the hidden regions of these runs "
                    "(e.g. full-seed0 no-ils-seed0) into <out>/hidden.png, then exit")
    ap.add_argument("--mask-share", nargs="+", metavar="RUN", help="MINE of each Eq. (11) pair beside MINE of its "
                    "visible region and the mask alone (both variables share the mask), then exit")
    args, common = ap.parse_known_args()  # anything else goes to every ilsgan.py run
    argv = sys.argv[1:]
    ilsgan.error_boundary(lambda: run(args, common), lambda: f"python scripts/ablation.py {' '.join(argv)} "
                          "(finished runs are kept; the others continue from their checkpoints)")


def run(args, common):
    for v in args.variant:
        name, _, flags = v.partition("=")
        if not name or not flags.strip() or name in VARIANTS:
            raise ilsgan.InputError(f"--variant {v!r}: give NAME=\"FLAGS\" with a new name, e.g. lr4=\"--lr 0.004\"")
        VARIANTS[name] = (shlex.split(flags), f"your own: {flags}")
        SEEDS[name] = 3
    args.variants = args.variants or list(VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ilsgan.InputError(f"--variants {' '.join(unknown)}: not a variant ({', '.join(VARIANTS)}; or add one with --variant)")
    if args.jobs < 1:
        raise ilsgan.InputError(f"--jobs {args.jobs}: must be 1 or more")
    if not args.out.strip():
        raise ilsgan.InputError("--out is empty: give the folder of the runs")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ilsgan.InputError(f"--out {out} is a file; give a folder")

    def run_path(r):  # a run folder, or a run's name under --out
        return Path(r) if Path(r).exists() or not (out / r).exists() else out / r
    if args.mine_spread:
        return mine_spread(run_path(args.mine_spread), args.mine_seeds)
    if args.mask_share:
        mask_share([run_path(r) for r in args.mask_share])
        return
    if args.hidden_grid:
        out.mkdir(parents=True, exist_ok=True)
        return hidden_grid([run_path(r) for r in args.hidden_grid], out / "hidden.png")

    def seeds_of(v):
        return args.seeds if args.seeds is not None else list(range(SEEDS[v]))
    if args.report:
        print(f"wrote {report_page(out, args.variants, seeds_of)} and {out / 'ablation-dots.svg'}")
        return
    failed = []
    if not args.table_only:
        failed = run_all([(v, s, out / f"{v}-seed{s}") for v in args.variants for s in seeds_of(v)], args.jobs, common)
    out.mkdir(parents=True, exist_ok=True)
    print(table(out, args.variants, seeds_of), end="")
    if args.per_run:
        print("\n" + per_run_table(out, args.variants, seeds_of, args.success), end="")
    if failed:
        sys.exit(f"{len(failed)} run(s) failed; their log.txt says why: {', '.join(str(f) for f in failed)}")


if __name__ == "__main__":
    main()
