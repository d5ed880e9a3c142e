"""The shape of the project: imports point down (scripts -> companions -> ilsgan), and ilsgan.py
teaches before its appendix."""
import ast
import io
import re
import tokenize

from conftest import ROOT

COMPANIONS = {"unet_eval", "mine"}


def module_imports(path, skip_main):
    """Project modules imported by a file; skip_main leaves out imports inside def main()."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for f in ast.walk(tree) if skip_main and isinstance(f, ast.FunctionDef) and f.name == "main"
               for n in ast.walk(f)}
    names = set()
    for n in ast.walk(tree):
        if id(n) not in skipped and isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif id(n) not in skipped and isinstance(n, ast.ImportFrom) and n.module:
            names.add(n.module.split(".")[0])
    return (names & ({"ilsgan"} | COMPANIONS)) - {path.stem}  # a script importing itself as a module points nowhere


def test_every_import_points_down():
    files = [ROOT / "ilsgan.py", ROOT / "unet_eval.py", ROOT / "mine.py", *sorted((ROOT / "scripts").glob("*.py"))]
    for path in files:
        outside_main = module_imports(path, skip_main=True)
        if path.stem == "ilsgan":  # the lesson imports nothing of the project (main() may call the companions)
            assert not outside_main, outside_main
        elif path.stem in COMPANIONS:  # the companions import ilsgan only, never each other, not even lazily
            assert outside_main == {"ilsgan"} and not module_imports(path, skip_main=False) & COMPANIONS, path.name


def code_lines(src, upto=None):
    """Lines of code of src (up to line index `upto`): not blank, not comments, not docstrings."""
    lines, doc = src.splitlines(), set()
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.STRING and t.line.strip().startswith(('"""', "r\"\"\"")):
            doc.update(range(t.start[0] - 1, t.end[0]))
    return sum(1 for i, line in enumerate(lines[:upto]) if line.strip() and not line.strip().startswith("#") and i not in doc)


def test_the_lesson_comes_before_the_appendix():
    src = (ROOT / "ilsgan.py").read_text()
    appendix = src.index("# The lesson ends here. Appendix")
    lesson = ("train_step", "train", "State", "augment", "ils_mi_loss", "club", "sample")
    plumbing = ("make_synthetic", "load_real", "fid", "inception_network", "run_folder", "folder_lock", "validate_config",
                "save_checkpoint", "load_checkpoint", "config_parser", "init_processes", "optimizer_step", "main", "Run")
    where = {name: re.search(rf"^(def|class) {name}\b", src, re.M).start() for name in lesson + plumbing}
    assert all(where[n] < appendix for n in lesson) and all(where[n] > appendix for n in plumbing), where
    assert re.search(r"The lesson ends here\. Appendix", src[:src.index('"""', 10)])  # the table of contents says so


def test_the_lesson_is_the_size_its_docstring_states():
    """The lesson (top of the file to the marker) is read in one sitting: about 550 lines of code at
    most, comments and docstrings not counted; the docstring states both figures as they are."""
    src = (ROOT / "ilsgan.py").read_text()
    marker = next(i for i, line in enumerate(src.splitlines()) if line.startswith("#") and "lesson ends here" in line.lower())
    lesson, whole = code_lines(src, marker), code_lines(src)
    assert lesson <= 550, lesson
    said = re.search(r"the lesson \(sections 1-11\) is (\d+) lines of code.*?the\s+whole file (\d+)\.", src, re.S)
    assert said and (int(said[1]), int(said[2])) == (lesson, whole), (said and said.groups(), lesson, whole)


def test_the_docs_show_the_layouts_the_loader_reads():
    import ilsgan
    text = (ROOT / "docs" / "datasets.md").read_text()
    for name, layout in ilsgan.LAYOUTS.items():
        assert layout in text, name
