"""scripts/ablation.py end to end at tiny size: runs the variants over seeds, then tabulates them."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def fake_run(folder, iou, mi_sum, flags=(), cpu="CPU A"):
    folder.mkdir(parents=True)
    (folder / "machine.json").write_text(json.dumps(dict(cpu=cpu, torch="2.x", threads=1, code="abc1234")))
    seg = dict(test=dict(iou=iou, dice=iou + 0.05))
    mi = dict(nats={"vis_fg;inv_bg": mi_sum / 2, "vis_bg;inv_fg": mi_sum / 2, "sum (Eq. 11)": mi_sum, "whole f;b": 0.5})
    (folder / "results.json").write_text(json.dumps(dict(segmentation=seg, mi=mi)))
    (folder / "stats.jsonl").write_text(json.dumps(dict(flags=list(flags))) + "\n")


def test_table_means_and_paired_differences(tmp_path):
    for seed, (iou, mi) in enumerate([(0.80, 3.0), (0.90, 3.2), (0.85, 2.8)]):
        fake_run(tmp_path / f"full-seed{seed}", iou, mi)
    for seed, (iou, mi) in enumerate([(0.70, 4.0), (0.95, 3.0)]):  # seed 2 never finished
        fake_run(tmp_path / f"no-ils-seed{seed}", iou, mi, flags=["mask-fixed"] if seed else [],
                 cpu="CPU B" if seed else "CPU A")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", "--out", str(tmp_path),
                        "--variants", "full", "no-ils", "--seeds", "0", "1", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    means = r.stdout[:r.stdout.index("Paired")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in means.splitlines()
            if line.startswith("| full") or line.startswith("| no-ils")}
    assert rows["full"][:2] == ["3", "0.850 ± 0.050"] and rows["full"][-1] == "0"
    assert rows["no-ils"][:2] == ["2", "0.825 ± 0.177"] and rows["no-ils"][-1] == "1"
    paired = next(line for line in r.stdout.splitlines() if line.startswith("| no-ils | 0 1 |"))
    cells = [c.strip() for c in paired.split("|")[1:-1]]
    assert cells[2:] == ["-0.100 / +0.050", "-0.025", "1 of 2", "+1.000 / -0.200", "+0.400", "1 of 2"]
    assert (tmp_path / "ablation.md").read_text() in r.stdout
    assert "Runs from 2 machines or code versions" in r.stdout and "CPU B, torch 2.x, code abc1234" in r.stdout


@pytest.mark.slow
def test_ablation_runs_two_variants_over_two_seeds_at_tiny_size(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "ablation.py"), "--variants", "full", "no-ils", "--seeds", "0", "1",
           "--out", str(tmp_path), "--jobs", "2", "--preset", "tiny", "--kimg", "0.05", "--evaluate",
           "--eval-preset", "tiny"]
    killed = tmp_path / "full-seed0"  # a run killed before its first snapshot: started again, not refused
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    (killed / "stats.jsonl").write_text("")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "exit" not in r.stdout, r.stdout
    for v in ("full", "no-ils"):
        for s in (0, 1):
            results = json.loads((tmp_path / f"{v}-seed{s}" / "results.json").read_text())
            assert {"segmentation", "mi"} <= set(results)
    config = json.loads((tmp_path / "no-ils-seed1" / "config.json").read_text())
    assert config["ils"] == "none" and config["seed"] == 1
    assert json.loads((tmp_path / "no-ils-seed1" / "machine.json").read_text())["threads"] == 1
    assert "All runs on one machine and code: " in r.stdout
    assert "| full | 2 |" in r.stdout and "| no-ils | 2 |" in r.stdout and "| no-ils | 0 1 |" in r.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # resumable: nothing left to run
    assert "4 of 4 runs already have their results; running 0" in again.stdout


def test_hidden_grid_draws_four_rows_per_run(tiny_run, tmp_path):
    from PIL import Image
    sys.path.insert(0, str(ROOT / "scripts"))
    import ablation
    out, cfg = tiny_run
    ablation.hidden_grid([out, out], tmp_path / "hidden.png", n=4)
    w, h = Image.open(tmp_path / "hidden.png").size
    cell = cfg.resolution * -(-64 // cfg.resolution)  # cells of 64 px or more, upscaled by a whole factor
    assert (w, h) == (110 + 4 * (cell + 2), 8 * (cell + 2) + 2)  # 2 runs x 4 rows of 4, labels on the left


def test_run_options_take_a_run_name_under_out(tiny_run):
    out, _ = tiny_run
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--out", str(out.parent),
                        "--hidden-grid", out.name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out.parent / "hidden.png").exists()


def test_mask_share_measures_the_eq11_pairs_as_mine_does(tiny_run):
    import ilsgan
    import mine
    sys.path.insert(0, str(ROOT / "scripts"))
    import ablation
    out, _ = tiny_run
    row, = ablation.mask_share([out], preset="tiny")
    mc = mine.make_config("tiny", ckpt=str(out), device="cpu")
    _, G, _ = ilsgan.load_generator(ilsgan.find_checkpoint(out, best=True), "cpu")
    pairs = mine.layer_pairs(*mine.generated_layers(G, mc.n, mc.res, mc.seed))
    for ours, theirs in (("vis fg ; hidden bg", "vis_fg;inv_bg"), ("vis bg ; hidden fg", "vis_bg;inv_fg")):
        assert row[ours] == mine.estimate_mi(*pairs[theirs], mc)[0]  # the same pairs, the same estimator
    assert row["vis fg ; mask"] != row["vis fg ; hidden bg"]  # a different pair, not a copy
    assert 0 <= row["hidden f outside [-1, 1]"] <= 1 and row["hidden f median |value|"] >= 0


def test_the_ablation_table_of_the_docs_is_the_record_in_docs(tmp_path):
    """Every figure of docs/results.md's ablation table comes from `ablation.py --table-only --out docs/ablation`."""
    import shutil
    record = tmp_path / "ablation"  # a copy, so that the test writes nothing into the repository
    shutil.copytree(ROOT / "docs" / "ablation", record, ignore=shutil.ignore_patterns("*.pt", "*.png", "log.txt"))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", "--out", str(record)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "docs" / "ablation" / "ablation.md").read_text()
    assert r.stdout.strip() in (ROOT / "docs" / "results.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--report", "--out", str(record)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (record / "ablation-dots.svg").read_text() == (ROOT / "docs" / "ablation" / "ablation-dots.svg").read_text()
    assert "(ablation/ablation-dots.svg)" in (ROOT / "docs" / "results.md").read_text()


def test_per_run_table_and_successes_of_a_variant_of_ones_own(tmp_path):
    """--per-run lists each run (IoU, DICE, mask area, flags) and, with --success, counts the runs that
    reach it; --variant adds a named variant of one's own flags."""
    for seed, iou in enumerate([0.9, 0.3, 0.95]):
        fake_run(tmp_path / f"lr4-seed{seed}", iou, 3.0, flags=["swapped"] if iou < 0.5 else [])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", "--variant", "lr4=--lr 0.004",
                        "--variants", "lr4", "--seeds", "0", "1", "2", "3", "--per-run", "--success", "0.85",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| lr4-seed1 | 0.300 | 0.350 |" in r.stdout and "| swapped |" in r.stdout
    assert "| lr4-seed3 | (not finished) |" in r.stdout
    assert "lr4: 2 of 3 runs reach IoU 0.85; mean 0.717" in r.stdout


def test_the_five_seeds_of_the_docs_are_their_record(tmp_path):
    """docs/results.md's table of the default job's five seeds is what `ablation.py --per-run` prints from docs/five-seeds."""
    import shutil
    record = tmp_path / "five"
    shutil.copytree(ROOT / "docs" / "five-seeds", record)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", "--variants", "full",
                        "--per-run", "--success", "0.8", "--out", str(record)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    per_run = r.stdout[r.stdout.index("| run | test IoU"):].strip()
    assert per_run in (ROOT / "docs" / "results.md").read_text()
