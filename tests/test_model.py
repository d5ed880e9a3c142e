"""The networks: modulated convolution parity, output shapes and ranges, minibatch stddev."""
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
