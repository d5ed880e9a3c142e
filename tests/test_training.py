"""Training and resuming with a tiny budget: reproducible, resumed exactly (weights, logs and the flags
given), stopped with the last good checkpoint when lost, the same numbers in every precision to
rounding, no wait for the device inside a step, data parallel under torchrun, the GPU path on fake
CUDA tensors."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import ilsgan
import runs
from conftest import ENV, ROOT, train_tiny


def first_steps(steps=2, data_seed=0, ada_p=None, **overrides):
    """The statistics of a tiny run's first `steps` training steps on random images (seeded)."""
    cfg = ilsgan.make_config("tiny", **overrides)
    state = ilsgan.State(cfg, torch.device("cpu"))
    if ada_p is not None:
        state.ada_p = torch.tensor(ada_p)
    torch.manual_seed(data_seed)
    x = torch.rand(cfg.batch, 3, cfg.resolution, cfg.resolution) * 2 - 1
    return [ilsgan.train_step(state, x, cfg) for _ in range(steps)]


def weights(run):
    return ilsgan.read_checkpoint(run)[1]["state"]


def test_same_seed_gives_the_same_first_losses():
    a, b, c = first_steps(seed=0), first_steps(seed=0), first_steps(seed=1, data_seed=1)
    assert [r["loss_G"].item() for r in a] == [r["loss_G"].item() for r in b]
    assert [r["loss_D"].item() for r in a] == [r["loss_D"].item() for r in b]
    assert a[0]["loss_G"].item() != c[0]["loss_G"].item()


def test_a_tiny_run_writes_its_files_and_its_checkpoint_loads(tiny_session):
    names = {p.name for p in tiny_session.iterdir()}
    assert {"config.json", "stats.jsonl", "checkpoint.pt", "hidden.png", "report.html"} <= names
    assert "grid-00000.000kimg.png" in names  # official: a snapshot of the networks before training too
    saved = runs.read_config(tiny_session)
    assert saved["resolution"] == 16 and saved["amp"] == "off" and saved["about"]["preset"] == "custom"
    rec = runs.read_log(tiny_session / "stats.jsonl")
    assert rec[-1]["kimg"] >= 0.1 and {"loss_G", "loss_D", "mask_area", "flags", "ada_p", "w_ils", "train_sec"} <= set(rec[-1])
    cfg, ckpt = ilsgan.read_checkpoint(tiny_session)  # torch.load(..., weights_only=True) inside
    assert cfg.resolution == 16 and ckpt["run_id"] == saved["run_id"]
    _, G, kimg = ilsgan.load_generator(tiny_session)
    assert kimg == ckpt["state"]["nimg"] / 1000
    assert all(torch.equal(v, ckpt["state"]["G_ema"][k]) for k, v in G.state_dict().items())


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """A run stopped at a snapshot and resumed ends with the weights, ADA p and log of one never stopped."""
    common = dict(ils_warmup=0.0, snap_kimg=0.048, log_kimg=0.016)
    train_tiny(tmp_path / "a", total_kimg=0.096, **common)
    train_tiny(tmp_path / "b", total_kimg=0.048, **common)
    cfg, ckpt = ilsgan.resume_config(tmp_path / "b", dict(total_kimg=0.096))
    ilsgan.run(cfg, ckpt)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a["nimg"] == b["nimg"] == 96 and a["ada_p"] == b["ada_p"]
    for net in ("G", "D", "G_ema"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    log_a, log_b = (runs.read_log(tmp_path / r / "stats.jsonl") for r in "ab")
    assert [r["kimg"] for r in log_a] == [r["kimg"] for r in log_b]
    assert all(r1[k] == r2[k] for r1, r2 in zip(log_a, log_b) for k in ("loss_G", "loss_D", "mask_area"))


def test_resume_gives_the_optimisers_the_flags_lr_and_betas_and_keeps_the_moments():
    cfg = ilsgan.make_config("tiny")
    saved = ilsgan.State(cfg, torch.device("cpu"))
    ilsgan.train_step(saved, torch.rand(cfg.batch, 3, 16, 16) * 2 - 1, cfg)
    resumed = ilsgan.State(runs.with_overrides(cfg, lr=0.01, beta2=0.9), torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    k_g, k_d = 4 / 5, 16 / 17  # the lazy-regularisation rescale
    assert resumed.opt_G.param_groups[0]["lr"] == pytest.approx(0.01 * k_g)
    assert resumed.opt_D.param_groups[0]["lr"] == pytest.approx(0.01 * k_d)
    assert resumed.opt_G.param_groups[0]["betas"][1] == pytest.approx(0.9**k_g)
    p, q = next(resumed.G.parameters()), next(saved.G.parameters())
    assert torch.equal(resumed.opt_G.state[p]["exp_avg_sq"], saved.opt_G.state[q]["exp_avg_sq"])


def test_lr_decay_anneals_the_optimisers_learning_rate_at_the_end_of_the_run():
    cfg = ilsgan.make_config("tiny", lr_decay=0.5, total_kimg=0.1)
    state, x, seen = ilsgan.State(cfg, torch.device("cpu")), torch.rand(8, 3, 16, 16) * 2 - 1, []
    for nimg in (0, 40, 50, 75, 96):
        state.nimg = nimg
        ilsgan.train_step(state, x, cfg)
        seen.append([opt.param_groups[0]["lr"] / opt.defaults["lr"] for opt in (state.opt_G, state.opt_D)])
    assert [x for pair in seen for x in pair] == pytest.approx([1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.08, 0.08])
    assert state.opt_G.defaults["lr"] == pytest.approx(cfg.lr * 4 / 5)  # the rescaled lr it starts from stays


@pytest.mark.parametrize("before, after", [("off", "fp16"), ("fp16", "off"), ("bf16", "fp16")])
def test_resume_in_another_precision(before, after):
    saved = ilsgan.State(ilsgan.make_config("tiny", amp=before), torch.device("cpu"))
    resumed = ilsgan.State(ilsgan.make_config("tiny", amp=after), torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.scaler_G.is_enabled() == (after == "fp16")
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    assert torch.isfinite(ilsgan.train_step(resumed, x, ilsgan.make_config("tiny", amp=after))["loss_G"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_gives_the_losses_of_full_precision(amp):
    """The convolutions in reduced precision, everything that mixed precision would spoil (mapping,
    styles, demodulation, D's 4x4 epilogue, the losses, ADA, R1) in float32: the first steps' losses
    agree with float32 to a few per cent, and stay finite."""
    full, mixed = (first_steps(3, data_seed=1, ada_p=0.2, amp=a) for a in ("off", amp))
    for a, b in zip(full, mixed):
        for k in ("loss_G", "loss_adv", "loss_D", "loss_ils", "mask_area"):
            assert torch.isfinite(b[k]) and abs(a[k].item() - b[k].item()) < 0.05 * abs(a[k].item()) + 2e-3, (k, a[k], b[k])


def test_a_non_finite_loss_stops_training_with_the_last_good_checkpoint(tiny_run, monkeypatch):
    before = (tiny_run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ilsgan, "g_adversarial_loss", lambda d: d.mean() * float("nan"))
    cfg, ckpt = ilsgan.resume_config(tiny_run, dict(total_kimg=1.0))
    with pytest.raises(ilsgan.TrainingStopped, match=f"loss_G became non-finite .*last good checkpoint is {tiny_run}"):
        ilsgan.run(cfg, ckpt)
    assert (tiny_run / "checkpoint.pt").read_bytes() == before


def test_a_lost_run_stops_whatever_its_first_losses_and_the_watch_flags_it_first():
    """The divergence watch is absolute: a non-saturating loss past --diverge nats (100) is lost on any
    machine, and past a tenth of it the collapse watch flags 'diverging'."""
    cfg = ilsgan.make_config("tiny")
    calm = dict(mask_area=0.3, diversity=1.0, mask_spread=0.3, mask_border=0.0, mask_centre=0.5, loss_adv=2.0,
                loss_D=1.3, loss_G=2.0, kimg=1.0)
    assert ilsgan.collapse_flags(calm, cfg.diverge) == [] and "diverging" in ilsgan.collapse_flags(dict(calm, loss_D=12.0), 100)
    ilsgan.stop_if_lost(calm, cfg, "cpu")  # calm: nothing happens
    with pytest.raises(ilsgan.TrainingStopped, match=r"loss_adv reached 1.7e\+06 nats \(--diverge 100\)"):
        ilsgan.stop_if_lost(dict(calm, loss_adv=1.7e6), cfg, "cpu")
    ilsgan.stop_if_lost(dict(calm, loss_adv=1.7e6), runs.with_overrides(cfg, diverge=0.0), "cpu")  # 0: off
    with pytest.raises(ilsgan.TrainingStopped, match="loss_D became non-finite"):
        ilsgan.stop_if_lost(dict(calm, loss_D=float("nan")), runs.with_overrides(cfg, diverge=0.0), "cpu")


@pytest.mark.slow
def test_a_learning_rate_far_too_high_stops_the_run_with_its_last_good_checkpoint(tmp_path):
    from conftest import fails
    r = fails("--preset", "tiny", "--lr", "5", "--total-kimg", "2", "--out", tmp_path / "run", says="Training stopped")
    assert "nats (--diverge 100)" in r.stderr and "the last good checkpoint is" in r.stderr
    _, G, kimg = ilsgan.load_generator(tmp_path / "run")  # whole and finite: written before the loss was lost
    assert f"checkpoint.pt at {kimg:g} kimg" in r.stderr


def test_the_collapse_watch_names_each_known_failure():
    def flags(m, x_fake=None):
        st = ilsgan.watch_stats(m, torch.randn(16, 3, 16, 16) if x_fake is None else x_fake, torch.randn(16, 3, 16, 16))
        return ilsgan.collapse_flags(dict(st, loss_adv=1.0, loss_D=1.0), 100)
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


@pytest.mark.parametrize("dataset, device, resolution, expect", [
    ("synthetic", "cpu", None, "cpu"), ("synthetic", "cuda", 128, "cpu"), ("cub", "cpu", None, "cpu"),
    ("cars", "cpu", 128, "cpu"), ("cub", "cuda", None, "paper64"), ("dogs", "cuda:1", 64, "paper64"),
    ("cars", "cuda", 128, "paper128")])
def test_the_preset_without_the_flag_fits_the_data_and_the_device(dataset, device, resolution, expect):
    preset, why = ilsgan.choose_preset(dataset, device, resolution)
    assert preset == expect and why
    if dataset != "synthetic" and expect == "cpu":
        assert "--preset paper64" in why  # says how to force the paper's settings


@pytest.mark.parametrize("capability, expect", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "off")])
def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expect):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert ilsgan.resolve_amp("auto", torch.device("cuda", 0)) == expect
    assert ilsgan.resolve_amp("fp16", torch.device("cuda", 0)) == "fp16"  # given, not chosen
    assert ilsgan.resolve_amp("auto", torch.device("cpu")) == "off"


@pytest.mark.slow
def test_torchrun_two_processes_train_in_step(tmp_path):
    """Data parallel on CPUs (gloo): two processes share the batch and average their gradients, process
    0 alone writes the run folder, and both end with the same generator."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "ilsgan.py"), "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("preset tiny") == 1 and "2 processes" in runs.read_config(tmp_path / "run")["about"]["workers"]
    state = weights(tmp_path / "run")
    assert state["nimg"] >= 100 and state["step"] == state["nimg"] // 8
    lines = runs.read_log(tmp_path / "run" / "stats.jsonl")
    assert len(lines) == len({r["step"] for r in lines}) >= 4  # one writer


COMPILED_VS_EAGER = """
import torch, ilsgan
from test_training import first_steps
ilsgan.setup_device(torch.device("cpu"), compile=True)
eager, compiled = (first_steps(data_seed=3, compile=c) for c in (False, True))
for a, b in zip(eager, compiled):
    for k in ("loss_G", "loss_D", "loss_ils", "mask_area"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
torch.testing.assert_close(eager[0]["r1"], compiled[0]["r1"], rtol=1e-4, atol=1e-6)
"""


@pytest.mark.slow
def test_the_compiled_generator_trains_as_the_eager_one(tmp_path):
    """--compile: the generator through torch.compile draws the same noise and gives the eager losses
    (to float rounding); R1 still differentiates the eager D twice. In a process of its own with a
    compiler cache of its own: inductor's cache is not keyed by ATEN_CPU_CAPABILITY, so kernels cached
    under other CPU settings can break it (and a crash there would end the whole suite)."""
    pytest.importorskip("torch._inductor")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    env = dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", COMPILED_VS_EAGER], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# --- the GPU path on fake CUDA tensors ------------------------------------------------------------------

def test_the_forward_passes_of_a_paper64_step_stay_on_the_device():
    """paper64's networks and every forward pass of a training step on FAKE CUDA tensors (FakeTensorMode:
    shapes, dtypes and devices, no data, no GPU): no CPU tensor meets a CUDA one, nothing is copied from
    the host and no device value read back. The backward passes need a GPU runtime:
    ../shared/tools/fakecuda/run.sh checks whole steps."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class HostTraffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.events = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            devs = [t.device.type for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            if func is torch.ops.aten._local_scalar_dense.default and devs[0] == "cuda":
                self.events["host read"] += 1
            elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and devs[:2] == ["cuda", "cpu"]:
                self.events["copy cpu->cuda"] += 1
            return func(*args, **(kwargs or {}))

    def on_fake_cuda(module, mode):
        for m in module.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    m._parameters[k] = torch.nn.Parameter(mode.from_tensor(p.detach()).to("cuda"), p.requires_grad)
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = mode.from_tensor(b).to("cuda")
        return module
    cfg = ilsgan.make_config("paper64", mask_max=0.6, min_spread=0.2, lambda_border=2.0)
    G, D = ilsgan.Generator(cfg), ilsgan.Discriminator(cfg)
    mode, dev, B, res, spy = FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"), cfg.batch, cfg.resolution, HostTraffic()
    try:
        with mode, torch.device("cuda"):
            G, D = on_fake_cuda(G, mode), on_fake_cuda(D, mode)
            p = torch.zeros([]) + 0.3  # ADA's p, on the device
    except (RuntimeError, AssertionError) as e:
        pytest.skip(f"this PyTorch initialises CUDA for fake CUDA tensors ({str(e)[:80]})")
    with mode, torch.device("cuda"), spy:
        f, b, m = G(torch.randn(B, cfg.z_dim))
        x_fake, f_s, m_s = ilsgan.perturbed_composite(f, b, m, *ilsgan.random_shifts(B, res, cfg.shift, dev))
        x_real = ilsgan.to_float(torch.randint(0, 256, (B, 3, res, res), dtype=torch.uint8))
        d_fake, d_real = D(ilsgan.augment(x_fake, p)), D(ilsgan.augment(x_real, p))
        outputs = [ilsgan.g_adversarial_loss(d_fake), ilsgan.d_adversarial_loss(d_real, d_fake),
                   ilsgan.mask_area_loss(m_s, cfg.eta), ilsgan.binarization_loss(m_s), ilsgan.ils_mi_loss(f, b, m),
                   ilsgan.ils_l1_loss(f, b, m), ilsgan.guard_loss(m, m_s, cfg), *ilsgan.watch_stats(m, x_fake, x_real).values(),
                   ilsgan.ada_adjust(p, d_real.sign().mean(), cfg.ada_target, B, cfg.ada_interval, cfg.ada_kimg)]
    assert all(t.device.type == "cuda" for t in outputs)
    assert not spy.events, dict(spy.events)
