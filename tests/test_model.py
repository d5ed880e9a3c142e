"""The networks: modulated convolution parity, output shapes and ranges, minibatch stddev."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ilsgan


def loop_modulated_conv(x, weight, styles, demodulate):
    """Reference: one ordinary conv per sample with its own modulated (and demodulated) weight."""
    out = []
    for i in range(x.shape[0]):
        w = weight * styles[i][None, :, None, None]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        out.append(F.conv2d(x[i:i + 1], w, padding=weight.shape[-1] // 2))
    return torch.cat(out)


def test_grouped_modulated_conv_equals_per_sample_loop():
    x, weight, styles = torch.randn(5, 6, 8, 8), torch.randn(7, 6, 3, 3), torch.randn(5, 6)
    for demod in (True, False):
        ref = loop_modulated_conv(x, weight, styles, demod)
        for fused in (True, False):
            out = ilsgan.modulated_conv2d(x, weight, styles, demodulate=demod, fused=fused)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_demodulation_gives_unit_variance_outputs():
    x = torch.randn(4, 32, 16, 16)
    out = ilsgan.modulated_conv2d(x, torch.randn(32, 32, 3, 3), torch.rand(4, 32) * 3 + 0.1)
    assert abs(out[..., 2:-2, 2:-2].std().item() - 1) < 0.15


def test_generator_and_discriminator_shapes():
    cfg = ilsgan.make_config("tiny")
    G, D = ilsgan.Generator(cfg), ilsgan.Discriminator(cfg)
    f, b, m = G(torch.randn(4, cfg.z_dim))
    assert f.shape == b.shape == (4, 3, 16, 16) and m.shape == (4, 1, 16, 16)
    assert m.min() > 0 and m.max() < 1
    assert D(ilsgan.composite(f, b, m)).shape == (4,)


def test_train_and_eval_mode_give_the_same_generator_output():
    cfg = ilsgan.make_config("tiny")
    G, z = ilsgan.Generator(cfg), torch.randn(3, cfg.z_dim)
    torch.manual_seed(1)
    a = G.train()(z)
    torch.manual_seed(1)
    b = G.eval()(z)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_minibatch_stddev_appends_group_std():
    x = torch.randn(8, 3, 4, 4)
    y = ilsgan.minibatch_stddev(x, 4)
    assert y.shape == (8, 4, 4, 4)
    groups = x.reshape(4, 2, 3, 4, 4)  # sample i is in group i % 2 (StyleGAN2 layout)
    expect = (groups.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])
    torch.testing.assert_close(y[0, 3, 0, 0], expect[0])
    torch.testing.assert_close(y[1, 3, 0, 0], expect[1])


def loop_modulated_up_conv(x, weight, styles):
    """Reference for the up_filter path, from the definitions: per sample, insert zeros between the pixels, run an
    ordinary conv with the flipped kernel (a transposed conv), then the [1,3,3,1] filter with gain 4."""
    B, I, H, W = x.shape
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = torch.outer(f, f) / 64 * 4
    out = []
    for i in range(B):
        w = weight * styles[i][None, :, None, None]
        w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        z = torch.zeros(1, I, 2 * H - 1, 2 * W - 1)
        z[..., ::2, ::2] = x[i]
        y = F.conv2d(z, w.flip(2, 3), padding=2)  # [1,O,2H+1,2W+1]
        y = F.conv2d(F.pad(y, [1, 1, 1, 1]), blur.expand(y.shape[1], 1, 4, 4), groups=y.shape[1])
        out.append(y)
    return torch.cat(out)


def test_upsampling_modulated_conv_equals_its_definition():
    x, weight, styles = torch.randn(3, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    ref = loop_modulated_up_conv(x, weight, styles)
    assert ref.shape == (3, 4, 12, 12)
    for fused in (True, False):
        out = ilsgan.modulated_conv2d(x, weight, styles, fused=fused, up_filter=ilsgan.fir_filter())
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_upsample2d_is_bilinear_inside_and_zero_padded_at_the_border():
    x = torch.randn(2, 3, 5, 5)
    up = ilsgan.upsample2d(x, ilsgan.fir_filter())
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])
    torch.testing.assert_close(up[..., 0, 1:-1], 0.75 * bilinear[..., 0, 1:-1])  # edge row: 3/4 of row 0, 1/4 zero padding


def _two_copies(memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    net = torch.nn.Sequential(ilsgan.EqualConv2d(3, 8, 3), ilsgan.EqualConv2d(8, 8, 1, act=False, bias=False),
                              torch.nn.Flatten(), ilsgan.EqualLinear(8 * 16, 1)).to(memory_format=memory_format)
    return net, copy.deepcopy(net)


def _loss(net, seed):
    torch.manual_seed(seed)
    return net(torch.randn(4, 3, 4, 4)).square().mean()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_adam_on_the_flat_buffer_steps_every_parameter_as_adam_on_the_parameters(memory_format):
    flat_net, ref = _two_copies(memory_format)
    flat = ilsgan.flatten_parameters(flat_net)
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in flat_net.parameters())
    opt = torch.optim.Adam([flat], lr=0.01, betas=(0.0, 0.99), fused=True)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.0, 0.99), fused=True)
    before = [p.detach().clone() for p in ref.parameters()]
    for seed in range(3):
        ilsgan.optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), _loss(flat_net, seed), flat)
        opt_ref.zero_grad()
        _loss(ref, seed).backward()
        opt_ref.step()
    for p, q, p0 in zip(flat_net.parameters(), ref.parameters(), before):
        assert not torch.equal(q, p0)  # every parameter moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # an older checkpoint's per-parameter moments are laid out into the buffer, each in its place
    resumed = torch.optim.Adam([flat], lr=0.01, betas=(0.0, 0.99), fused=True)
    resumed.load_state_dict(ilsgan.flat_adam_state(opt_ref.state_dict(), flat_net, flat))
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(resumed.state[flat][k], opt.state[flat][k], rtol=1e-5, atol=1e-9)
    assert resumed.state[flat]["step"].item() == 3
    fresh = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.0, 0.99), fused=True)  # saved before any step
    resumed.load_state_dict(ilsgan.flat_adam_state(fresh.state_dict(), flat_net, flat))
    assert not resumed.state


def test_flat_parameters_keep_their_layout_and_values_and_get_their_gradients():
    net = _two_copies(torch.channels_last)[0]
    values = [p.detach().clone() for p in net.parameters()]
    flat = ilsgan.flatten_parameters(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values))
    flat.grad.fill_(7.0)  # backward adds into the buffer, so it is zeroed before each step
    flat.grad.zero_()
    _loss(net, 0).backward()
    _, ref = _two_copies()
    _loss(ref, 0).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
        torch.testing.assert_close(p.grad, q.grad)
    with torch.no_grad():
        flat.zero_()
    assert all((p == 0).all() for p in net.parameters())  # the parameters are the buffer


def test_a_synthesis_networks_styles_in_one_product_are_each_layers_affine_map():
    cfg = ilsgan.make_config("tiny")
    syn = ilsgan.SynthesisNetwork(cfg, 3)
    w = torch.randn(5, cfg.w_dim)
    s_conv, s_rgb = syn.styles(w)
    for layer, s in zip([*syn.convs, *syn.torgbs], [*s_conv, *s_rgb]):
        torch.testing.assert_close(s, layer.affine(w), rtol=1e-6, atol=1e-6)


def test_the_ema_follows_the_generator_with_its_half_life():
    cfg = ilsgan.make_config("tiny")
    state = ilsgan.State(cfg, torch.device("cpu"))
    state.nimg = 10**7  # past the ramp-up: beta = 0.5 ** (batch / (ema_kimg * 1000))
    ema0 = [p.detach().clone() for p in state.G_ema.parameters()]
    ilsgan.train_step(state, torch.rand(cfg.batch, 3, 16, 16) * 2 - 1, cfg)
    beta = 0.5 ** (cfg.batch / (cfg.ema_kimg * 1000))
    for e, e0, g in zip(state.G_ema.parameters(), ema0, state.G.parameters()):
        torch.testing.assert_close(e, g + beta * (e0 - g), rtol=1e-5, atol=1e-7)
    assert not torch.equal(list(state.G_ema.parameters())[0], ema0[0])
