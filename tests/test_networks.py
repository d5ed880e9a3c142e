"""The networks: the modulated convolution against the paper's per-sample definition, its upsampling,
output shapes and ranges, minibatch stddev, the official conv_clamp bounds, the EMA's half-life."""
import pytest
import torch
import torch.nn.functional as F

import ilsgan


def per_sample_modulated_conv(x, weight, styles, demodulate, up=False):
    """The paper's form: per sample, the weights modulated (w * s) and demodulated (/ sqrt(sum w'^2)),
    then an ordinary conv; with up, zeros inserted between the pixels, a conv with the flipped kernel
    (a transposed conv), then the [1,3,3,1] filter with gain 4."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = torch.outer(f, f) / 64 * 4
    out = []
    for i in range(x.shape[0]):
        w = weight * styles[i][None, :, None, None]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        if not up:
            out.append(F.conv2d(x[i:i + 1], w, padding=weight.shape[-1] // 2))
            continue
        z = torch.zeros(1, x.shape[1], 2 * x.shape[2] - 1, 2 * x.shape[3] - 1)
        z[..., ::2, ::2] = x[i]
        y = F.conv2d(z, w.flip(2, 3), padding=2)  # [1,O,2H+1,2W+1]
        out.append(F.conv2d(F.pad(y, [1, 1, 1, 1]), blur.expand(y.shape[1], 1, 4, 4), groups=y.shape[1]))
    return torch.cat(out)


def test_modulated_conv_equals_the_per_sample_definition():
    x, weight, styles = torch.randn(5, 6, 8, 8), torch.randn(7, 6, 3, 3), torch.randn(5, 6)
    for demod in (True, False):
        out = ilsgan.modulated_conv2d(x, weight, styles, demodulate=demod)
        torch.testing.assert_close(out, per_sample_modulated_conv(x, weight, styles, demod), atol=1e-5, rtol=1e-4)


def test_upsampling_modulated_conv_equals_its_definition():
    x, weight, styles = torch.randn(3, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    ref = per_sample_modulated_conv(x, weight, styles, True, up=True)
    assert ref.shape == (3, 4, 12, 12)
    out = ilsgan.modulated_conv2d(x, weight, styles, up_filter=ilsgan.fir_filter())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_demodulation_gives_unit_variance_outputs():
    x = torch.randn(4, 32, 16, 16)
    out = ilsgan.modulated_conv2d(x, torch.randn(32, 32, 3, 3), torch.rand(4, 32) * 3 + 0.1)
    assert abs(out[..., 2:-2, 2:-2].std().item() - 1) < 0.15


def test_upsample2d_is_bilinear_inside_and_zero_padded_at_the_border():
    x = torch.randn(2, 3, 5, 5)
    up = ilsgan.upsample2d(x, ilsgan.fir_filter())
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1])
    torch.testing.assert_close(up[..., 0, 1:-1], 0.75 * bilinear[..., 0, 1:-1])  # edge row: 3/4 of row 0, 1/4 zero padding


def test_generator_and_discriminator_shapes():
    cfg = ilsgan.make_config("tiny")
    G, D = ilsgan.Generator(cfg), ilsgan.Discriminator(cfg)
    f, b, m = G(torch.randn(4, cfg.z_dim))
    assert f.shape == b.shape == (4, 3, 16, 16) and m.shape == (4, 1, 16, 16)
    assert m.min() > 0 and m.max() < 1
    assert D(ilsgan.composite(f, b, m)).shape == (4,)


def test_minibatch_stddev_appends_group_std():
    x = torch.randn(8, 3, 4, 4)
    y = ilsgan.minibatch_stddev(x, 4)
    assert y.shape == (8, 4, 4, 4)
    groups = x.reshape(4, 2, 3, 4, 4)  # sample i is in group i % 2 (StyleGAN2 layout)
    expect = (groups.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])
    torch.testing.assert_close(y[0, 3, 0, 0], expect[0])
    torch.testing.assert_close(y[1, 3, 0, 0], expect[1])


def test_conv_clamp_is_the_official_bound_times_the_layers_own_gain():
    """official bias_act: clamp = conv_clamp * gain, the layer's own gain argument, after the
    activation's sqrt(2): +-256 for G's convolutions and D's fromrgb and conv0, +-181 for D's conv1
    (gain sqrt(1/2)); ToRGB +-256."""
    cfg = ilsgan.make_config("tiny")
    G, D = ilsgan.Generator(cfg), ilsgan.Discriminator(cfg)
    big = torch.full((2, 16, 4, 4), 1e6)
    layer, block = G.synthesis_fg.convs[0], D.blocks[0]
    assert layer(big, torch.ones(2, 16)).abs().max().item() == pytest.approx(256)
    assert G.synthesis_fg.torgbs[0](big, torch.ones(2, 16)).abs().max().item() == pytest.approx(256)
    assert D.fromrgb(torch.full((2, 3, 16, 16), 1e6)).abs().max().item() == pytest.approx(256)
    assert block.conv1(torch.full((2, block.conv1.weight.shape[1], 8, 8), 1e6)).abs().max().item() == pytest.approx(256 * 0.5**0.5)


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
