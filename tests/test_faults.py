"""Faults and hostile input, one test per class of what once went wrong: a run folder destroyed or
mixed with another, a resume that did not apply or repeated what it said, interrupts that ended in a
traceback, files misread, odd numbers and files given to the companions, a run that diverged while
staying finite. Signals are sent at chosen points of real runs (a subprocess patches one function to
send it), then the run is resumed and compared with one that was never interrupted."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ilsgan
import mine
import unet_eval
from conftest import ROOT, fails, refused, run_script as run

TINY = ["--preset", "tiny", "--device", "cpu", "--kimg", "0.2", "--snap-kimg", "0.048", "--log-kimg", "0.016"]
EVAL = ["--evaluate", "--eval-preset", "tiny"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def files_of(folder):
    """{name: sha256} of every file in a folder: what 'nothing changed' compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_with_signal(argv, patch, sig, at=1):
    """Run ilsgan.main(argv) in a subprocess in which the function `patch` ('module.name') sends `sig`
    to the process on its `at`-th call, just after it ran (or, for torch.save, once the temporary
    checkpoint is on disk and before it is renamed)."""
    module, name = patch.rsplit(".", 1)
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import ilsgan, mine, unet_eval, torch\n"
            f"target = {module}; real = getattr(target, {name!r}); calls = []\n"
            "def patched(*a, **k):\n"
            "    out = real(*a, **k); calls.append(1)\n"
            f"    if len(calls) == {at}: os.kill(os.getpid(), {int(sig)})\n"
            "    return out\n"
            f"setattr(target, {name!r}, patched)\n"
            f"ilsgan.main({list(map(str, argv))!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run with its evaluations, never interrupted: what the interrupted ones must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), *TINY, *EVAL, "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def kimgs(run):
    return [json.loads(line)["kimg"] for line in (run / "stats.jsonl").read_text().splitlines()]


# --- interrupts: one line, the checkpoint kept, and the resumed run ends as the straight one ----------

@pytest.mark.slow
@pytest.mark.parametrize("patch, sig, at, during", [
    ("ilsgan.train_step", signal.SIGINT, 9, "training, at 0.07 of 0.2 kimg"),
    ("ilsgan.train_step", signal.SIGTERM, 15, "training, at 0.12 of 0.2 kimg"),
    ("torch.save", signal.SIGINT, 2, "training, at 0.10 of 0.2 kimg"),  # in the middle of the second checkpoint's write
    ("unet_eval.train_unet", signal.SIGTERM, 1, "the U-Net distillation"),
    ("mine.estimate_mi", signal.SIGINT, 2, "MINE"),
])
def test_an_interrupt_says_what_was_kept_and_the_run_continues_exactly(tmp_path, straight, patch, sig, at, during):
    out = tmp_path / "run"
    r = run_with_signal([*TINY, *EVAL, "--out", out], patch, sig, at)
    assert r.returncode == 128 + sig, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {signal.Signals(sig).name} during {during}"), line
    assert f"continue with: python ilsgan.py --resume {out}" in line and "kept: " in line
    assert not (out / ".lock").exists()  # released
    before = ilsgan.load_checkpoint(out)[1]["state"]["nimg"]  # the last good checkpoint loads
    assert before % 48 == 0 or before == 200  # a snapshot, or the final one
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), "--resume", str(out)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = ilsgan.load_checkpoint(straight)[1]["state"], ilsgan.load_checkpoint(out)[1]["state"]
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert kimgs(out) == kimgs(straight) and len(set(kimgs(out))) == len(kimgs(out))  # every kimg once
    assert {"segmentation", "mi"} <= set(json.loads((out / "results.json").read_text()))


@pytest.mark.slow
def test_an_interrupt_before_the_first_checkpoint_says_to_start_again(tmp_path):
    r = run_with_signal([*TINY, "--out", tmp_path / "run"], "ilsgan.train_step", signal.SIGINT, 2)
    assert r.returncode == 130 and "kept: nothing: no checkpoint had been written yet" in r.stderr
    assert "--overwrite" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_an_interrupt_of_a_companion_names_what_it_did_not_finish(straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = files_of(run_dir)
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import mine, signal\n"
            "real = mine.estimate_mi\n"
            "def patched(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n"
            "mine.estimate_mi = patched\n"
            f"mine.main(['--ckpt', {str(run_dir)!r}, '--preset', 'tiny'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "during MINE of" in line and "results.json has no new 'mi' section (scoring not finished)" in line
    assert "continue with: python mine.py --ckpt" in line
    assert files_of(run_dir) == before


# --- one run, one folder -------------------------------------------------------------------------

@pytest.fixture
def paused_run(tmp_path):
    """A run that trains (a real process), stopped with SIGSTOP once it holds a checkpoint."""
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, str(ROOT / "ilsgan.py"), "--preset", "tiny", "--device", "cpu",
                             "--kimg", "100", "--snap-kimg", "0.02", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    t0 = time.time()
    while not (out / "checkpoint.pt").is_file() and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)  # its last write has landed
    yield out
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_nothing_of_a_training_run_changes_whatever_else_is_started_in_its_folder(paused_run, straight):
    before = files_of(paused_run)
    for args, script in [(["--preset", "tiny", "--out", paused_run], "ilsgan.py"),
                         (["--preset", "tiny", "--out", paused_run, "--overwrite"], "ilsgan.py"),
                         (["--resume", paused_run], "ilsgan.py"),
                         (["--resume", paused_run, "--kimg", "200"], "ilsgan.py"),
                         (["--resume", straight, "--out", paused_run], "ilsgan.py"),
                         (["--ckpt", paused_run, "--preset", "tiny"], "unet_eval.py"),
                         (["--ckpt", paused_run, "--preset", "tiny"], "mine.py")]:
        fails(*args, script=script, says="is in use by another process")
        assert files_of(paused_run) == before, (args, script)


@pytest.mark.slow
def test_resume_never_writes_into_a_folder_that_holds_another_run(straight, tmp_path):
    other = tmp_path / "other"
    r = subprocess.run([sys.executable, str(ROOT / "ilsgan.py"), *TINY, "--seed", "1", "--out", str(other)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    before = files_of(other)
    fails("--resume", straight, "--out", other, "--kimg", "0.3", says=f"--out {other} holds another run")
    assert files_of(other) == before
    # into an empty folder it continues, with the run's logs up to its checkpoint
    fork = tmp_path / "fork"
    r = run("--resume", straight, "--out", fork, "--kimg", "0.25", "--no-evaluate")
    assert r.returncode == 0, r.stderr
    assert kimgs(fork)[: len(kimgs(straight))] == kimgs(straight) and kimgs(fork)[-1] >= 0.25
    assert json.loads((fork / "config.json").read_text())["run_id"] == json.loads((straight / "config.json").read_text())["run_id"]


def test_overwrite_of_a_folder_in_use_deletes_nothing(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    (out / ".lock").write_text(str(os.getppid()))  # another live process holds it
    before = files_of(out)
    refused("--preset", "tiny", "--out", out, "--overwrite", says="is in use by another process")
    assert files_of(out) == before


@pytest.mark.slow
def test_prepare_data_never_writes_into_its_input(tmp_path):
    src = tmp_path / "CUB_200_2011"
    src.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "cub", "--cub", str(src),
                        "--segmentations", str(tmp_path / "segs"), "--out", str(src / "birds")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "lie one inside the other" in r.stderr and not (src / "birds").exists(), r.stderr


# --- resume is a continuation --------------------------------------------------------------------

def test_resume_gives_the_optimisers_the_flags_lr_and_betas():
    cfg = ilsgan.make_config("tiny")
    saved = ilsgan.State(cfg, torch.device("cpu"))
    x = torch.rand(cfg.batch, 3, 16, 16) * 2 - 1
    ilsgan.train_step(saved, x, cfg)
    resumed = ilsgan.State(ilsgan.with_overrides(cfg, lr=0.01, beta2=0.9), torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    k_g, k_d = 4 / 5, 16 / 17  # the lazy-regularisation rescale
    assert resumed.opt_G.param_groups[0]["lr"] == pytest.approx(0.01 * k_g)
    assert resumed.opt_D.param_groups[0]["lr"] == pytest.approx(0.01 * k_d)
    assert resumed.opt_G.param_groups[0]["betas"][1] == pytest.approx(0.9**k_g)
    for k in ("exp_avg", "exp_avg_sq"):  # the moments are kept
        assert torch.equal(resumed.opt_G.state[resumed.flat_G][k], saved.opt_G.state[saved.flat_G][k])


@pytest.mark.slow
def test_resume_with_a_new_lr_trains_with_it(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    r = run("--resume", out, "--kimg", "0.15", "--lr", "0.01")
    assert r.returncode == 0 and "lr=0.01 (was 0.0025)" in r.stdout, r.stderr
    opt = ilsgan.load_checkpoint(out)[1]["state"]["opt_G"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(0.01 * 4 / 5)


@pytest.mark.parametrize("before, after", [("off", "fp16"), ("fp16", "off"), ("bf16", "fp16")])
def test_resume_in_another_precision(before, after):
    saved = ilsgan.State(ilsgan.make_config("tiny", amp=before), torch.device("cpu"))
    resumed = ilsgan.State(ilsgan.make_config("tiny", amp=after), torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.scaler_G.is_enabled() == (after == "fp16")
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    assert torch.isfinite(ilsgan.train_step(resumed, x, ilsgan.make_config("tiny", amp=after))["loss_G"])


def test_the_logs_are_cut_back_to_the_checkpoint_and_a_torn_line_dropped(tmp_path):
    log = tmp_path / "stats.jsonl"
    log.write_text('{"kimg": 0.1}\n{"kimg": 0.2}\n{"kimg": 0.3}\n{"kimg": 0.4, "loss')
    ilsgan.cut_log(log, 0.2)
    assert log.read_text() == '{"kimg": 0.1}\n{"kimg": 0.2}\n'


# --- files are read by value ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_with_an_alpha_channel_is_read_by_its_colour(tmp_path, mode):
    box = np.zeros((16, 16), np.uint8)
    box[4:12, 2:10] = 255
    channels = 3 if mode == "RGBA" else 1
    opaque = np.dstack([box] * channels + [np.full_like(box, 255)])  # the mask in its colour, fully opaque
    Image.fromarray(opaque, mode).save(tmp_path / "m.png")
    assert np.array_equal(ilsgan.read_gray(tmp_path / "m.png") > 0.5, box > 0)
    in_alpha = np.dstack([np.zeros_like(box)] * channels + [box])  # black everywhere, the mask in the alpha
    Image.fromarray(in_alpha, mode).save(tmp_path / "a.png")
    said = []
    assert np.array_equal(ilsgan.read_gray(tmp_path / "a.png", said) > 0.5, box > 0) and said == [tmp_path / "a.png"]


def test_a_16_bit_image_is_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)
    Image.fromarray(ramp).save(tmp_path / "x.png")
    a = ilsgan.read_rgb(tmp_path / "x.png")
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
    assert np.array_equal(a[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))  # not white


@pytest.mark.parametrize("box, says", [("x 10 30 30", "is not 4 numbers"), ("-5 10 30 30", "must start at 0 or more"),
                                       ("10 10 0 30", "a positive width"), ("nan 1 2 3", "must start at 0"),
                                       ("70 10 60 30", "leaves its 100x50 image")])
def test_a_bad_cub_box_names_the_file_and_line(cub, box, says):
    (cub / "bounding_boxes.txt").write_text("1 20.0 10.0 30.0 30.0\n2 0 0 20 30\n3 " + box + "\n4 10 10 40 40\n")
    message = refused("--dataset", "cub", "--data-root", cub, "--check-data", "--resolution", "16", says=says)
    assert "bounding_boxes.txt:3" in message


def test_a_token_that_leaves_the_data_root_is_refused(cars):
    np.save(cars / "data_mrcnn_test_select.npy", np.array(["7", "../../../../x"]))
    refused("--dataset", "cars", "--data-root", cars, "--check-data", says="which is outside the data root")


def test_a_cub_name_that_leaves_the_data_root_is_refused(cub):
    (cub / "images.txt").write_text("1 001.A/a_1.jpg\n2 001.A/a_2.jpg\n3 ../../../etc/x.jpg\n4 002.B/b_2.jpg\n")
    refused("--dataset", "cub", "--data-root", cub, "--check-data", says="images.txt:3 names")


# --- odd numbers and odd files -------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--kimg", "inf"], "--kimg inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--device", "meta"], "runs on a CPU or a CUDA GPU"),
    (["--channel-max", "100000", "--channel-base", "10000000"], "these sizes need at least"),
    (["--batch", "400000000"], "these sizes need at least"),
    (["--out", ""], "--out '': must be a folder for the run"),
])
def test_numbers_no_run_can_use_are_refused_before_any_work(tmp_path, flags, says):
    refused("--preset", "tiny", *(["--out", tmp_path / "run"] if "--out" not in flags else []), *flags, says=says)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, flags, says", [
    ("unet_eval.py", ["--n", "10000000000"], "these sizes need at least"),
    ("unet_eval.py", ["--lr", "inf"], "--lr inf: must be a finite number"),
    ("mine.py", ["--hidden", "100000000000"], "these sizes need at least"),
    ("mine.py", ["--device", "mps"], "runs on a CPU or a CUDA GPU"),
])
def test_companions_refuse_odd_numbers_too(tiny_run, script, flags, says):
    refused("--ckpt", tiny_run[0], "--preset", "tiny", *flags, script=script, says=says)


@pytest.mark.parametrize("script", ["unet_eval.py", "mine.py"])
def test_an_unreadable_results_file_is_refused_before_the_work(tiny_run, tmp_path, script, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    (out / "results.json").write_text("{half a file")
    monkeypatch.setattr(unet_eval, "train_unet", lambda *a: pytest.fail("trained before reading results.json"))
    monkeypatch.setattr(mine, "estimate_mi", lambda *a, **k: pytest.fail("trained before reading results.json"))
    refused("--ckpt", out, "--preset", "tiny", script=script, says="results.json is not a results file")


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [(["--jobs", "0"], "--jobs 0: must be 1 or more"), (["--out", ""], "--out is empty"),
                                         (["--out", "FILE"], "is a file")])
def test_ablation_refuses_what_it_cannot_run(tmp_path, flags, says):
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", *flags], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_ablation_names_a_run_whose_results_are_garbage(tmp_path):
    (tmp_path / "full-seed0").mkdir()
    (tmp_path / "full-seed0" / "results.json").write_text("[1, 2")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation.py"), "--table-only", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "full-seed0/results.json is not a results file" in r.stderr and "Traceback" not in r.stderr


# --- a run that diverges while its losses stay finite ----------------------------------------------

def test_diverging_losses_are_flagged_then_stop_the_run():
    ref = {"loss_adv": 1.0, "loss_D": 1.4}
    calm = dict(mask_area=0.3, diversity=1.0, mask_spread=0.3, mask_border=0.0, mask_centre=0.5, loss_adv=2.0, loss_D=1.3)
    assert "diverging" not in ilsgan.collapse_flags(calm, ref, 5.0)
    assert "diverging" in ilsgan.collapse_flags(dict(calm, loss_D=7.5), ref, 5.0)
    state = ilsgan.State(ilsgan.make_config("tiny"), torch.device("cpu"))
    state.loss_ref = ref
    cfg = ilsgan.make_config("tiny")
    ilsgan.stop_if_lost(dict(calm, loss_G=2.0), state, cfg, None, ROOT)  # calm: nothing happens
    with pytest.raises(ilsgan.Diverged, match="loss_D reached 80, over 50 times its first value 1.4"):
        ilsgan.stop_if_lost(dict(calm, loss_G=2.0, loss_D=80.0), state, cfg, 0.5, ROOT)


@pytest.mark.slow
def test_a_learning_rate_far_too_high_stops_the_run_with_its_last_good_checkpoint(tmp_path):
    r = run("--preset", "tiny", "--lr", "5", "--kimg", "2", "--snap-kimg", "0.05", "--log-kimg", "0.02",
            "--out", tmp_path / "run")
    assert r.returncode == 1 and "Training stopped; the last good checkpoint is" in r.stderr, r.stderr[-2000:]
    flags = [f for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines() for f in json.loads(line)["flags"]]
    assert "diverging" in flags
    assert ilsgan.load_checkpoint(tmp_path / "run")[1]["state"]["nimg"] < 2000


@pytest.mark.parametrize("flags, says", [
    (["--n-train", "300"], "--n-train 300 (the run has 256) cannot change"),
    (["--bgr"], "--bgr True (the run has False) cannot change"),
])
def test_resume_refuses_a_change_of_the_data(copied, flags, says):
    refused("--resume", copied, *flags, says=says)


@pytest.mark.parametrize("flags, says", [(["--eta", "1.5"], "--eta 1.5: must be at most 1"),
                                         (["--ada-target", "2"], "--ada-target 2.0: must be in [-1, 1]"),
                                         (["--fid-n", "100000000000"], "these sizes need at least")])
def test_settings_that_mean_nothing_are_refused(tmp_path, flags, says):
    refused("--preset", "tiny", "--out", tmp_path / "run", *flags, says=says)


@pytest.fixture
def copied(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out
