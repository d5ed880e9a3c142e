"""Bad input, as a careless user or an attacker would give it: every case ends in one `error:` line
naming the flag or file (exit code 1, no traceback) before any work is done, or works correctly.
Each class of case runs the real command in a subprocess (`fails`); the variations within a class
call the same main() in this process (`refused`), which is the same code path without the start-up."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ilsgan
from conftest import ROOT, fails, refused, run_script, save_mask

def run(*args, script="ilsgan.py", cwd=None):
    return run_script(*args, script=script, cwd=cwd)


class Marker:
    """Unpickling it would write a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def make_read_only():
    """make_read_only(folder): nothing can be written into it any more, even by root (chattr +i), or the
    test is skipped; undone at the end of the test."""
    locked = []

    def make(folder):
        folder.chmod(0o555)
        locked.append(folder)
        if os.access(folder, os.W_OK):  # root ignores the mode bits
            if not (shutil.which("chattr") and subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0):
                pytest.skip("no way to make a read-only folder here")
        return folder

    yield make
    for folder in locked:
        subprocess.run(["chattr", "-i", folder], capture_output=True)
        folder.chmod(0o755)


# --- settings: refused before data is loaded or a folder is made ------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--dataset", "imagenet"], "--dataset 'imagenet': must be one of"),
    (["--resolution", "48"], "--resolution 48: must be a power of two"),
    (["--resolution", "0"], "--resolution 0: must be a power of two"),
    (["--batch", "0"], "--batch 0: must be positive"),
    (["--batch", "6"], "--batch 6: must be a multiple of the minibatch-stddev group"),
    (["--kimg", "0"], "--kimg 0.0: must be positive"),
    (["--kimg", "-1"], "--kimg -1.0: must be positive"),
    (["--ils", "mutual"], "--ils 'mutual': must be one of mi | l1 | none"),
    (["--dataset", "cars", "--data-root", "no/such/folder"], "--data-root 'no/such/folder': must be an existing folder"),
    (["--device", "gpu0"], "--device 'gpu0': not a device name"),
])
def test_settings_are_checked_before_any_work(tmp_path, flags, says):
    refused(*flags, "--out", tmp_path / "run", says=says)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_bad_setting_is_listed_at_once(tmp_path):
    r = fails("--batch", "0", "--kimg", "0", "--resolution", "20", "--out", tmp_path / "run", says="invalid settings")
    assert all(f in r.stderr for f in ("--batch 0", "--kimg 0.0", "--resolution 20"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path):
    fails("--device", "cuda", "--out", tmp_path / "run", says="--device cuda: PyTorch sees no CUDA GPU")
    refused("--ckpt", tmp_path, "--device", "cuda", script="unet_eval.py", says="--device cuda")


# --- the run folder ------------------------------------------------------------------------------

@pytest.mark.slow
def test_out_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    fails("--preset", "tiny", "--out", tmp_path / "run", says="is a file; give a folder")


@pytest.mark.slow
def test_out_cannot_be_written(tmp_path, make_read_only):
    parent = make_read_only(tmp_path)
    fails("--preset", "tiny", "--out", parent / "run", says=f"cannot write to {parent / 'run'}")


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stats.jsonl").write_text('{"old": 1}\n')
    fails("--preset", "tiny", "--out", out, says="holds a run (stats.jsonl): continue it with --resume")
    assert (out / "stats.jsonl").read_text() == '{"old": 1}\n'  # nothing touched
    r = run("--preset", "tiny", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert '"old"' not in (out / "stats.jsonl").read_text() and (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # this test's process is alive
    fails("--preset", "tiny", "--out", out, says="is in use by another process")
    assert not (out / "config.json").exists()


# --- resuming ------------------------------------------------------------------------------------

@pytest.fixture
def copied_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint(copied_run):
    data = (copied_run / "checkpoint.pt").read_bytes()
    (copied_run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    fails("--resume", copied_run, says="checkpoint.pt is not a readable checkpoint")


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    refused("--resume", tmp_path / "notes.pt", says="notes.pt is not a readable checkpoint")


@pytest.mark.slow
def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": ilsgan.CHECKPOINT_FORMAT, "config": Marker(str(marker))}, tmp_path / "evil.pt")
    fails("--resume", tmp_path / "evil.pt", says="evil.pt is not a readable checkpoint")
    refused("--ckpt", tmp_path / "evil.pt", script="unet_eval.py", says="evil.pt is not a readable checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("flags, says", [
    (["--z-dim", "32"], "--z-dim 32 (the run has 16) cannot change"),
    (["--resolution", "32"], "--resolution 32 (the run has 16) cannot change"),
    (["--preset", "cpu"], "--preset does not go with --resume"),
    (["--kimg", "0.05"], "--kimg 0.05: the run has reached 0.104 kimg"),
    (["--overwrite"], "--overwrite starts a run afresh; it does not go with --resume"),
])
def test_resume_refuses_what_it_cannot_apply(copied_run, flags, says):
    before = (copied_run / "config.json").read_text()
    refused("--resume", copied_run, *flags, says=says)
    assert (copied_run / "config.json").read_text() == before


@pytest.mark.slow
def test_resume_applies_and_records_the_flags_it_accepts(copied_run):
    r = run("--resume", copied_run, "--kimg", "0.15", "--lr", "0.001")
    assert r.returncode == 0, r.stderr
    assert "kimg=0.15 (was 0.1)" in r.stdout and "lr=0.001 (was 0.0025)" in r.stdout
    cfg, ckpt = ilsgan.load_checkpoint(copied_run)
    assert (cfg.kimg, cfg.lr) == (0.15, 0.001) and ckpt["state"]["nimg"] >= 150


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_leaves_a_loadable_run(copied_run):
    """kill -9 in the middle of writing a checkpoint: the previous one still loads, the stale lock and
    the half-written temporary file do not stop the resume, and the run then finishes."""
    nimg_before = ilsgan.load_checkpoint(copied_run)[1]["state"]["nimg"]
    dying = (f"import os, signal, sys, torch; sys.path.insert(0, {str(ROOT)!r}); import ilsgan\n"
             "real = torch.save\n"
             "def save(obj, f):\n"
             "    real(obj, f)\n"
             "    data = open(f, 'rb').read()\n"
             "    open(f, 'wb').write(data[: len(data) // 3])  # a third of the bytes are on disk when the kill comes\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "torch.save = save\n"
             f"ilsgan.main(['--resume', {str(copied_run)!r}, '--kimg', '0.2'])\n")
    r = subprocess.run([sys.executable, "-c", dying], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (copied_run / ".lock").exists() and list(copied_run.glob("checkpoint.pt.*.tmp"))
    assert ilsgan.load_checkpoint(copied_run)[1]["state"]["nimg"] == nimg_before
    r = run("--resume", copied_run, "--kimg", "0.2")
    assert r.returncode == 0, r.stderr
    assert ilsgan.load_checkpoint(copied_run)[1]["state"]["nimg"] >= 200
    assert not (copied_run / ".lock").exists() and not list(copied_run.glob("*.tmp"))  # the dead process's files are gone


def test_a_loss_that_is_nan_from_the_start_says_no_checkpoint_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(ilsgan, "g_adversarial_loss", lambda d: d.mean() * float("nan"))
    message = refused("--preset", "tiny", "--out", tmp_path / "run", says="became non-finite")
    assert "no checkpoint had been written yet" in message and not (tmp_path / "run/checkpoint.pt").exists()


# --- dataset files are untrusted -----------------------------------------------------------------

@pytest.mark.slow
def test_a_pickled_token_list_runs_nothing(cars, tmp_path):
    marker = tmp_path / "ran"
    np.save(cars / "data_mrcnn_train_select.npy", np.array([Marker(str(marker))], dtype=object), allow_pickle=True)
    fails("--dataset", "cars", "--data-root", cars, "--check-data", says="data_mrcnn_train_select.npy: not a token list")
    assert not marker.exists()


@pytest.mark.parametrize("tokens, says", [
    ("text", "data_mrcnn_test_select.npy: not a .npy file"),
    (np.zeros((2, 2)), "expected a non-empty 1-D array"),
    (np.array([7, 8, 7]), "the token '7' is listed twice"),
])
def test_a_token_list_that_is_not_one(cars, tokens, says):
    path = cars / "data_mrcnn_test_select.npy"
    path.write_text("7\n8\n") if isinstance(tokens, str) else np.save(path, tokens)
    refused("--dataset", "cars", "--data-root", cars, "--check-data", says=says)


@pytest.mark.parametrize("table, text, says", [
    ("images.txt", "2 001.A/a_2.jpg\n", "image id 2 is listed twice"),
    ("bounding_boxes.txt", None, "do not list the same ids"),
    ("bounding_boxes.txt", "1 0 0 5\n", "expected 5 columns"),
])
def test_cub_id_tables_that_disagree(cub, table, text, says):
    path = cub / table
    if text is None:
        path.write_text("1 0 0 5 5\n2 0 0 5 5\n3 0 0 5 5\n")  # id 4 has no box
    else:
        path.write_text((path.read_text() + text) if "twice" in says else text)
    refused("--dataset", "cub", "--data-root", cub, "--check-data", says=says)


def test_a_corrupt_image_is_named(cars):
    (cars / "data_mrcnn/test/resized/8_resized.png").write_bytes(b"\x89PNG broken")
    refused("--dataset", "cars", "--data-root", cars, "--check-data", says="cannot read image")


def test_a_label_map_is_refused(cars):
    a = np.zeros((32, 32), np.uint8)
    a[8:16, 8:24], a[16:24, 8:24] = 3, 7  # class labels, not a foreground mask
    Image.fromarray(a).save(cars / "data_mrcnn/test/resized/7_maskresized.png")
    refused("--dataset", "cars", "--data-root", cars, "--check-data", says="holds the labels [0, 3, 7]")


@pytest.mark.parametrize("kind", ["0/255", "0/1", "palette", "rgb", "16-bit"])
def test_masks_are_read_by_value(tmp_path, kind):
    """The same box saved five ways reads as the same mask (before: 0/1 and palette masks read as empty)."""
    box = np.zeros((32, 32), np.uint8)
    box[8:24, 4:20] = 1
    path = tmp_path / "m.png"
    if kind == "0/255":
        save_mask(path, 32, 32, (4, 8, 20, 24))
    elif kind == "0/1":
        Image.fromarray(box).save(path)
    elif kind == "palette":
        im = Image.fromarray(box, mode="L").convert("P")
        im.putpalette([0, 0, 0, 128, 64, 0] + [0] * 762)  # index 1 drawn dark: its value is the index
        im.save(path)
    elif kind == "rgb":
        Image.fromarray(np.stack([box * 200, box * 10, box * 0], -1)).save(path)
    else:
        Image.fromarray(box.astype(np.uint16) * 65535).save(path)
    assert np.array_equal(ilsgan.read_gray(path) > 0.5, box.astype(bool))


# --- the companions ------------------------------------------------------------------------------

@pytest.mark.slow
def test_unet_eval_on_a_folder_it_cannot_write_stops_before_the_work(copied_run, make_read_only):
    make_read_only(copied_run)
    r = fails("--ckpt", copied_run, "--preset", "tiny", script="unet_eval.py", says=f"cannot write to {copied_run}")
    assert "U-Net" not in r.stdout + r.stderr  # refused before anything was trained


def test_mine_too_short_to_measure(tiny_run):
    refused("--ckpt", tiny_run[0], "--preset", "tiny", "--iters", "5", script="mine.py",
          says="--iters 5: must be at least --eval-every (10)")


def test_companion_without_a_checkpoint(tmp_path):
    refused("--ckpt", tmp_path, script="mine.py", says=f"no checkpoint at {tmp_path / 'checkpoint.pt'}")
