"""What every script of the project shares: a run folder and its files, the command line, the error line.

A run folder (`python ilsgan.py --out DIR`) holds one run. Its files are written atomically (a
temporary file of a name only this project makes, then one rename) and read back through one reader
per kind of file, which names the file and what is wrong with it before any work is done:

    config.json    the run's settings and its id (run_id)      read_config
    stats.jsonl    one JSON record per log step                read_log
    fid.jsonl      FID at each snapshot (with --fid-n)          read_log
    results.json   the evaluations' scores, one section each   read_results, write_results
    report.html    the run on one page                          write_report

checkpoint.pt and best.pt are ilsgan.py's (read_checkpoint there). While a script works in a folder
it holds the folder's lock (`locked`): an operating-system lock, released by the system when the
process ends, however it ends. Every script ends through `error_boundary`: a problem with what was
given is one line `error: ...` and exit code 1; Ctrl-C or SIGTERM is one line saying where it stopped,
what was kept and how to continue.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import html
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path


class InputError(ValueError):
    """A problem with what was given (flags, files, folders): printed as one line `error: ...`."""


class Interrupt(BaseException):
    """SIGINT or SIGTERM, raised where the program was; `where` and `kept` are filled in on the way out."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where, self.kept = signum, None, None


def error_boundary(body, again, expected=()):
    """A script's main: runs body(). What was given is wrong (InputError, OSError, `expected`), or a size
    does not fit in memory -> one line `error: ...`, exit code 1. SIGINT or SIGTERM -> one line: where
    it stopped, what was kept and again(), the command that continues; exit code 128 + the signal. A
    closed standard output ends quietly. A bug still shows its traceback."""
    def interrupt(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)  # a second one ends the process at once
        raise Interrupt(signum)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return body()
    except Interrupt as e:
        sys.stderr.write(f"\nstopped by {e} during {e.where or 'the start, before any work was kept'}; kept: "
                         f"{e.kept or 'what was there before'}; continue with: {again()}\n")
        sys.exit(128 + e.signum)
    except BrokenPipeError:  # `... | head`: the reader is gone; the rest goes nowhere, and stderr says so
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(f"error: the standard output was closed; stopped there (continue with: {again()})")
    except (InputError, OSError, *expected) as e:
        sys.exit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:  # the one place where sizes that do not fit are caught
        if not isinstance(e, MemoryError) and not re.search(r"out of memory|can't allocate memory", str(e)):
            raise
        sys.exit(f"error: out of memory ({str(e).splitlines()[0][:200] or 'MemoryError'}): make the sizes smaller "
                 "(--batch, --resolution, --channel-max, --n-train, ...)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the command line: a dataclass is the config, every field a flag ---------------------------------


def config_parser(cls, presets, description):
    """--preset plus one flag per field of cls, helped by the field's comment; unset flags are None."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", choices=list(presets), default=None, help="named overrides of the defaults")
    comments = dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, "").replace("%", "%%")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        ap.add_argument(flag, default=None, help=f"{text} [{f.default}]", **kind)
    return ap


def given(args, cls):
    """The fields of cls given on the command line, as overrides."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def with_overrides(cfg, **overrides):
    """A copy of cfg with the given fields replaced (None = not given); an unknown name is an error."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise InputError(f"unknown setting(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def preset_name(cfg, presets):
    """The preset whose every setting cfg has, or 'custom' (for the protocol lines of results.json)."""
    return next((k for k, v in presets.items() if all(getattr(cfg, f) == x for f, x in v.items())), "custom")


def validate_fields(cfg, positive=(), nonneg=(), choices=None, rules=()):
    """Raise InputError naming every field out of range (one line each) before any work is done: every
    number finite, `positive` > 0, `nonneg` >= 0, `choices` {field: allowed}, and `rules` (field, ok,
    what it must be) for the conditions that need more."""
    numbers = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), (int, float))
               and not isinstance(getattr(cfg, f.name), bool)]
    bad_numbers = {f for f in numbers if not math.isfinite(getattr(cfg, f))}
    checks = [*[(f, False, "a finite number") for f in sorted(bad_numbers)],
              *[(f, getattr(cfg, f) > 0, "positive") for f in positive if f not in bad_numbers],
              *[(f, getattr(cfg, f) >= 0, "0 or more") for f in nonneg if f not in bad_numbers],
              *[(f, getattr(cfg, f) in c, "one of " + " | ".join(c)) for f, c in (choices or {}).items()],
              *[r for r in rules if r[0] not in bad_numbers]]
    bad = [f"--{f.replace('_', '-')} {getattr(cfg, f)!r}: must be {what}" for f, ok, what in checks if not ok]
    if bad:
        raise InputError("invalid settings:\n  " + "\n  ".join(bad))


# --- files: written atomically, read back checked ------------------------------------------------------

TMP = ".ilsgan-tmp"  # the mark of this project's temporary files: NAME.PID.ilsgan-tmp


@contextlib.contextmanager
def replaced(path):
    """Every file the project writes is written this way: to the yielded temporary path, which then
    replaces `path` in one rename. A write that fails (a full disk) or is killed leaves the previous
    file; a failed one also removes its temporary file, and `claim` removes those of killed ones."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}{TMP}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text):
    with replaced(path) as tmp:
        tmp.write_text(text)


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2))


def read_json(path, kind=dict):
    """A JSON file the project wrote -> its value, which must be a `kind`; anything else is an InputError
    naming the file."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a JSON file of this project ({str(e)[:120]}): move it away") from None
    if not isinstance(value, kind):
        raise InputError(f"{path} holds a {type(value).__name__}, not the {kind.__name__} this project writes there")
    return value


def read_config(folder):
    """A run folder's config.json -> dict (with its run_id), or None when the folder has none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg.get("run_id"), str):
        raise InputError(f"{path} is not an ilsgan run's config (it has no run_id): this folder is not a run folder")
    return cfg


def read_log(path, number="kimg"):
    """stats.jsonl or fid.jsonl -> its records, each a dict with a finite `number` (kimg). A torn last
    line (a write that was killed) is left out; a bad line anywhere else is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): move it away") from None
    records = []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):
                break  # torn: the write was killed
            rec = None
        if not (isinstance(rec, dict) and (number is None or type(rec.get(number)) in (int, float) and math.isfinite(rec[number]))):
            raise InputError(f"{path}:{i}: not a record of this project's log ({line[:80]!r}): move the file away")
        records.append(rec)
    return records


def cut_log(path, kimg):
    """A log cut back to its records up to kimg (a resumed run logs the rest again)."""
    if Path(path).is_file():
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_log(path) if r["kimg"] <= kimg + 1e-9))


# what each evaluation's section must hold, so that the closing table and the report can read it
SECTIONS = {"segmentation": ("test", "baselines", "n_test", "kimg", "protocol"), "oracle": ("test", "n_test", "protocol"),
            "mi": ("nats", "protocol")}


def read_results(folder):
    """A run folder's results.json -> {section: dict}, {} if there is none; a file that is not one, or a
    section without what its evaluation writes, is an InputError naming it."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        return {}
    results = read_json(path)
    for name, keys in SECTIONS.items():
        section = results.get(name)
        if section is not None and not (isinstance(section, dict) and all(k in section for k in keys)):
            raise InputError(f"{path}: its '{name}' section lacks {', '.join(keys)}: move the file away to score again")
    return results


def write_results(folder, section, values):
    """One section of results.json, the others kept; written atomically (the caller holds the lock)."""
    results = read_results(folder)
    results[section] = values
    write_json(Path(folder) / "results.json", results)


# --- a run folder: one run, held by one process at a time ---------------------------------------------

# the files a run writes; --overwrite removes these and no others, and only from a run folder
RUN_FILES = ("config.json", "stats.jsonl", "fid.jsonl", "checkpoint.pt", "best.pt", "results.json", "report.html",
             "hidden.png", "segmentation.png", "oracle.png", "unet.pt")
GRID = re.compile(r"grid-\d+\.\d{3}kimg\.png")  # grid-00010.000kimg.png
SET_ASIDE = re.compile(r"(results|unet|segmentation)-[\d.e+-]+kimg\.(json|pt|png)")  # what scored an older checkpoint


@contextlib.contextmanager
def locked(folder):
    """While the block runs, this process holds the folder: an operating-system lock (flock) on the folder
    itself, which leaves no file behind and which the system releases when the process ends, however it
    ends. A folder another process holds is an InputError."""
    make_writable(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{folder} is in use by another process; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def make_writable(folder):
    """Make the folder if needed, and fail now, not after hours of work, if it cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}{TMP}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}): the results go there") from None


def claim(out, run_id, overwrite=False):
    """Make `out` the folder of run `run_id`, under its lock (held by the caller): a folder holding
    another run is refused (unless `overwrite`, which removes that run's files and no others), as is
    one holding files a run would write over that no run wrote. Temporary files of killed writes go."""
    out = Path(out)
    for p in out.glob(f"*{TMP}"):
        p.unlink(missing_ok=True)  # nobody else writes here: we hold the lock
    files = sorted(p for p in out.iterdir() if p.name in RUN_FILES or GRID.fullmatch(p.name) or SET_ASIDE.fullmatch(p.name))
    try:
        saved = read_config(out)
    except InputError:  # a config.json that no run wrote
        saved = None
    if saved is None and files:
        raise InputError(f"{out} holds files that no run made ({', '.join(p.name for p in files[:3])}), and a run "
                         "would write over them: give an empty folder or another --out")
    if saved is not None and saved["run_id"] != run_id:
        if not overwrite:
            raise InputError(f"{out} holds another run ({', '.join(p.name for p in files[:3])}): continue it with "
                             f"--resume {out}, start it again with --overwrite, or give another --out")
        for p in files:
            p.unlink()


@contextlib.contextmanager
def scoring(folder, section, what):
    """An evaluation of a run folder (unet_eval.py, mine.py): under the folder's lock, every file the
    report reads checked (and refused if damaged) before any work, report.html redrawn after, and an
    interrupt told what was kept."""
    with locked(folder):
        read_config(folder), read_results(folder), read_log(folder / "stats.jsonl"), read_log(folder / "fid.jsonl")
        try:
            yield
        except Interrupt as e:
            e.where = e.where or f"{what} of {folder}"
            e.kept = e.kept or f"the run as it was; results.json has no new '{section}' section (scoring not finished)"
            raise
        if read_config(folder) is not None:
            write_report(folder)


def code_version():
    """The commit of this project's git checkout (+dirty when changed), or 'unknown'."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty=+dirty",
                               "--exclude=*", "--abbrev=7"], capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_scores(folder, results=None):
    """The closing table: a run folder's scores (results.json, fid.jsonl) as report.html shows them,
    then where its files are; report.html is redrawn."""
    folder = Path(folder)
    rows = scores_table(read_results(folder) if results is None else results, read_log(folder / "fid.jsonl"))
    print("\n" + "\n".join([f"{a:30s} {b:>15s}  {c}" for a, b, c in rows] or ["no scores yet: unet_eval.py and mine.py score a run"]))
    print((f"results: {folder / 'results.json'}, pictures: {folder / 'segmentation.png'}\n" if (folder / "results.json").is_file()
           else "") + f"report: {write_report(folder)}")


# --- report.html: a run at a glance (inline SVG and CSS, no JavaScript, no network) ---------------------

CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1em}
figure{margin:0}svg{width:100%;height:auto;background:#fff}img{max-width:100%;image-rendering:pixelated}
.tick{font-size:10px;fill:#555}.axis{stroke:#333}.ref{stroke:#888;stroke-dasharray:4 3}.flag{stroke:#d00;stroke-width:2}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em}dt{font-weight:600}dd{margin:0}"""
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def svg_chart(title, series, ylabel, refs=(), marks=(), W=560, H=230):
    """A line chart: series {name: [(kimg, value)]}; refs [(axis 'x' or 'y', value, label)] dashed; marks
    [(kimg, label)] red ticks. The <svg> states its ranges (data-x0 ... data-bottom) and every line its
    series (data-series), so that the points can be read back."""
    pts = [p for ps in series.values() for p in ps if math.isfinite(p[1])]
    if not pts:
        return f"<figure><figcaption>{html.escape(title)}: nothing logged yet</figcaption></figure>"
    x1 = max([p[0] for p in pts] + [v for a, v, _ in refs if a == "x"] + [1e-9])
    ys = [p[1] for p in pts] + [v for a, v, _ in refs if a == "y"]
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-12 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    L, R, T, B = 56, W - 10, 24, H - 34

    def X(x):
        return L + x / x1 * (R - L)

    def Y(y):
        return B - (y - y0) / (y1 - y0) * (B - T)
    out = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}" data-x0="0.0" data-x1="{x1!r}" '
           f'data-y0="{y0!r}" data-y1="{y1!r}" data-left="{L}" data-right="{R}" data-top="{T}" data-bottom="{B}">',
           f'<text x="{L}" y="14" font-weight="600" font-size="13">{html.escape(title)}</text>',
           f'<path d="M{L},{T}V{B}H{R}" fill="none" class="axis"/>',
           f'<text x="{(L + R) / 2}" y="{H - 4}" font-size="11" text-anchor="middle">kimg (thousands of real images '
           f'shown to D)</text><text x="12" y="{(T + B) / 2}" font-size="11" text-anchor="middle" '
           f'transform="rotate(-90 12 {(T + B) / 2})">{html.escape(ylabel)}</text>']
    for i in range(5):
        xv, yv = x1 * i / 4, y0 + (y1 - y0) * i / 4
        out += [f'<text x="{X(xv):.1f}" y="{B + 14}" class="tick" text-anchor="middle">{xv:.4g}</text>',
                f'<text x="{L - 4}" y="{Y(yv):.1f}" class="tick" text-anchor="end">{yv:.3g}</text>']
    for axis, v, label in refs:
        line = (f'x1="{X(v):.2f}" y1="{T}" x2="{X(v):.2f}" y2="{B}"' if axis == "x" else
                f'x1="{L}" y1="{Y(v):.2f}" x2="{R}" y2="{Y(v):.2f}"')
        at = f'x="{X(v):.2f}" y="{T + 10}"' if axis == "x" else f'x="{R}" y="{Y(v) - 3:.2f}" text-anchor="end"'
        out.append(f'<line {line} class="ref"/><text {at} class="tick">{html.escape(label)}</text>')
    for (name, ps), colour in zip(series.items(), COLOURS):
        ps = [p for p in ps if math.isfinite(p[1])]
        out.append(f'<polyline data-series="{name}" fill="none" stroke="{colour}" stroke-width="1.5" points="'
                   + " ".join(f"{X(x):.2f},{Y(y):.2f}" for x, y in ps) + f'"><title>{name}</title></polyline>')
        out += [f'<circle cx="{X(x):.2f}" cy="{Y(y):.2f}" r="3" fill="{colour}"/>' for x, y in ps if len(ps) <= 3]
    out += [f'<line x1="{X(v):.2f}" y1="{B}" x2="{X(v):.2f}" y2="{B - 8}" class="flag" data-flag="{html.escape(label)}">'
            f'<title>{html.escape(label)} at {v:g} kimg</title></line>' for v, label in marks]
    legend = " ".join(f'<span style="color:{c}">&#9632; {n}</span>' for n, c in zip(series, COLOURS))
    return f'<figure>{"".join(out)}</svg><figcaption>{legend}</figcaption></figure>'


def scores_table(results, fids):
    """The scores as rows (measure, value, what it means), read from results.json and fid.jsonl."""
    rows = []
    for name in ("segmentation", "oracle"):
        if name in results:
            seg, t = results[name], results[name]["test"]
            rows.append(("ILSGAN -> U-Net" if name == "segmentation" else "ceiling: U-Net on real masks",
                         f"{t['iou']:.3f} / {t['dice']:.3f}", f"IoU / DICE per test image, averaged over {seg['n_test']}: "
                         + ("a U-Net trained only on generated pairs" if name == "segmentation" else "the most this "
                            "U-Net and protocol reach") + f" (checkpoint at {seg.get('kimg', '?')} kimg)"))
            if "missed" in t:
                rows.append(("  where the IoU is lost", f"{t['missed']:.3f} / {t['extra']:.3f}", "shares of each image's "
                             "union: true object missed / background called object; by true object area: "
                             + ", ".join(f"{k} {v:.3f}" for k, v in t.get("iou_by_size", {}).items())))
            meaning = {"all foreground": "every pixel called object: what a segmenter that learnt nothing scores",
                       "mean training mask": "the training masks' mean, thresholded: what knowing only where objects "
                       "usually are scores"}
            rows += [(f"baseline: {k}", f"{b['iou']:.3f} / {b['dice']:.3f}", meaning.get(k, "")) for k, b in
                     seg.get("baselines", {}).items() if name == "segmentation"]
    if "mi" in results:
        n = results["mi"]["nats"]
        rows += [("MI b_inv ; f_vis", f"{n['b_inv;f_vis']:.3f} nats", "what the background hidden under the object knows "
                  "of the visible object (MINE): the leakage of the paper's Fig. 1"),
                 ("MI b_vis ; f_inv", f"{n['b_vis;f_inv']:.3f} nats", "what the foreground's hidden part knows of the "
                  "visible background"),
                 ("MI sum, Eq. (11)", f"{n['sum (Eq. 11)']:.3f} nats", "the quantity L_ILS bounds and ILS aims to lower"),
                 ("MI whole layers", f"{n['b;f']:.3f} nats", "b and f as wholes (Table 3 row E minimises it)")]
    if fids:
        best = min(fids, key=lambda r: r["fid"])
        rows.append(("FID", f"{best['fid']:.2f} at {best['kimg']:g} kimg", f"the best snapshot's, {best['n']} samples"))
    return rows


def write_report(folder):
    """report.html in a run folder, from the files beside it: the run, its scores, its curves, the
    segmentation, what each layer hides and the grids, latest first. Written atomically -> its path."""
    folder, h = Path(folder), html.escape
    cfg, stats, fids = read_config(folder) or {}, read_log(folder / "stats.jsonl"), read_log(folder / "fid.jsonl")
    results, about, last = read_results(folder), cfg.get("about", {}), (stats or [{}])[-1]
    header = [("dataset", f"{cfg.get('dataset')} {cfg.get('data_root', '')}, {cfg.get('resolution')} px, preset "
               f"{about.get('preset', '?')}"),
              ("progress", f"{last.get('kimg', 0):g} of {cfg.get('total_kimg', '?')} kimg"),
              ("device", f"{about.get('device', '?')}, {about.get('workers', '?')}, precision {cfg.get('amp')}"),
              ("code", f"{about.get('code', '?')}, torch {about.get('torch', '?')}"),
              ("time", f"{last.get('train_sec', 0) / 60:.1f} min of training" if last else "not started")]
    rows = scores_table(results, fids)
    col = {k: [(r["kimg"], r[k]) for r in stats if isinstance(r.get(k), (int, float))] for k in
           ("loss_G", "loss_D", "loss_adv", "loss_ils", "w_ils", "ada_p", "ada_rt", "mask_area", "mask_binary", "r1")}
    flags = [(r["kimg"], " ".join(r["flags"])) for r in stats if r.get("flags")]
    warmup = [("x", cfg["ils_warmup"] * cfg["total_kimg"], "ILS warm-up ends")] if "ils_warmup" in cfg else []
    charts = [svg_chart("Losses", {k: col[k] for k in ("loss_G", "loss_D", "loss_adv")}, "loss (nats)", marks=flags),
              svg_chart("ILS, Eq. (12), and its weight", {k: col[k] for k in ("loss_ils", "w_ils")}, "nats; weight",
                        warmup, flags),
              svg_chart("ADA: p, and r_t = E[sign D(x_real)] against its target", {k: col[k] for k in ("ada_p", "ada_rt")},
                        "probability; r_t", [("y", cfg.get("ada_target", 0.6), f"target {cfg.get('ada_target', 0.6):g}")], flags),
              svg_chart("The masks: mean area against eta, binarisation", {k: col[k] for k in ("mask_area", "mask_binary")},
                        "fraction of the image", [("y", cfg.get("eta", 0.25), f"eta {cfg.get('eta', 0.25):g}")], flags),
              svg_chart("R1, the gradient penalty", {"r1": col["r1"]}, "squared gradient norm")]
    if fids:
        charts.append(svg_chart("FID", {"fid": [(r["kimg"], r["fid"]) for r in fids]}, "FID (lower is better)"))
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ILSGAN run {h(folder.name)}</title>"
             f"<style>{CSS}</style></head><body><h1>ILSGAN run <code>{h(str(folder))}</code></h1><dl>"
             + "".join(f"<dt>{h(k)}</dt><dd>{h(str(v))}</dd>" for k, v in header) + "</dl><h2>Scores</h2>"
             + ("<table><tr><th>measure</th><th>value</th><th>what it means</th></tr>" + "".join(
                 f"<tr><td>{h(a)}</td><td>{h(b)}</td><td>{h(c)}</td></tr>" for a, b, c in rows) + "</table>" if rows else
                "<p>Not yet: the U-Net and MINE score the run after training.</p>"),
             "<h2>Curves</h2><p>Means over each log step; red ticks: the collapse watch's flags.</p>",
             f"<div class='charts'>{''.join(charts)}</div>"]
    for name, title, text in [("segmentation.png", "Segmentation", "Test images, the U-Net's outlines in red, the true "
                               "ones in green."), ("hidden.png", "What each layer hides", "For the grid's latents: the "
                               "composite, f_inv = f(1-m) and b_inv = b m (Eq. 10), grey where visible. An echo of the "
                               "object in b_inv is the leakage ILS is meant to remove.")]:
        if (folder / name).is_file():
            parts.append(f"<h2>{title}</h2><p>{text}</p><img src='{name}' alt='{title}'>")
    grids = sorted((p for p in folder.iterdir() if GRID.fullmatch(p.name)), reverse=True)
    parts.append("<h2>Grids of fixed latents, latest first</h2>" + "".join(
        f"<figure><figcaption>{float(g.name[5:-8]):g} kimg</figcaption><img src='{g.name}' alt='{g.name}'></figure>"
        for g in grids) + "</body></html>\n")
    write_text(folder / "report.html", "".join(parts))
    return folder / "report.html"
