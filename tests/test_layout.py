"""The shape of the project: imports point one way (scripts -> companions -> ilsgan -> data -> runs); the
lesson in ilsgan.py comes first and stands alone, calling nothing below it but the loop's plain I/O;
the files keep to their budgets; the docs show the layouts the loader reads."""
import ast
import builtins
import io
import re
import sys
import tokenize

from conftest import ROOT

ORDER = ["runs", "data", "ilsgan", "unet_eval", "mine"]  # each may import only those before it
IO_HELPERS = {"load_images", "write_log", "save_snapshot"}  # what the training loop calls below the marker


def imports(path):
    """The project modules a file imports anywhere in it (in functions too)."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            names.add(n.module.split(".")[0])
    return names & set(ORDER)


def test_every_import_points_one_way():
    for i, name in enumerate(ORDER):
        allowed = set(ORDER[:i]) - {"unet_eval"}  # the companions never import each other
        assert imports(ROOT / f"{name}.py") <= allowed, name
    for path in sorted((ROOT / "scripts").glob("*.py")):
        assert imports(path) <= set(ORDER), path.name  # the scripts sit on top; nothing imports them


def code_lines(path):
    """Indices of a file's lines of code: not blank, not comments, not docstrings."""
    src = path.read_text()
    lines, doc = src.splitlines(), set()
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.STRING and t.line.strip().startswith(('"""', 'r"""')):
            doc.update(range(t.start[0] - 1, t.end[0]))
    return [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#") and i not in doc]


def lesson_end():
    lines = (ROOT / "ilsgan.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines) if line.startswith("#") and "lesson ends here" in line.lower())


def test_the_lesson_stands_alone():
    """Every name the lesson (the top of ilsgan.py to the marker) uses is defined in the lesson, is
    Python's, or comes from a module it imports (the standard library, torch, tqdm), except the
    training loop's plain I/O helpers."""
    tree, end = ast.parse((ROOT / "ilsgan.py").read_text()), lesson_end()
    defined, imported = {}, set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            defined[n.name] = n.lineno - 1
        elif isinstance(n, ast.Assign):
            defined.update({t.id: n.lineno - 1 for t in n.targets if isinstance(t, ast.Name)})
        elif isinstance(n, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in n.names if a.name.split(".")[0] not in ORDER}
        elif isinstance(n, ast.ImportFrom) and n.module.split(".")[0] not in ORDER:
            imported |= {a.asname or a.name for a in n.names}
    lesson = [n for n in tree.body if n.lineno - 1 < end]
    used = {x.id for n in lesson for x in ast.walk(n) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)}
    local = {x.id for n in lesson for x in ast.walk(n) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Store)}
    local |= {a.arg for n in lesson for x in ast.walk(n) if isinstance(x, (ast.FunctionDef, ast.Lambda)) for a in
              x.args.args + x.args.kwonlyargs + [x.args.vararg, x.args.kwarg] if a is not None}
    local |= {x.name for n in lesson for x in ast.walk(n) if isinstance(x, ast.FunctionDef)}  # functions in functions
    below = {u for u in used if u in defined and defined[u] > end}
    assert below == IO_HELPERS, below  # named for what they do: load the data, write a log record, save a snapshot
    unknown = used - set(defined) - imported - local - set(dir(builtins))
    assert not unknown, unknown
    assert all(n.lineno - 1 > end for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("main", "run"))


def test_the_files_keep_to_their_budgets():
    """ilsgan.py at most 1,000 lines of code, its lesson at most 550; all the project's Python but its
    tests at most 2,600 (comments, docstrings and blank lines not counted)."""
    code, end = code_lines(ROOT / "ilsgan.py"), lesson_end()
    assert len(code) <= 1000 and sum(1 for i in code if i < end) <= 550
    files = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    assert sum(len(code_lines(p)) for p in files) <= 2600


def test_nothing_runs_at_import(tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, "-c", "import ilsgan, unet_eval, mine, data, runs"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0 and r.stdout == "" and not list(tmp_path.iterdir()), r.stderr


def test_the_docs_show_the_layouts_the_loader_reads():
    import data
    text = (ROOT / "docs" / "datasets.md").read_text()
    assert all(layout in text for layout in data.LAYOUTS.values())
    assert re.search(r"The lesson ends here", (ROOT / "ilsgan.py").read_text()[:4000])  # the table of contents says so
