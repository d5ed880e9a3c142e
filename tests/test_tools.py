"""The tools in scripts/: the classroom kit (every equation's tests catch a blank and a plausible mistake,
the README's table is its map, a student copy grades 0 blanked and full marks restored, with the
instructor's tests and a bound on each function's time); the ablation (its table, its runs, the
records in docs); the benchmark and the GPU check at tiny size; prepare_data on fake downloads; every
script's refusals as one line."""
import importlib
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import ilsgan
import mine
import runs
from conftest import ENV, ROOT, fails, refused

sys.path.insert(0, str(ROOT / "scripts"))
import ablation  # noqa: E402
import assignment  # noqa: E402
import prepare_data  # noqa: E402

# --- the classroom kit --------------------------------------------------------------------------------

ORIGINAL = {name: getattr({"ilsgan": ilsgan, "mine": mine}[module], name) for name, (_, module, _) in assignment.FUNCTIONS.items()}


def _ils_mi_wrong_regions(f, b, m, separate=True, opt_vis=True, opt_mask=True, q="laplace"):
    if not separate:
        return ilsgan.club(b, f, torch.randperm(f.shape[0]), q)
    perm1, perm2 = torch.randperm(f.shape[0]), torch.randperm(f.shape[0])
    return ilsgan.club(b * (1 - m), f * m, perm1, q) + ilsgan.club(f * (1 - m), b * m, perm2, q)  # b's regions swapped


# Plausible mistakes, one or more per function of the map: what a student might write instead.
MISTAKES = {
    "composite": {"layers swapped": lambda f, b, m: m * b + (1 - m) * f},
    "g_adversarial_loss": {"saturating sign": lambda d: F.softplus(d).mean()},
    "d_adversarial_loss": {"real and fake swapped": lambda r, f: F.softplus(r).mean() + F.softplus(-f).mean()},
    "random_shifts": {"fraction not scaled by width": lambda batch, width, max_frac, device: tuple(
        torch.round((torch.rand(2, batch) * 2 - 1) * max_frac).long())},
    "shift_image": {"shifted the wrong way": lambda x, dx, dy: ORIGINAL["shift_image"](x, -dx, -dy)},
    "perturbed_composite": {"background shifted too": lambda f, b, m, dx, dy: (
        ilsgan.composite(ilsgan.shift_image(f, dx, dy), ilsgan.shift_image(b, dx, dy), ilsgan.shift_image(m, dx, dy)),
        ilsgan.shift_image(f, dx, dy), ilsgan.shift_image(m, dx, dy))},
    "mask_area_loss": {"hinge flipped": lambda m, eta: F.relu(m.mean(dim=[1, 2, 3]) - eta).mean()},
    "binarization_loss": {"max for min": lambda m: torch.maximum(m, 1 - m).mean()},
    "r1_penalty": {"norm, not squared": lambda d, x: torch.autograd.grad(d.sum(), x, create_graph=True)[0]
                   .flatten(1).norm(dim=1).mean()},
    "ils_weight": {"warm-up weight after the warm-up": lambda kimg, cfg: (
        cfg.lambda_ils if kimg <= cfg.ils_warmup * cfg.total_kimg else cfg.ils_warmup_weight)},
    "club": {"positive and negative pairs swapped": lambda x, y, perm, q="laplace": -ORIGINAL["club"](x, y, perm, q),
             "Laplace distance squared": lambda x, y, perm, q="laplace": ORIGINAL["club"](x, y, perm, "gaussian")},
    "ils_mi_loss": {"the wrong regions paired (Eq. 11)": _ils_mi_wrong_regions,
                    "ablation switches ignored": lambda f, b, m, **k: ORIGINAL["ils_mi_loss"](f, b, m)},
    "gate_gradients": {"no gate": lambda t: t},
    "ils_l1_loss": {"no stop-gradient on the visible layer (Eq. 13)": lambda f, b, m: (
        -((b - f).abs() * m.detach()).mean() - ((f - b).abs() * (1 - m.detach())).mean())},
    "modulated_conv2d": {"demodulation left out": lambda x, w, s, demodulate=True, up_filter=None:
                         ORIGINAL["modulated_conv2d"](x, w, s, False, up_filter)},
    "ada_adjust": {"sign reversed": lambda p, r, target, batch, interval, ada_kimg:
                   ORIGINAL["ada_adjust"](p, 2 * target - r, target, batch, interval, ada_kimg)},
    "dv_bound": {"mean for log-mean-exp": lambda t_joint, t_marg: t_joint.mean() - t_marg.mean()},
}


def blanked(*args, **kwargs):
    raise NotImplementedError("blank")


def caught(name, replacement, monkeypatch):
    """Do `name`'s tests fail with `replacement` in its place? (at least one of them must)"""
    _, module, tests = assignment.FUNCTIONS[name]
    with monkeypatch.context() as mp:
        mp.setattr({"ilsgan": ilsgan, "mine": mine}[module], name, replacement)
        for test in tests:
            file, fn = test.split("::")
            try:
                torch.manual_seed(0)
                getattr(importlib.import_module(file[:-3]), fn)()
            except Exception:  # an assertion, or the blank's NotImplementedError
                return True
    return False


def test_every_function_of_the_map_has_mistakes_to_catch():
    assert set(MISTAKES) == set(assignment.FUNCTIONS)


@pytest.mark.parametrize("name", list(assignment.FUNCTIONS))
def test_its_tests_catch_a_blank_and_each_plausible_mistake(name, monkeypatch):
    assert not caught(name, ORIGINAL[name], monkeypatch), "the tests fail on the real function"
    assert caught(name, blanked, monkeypatch), "a blank body passes the tests"
    missed = [what for what, wrong in MISTAKES[name].items() if not caught(name, wrong, monkeypatch)]
    assert not missed, f"the tests of {name} pass with: {missed}"


def test_the_readme_table_is_the_map_and_a_blank_keeps_signature_and_docstring():
    assert assignment.readme_table() in (ROOT / "README.md").read_text()
    src = (ROOT / "ilsgan.py").read_text()
    out = assignment.blank(src, "club", "Eq. (7)-(9)")
    ns = {}
    exec(compile(out, "ilsgan_student.py", "exec"), ns)  # the copy still imports and defines club
    assert ns["club"].__doc__ == ilsgan.club.__doc__
    with pytest.raises(NotImplementedError, match=r"Eq. \(7\)-\(9\): write club"):
        ns["club"](torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(2))


@pytest.mark.slow
def test_a_student_copy_grades_zero_blanked_and_full_marks_restored_with_the_instructors_tests(tmp_path):
    """A student who rewrites the tests or adds a conftest.py that passes everything still scores 0 with
    a blank: the grader runs the instructor's tests against the student's modules; a body that never
    returns scores 0 within the time bound."""
    out, script = tmp_path / "hw", [sys.executable, str(ROOT / "scripts" / "assignment.py")]
    r = subprocess.run([*script, "club", "mask_area_loss", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and runs.read_json(out / "ASSIGNMENT.json")["functions"].keys() == {"club", "mask_area_loss"}
    tests = out / "tests" / "test_equations.py"
    tests.write_text(tests.read_text().replace("def test_club_is_zero", "def _hidden_club_is_zero")
                     + "\ndef test_club_is_zero_for_independent_and_large_for_copied_layers():\n    pass\n")
    (out / "conftest.py").write_text("import pytest\n@pytest.hookimpl(tryfirst=True)\ndef pytest_runtest_call(item):\n"
                                     "    return True\n")
    r = subprocess.run([*script, "--grade", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "score: 0/2 functions" in r.stdout and "the instructor's tests" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(out / "scripts" / "assignment.py"), "--grade"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 1 and f"from {ROOT}" in r.stdout, r.stdout + r.stderr  # from the project the copy was made from
    src = (ROOT / "ilsgan.py").read_text()
    (out / "ilsgan.py").write_text(src.replace('    """Eq. (4), L_m: max(0', '    while True:\n        pass\n    """Eq. (4), L_m: max(0'))
    assert assignment.grade(out, timeout=20) is False  # club restored, mask_area_loss loops: 1 of 2
    (out / "ilsgan.py").write_text(src)  # the answers pasted back
    r = subprocess.run([*script, "--grade", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "score: 2/2 functions" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"functions": {"train": "Eq. (5)"}}', '{"functions": {"club": 3}}'])
def test_a_garbage_assignment_record_is_one_line(tmp_path, text):
    (tmp_path / "ASSIGNMENT.json").write_text(text)
    refused("--grade", tmp_path, script="scripts/assignment.py", says="is not an assignment record")


def test_the_project_is_never_the_student_copy(tmp_path):
    refused("club", "--out", ROOT / "hw", script="scripts/assignment.py", says="inside the project")
    refused("train", "--out", tmp_path / "hw", script="scripts/assignment.py", says="not gradable")
    (tmp_path / "file").write_text("")
    refused("club", "--out", tmp_path / "file" / "hw", script="scripts/assignment.py", says="lies below a file")


# --- the ablation --------------------------------------------------------------------------------------

def fake_run(folder, iou, mi_sum, flags=(), cpu="CPU A"):
    folder.mkdir(parents=True)
    (folder / "machine.json").write_text(json.dumps(dict(cpu=cpu, torch="2.x", threads=1, code="abc1234")))
    seg = dict(test=dict(iou=iou, dice=iou + 0.05), baselines={}, n_test=10, kimg=1.0, protocol="U-Net")
    mi = dict(nats={"b_inv;f_vis": mi_sum / 2, "b_vis;f_inv": mi_sum / 2, "sum (Eq. 11)": mi_sum, "b;f": 0.5}, protocol="MINE")
    (folder / "results.json").write_text(json.dumps(dict(segmentation=seg, mi=mi)))
    (folder / "stats.jsonl").write_text(json.dumps(dict(kimg=1.0, flags=list(flags))) + "\n")


def test_the_table_means_paired_differences_and_runs_of_ones_own(tmp_path, capsys):
    for seed, (iou, mi) in enumerate([(0.80, 3.0), (0.90, 3.2), (0.85, 2.8)]):
        fake_run(tmp_path / f"full-seed{seed}", iou, mi)
    for seed, (iou, mi) in enumerate([(0.70, 4.0), (0.95, 3.0)]):  # seed 2 never finished
        fake_run(tmp_path / f"no-ils-seed{seed}", iou, mi, flags=["mask-fixed"] if seed else [], cpu="CPU B" if seed else "CPU A")
    ablation.main(["--table-only", "--out", str(tmp_path), "--variants", "full", "no-ils", "--seeds", "0", "1", "2"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out[:out.index("Paired")].splitlines()
            if line.startswith("| full") or line.startswith("| no-ils")}
    assert rows["full"][:2] == ["3", "0.850 ± 0.050"] and rows["full"][-1] == "0"
    assert rows["no-ils"][:2] == ["2", "0.825 ± 0.177"] and rows["no-ils"][-1] == "1"
    cells = [c.strip() for c in next(x for x in out.splitlines() if x.startswith("| no-ils | 0 1 |")).split("|")[1:-1]]
    assert cells[2:] == ["-0.100 / +0.050", "-0.025", "1 of 2", "+1.000 / -0.200", "+0.400", "1 of 2"]
    assert (tmp_path / "ablation.md").read_text() in out and "Runs from 2 machines or code versions" in out
    for seed, iou in enumerate([0.9, 0.3, 0.95]):
        fake_run(tmp_path / f"lr4-seed{seed}", iou, 3.0, flags=["swapped"] if iou < 0.5 else [])
    ablation.main(["--table-only", "--variant", "lr4=--lr 0.004", "--variants", "lr4", "--seeds", "0", "1", "2", "3",
                   "--per-run", "--success", "0.85", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| lr4-seed1 | 0.300 | 0.350 |" in out and "| swapped |" in out and "lr4: 2 of 3 runs reach IoU 0.85; mean 0.717" in out


@pytest.mark.slow
def test_the_ablation_runs_two_variants_over_two_seeds_at_tiny_size_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "ablation.py"), "--variants", "full", "no-ils", "--seeds", "0", "1",
           "--out", str(tmp_path), "--jobs", "2", "--preset", "tiny", "--total-kimg", "0.05", "--evaluate", "--eval-preset", "tiny"]
    killed = tmp_path / "full-seed0"  # a run killed before its first snapshot: started again, not refused
    killed.mkdir()
    (killed / "config.json").write_text('{"run_id": "killed"}')
    (killed / "stats.jsonl").write_text("")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0 and "exit" not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert all({"segmentation", "mi"} <= set(runs.read_results(tmp_path / f"{v}-seed{s}")) for v in ("full", "no-ils") for s in (0, 1))
    config = runs.read_config(tmp_path / "no-ils-seed1")
    assert config["ils"] == "none" and config["seed"] == 1 and runs.read_json(tmp_path / "no-ils-seed1" / "machine.json")["threads"] == 1
    assert "All runs on one machine and code: " in r.stdout and "| no-ils | 0 1 |" in r.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)  # resumable: nothing left to run
    assert "4 of 4 runs have their results; running 0" in again.stdout


def test_the_hidden_grid_draws_four_rows_per_run(tiny_run, tmp_path):
    ablation.main(["--out", str(tiny_run.parent), "--hidden-grid", tiny_run.name, str(tiny_run)])
    w, h = Image.open(tiny_run.parent / "hidden.png").size
    assert (w, h) == (110 + 8 * (64 + 2), 8 * (64 + 2) + 2)  # 2 runs x 4 rows of 8 cells of 64 px, labels on the left


@pytest.mark.parametrize("flags, says", [(["--jobs", "0"], "--jobs must be 1 or more"), (["--out", ""], "--out a folder"),
                                         (["--seeds", "-1"], "--seeds between 0"),
                                         (["--variants", "nope"], "--variants nope: not one of"),
                                         (["--variant-s", "full"], "--variant-s full: not a flag of --table-only")])
def test_the_ablation_refuses_what_it_cannot_run(tmp_path, flags, says):
    refused("--table-only", "--out", tmp_path, *flags, script="scripts/ablation.py", says=says)
    (tmp_path / "full-seed0").mkdir()
    (tmp_path / "full-seed0" / "results.json").write_text("[1, 2")
    refused("--table-only", "--out", tmp_path, "--variants", "full", script="scripts/ablation.py", says="full-seed0/results.json")


LEAKAGE = sorted(f"leakage/{p.name}" for p in (ROOT / "docs" / "leakage").glob("*") if p.is_dir())


@pytest.mark.parametrize("record", ["ablation", "five-seeds", *LEAKAGE])
def test_the_tables_of_the_docs_are_their_records_in_docs(tmp_path, capsys, record):
    """Every figure of docs/results.md's tables comes from `ablation.py --table-only` on the records kept in docs."""
    shutil.copytree(ROOT / "docs" / record, tmp_path / record, ignore=shutil.ignore_patterns("*.png", "*.svg", "*.html"))
    flags = {"ablation": [], "five-seeds": ["--variants", "full", "--seeds", "0", "1", "2", "3", "4", "--per-run", "--success", "0.8"]
             }.get(record, ["--variants", "full", "no-ils"])
    ablation.main(["--table-only", "--out", str(tmp_path / record), *flags])
    out = capsys.readouterr().out
    table = out[out.index("| variant"):]
    assert (ROOT / "docs" / record / "ablation.md").read_text() in table
    results = (ROOT / "docs" / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") or "reach IoU" in line]
    if record == "five-seeds":
        lines = [line for line in lines if line.startswith("| full-seed") or "reach IoU" in line]
    assert lines and all(line in results for line in lines), [line for line in lines if line not in results]


# --- the benchmark and the GPU check --------------------------------------------------------------------------

@pytest.mark.slow
def test_the_benchmark_prints_speed_and_memory_of_each_precision_side_by_side(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "tiny", "--seconds", "0.5", "--device", "cpu",
                        "--amp", "off,bf16"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("tiny")]
    assert [row[3] for row in rows] == ["off", "bf16"] and rows[0][7] == "1.00x"
    for row in rows:
        ips, sec_kimg, peak_mb = float(row[4]), float(row[5]), float(row[6])
        assert ips > 0 and sec_kimg == pytest.approx(1000 / ips, rel=0.01, abs=0.006) and peak_mb > 0
    assert list(tmp_path.iterdir()) == []  # writes nothing


@pytest.mark.parametrize("flags, says", [(["bogus"], "bogus: presets are"), (["--amp", "fp32"], "fp32: presets are"),
                                         (["--seconds", "nan"], "--seconds nan"), (["--seconds", "inf"], "--seconds inf"),
                                         (["tiny", "--batch", "0"], "--batch 0: must be positive"),
                                         (["tiny", "--resolution", "24"], "--resolution 24: must be a power of two")])
def test_the_benchmark_refuses_what_it_cannot_time(flags, says):
    refused(*flags, script="scripts/benchmark.py", says=says)


# --- prepare_data on small fake downloads ---------------------------------------------------------------------

def tar_of(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


@pytest.fixture
def cub_downloads(tmp_path):
    src = tmp_path / "src"
    root, segs = src / "CUB_200_2011", src / "segmentations"
    names = ["001.A/a_1", "001.A/a_2", "002.B/b_1", "002.B/b_2"]
    root.mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i + 1} {n}.jpg\n" for i, n in enumerate(names)))
    (root / "bounding_boxes.txt").write_text("".join(f"{i + 1} 4.0 4.0 20.0 16.0\n" for i in range(4)))
    (root / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n4 0\n")
    for i, n in enumerate(names):
        (root / "images" / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / f"images/{n}.jpg")
        m = np.zeros((32, 40), np.uint8)
        m[4:20, 4:24] = 255
        (segs / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(segs / f"{n}.png")
    (tmp_path / "split.txt").write_text("1 0\n2 1\n3 2\n4 0\n")
    return tar_of(root, tmp_path / "CUB_200_2011.tgz"), tar_of(segs, tmp_path / "segmentations.tgz"), tmp_path / "split.txt"


def test_the_cub_rebuild_is_the_layout_the_loader_reads(cub_downloads, tmp_path, capsys):
    cub, segs, split = cub_downloads
    out = tmp_path / "birds"
    prepare_data.main(["cub", "--cub", str(cub), "--segmentations", str(segs), "--split", str(split), "--out", str(out),
                       "--check-resolution", "16"])
    assert "test: images (1, 3, 16, 16) uint8, masks (1, 1, 16, 16)" in capsys.readouterr().out  # checked at the end
    assert len(data.load("cub", str(out), 16, "train")[0]) == 2  # ids 1 and 4: split 0
    record = runs.read_json(out / "PREPARED.json")
    assert record["images"] == 4 and record["split_file"] == "train_val_test_split.txt"
    assert not (tmp_path / "birds.partial").exists() and not (out / "downloads").exists()
    prepare_data.main(["cub", "--check", str(out), "--check-resolution", "16"])
    assert "train: images (2, 3, 16, 16) uint8, no masks" in capsys.readouterr().out


def test_prepare_data_names_what_is_missing_or_refused(cub_downloads, tmp_path):
    cub, _, _ = cub_downloads
    segs = tmp_path / "src/segmentations"
    (segs / "002.B/b_2.png").unlink()
    refused("cub", "--cub", cub, "--segmentations", segs, "--out", tmp_path / "birds", script="scripts/prepare_data.py",
            says="b_2.png is missing (1 of 4 segmentations are)")
    assert not (tmp_path / "birds").exists()  # nothing that looks complete
    (segs / "002.B/b_2.png").write_bytes((segs / "002.B/b_1.png").read_bytes())
    (segs / "002.B/zero.png").symlink_to("/dev/zero")  # a link in the input is never followed
    refused("cub", "--cub", cub, "--segmentations", segs, "--out", tmp_path / "birds", script="scripts/prepare_data.py",
            says="zero.png is not a regular file")
    for flags, says in [(["--min-score", "2"], "--min-score 2: must be in [0, 1]"),
                        (["--check-resolution", "-5"], "--check-resolution -5: must be 0 or a power of two"),
                        (["--out", segs / "birds"], "lie one inside the other")]:
        refused("cub", "--cub", cub, "--segmentations", segs, *(["--out", tmp_path / "b2"] if "--out" not in flags else []),
                *flags, script="scripts/prepare_data.py", says=says)


@pytest.mark.slow
def test_a_truncated_archive_is_one_clear_line(cub_downloads, tmp_path):
    cub, segs, _ = cub_downloads
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(cub.read_bytes()[: len(cub.read_bytes()) // 2])
    r = fails("cub", "--cub", cut, "--segmentations", segs, "--out", tmp_path / "birds", script="scripts/prepare_data.py",
              says="not a readable archive")
    assert r.stderr.startswith(f"error: {cut}: not a readable archive"), r.stderr


def test_tar_members_outside_the_folder_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(runs.InputError, match="not a readable archive"):
        prepare_data.unpack(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


class Stub:
    """Detections for a known image: a `car`/`dog` instance over the object's box, with a known mask.
    Images with a black top-left corner get no detection (they must be dropped)."""

    def __init__(self, class_id):
        self.class_id = class_id

    def __call__(self, images):
        out = []
        for img in images:
            _, H, W = img.shape
            if img[:, 1, 1].sum() < 0.1:
                out.append(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0),
                                masks=torch.zeros(0, 1, H, W)))
                continue
            mask = torch.zeros(1, 1, H, W)
            mask[..., 8:24, 10:30] = 1.0
            out.append(dict(boxes=torch.tensor([[10.0, 8.0, 30.0, 24.0], [0.0, 0.0, 5.0, 5.0]]),
                            labels=torch.tensor([self.class_id, self.class_id]), scores=torch.tensor([0.99, 0.999]),
                            masks=torch.cat([mask, torch.ones(1, 1, H, W)])))
        return out


@pytest.fixture
def cars_args(tmp_path, monkeypatch):
    """Stanford Cars as downloaded (a train archive, a test folder, the devkit's .mat files) -> the
    prepare_data arguments for it; the third training image gets no detection."""
    scipy_io = pytest.importorskip("scipy.io")

    def load(weights, device):
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
        model.forward = Stub(prepare_data.COCO_CLASS["cars"][1])  # a real model, stubbed detections
        return model, "stub"
    monkeypatch.setattr(prepare_data, "load_detector", load)
    src = tmp_path / "src"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            a = np.random.default_rng(i).integers(30, 255, (32, 40, 3), dtype=np.uint8)
            a[:6, :6] = 0 if (split == "train" and i == 2) else a[:6, :6]
            (src / f"cars_{split}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(src / f"cars_{split}/{i + 1:05d}.jpg", quality=100)
        annos = np.zeros(n, dtype=[(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")])
        for i in range(n):
            annos[i] = (11, 9, 29, 23, 1, f"{i + 1:05d}.jpg")
        (src / "devkit").mkdir(exist_ok=True)
        scipy_io.savemat(src / f"devkit/cars_{split}_annos.mat", {"annotations": annos})
    return ["cars", "--images", str(tar_of(src / "cars_train", tmp_path / "cars_train.tgz")), str(src / "cars_test"),
            "--devkit", str(src / "devkit"), "--device", "cpu", "--check-resolution", "16"]


@pytest.mark.slow
def test_cars_end_to_end_and_an_interrupted_build_continues_where_it_stopped(tmp_path, cars_args, monkeypatch):
    out, real_save, saved = tmp_path / "cars", prepare_data.save_png, []

    def save_then_die(array, path):
        real_save(array, path)
        saved.append(path)
        if len(saved) == 5:  # the second image's crop written, its mask not yet
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main([*cars_args, "--out", str(out)])
    assert not out.exists() and (tmp_path / "cars.partial/data_mrcnn/train/resized/00001_maskresized.png").is_file()
    monkeypatch.setattr(prepare_data, "save_png", real_save)
    prepare_data.main([*cars_args, "--out", str(out)])
    record = runs.read_json(out / "PREPARED.json")
    assert record["counts"]["train"]["kept"] == 2 and record["counts"]["train"]["dropped"] == 1
    assert list(np.load(out / "data_mrcnn_train_select.npy")) == ["00001", "00002"]
    x, m = data.load("cars", str(out), 16, "test")
    crop = data.drc_crop(11, 9, 18, 14, 40, 32)  # the annotated box; the stub's mask is [10:30] x [8:24]
    expect = np.zeros((32, 40))
    expect[8:24, 10:30] = 1
    expect = np.asarray(Image.fromarray((expect * 255).astype(np.uint8)).crop(crop).resize((16, 16), Image.NEAREST)) > 127
    assert np.array_equal(m[0, 0].numpy(), expect)  # the highest-scoring instance off the box was passed over
