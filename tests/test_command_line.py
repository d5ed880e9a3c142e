"""The command line's promises (README, "When something goes wrong"), one test per class of mistake or
fault: every bad setting is one `error:` line before any work; a run folder holds one run, is held by
one process at a time and loses nothing to another command; a resume is a continuation of the same
run on the same data; a file the project wrote and finds damaged or foreign is named; an interrupt
says where it stopped, what was kept and how to continue, and the continued run ends as one never
interrupted; a full disk, a closed output and bad torchrun variables end in one line."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import ilsgan
import runs
from conftest import ENV, ROOT, fails, refused, run_script, save_rgb

TINY = ["--preset", "tiny", "--device", "cpu", "--total-kimg", "0.2", "--snap-kimg", "0.048", "--log-kimg", "0.016"]
EVAL = ["--evaluate", "--eval-preset", "tiny"]


def files_of(folder):
    """{name: sha256} of every file in a folder: what 'nothing changed' compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- settings: refused before any work --------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--dataset", "imagenet"], "--dataset 'imagenet': must be one of"),
    (["--resolution", "48"], "--resolution 48: must be a power of two"),
    (["--batch", "6"], "--batch 6: must be a multiple of 1 processes and, per process, of the minibatch-stddev group"),
    (["--total-kimg", "0"], "--total-kimg 0.0: must be positive"),
    (["--total-kimg", "inf"], "--total-kimg inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--ils", "mutual"], "--ils 'mutual': must be one of mi | l1 | none"),
    (["--eta", "1.5"], "--eta 1.5: must be at most 1"),
    (["--ada-target", "2"], "--ada-target 2.0: must be in [-1, 1]"),
    (["--diverge", "-1"], "--diverge -1.0: must be 0 or more"),
    (["--seed", "-3"], "--seed -3: must be 0 or more"),
    (["--dataset", "cars", "--data-root", "no/such/folder"], "--data-root 'no/such/folder': must be an existing folder"),
    (["--device", "gpu0"], "--device 'gpu0': not a device name"),
    (["--device", "meta"], "runs on a CPU or a CUDA GPU"),
    (["--out", ""], "--out '': must be a folder for the run"),
])
def test_settings_are_checked_before_any_work(tmp_path, flags, says):
    refused("--preset", "tiny", *(["--out", tmp_path / "run"] if "--out" not in flags else []), *flags, says=says)
    assert not (tmp_path / "run").exists()


def test_every_bad_setting_is_listed_at_once(tmp_path):
    message = refused("--batch", "0", "--total-kimg", "0", "--resolution", "20", "--out", tmp_path / "r", says="invalid settings")
    assert all(f in message for f in ("--batch 0", "--total-kimg 0.0", "--resolution 20"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, tiny_run):
    refused("--device", "cuda", "--out", tmp_path / "run", says="--device cuda: PyTorch sees no CUDA GPU")
    refused("--ckpt", tiny_run, "--device", "cuda", script="unet_eval.py", says="--device cuda")


def test_sizes_that_do_not_fit_in_memory_end_in_one_line(tmp_path):
    refused("--preset", "tiny", "--n-train", str(10**13), "--out", tmp_path / "run", says="out of memory")


@pytest.mark.parametrize("env, says", [(dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc'"), (dict(WORLD_SIZE="0"), "torchrun variables"),
                                       (dict(WORLD_SIZE="2", RANK="x"), "RANK='x'")])
def test_bad_torchrun_variables_end_in_one_line(tmp_path, monkeypatch, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    refused("--preset", "tiny", "--out", tmp_path / "run", says=says)


@pytest.mark.slow
def test_a_closed_standard_output_ends_in_one_line_on_stderr(tmp_path):
    code = f"cd {ROOT} && {sys.executable} ilsgan.py --preset tiny --device cpu --out {tmp_path / 'run'} | head -c 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert "error: the standard output was closed; stopped there (continue with: python ilsgan.py --resume" in r.stderr


# --- one run, one folder ----------------------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite_which_removes_only_its_files(tiny_run):
    (tiny_run / "notes.txt").write_text("mine")  # the user's own files: never removed
    (tiny_run / "backup.2024.tmp").write_text("mine")
    before = files_of(tiny_run)
    refused("--preset", "tiny", "--out", tiny_run, says="holds another run")
    assert files_of(tiny_run) == before
    refused("--preset", "tiny", "--out", tiny_run, "--overwrite", "--total-kimg", "0.01", "--lr", "nan", says="--lr nan")
    assert files_of(tiny_run) == before  # a refused --overwrite removes nothing
    ilsgan.main(["--preset", "tiny", "--out", str(tiny_run), "--overwrite", "--total-kimg", "0.02", "--no-evaluate"])
    assert {"notes.txt", "backup.2024.tmp"} <= set(files_of(tiny_run)) and runs.read_log(tiny_run / "stats.jsonl")[-1]["kimg"] < 0.1


def test_a_folder_of_files_no_run_made_is_never_written_over(tmp_path):
    (tmp_path / "config.json").write_text('{"mine": 1}')
    (tmp_path / "report.html").write_text("my page")
    before = files_of(tmp_path)
    for flags in ([], ["--overwrite"]):
        refused("--preset", "tiny", "--out", tmp_path, *flags, says="holds files that no run made")
    assert files_of(tmp_path) == before


def test_a_folder_in_use_by_another_process_is_refused_and_nothing_changes(tiny_run):
    """Whatever is started in a folder another process holds (its lock, which the system releases when
    that process ends, however it ends) is refused before it touches anything."""
    before = files_of(tiny_run)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import runs, time\n"
                               f"with runs.locked({str(tiny_run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args, script in [(["--preset", "tiny", "--out", tiny_run, "--overwrite"], "ilsgan.py"),
                             (["--resume", tiny_run, "--total-kimg", "0.2"], "ilsgan.py"),
                             (["--ckpt", tiny_run, "--preset", "tiny"], "unet_eval.py"),
                             (["--ckpt", tiny_run, "--preset", "tiny"], "mine.py")]:
            refused(*args, script=script, says="is in use by another process")
            assert files_of(tiny_run) == before, (args, script)
    finally:
        holder.kill()
        holder.wait()
    ilsgan.main(["--resume", str(tiny_run), "--total-kimg", "0.11"])  # released with the process: no stale lock


def test_out_is_a_file_or_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("")
    refused("--preset", "tiny", "--out", tmp_path / "file", says="is a file; give a folder")
    refused("--preset", "tiny", "--out", tmp_path / "file" / "run", says="cannot write to")


# --- a resume is a continuation of the same run -----------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--z-dim", "32"], "--z-dim 32 (the run has 16) cannot change"),
    (["--n-train", "300"], "--n-train 300 (the run has 256) cannot change"),
    (["--bgr"], "--bgr True (the run has False) cannot change"),
    (["--preset", "cpu"], "--preset and --overwrite do not go with it"),
    (["--overwrite"], "--preset and --overwrite do not go with it"),
    (["--total-kimg", "0.05"], "--total-kimg 0.05: the run has reached 0.104 kimg"),
    (["--out", "ELSEWHERE"], "continues the run in its own folder"),
])
def test_resume_refuses_what_it_cannot_apply(tiny_run, tmp_path, flags, says):
    before = files_of(tiny_run)
    refused("--resume", tiny_run, *[str(tmp_path / "else") if f == "ELSEWHERE" else f for f in flags], says=says)
    assert files_of(tiny_run) == before


def test_resume_applies_the_flags_it_accepts_and_sets_the_old_scores_aside(tiny_run, capsys):
    (tiny_run / "results.json").write_text(json.dumps({"mi": {"nats": {}, "protocol": "x"}}))
    (tiny_run / "unet.pt").write_bytes(b"the U-Net of the older checkpoint")
    ilsgan.main(["--resume", str(tiny_run), "--total-kimg", "0.15", "--lr", "0.01"])
    assert "preset of the run (resumed); total_kimg=0.15, lr=0.01 |" in capsys.readouterr().out
    cfg, ckpt = ilsgan.read_checkpoint(tiny_run)
    assert (cfg.total_kimg, cfg.lr) == (0.15, 0.01) and ckpt["state"]["nimg"] >= 150
    assert ckpt["state"]["opt_G"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 4 / 5)  # what the optimiser used
    assert not (tiny_run / "results.json").exists() and (tiny_run / "results-0.104kimg.json").exists()
    assert not (tiny_run / "unet.pt").exists() and (tiny_run / "unet-0.104kimg.pt").exists()  # --segment will not use it
    kimgs = [r["kimg"] for r in runs.read_log(tiny_run / "stats.jsonl")]
    assert kimgs == sorted(set(kimgs)) and kimgs[-1] >= 0.15  # every kimg once


def test_the_closing_lines_of_an_unscored_run_name_no_scores_and_no_missing_files(tiny_run, capsys):
    runs.print_scores(tiny_run)
    out = capsys.readouterr().out
    assert "no scores yet" in out and "results:" not in out and f"report: {tiny_run / 'report.html'}" in out


def test_resume_on_other_data_is_refused(cars, tmp_path):
    ilsgan.main(["--preset", "tiny", "--dataset", "cars", "--data-root", str(cars), "--out", str(tmp_path / "run"),
                 "--total-kimg", "0.016"])
    save_rgb(cars / "data_mrcnn/train/orig/a1_orig.png", 60, 40, colour=(0, 250, 0))  # the same file names, other pixels
    refused("--resume", tmp_path / "run", "--total-kimg", "0.03", says="the training images differ from those the run trained on")


# --- files the project wrote, found damaged or foreign ---------------------------------------------------

def damage(run, what):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if what == "empty":
        return (run / "checkpoint.pt").write_bytes(b"")
    if what == "truncated":
        data = (run / "checkpoint.pt").read_bytes()
        return (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    if what == "no state":
        del ckpt["state"]
    elif what == "unknown field":
        ckpt["config"]["flavour"] = 1
    elif what == "mistyped field":
        ckpt["config"]["z_dim"] = "16"
    elif what == "other z_dim":
        ckpt["config"]["z_dim"] = 32
    elif what == "other run":
        ckpt["run_id"] = "another"
    elif what == "negative progress":
        ckpt["state"]["nimg"] = -5000
    elif what == "NaN ADA p":
        ckpt["state"]["ada_p"] = torch.tensor(float("nan"))
    elif what == "no optimiser state":
        ckpt["state"]["opt_G"] = {"x": 1}
    torch.save(ckpt, run / "checkpoint.pt")


@pytest.mark.parametrize("what, says", [
    ("empty", "is not a readable checkpoint"), ("truncated", "is not a readable checkpoint"),
    ("no state", "is not a whole checkpoint"), ("unknown field", "unknown, missing or mistyped fields (flavour)"),
    ("mistyped field", "mistyped fields (z_dim)"), ("other z_dim", "its G does not fit its config"),
    ("other run", "is not the checkpoint of the run in"), ("negative progress", "progress or optimiser state"),
    ("NaN ADA p", "progress or optimiser state"), ("no optimiser state", "progress or optimiser state")])
def test_a_damaged_or_foreign_checkpoint_is_named_by_every_reader(tiny_run, what, says):
    damage(tiny_run, what)
    before = files_of(tiny_run)
    refused("--resume", tiny_run, "--total-kimg", "0.2", says=says)
    if what not in ("other run", "no optimiser state"):  # the scores read the checkpoint alone (and no optimiser)
        for script in ("unet_eval.py", "mine.py"):
            refused("--ckpt", tiny_run, "--preset", "tiny", script=script, says=says)
    assert files_of(tiny_run) == before


def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    class Marker:  # unpickling it would write a file: proof that code ran
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))
    torch.save({"format": ilsgan.CHECKPOINT_FORMAT, "config": Marker()}, tmp_path / "evil.pt")
    refused("--resume", tmp_path / "evil.pt", says="evil.pt is not a readable checkpoint")
    refused("--ckpt", tmp_path / "evil.pt", script="unet_eval.py", says="evil.pt is not a readable checkpoint")
    assert not (tmp_path / "ran").exists()


def test_a_generator_with_non_finite_weights_is_not_scored(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    next(iter(ckpt["state"]["G_ema"].values()))[0] = float("nan")
    torch.save(ckpt, tiny_run / "checkpoint.pt")
    for script in ("unet_eval.py", "mine.py"):
        refused("--ckpt", tiny_run, "--preset", "tiny", script=script, says="weights are not all finite")
    assert not (tiny_run / "results.json").exists()


@pytest.mark.parametrize("name, text, says", [
    ("stats.jsonl", '{"kimg": "0.1"}\n{"kimg": 0.2}\n', "stats.jsonl:1: not a record"),
    ("stats.jsonl", b'{"kimg": 0.1}\n\xff\xfe\n', "stats.jsonl is not UTF-8 text"),
    ("config.json", "{not json", "config.json is not a JSON file of this project"),
    ("results.json", "[1, 2]", "results.json holds a list"),
    ("results.json", '{"segmentation": 5}', "its 'segmentation' section lacks"),
])
def test_a_damaged_log_config_or_results_file_is_named_before_any_work(tiny_run, name, text, says, monkeypatch):
    import unet_eval
    (tiny_run / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.setattr(unet_eval, "train_unet", lambda *a: pytest.fail("trained before reading the run's files"))
    refused("--ckpt", tiny_run, "--preset", "tiny", script="unet_eval.py", says=says)
    if name != "results.json":
        refused("--resume", tiny_run, "--total-kimg", "0.2", says=says)


def test_a_torn_last_log_line_is_dropped_and_the_logs_cut_back_on_resume(tmp_path):
    log = tmp_path / "stats.jsonl"
    log.write_text('{"kimg": 0.1}\n{"kimg": 0.2}\n{"kimg": 0.3}\n{"kimg": 0.4, "loss')
    assert [r["kimg"] for r in runs.read_log(log)] == [0.1, 0.2, 0.3]
    runs.cut_log(log, 0.2)
    assert log.read_text() == '{"kimg": 0.1}\n{"kimg": 0.2}\n'


def test_a_full_disk_while_the_checkpoint_is_written_keeps_the_previous_one(tiny_run, monkeypatch):
    before = (tiny_run / "checkpoint.pt").read_bytes()
    real = torch.save

    def full(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise OSError(28, "No space left on device", str(f))
    monkeypatch.setattr(torch, "save", full)
    message = refused("--resume", tiny_run, "--total-kimg", "0.2", says="No space left on device")
    assert "Traceback" not in message and (tiny_run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in tiny_run.iterdir() if p.name.endswith(runs.TMP)]


# --- interrupts: one line, the checkpoint kept, and the resumed run ends as the straight one ------------------

def run_with_signal(argv, patch, sig, at=1, entry="ilsgan"):
    """entry.main(argv) in a subprocess in which `patch` ('module.name') sends `sig` to the process on
    its `at`-th call, just after it ran."""
    module, name = patch.rsplit(".", 1)
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import ilsgan, mine, unet_eval, torch\n"
            f"target = {module}; real = getattr(target, {name!r}); calls = []\n"
            "def patched(*a, **k):\n"
            "    out = real(*a, **k); calls.append(1)\n"
            f"    if len(calls) == {at}: os.kill(os.getpid(), {int(sig)})\n"
            "    return out\n"
            f"setattr(target, {name!r}, patched)\n"
            f"{entry}.main({list(map(str, argv))!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run with its evaluations, never interrupted: what the interrupted ones must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run_script(*TINY, *EVAL, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("patch, sig, at, during", [
    ("ilsgan.train_step", signal.SIGINT, 9, "training"),
    ("torch.save", signal.SIGTERM, 2, "training"),  # during the second checkpoint's write
])
def test_an_interrupt_says_what_was_kept_and_the_run_continues_exactly(tmp_path, straight, patch, sig, at, during):
    out = tmp_path / "run"
    r = run_with_signal([*TINY, *EVAL, "--out", out], patch, sig, at)
    assert r.returncode == 128 + sig and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {signal.Signals(sig).name} during {during}; kept: {out / 'checkpoint.pt'} at"), line
    assert f"continue with: python ilsgan.py --resume {out}" in line
    assert not [p for p in out.iterdir() if p.name.endswith(runs.TMP)]
    r = run_script("--resume", out)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = ilsgan.read_checkpoint(straight)[1]["state"], ilsgan.read_checkpoint(out)[1]["state"]
    for net in ("G", "D", "G_ema"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    kimgs = [[x["kimg"] for x in runs.read_log(run / "stats.jsonl")] for run in (straight, out)]
    assert kimgs[0] == kimgs[1] == sorted(set(kimgs[1]))  # every kimg once
    assert {"segmentation", "mi"} <= set(runs.read_results(out))


@pytest.mark.slow
def test_an_interrupt_before_the_first_checkpoint_says_to_start_again(tmp_path):
    r = run_with_signal([*TINY, "--out", tmp_path / "run"], "ilsgan.load_images", signal.SIGINT)  # before the snapshot at kimg 0
    assert r.returncode == 130 and "kept: nothing: no checkpoint had been written yet" in r.stderr
    assert "--overwrite" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script, patch, during", [("unet_eval", "unet_eval.train_unet", "the U-Net distillation"),
                                                   ("mine", "mine.estimate_mi", "MINE")])
def test_an_interrupt_of_an_evaluation_names_what_it_did_not_finish(straight, tmp_path, script, patch, during):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = files_of(run)
    r = run_with_signal(["--ckpt", run, "--preset", "tiny"], patch, signal.SIGTERM, entry=script)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"during {during} of {run}" in line and "(scoring not finished)" in line
    assert f"continue with: python {script}.py --ckpt" in line and files_of(run) == before


@pytest.mark.slow
def test_the_help_lists_every_setting_with_its_comment(tmp_path):
    import dataclasses
    r = run_script("--help", cwd=tmp_path)
    text = " ".join(r.stdout.split())  # argparse wraps long help lines
    assert r.returncode == 0 and all("--" + f.name.replace("_", "-") in text for f in dataclasses.fields(ilsgan.Config))
    assert "Eq. (4): minimal mask area [0.25]" in text and "--resume" in text and "--preset {tiny,cpu,paper64,paper128}" in text


@pytest.mark.slow
def test_a_missing_dataset_names_its_layout_from_the_command_line(tmp_path):
    (tmp_path / "cars").mkdir()
    fails("--dataset", "cars", "--data-root", tmp_path / "cars", "--out", tmp_path / "run", says="expected layout")
