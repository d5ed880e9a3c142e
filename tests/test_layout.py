"""The shape of the project: imports point down (scripts -> companions -> ilsgan), and ilsgan.py
teaches before its appendix."""
import ast
import re

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


def test_the_lesson_comes_before_the_appendix():
    src = (ROOT / "ilsgan.py").read_text()
    where = {name: src.index(f"\ndef {name}(") for name in ("train_step", "train", "make_synthetic", "load_real", "fid")}
    appendix = src.index("# The lesson ends here. Appendix")
    assert max(where["train_step"], where["train"]) < appendix < min(where["make_synthetic"], where["load_real"], where["fid"])
    assert re.search(r"The lesson ends here\. Appendix", src[:src.index('"""', 10)])  # the table of contents says so
