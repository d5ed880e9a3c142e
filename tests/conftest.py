"""Shared fixtures: the project importable, tests on the CPU, small and seeded; one tiny run trained
for the session; fake dataset trees in the documented layouts (DRC cars, CUB); the one way of running
a script of the project (run_script) and of expecting its `error:` line (fails in a subprocess,
refused in this process)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def train_tiny(out, **overrides):
    """A `tiny` run in `out`, as `python ilsgan.py --preset tiny` trains it, in this process."""
    import ilsgan
    return ilsgan.run(ilsgan.make_config("tiny", out=str(out), device="cpu", **overrides))[1]


@pytest.fixture(scope="session")
def tiny_session(tmp_path_factory):
    """A `tiny` run trained once for the whole session (treat it as read-only: copy it with `tiny_run`)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    train_tiny(out)
    return out


@pytest.fixture
def tiny_run(tiny_session, tmp_path):
    """A copy of the session's tiny run, the test's own."""
    shutil.copytree(tiny_session, tmp_path / "run")
    return tmp_path / "run"


def save_rgb(path, w, h, colour=(200, 30, 30), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = colour
    a[:, : w // 2] = (10, 20, 250)  # left half blue: lets the tests check crops and channel order
    im = Image.fromarray(a)
    (im.convert("L") if gray else im).save(path)


def save_mask(path, w, h, box, gray_edge=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    if gray_edge:
        a[y0:y1, x0] = 100  # soft edge: below 0.5, must end up background
        a[y0:y1, x1 - 1] = 180  # above 0.5: foreground
    Image.fromarray(a).save(path)


@pytest.fixture
def cars(tmp_path):
    r = tmp_path / "cars"
    np.save(r.mkdir() or r / "data_mrcnn_train_select.npy", np.array(["a1", "a2", "a3"]))
    np.save(r / "data_mrcnn_test_select.npy", np.array([7, 8]))
    for t, (w, h) in zip(["a1", "a2", "a3"], [(60, 40), (40, 60), (50, 50)]):
        save_rgb(r / f"data_mrcnn/train/orig/{t}_orig.png", w, h)
    for t in ["7", "8"]:
        save_rgb(r / f"data_mrcnn/test/resized/{t}_resized.png", 32, 32)
        save_mask(r / f"data_mrcnn/test/resized/{t}_maskresized.png", 32, 32, (8, 8, 24, 24))
    return r


@pytest.fixture
def cub(tmp_path):
    r = tmp_path / "birds"
    names = ["001.A/a_1", "001.A/a_2", "002.B/b_1", "002.B/b_2"]
    sizes = [(80, 60), (60, 80), (100, 50), (64, 64)]
    boxes = [(20.0, 10.0, 30.0, 30.0), (0.0, 0.0, 20.7, 30.2), (70.0, 10.0, 29.0, 30.0), (10.0, 10.0, 40.0, 40.0)]
    r.mkdir()
    (r / "images.txt").write_text("".join(f"{i + 1} {n}.jpg\n" for i, n in enumerate(names)))
    (r / "bounding_boxes.txt").write_text("".join(f"{i + 1} {' '.join(map(str, b))}\n" for i, b in enumerate(boxes)))
    (r / "train_val_test_split.txt").write_text("1 0\n2 1\n3 2\n4 2\n")
    (r / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n4 0\n")
    for i, (n, (w, h), b) in enumerate(zip(names, sizes, boxes)):
        save_rgb(r / f"images/{n}.jpg", w, h, gray=(i == 0))
        x, y, bw, bh = map(int, b)
        save_mask(r / f"segmentations/{n}.png", w, h, (x, y, x + bw, y + bh), gray_edge=True)
    return r


def run_script(*args, script="ilsgan.py", cwd=None, timeout=300, env=None):
    """A script of the project in a subprocess, on the CPU and one thread, as a user would run it."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(ENV, **(env or {})), timeout=timeout)


def fails(*args, says, script="ilsgan.py", cwd=None, env=None):
    """The command exits 1 with one line `error: ...` mentioning `says`, and prints no traceback."""
    r = run_script(*args, script=script, cwd=cwd, env=env)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "error: " in r.stderr and says in r.stderr.partition("error: ")[2], r.stderr
    return r


def refused(*args, says, script="ilsgan.py"):
    """The same in this process: the script's main() ends in SystemExit('error: ...'), no other exception."""
    import importlib
    if script.startswith("scripts/"):
        sys.path.insert(0, str(ROOT / "scripts"))
    main = importlib.import_module(Path(script).stem).main
    with pytest.raises(SystemExit) as e:
        main(list(map(str, args)))
    assert str(e.value.code).startswith("error: ") and says in str(e.value.code), e.value.code
    return str(e.value.code)
