"""Classroom kit: turn equations into assignments and grade them with their tests.

    python scripts/assignment.py --list                              # the gradable functions
    python scripts/assignment.py club ils_mi_loss --out hw1          # a student copy with those blanked
    python scripts/assignment.py --grade hw1                          # a score per function, with this project's tests

A student copy is the whole project with the chosen functions' bodies replaced by
`raise NotImplementedError(...)`; their signatures and docstrings stay. It records the assignment in
ASSIGNMENT.json (with the project it came from and a hash of its tests), and `--grade` runs exactly
the tests of those functions, the instructor's (from the grading script's project, or the recorded one),
against the student's modules, and prints per function how many pass: tests the student changed or
added never run. The project's own files are never modified.

EQUATIONS is the one map from equation to function to test: the README's table is `readme_table()`
(checked by the test suite), and tests/test_tools.py checks that every function's
tests fail when its body is blanked and for a plausible mistake.
"""
import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runs import InputError, error_boundary  # noqa: E402

# (equation, what it is, [(module, function, [tests in tests/<file>::<name>])]), in the paper's order
EQUATIONS = [
    ("Eq. (1)", "`x = m*f + (1-m)*b`", [
        ("ilsgan", "composite", ["test_equations.py::test_composite_identities"])]),
    ("Eq. (2)", "adversarial loss (non-saturating)", [
        ("ilsgan", "g_adversarial_loss", ["test_equations.py::test_adversarial_losses_equal_binary_cross_entropy"]),
        ("ilsgan", "d_adversarial_loss", ["test_equations.py::test_adversarial_losses_equal_binary_cross_entropy"])]),
    ("Eq. (3)", "perturbed composition", [
        ("ilsgan", "random_shifts", ["test_equations.py::test_random_shifts_range"]),
        ("ilsgan", "shift_image", ["test_equations.py::test_shift_image_known_answer",
                                   "test_equations.py::test_perturbed_composite_moves_f_and_m_but_not_b"]),
        ("ilsgan", "perturbed_composite", ["test_equations.py::test_perturbed_composite_moves_f_and_m_but_not_b"])]),
    ("Eq. (4)", "`L_m`, `L_b`", [
        ("ilsgan", "mask_area_loss", ["test_equations.py::test_mask_area_loss_known_answers"]),
        ("ilsgan", "binarization_loss", ["test_equations.py::test_binarization_loss_known_answers"])]),
    ("Eq. (5)", "R1 and the ILS weight's warm-up (the objectives themselves: `train_step`)", [
        ("ilsgan", "r1_penalty", ["test_equations.py::test_r1_of_a_linear_discriminator_is_squared_weight_norm"]),
        ("ilsgan", "ils_weight", ["test_equations.py::test_ils_weight_schedule_matches_official_at_8000_kimg"])]),
    ("Eq. (7)-(9)", "CLUB with a Laplace `q`", [
        ("ilsgan", "club", ["test_equations.py::test_club_is_zero_for_independent_and_large_for_copied_layers",
                            "test_equations.py::test_club_known_answer_laplace_and_gaussian"])]),
    ("Eq. (10)-(12)", "ILS-MI on visible/hidden regions; Table 3's ablation switches", [
        ("ilsgan", "ils_mi_loss", ["test_equations.py::test_ils_mi_loss_equals_two_club_terms_on_regions",
                                   "test_equations.py::test_ils_mi_is_lower_for_independent_layers",
                                   "test_equations.py::test_ils_mi_ablation_switches_route_gradients"]),
        ("ilsgan", "gate_gradients", ["test_equations.py::test_ils_gradients_are_gated_outside_minus_one_one"])]),
    ("Eq. (13)", "ILS-L1", [
        ("ilsgan", "ils_l1_loss", ["test_equations.py::test_ils_l1_known_answer_and_detached_visible_layer"])]),
    ("StyleGAN2", "modulated conv (and its x2 upsampling)", [
        ("ilsgan", "modulated_conv2d", ["test_networks.py::test_modulated_conv_equals_the_per_sample_definition",
                                        "test_networks.py::test_demodulation_gives_unit_variance_outputs",
                                        "test_networks.py::test_upsampling_modulated_conv_equals_its_definition"])]),
    ("ADA", "p controller", [
        ("ilsgan", "ada_adjust", ["test_equations.py::test_ada_adjust_step_and_clamp"])]),
    ("MINE", "Donsker-Varadhan bound (`mine.py`)", [
        ("mine", "dv_bound", ["test_evaluations.py::test_dv_bound_known_answer"])]),
]
FUNCTIONS = {name: (eq, module, tests) for eq, _, rows in EQUATIONS for module, name, tests in rows}


def readme_table():
    """The README's 'Where each equation lives' table."""
    lines = ["| paper | function | tests |", "|---|---|---|"]
    for eq, what, rows in EQUATIONS:
        tests = dict.fromkeys(t for _, _, ts in rows for t in ts)  # in order, once each
        names = ", ".join(f"`{n}`" if m == "ilsgan" else f"`{m}.{n}`" for m, n, _ in rows)
        lines.append(f"| {eq} {what} | {names} | {', '.join('`' + t.split('::')[1] + '`' for t in tests)} |")
    return "\n".join(lines)


def blank(source, name, eq):
    """source with function `name`'s body replaced by a NotImplementedError; signature and docstring kept."""
    node = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise InputError(f"no function {name} in the source")
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    lines = source.splitlines(keepends=True)
    indent = re.match(r"\s*", lines[body[0].lineno - 1]).group()
    todo = f'{indent}raise NotImplementedError("{eq}: write {name} (its docstring says what it returns)")\n'
    return "".join(lines[: body[0].lineno - 1] + [todo] + lines[node.end_lineno:])


def test_hashes(project):
    """sha256 of every file of the project's tests (tests/*.py) and of its pytest.ini."""
    files = sorted((project / "tests").glob("*.py")) + [project / "pytest.ini"]
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def make_copy(names, out):
    unknown = [n for n in names if n not in FUNCTIONS]
    if unknown:
        raise InputError(f"not gradable: {', '.join(unknown)} (python scripts/assignment.py --list)")
    if not str(out).strip():
        raise InputError("--out is empty: give a folder for the student copy")
    out = Path(out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise InputError(f"--out {out} is inside the project; the student copy goes elsewhere")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the student copy")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise InputError(f"--out {out} lies below a file; give a folder")
    shutil.copytree(ROOT, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", "runs", "__pycache__", ".pytest_cache", "*.tmp", "*.pt", "ASSIGNMENT.json"))
    for name in names:
        eq, module, _ = FUNCTIONS[name]
        path = out / f"{module}.py"
        path.write_text(blank(path.read_text(), name, eq))
    record = dict(functions={n: FUNCTIONS[n][0] for n in names}, source=str(ROOT), tests=test_hashes(ROOT))
    (out / "ASSIGNMENT.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out}: {', '.join(names)} blanked. Grade with: python {ROOT / 'scripts' / 'assignment.py'} --grade {out}")


def read_assignment(folder):
    """A student copy's ASSIGNMENT.json -> its record; anything else is an error naming the file."""
    path = folder / "ASSIGNMENT.json"
    if not path.is_file():
        raise InputError(f"{folder} holds no ASSIGNMENT.json (run --grade inside a student copy, or give its folder)")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        names = record.get("functions") if isinstance(record, dict) else None
        if not isinstance(names, dict) or not names or any(n not in FUNCTIONS or not isinstance(e, str) for n, e in names.items()):
            raise ValueError("it names no gradable functions")
        if not isinstance(record.get("source"), (str, type(None))) or not isinstance(record.get("tests"), (dict, type(None))):
            raise ValueError("its source or tests are not a folder and hashes")
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not an assignment record ({e}); make the copy again with --out") from None
    return dict(functions=names, source=record.get("source"), tests=record.get("tests"))


def original_tests(folder, record):
    """The instructor's tests: this script's own project when it is not the student copy (the
    instructor grades with theirs), else the project the copy was made from if its tests are the ones
    recorded then, else the copy's own if they still are. -> (project folder, what to say)"""
    if ROOT != folder:
        return ROOT, f"the instructor's tests, from {ROOT}"
    recorded = record["tests"]
    source = Path(record["source"]) if record["source"] else None
    if source and source != folder and (source / "tests").is_dir() and (recorded is None or test_hashes(source) == recorded):
        return source, f"the instructor's tests, from {source}, which the copy was made from"
    now = test_hashes(folder)
    if recorded is not None and now == recorded:
        return folder, "this copy's tests, unchanged since it was made"
    changed = sorted(k for k in set(recorded or {}) | set(now) if (recorded or {}).get(k) != now.get(k))
    raise InputError(f"this copy's tests were changed ({', '.join(changed[:3]) or 'no record of them'}) and the "
                     f"originals are not here: grade it with the instructor's project: "
                     f"python /path/to/project/scripts/assignment.py --grade {folder}")


def grade(folder, timeout=300):
    """Run each assigned function's tests, the instructor's, against the student's modules, in a clean
    folder holding only those (the copy's own tests, conftest.py or pytest.ini never run), each
    function's within `timeout` seconds (a body that never returns scores 0); print passed/total per
    function; True if all pass."""
    folder = Path(folder).resolve()
    record = read_assignment(folder)
    names = record["functions"]
    project, said = original_tests(folder, record)
    modules = sorted(p.name for p in folder.glob("*.py"))  # the student's code
    if not {f"{FUNCTIONS[n][1]}.py" for n in names} | {"ilsgan.py"} <= set(modules):
        raise InputError(f"{folder} lacks the project's modules ({', '.join(modules) or 'it has none'}): grade a student copy")
    print(f"graded with {said}, against the student's {', '.join(sorted({FUNCTIONS[n][1] + '.py' for n in names}))}")
    total = 0
    with tempfile.TemporaryDirectory(prefix="grading-") as tmp:
        tmp = Path(tmp)
        (tmp / "tests").mkdir()
        for f in {t.split("::")[0] for n in names for t in FUNCTIONS[n][2]} | {"conftest.py"}:
            shutil.copyfile(project / "tests" / f, tmp / "tests" / f)
        shutil.copyfile(project / "pytest.ini", tmp / "pytest.ini")
        for m in modules:
            shutil.copyfile(folder / m, tmp / m)
        for name, eq in names.items():
            tests = FUNCTIONS[name][2]
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-c",
                                    str(tmp / "pytest.ini"), "--rootdir", str(tmp), *[f"tests/{t}" for t in tests]], cwd=tmp,
                                   capture_output=True, text=True, timeout=timeout,
                                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
                ok = [t for t in tests if t in set(re.findall(r"^PASSED tests/(\S+)", r.stdout, re.M))]
            except subprocess.TimeoutExpired:
                ok, eq = [], f"{eq} (did not finish in {timeout} s)"
            total += len(ok) == len(tests)
            print(f"{name:22s} {eq:14s} {len(ok)}/{len(tests)} tests pass")
    print(f"score: {total}/{len(names)} functions")
    return total == len(names)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("functions", nargs="*", help="functions to blank (see --list)")
    ap.add_argument("--out", help="folder for the student copy (new or empty)")
    ap.add_argument("--list", action="store_true", help="the gradable functions, their equations and tests")
    ap.add_argument("--grade", nargs="?", const=".", metavar="DIR", help="grade the student copy DIR (default: here)")
    args = ap.parse_args(argv)
    error_boundary(lambda: run(ap, args), lambda: "make the copy again into an empty --out, or run --grade again "
                   "(the project itself is never changed)")


def run(ap, args):
    if args.list:
        for eq, what, rows in EQUATIONS:
            for module, name, tests in rows:
                print(f"{name:20s} {module + '.py':10s} {eq} {what}\n{'':31s} tests: {', '.join(tests)}")
    elif args.grade:
        sys.exit(0 if grade(args.grade) else 1)
    elif args.functions and args.out:
        make_copy(args.functions, args.out)
    else:
        ap.error("give functions and --out, or --list or --grade")


if __name__ == "__main__":
    main()
