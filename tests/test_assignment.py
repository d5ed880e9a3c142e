"""The classroom kit: every equation's tests catch a blank and a plausible mistake (a mutation check),
the README's table is the kit's map, and a student copy grades 0 blanked and full marks restored."""
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ilsgan
import mine
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import assignment  # noqa: E402

ORIGINAL = {name: getattr({"ilsgan": ilsgan, "mine": mine}[module], name)
            for name, (_, module, _) in assignment.FUNCTIONS.items()}


def _shift_wrong_way(x, dx, dy):
    return ORIGINAL["shift_image"](x, -dx, -dy)


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
    "shift_image": {"shifted the wrong way": _shift_wrong_way},
    "perturbed_composite": {"background shifted too": lambda f, b, m, dx, dy: (
        ilsgan.composite(ilsgan.shift_image(f, dx, dy), ilsgan.shift_image(b, dx, dy), ilsgan.shift_image(m, dx, dy)),
        ilsgan.shift_image(f, dx, dy), ilsgan.shift_image(m, dx, dy))},
    "mask_area_loss": {"hinge flipped": lambda m, eta: F.relu(m.mean(dim=[1, 2, 3]) - eta).mean()},
    "binarization_loss": {"max for min": lambda m: torch.maximum(m, 1 - m).mean()},
    "r1_penalty": {"norm, not squared": lambda d, x: torch.autograd.grad(d.sum(), x, create_graph=True)[0]
                   .flatten(1).norm(dim=1).mean()},
    "ils_weight": {"warm-up weight after the warm-up": lambda kimg, cfg: (
        cfg.lambda_ils if kimg <= cfg.ils_warmup * cfg.kimg else cfg.ils_warmup_weight)},
    "club": {"positive and negative pairs swapped": lambda x, y, perm, q="laplace": -ORIGINAL["club"](x, y, perm, q),
             "Laplace distance squared": lambda x, y, perm, q="laplace": ORIGINAL["club"](x, y, perm, "gaussian")},
    "ils_mi_loss": {"the wrong regions paired (Eq. 11)": _ils_mi_wrong_regions,
                    "ablation switches ignored": lambda f, b, m, **k: ORIGINAL["ils_mi_loss"](f, b, m)},
    "gate_gradients": {"no gate": lambda t: t},
    "ils_l1_loss": {"no stop-gradient on the visible layer (Eq. 13)": lambda f, b, m: (
        -((b - f).abs() * m.detach()).mean() - ((f - b).abs() * (1 - m.detach())).mean())},
    "modulated_conv2d": {"demodulation left out": lambda x, w, s, demodulate=True, fused=True, up_filter=None:
                         ORIGINAL["modulated_conv2d"](x, w, s, False, fused, up_filter)},
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


def test_the_readme_table_is_the_map():
    assert assignment.readme_table() in (ROOT / "README.md").read_text()


def test_blank_keeps_signature_and_docstring():
    src = (ROOT / "ilsgan.py").read_text()
    out = assignment.blank(src, "club", "Eq. (8)-(9)")
    ns = {}
    exec(compile(out, "ilsgan_student.py", "exec"), ns)  # the copy still imports and defines club
    assert ns["club"].__doc__ == ilsgan.club.__doc__
    with pytest.raises(NotImplementedError, match=r"Eq. \(8\)-\(9\): write club"):
        ns["club"](torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(2))
    assert out.count("\n") < src.count("\n") and "def ils_mi_loss(" in out


@pytest.mark.slow
def test_student_copy_grades_zero_blanked_and_full_marks_restored(tmp_path):
    out = tmp_path / "hw"
    script = [sys.executable, str(ROOT / "scripts" / "assignment.py")]
    r = subprocess.run([*script, "club", "mask_area_loss", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "ASSIGNMENT.json").read_text())["functions"].keys() == {"club", "mask_area_loss"}
    assert (ROOT / "ilsgan.py").read_text() != (out / "ilsgan.py").read_text()
    r = subprocess.run([*script, "--grade", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "score: 0/2 functions" in r.stdout, r.stdout + r.stderr
    assert "club" in r.stdout and "0/2 tests pass" in r.stdout
    (out / "ilsgan.py").write_text((ROOT / "ilsgan.py").read_text())  # the answers pasted back
    r = subprocess.run([*script, "--grade", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "score: 2/2 functions" in r.stdout, r.stdout + r.stderr


def test_the_project_is_never_the_student_copy(tmp_path):
    with pytest.raises(SystemExit, match="inside the project"):
        assignment.make_copy(["club"], ROOT / "hw")
    with pytest.raises(SystemExit, match="not gradable"):
        assignment.make_copy(["train"], tmp_path / "hw")


@pytest.mark.slow
def test_the_grader_tests_the_student_not_the_students_tests(tmp_path):
    """A student who rewrites the tests, or adds a conftest.py that passes everything, still scores 0
    with the function blank: the grader runs the instructor's tests against the student's modules."""
    out = tmp_path / "hw"
    script = [sys.executable, str(ROOT / "scripts" / "assignment.py")]
    assert subprocess.run([*script, "club", "--out", str(out)], capture_output=True, text=True).returncode == 0
    tests = out / "tests" / "test_equations.py"
    tests.write_text(tests.read_text().replace("def test_club_is_zero", "def _hidden_club_is_zero")
                     .replace("def test_club_known_answer", "def _hidden_club_known")
                     + "\ndef test_club_is_zero_for_independent_and_large_for_copied_layers():\n    pass\n"
                       "def test_club_known_answer_laplace_and_gaussian():\n    pass\n")
    (out / "conftest.py").write_text("import pytest\n@pytest.hookimpl(tryfirst=True)\ndef pytest_runtest_call(item):\n"
                                     "    return True\n")
    r = subprocess.run([*script, "--grade", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "score: 0/1 functions" in r.stdout and "the instructor's tests" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(out / "scripts" / "assignment.py"), "--grade"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 1 and "score: 0/1 functions" in r.stdout and f"from {ROOT}" in r.stdout, r.stdout + r.stderr
    record = json.loads((out / "ASSIGNMENT.json").read_text())
    record["source"] = str(tmp_path / "gone")  # the instructor's project is not reachable from the copy
    (out / "ASSIGNMENT.json").write_text(json.dumps(record))
    r = subprocess.run([sys.executable, str(out / "scripts" / "assignment.py"), "--grade"], cwd=out, capture_output=True, text=True)
    assert r.returncode != 0 and "this copy's tests were changed (tests/test_equations.py)" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"functions": {"train": "Eq. (5)"}}'])
def test_a_garbage_assignment_record_is_an_error(tmp_path, text):
    (tmp_path / "ASSIGNMENT.json").write_text(text)
    with pytest.raises(SystemExit, match="is not an assignment record"):
        assignment.grade(tmp_path)
