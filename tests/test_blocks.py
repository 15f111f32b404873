"""Tests of ddpm_course.blocks: wrappers, resampling, weight standardisation, ResNet blocks, attention."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ddpm_course.blocks import (
    Attention,
    Block,
    Downsample,
    LinearAttention,
    PreNorm,
    Residual,
    ResnetBlock,
    Upsample,
    WeightStandardizedConv2d,
    attention_block,
    space_to_depth,
)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_residual_and_prenorm():
    x = torch.randn(2, 6, 4, 5) * 3 + 1
    lin = nn.Conv2d(6, 6, 1)
    torch.testing.assert_close(Residual(lin)(x), x + lin(x))
    pn = PreNorm(6, lin, groups=2)
    torch.testing.assert_close(pn(x), lin(F.group_norm(x, 2, pn.norm.weight, pn.norm.bias)))


def test_space_to_depth_matches_einops_and_reshape():
    x = torch.randn(2, 3, 8, 6)
    ref = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2)  # lucidrains' Downsample
    assert torch.equal(space_to_depth(x), ref)
    b, c, h, w = x.shape
    explicit = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(-1, 4 * c, h // 2, w // 2)
    assert torch.equal(space_to_depth(x), explicit)
    with pytest.raises(ValueError, match="divisible"):
        space_to_depth(torch.zeros(1, 1, 6, 5))


def test_downsample_and_upsample():
    x = torch.randn(2, 4, 8, 6)
    s2d = Downsample(4, 10, "space_to_depth")
    torch.testing.assert_close(s2d(x), s2d.conv(space_to_depth(x)))
    conv = Downsample(4, 10, "conv")
    assert conv(x).shape == (2, 10, 4, 3) and conv.conv.stride == (2, 2)
    up = Upsample(4, 7)
    rep = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(up(x), up.conv(rep))
    assert up(x).shape == (2, 7, 16, 12)
    with pytest.raises(ValueError, match="kind"):
        Downsample(4, kind="avgpool")


def _standardised(w, eps):
    w = w.double()
    return (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), unbiased=False, keepdim=True) + eps).sqrt()


def test_weight_standardised_conv():
    conv = WeightStandardizedConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    ref = F.conv2d(x.double(), _standardised(conv.weight, 1e-5), conv.bias.double(), padding=1)
    torch.testing.assert_close(conv(x).double(), ref, atol=1e-5, rtol=1e-5)
    nobias = WeightStandardizedConv2d(3, 5, 1, bias=False)
    assert nobias(x).shape == (2, 5, 6, 6)
    w0 = conv.weight.detach().clone()
    with torch.no_grad():  # scale and offset of a kernel cancel, up to epsilon: 7w + 0.3 acts as w with eps / 49
        conv.weight.mul_(7.0).add_(0.3)
    ref = F.conv2d(x.double(), _standardised(w0, 1e-5 / 49), conv.bias.double(), padding=1)
    torch.testing.assert_close(conv(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_weight_standardised_conv_half_precision():
    conv = WeightStandardizedConv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(0.01)  # variance ~1e-6: comparable to epsilon
        conv.weight[0].fill_(0.02)  # a constant kernel: variance exactly 0
    x = torch.randn(1, 8, 5, 5)
    ref32 = conv(x)
    assert torch.isfinite(ref32).all()
    half = conv.half()
    out = half(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # in half precision the epsilon is 1e-3: the reference computed with that epsilon in float64
    ref = F.conv2d(x.double(), _standardised(half.weight.float(), 1e-3), half.bias.double(), padding=1)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_block_scale_shift_and_errors():
    blk = Block(4, 8, groups=4)
    x = torch.randn(3, 4, 5, 5)
    scale, shift = torch.randn(3, 8, 1, 1), torch.randn(3, 8, 1, 1)
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
        blk.norm.bias.uniform_(-0.5, 0.5)
    h = blk.proj(x).view(3, 4, -1)  # GroupNorm written out: 4 groups of 2 channels, biased variance, eps 1e-5
    h = ((h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).view(3, 8, 5, 5)
    h = h * blk.norm.weight[:, None, None] + blk.norm.bias[:, None, None]
    torch.testing.assert_close(blk(x, (scale, shift)), F.silu(h * (1 + scale) + shift), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(blk(x, (None, shift)), F.silu(h + shift), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(blk(x), F.silu(h), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="divisible by groups"):
        Block(4, 6, groups=4)
    assert isinstance(Block(4, 8, weight_standardize=True).proj, WeightStandardizedConv2d)


@pytest.mark.parametrize("time_cond", ["scale_shift", "add"])
def test_resnet_block(time_cond):
    rb = ResnetBlock(4, 8, time_emb_dim=16, time_cond=time_cond)
    x, e = torch.randn(3, 4, 6, 6), torch.randn(3, 16)
    out = rb(x, e)
    assert out.shape == (3, 8, 6, 6)
    p = rb.mlp(e)[:, :, None, None]
    ss = p.chunk(2, 1) if time_cond == "scale_shift" else (None, p)
    torch.testing.assert_close(out, rb.block2(rb.block1(x, ss)) + rb.res_conv(x))
    # each sample's output depends only on its own time embedding
    e2 = e.clone()
    e2[1] += 1
    out2 = rb(x, e2)
    assert torch.equal(out2[0], out[0]) and not torch.allclose(out2[1], out[1])
    with pytest.raises(ValueError, match="time embedding"):
        rb(x)
    plain = ResnetBlock(8, 8)
    assert isinstance(plain.res_conv, nn.Identity) and plain.mlp is None and plain(torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match="time_cond"):
        ResnetBlock(4, 8, 16, time_cond="concat")


def test_resnet_block_dropout():
    rb = ResnetBlock(8, 8, 16, dropout=0.5)
    x, e = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    assert not torch.equal(rb.train()(x, e), rb(x, e))
    assert torch.equal(rb.eval()(x, e), rb(x, e))


def _einsum_attention(attn, x):
    b, c, h, w = x.shape
    qkv = attn.to_qkv(x).reshape(b, 3, attn.heads, attn.dim_head, h * w)
    q, k, v = qkv.unbind(1)
    weights = (torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(attn.dim_head)).softmax(-1)
    return attn.to_out(torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, -1, h, w))


@pytest.mark.parametrize("heads,dim_head,hw", [(1, 16, (4, 4)), (4, 8, (3, 5)), (2, 32, (8, 8))])
def test_attention_equals_einsum_reference(heads, dim_head, hw):
    attn = Attention(12, heads, dim_head)
    x = torch.randn(2, 12, *hw) * 3  # large inputs: a wrong scale changes the result a lot
    out = attn(x)
    torch.testing.assert_close(out, _einsum_attention(attn, x), atol=1e-5, rtol=1e-4)
    # the slip scale = dim_head * -0.5 instead of dim_head ** -0.5 gives something else
    b, _, h, w = x.shape
    q, k, v = attn.to_qkv(x).reshape(b, 3, heads, dim_head, h * w).unbind(1)
    wrong = (torch.einsum("bhdi,bhdj->bhij", q, k) * (dim_head * -0.5)).softmax(-1)
    wrong = attn.to_out(torch.einsum("bhij,bhdj->bhdi", wrong, v).reshape(b, -1, h, w))
    assert (wrong - out).abs().max() > 1e-2


def test_attention_matches_torch_multihead_attention():
    dim, heads = 16, 4
    attn = Attention(dim, heads, dim // heads)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.to_qkv.weight[:, :, 0, 0])
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(attn.to_out.weight[:, :, 0, 0])
        mha.out_proj.bias.copy_(attn.to_out.bias)
    x = torch.randn(2, dim, 4, 6)
    tokens = x.flatten(2).transpose(1, 2)
    ref, _ = mha(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(attn(x), ref.transpose(1, 2).reshape(x.shape), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [Attention, LinearAttention])
def test_attention_is_permutation_equivariant(cls):
    attn = cls(8, 2, 4)
    x = torch.randn(2, 8, 5, 4)
    perm = torch.randperm(20)
    shuffle = lambda t: t.flatten(2)[:, :, perm].reshape(t.shape)
    torch.testing.assert_close(attn(shuffle(x)), shuffle(attn(x)), atol=1e-5, rtol=1e-4)
    conv = nn.Conv2d(8, 8, 3, padding=1)  # a convolution is not: the test can tell the difference
    assert not torch.allclose(conv(shuffle(x)), shuffle(conv(x)), atol=1e-3)


def test_linear_attention_equals_quadratic_form():
    la = LinearAttention(8, heads=2, dim_head=4)
    x = torch.randn(3, 8, 4, 4)
    q, k, v = la.to_qkv(x).reshape(3, 3, 2, 4, 16).unbind(1)
    q = q.softmax(-2) / 2.0  # softmax over features, scale 4 ** -0.5
    k = k.softmax(-1)  # softmax over positions
    out = torch.zeros(3, 2, 4, 16)
    for n in range(16):  # output at position n: sum over positions m of (q_n . k_m) v_m
        for m in range(16):
            out[:, :, :, n] += (q[:, :, :, n] * k[:, :, :, m]).sum(-1, keepdim=True) * v[:, :, :, m]
    torch.testing.assert_close(la(x), la.to_out(out.reshape(3, 8, 4, 4)), atol=1e-5, rtol=1e-4)


def test_attention_block():
    assert attention_block("none", 8) is None
    for kind, cls in (("full", Attention), ("linear", LinearAttention)):
        blk = attention_block(kind, 8, heads=2, dim_head=4)
        assert isinstance(blk, Residual) and isinstance(blk.fn, PreNorm) and isinstance(blk.fn.fn, cls)
        x = torch.randn(1, 8, 4, 4)
        torch.testing.assert_close(blk(x), x + blk.fn.fn(blk.fn.norm(x)))
    with pytest.raises(ValueError, match="attention kind"):
        attention_block("sparse", 8)
