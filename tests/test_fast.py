"""Tests of ddpm_course.fast: each fast form computes its plain block's function (outputs and gradients) with the
same parameters; make_fast / make_plain swap them in place; checkpoints load across the two."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm_course.blocks import Attention, Block, Downsample, LinearAttention, Upsample
from ddpm_course.unet import ToyMLP
from ddpm_course.fast import (
    FAST_FORMS,
    FastAttention,
    FastBlock,
    FastDownsample,
    FastLinearAttention,
    FastUNet,
    FastUpsample,
    from_tokens,
    is_channels_last,
    make_fast,
    make_plain,
    subpixel_kernel,
    to_tokens,
    upsample_taps,
)
from ddpm_course.checkpoint import load_model
from ddpm_course.unet import UNet


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _outputs_and_grads(module: nn.Module, *inputs):
    "Output, gradient of the first input and of every parameter, for a fixed uneven upstream gradient (float64)."
    module = module.double()
    xs = [i.detach().double().requires_grad_(k == 0) if torch.is_tensor(i) else i for k, i in enumerate(inputs)]
    out = module(*xs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out.detach(), xs[0].grad, {n: p.grad for n, p in module.named_parameters()}


def assert_same_function(plain: nn.Module, fast: nn.Module, *inputs, atol: float = 1e-9):
    "fast gives plain's outputs and gradients (float64: rounding only); both keep their own copies."
    o1, g1, p1 = _outputs_and_grads(copy.deepcopy(plain), *inputs)
    o2, g2, p2 = _outputs_and_grads(copy.deepcopy(fast), *inputs)
    torch.testing.assert_close(o2, o1, atol=atol, rtol=1e-7)
    torch.testing.assert_close(g2, g1, atol=atol, rtol=1e-7)
    assert p1.keys() == p2.keys()
    for n in p1:
        torch.testing.assert_close(p2[n], p1[n], atol=atol, rtol=1e-7, msg=n)


LAYOUTS = ["standard", "channels_last"]


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    "x with the same values, stored in the given layout."
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_layout_helpers():
    x = torch.randn(2, 3, 4, 5)
    cl = in_layout(x, "channels_last")
    assert is_channels_last(cl) and not is_channels_last(x) and not is_channels_last(torch.randn(3, 4, 5))
    assert not is_channels_last(torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last))  # both at once
    tokens = to_tokens(cl)
    assert tokens.shape == (2, 20, 3) and tokens.data_ptr() == cl.data_ptr()  # a view of a channels-last map
    assert torch.equal(tokens[1, 3 * 5 + 2], x[1, :, 3, 2])  # pixel (3, 2) of image 1
    assert torch.equal(to_tokens(x), tokens)  # a copy of a standard one, the same values
    back = from_tokens(tokens, 4, 5)
    assert torch.equal(back, x) and is_channels_last(back) and back.data_ptr() == cl.data_ptr()


def fast_copy(plain: nn.Module) -> nn.Module:
    "A copy of the plain block in its fast form (same parameters)."
    fast = make_fast(copy.deepcopy(plain))
    assert type(fast) is FAST_FORMS[type(plain)]
    return fast


def test_upsample_taps_from_the_repeat():
    # brute force: kernel row k of output row 2i + a reads repeated row 2i + a + k - 1 = original row (2i + a + k - 1) // 2
    i = 5
    expected = torch.zeros(2, 3, 3)
    for a in range(2):
        for k in range(3):
            expected[a, (2 * i + a + k - 1) // 2 - i + 1, k] = 1
    assert torch.equal(upsample_taps(), expected)
    assert subpixel_kernel(torch.randn(5, 3, 3, 3)).shape == (20, 3, 3, 3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 3, 1, 1), (3, 8, 4, 4)])
def test_fast_upsample(shape, layout):
    up = Upsample(shape[1], 6)
    x = in_layout(torch.randn(shape), layout)
    ref = up.conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3))  # the definition, without F.interpolate
    fast = fast_copy(up)
    torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
    assert_same_function(up, fast, x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("time", ["scale_shift", "shift", "none"])
@pytest.mark.parametrize("weight_standardize", [False, True])
def test_fast_block(time, weight_standardize, layout):
    blk = Block(4, 8, groups=4, weight_standardize=weight_standardize)
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
        blk.norm.bias.uniform_(-0.5, 0.5)
    x, scale, shift = in_layout(torch.randn(3, 4, 5, 6), layout), torch.randn(3, 8, 1, 1), torch.randn(3, 8, 1, 1)
    ss = {"scale_shift": (scale, shift), "shift": (None, shift), "none": None}[time]
    fast = fast_copy(blk)
    assert_same_function(blk, fast, x, ss)
    # against GroupNorm written out: groups of 2 channels, biased variance, eps 1e-5
    h = blk.proj(x).reshape(3, 4, -1)
    h = ((h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).view(3, 8, 5, 6)
    h = h * blk.norm.weight[:, None, None] + blk.norm.bias[:, None, None]
    if ss is not None:
        h = h * (1 + (0 if ss[0] is None else ss[0])) + ss[1]
    out = fast(x, ss)
    torch.testing.assert_close(out, F.silu(h), atol=1e-5, rtol=1e-4)
    assert is_channels_last(out) == (layout == "channels_last")  # the layout flows through


def test_fast_block_dropout_only_in_training():
    blk = FastBlock(4, 8, groups=4, dropout=0.5)
    x, ss = torch.randn(2, 4, 3, 3), (torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1))
    assert not torch.equal(blk.train()(x, ss), blk(x, ss))
    assert torch.equal(blk.eval()(x, ss), blk(x, ss))


def _quadratic_linear_attention(la: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    "Linear attention through the explicit N x N matrix softmax_feat(Q)^T softmax_pos(K), then V."
    b, _, h, w = x.shape
    q, k, v = la.to_qkv(x).reshape(b, 3, la.heads, la.dim_head, h * w).unbind(1)
    weights = torch.einsum("bhdi,bhdj->bhij", q.softmax(-2) / math.sqrt(la.dim_head), k.softmax(-1))
    return la.to_out(torch.einsum("bhij,bhej->bhei", weights, v).reshape(b, -1, h, w))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 3000])
def test_fast_linear_attention(chunk_bytes, layout):
    la = LinearAttention(8, heads=2, dim_head=4)
    with torch.no_grad():
        la.to_out[0].bias.uniform_(-1, 1)
    x = in_layout(torch.randn(5, 8, 3, 4) * 2, layout)
    fast = fast_copy(la)
    if chunk_bytes is not None:
        fast.chunk_bytes = chunk_bytes  # 1: one image at a time; 3000 (float32): chunks of 3 and 2 images
    with torch.no_grad():  # chunks are taken only when no gradient is recorded
        ref = _quadratic_linear_attention(la, x)
        torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-4)
    assert_same_function(la, fast, x)


def test_fast_linear_attention_chunks_only_at_inference(monkeypatch):
    fast, x = FastLinearAttention(8, heads=2, dim_head=4), torch.randn(5, 8, 3, 4)
    fast.chunk_bytes = 1
    calls = []
    attend = FastLinearAttention._attend
    monkeypatch.setattr(FastLinearAttention, "_attend", lambda self, part: calls.append(len(part)) or attend(self, part))
    with torch.no_grad():
        fast(x)
    assert calls == [1] * 5
    calls.clear()
    fast(x)
    assert calls == [5]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads,dim_head,hw", [(1, 16, (4, 4)), (4, 8, (3, 5))])
def test_fast_attention(heads, dim_head, hw, layout):
    attn = Attention(12, heads, dim_head)
    x = in_layout(torch.randn(2, 12, *hw) * 3, layout)
    b, _, h, w = x.shape
    q, k, v = attn.to_qkv(x).reshape(b, 3, heads, dim_head, h * w).unbind(1)
    weights = (torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(dim_head)).softmax(-1)
    ref = attn.to_out(torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, -1, h, w))
    fast = fast_copy(attn)
    out = fast(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert is_channels_last(out) == (layout == "channels_last")
    assert_same_function(attn, fast, x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_attention_runs_the_fused_kernel(layout):
    attn, x = Attention(64), in_layout(torch.randn(2, 64, 4, 4), layout)
    fast = make_fast(copy.deepcopy(attn))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast(x)  # the only kernel allowed is the fused one
        if layout == "standard":  # (a channels-last map happens to give the plain form d contiguous too)
            with pytest.raises(RuntimeError, match="No available kernel"):
                attn(x)  # the plain layout (d strided) is refused by it


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_downsample(layout):
    down = Downsample(3, 5)
    x = in_layout(torch.randn(2, 3, 4, 6), layout)
    # brute force: output pixel (p, q) mixes the 2x2 patch at (2p, 2q) through 1x1 weight column 4c + 2i + j
    w, ref = down.conv.weight[:, :, 0, 0], torch.empty(2, 5, 2, 3)
    for p in range(2):
        for q in range(3):
            patch = torch.stack([x[:, c, 2 * p + i, 2 * q + j] for c in range(3) for i in range(2) for j in range(2)], 1)
            ref[:, :, p, q] = patch @ w.T + down.conv.bias
    fast = fast_copy(down)
    assert type(fast) is FastDownsample
    torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
    assert_same_function(down, fast, x)
    with pytest.raises(ValueError, match="divisible by 2, got 5 x 6"):
        fast(torch.randn(1, 3, 5, 6))
    conv_kind = Downsample(3, 5, kind="conv")
    assert_same_function(conv_kind, fast_copy(conv_kind), x)  # the strided 3x3 kind is left as it is


def _small_unet(channels: int = 3, **kw) -> UNet:
    return UNet(dim=16, dim_mults=(1, 2), channels=channels, num_res_blocks=1, attn=("linear", "full"), mid_attn="full",
                heads=2, dim_head=8, groups=4, **kw)


@pytest.mark.parametrize("time_cond", ["scale_shift", "add"])
def test_make_fast_on_a_unet(time_cond):
    plain = _small_unet(time_cond=time_cond)
    params = list(plain.parameters())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 900])
    with torch.no_grad():
        ref = plain(x, t)
    fast = make_fast(copy.deepcopy(plain))
    kinds = {type(m) for m in fast.modules()}
    assert set(FAST_FORMS.values()) <= kinds and not kinds & set(FAST_FORMS)
    assert_same_function(plain, fast, x, t)
    # in place: the same module and parameter objects (an optimiser built before still holds them)
    assert make_fast(plain) is plain and list(plain.parameters()) == params
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t), ref, atol=1e-5, rtol=1e-4)
    assert make_plain(plain) is plain and not {type(m) for m in plain.modules()} & set(FAST_FORMS.values())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16])
def test_fast_unet_runs_channels_last_on_cpu(size, channels):
    plain = _small_unet(channels=channels)
    fast = make_fast(copy.deepcopy(plain))
    assert type(fast) is FastUNet and fast.channels_last
    seen = []  # the layout of the first convolution's output: one input channel is ambiguous, 16 outputs are not
    fast.init_conv.register_forward_hook(lambda m, args, out: seen.append(is_channels_last(out)))
    x, t = torch.randn(2, channels, size, size), torch.tensor([1, 900])
    out = fast(x, t)
    assert seen == [True] and out.is_contiguous()  # channels-last inside, the standard layout outside
    assert_same_function(plain, fast, x, t)
    x_view = torch.randn(5, channels, 2 * size, size)[1:3, :, ::2]  # a view: storage offset, strides of its own
    with torch.no_grad():
        torch.testing.assert_close(fast(x_view, t), plain(x_view, t), atol=1e-5, rtol=1e-4)
    fast.channels_last = False
    fast(x, t)
    assert seen[-1] is False
    assert_same_function(plain, fast, x, t)
    with pytest.raises(ValueError, match="expected x of shape"):
        fast(torch.randn(channels, size, size), 5)  # bad input gets the plain network's message


def test_state_dicts_load_across_forms():
    plain = _small_unet()
    fast = make_fast(_small_unet())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    fast.load_state_dict(plain.state_dict())  # strict: same keys, same shapes
    other = _small_unet()
    other.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 7), plain(x, 7), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other(x, 7), plain(x, 7), atol=0, rtol=0)


def test_make_fast_leaves_other_networks_alone():
    mlp = ToyMLP()
    before = [type(m) for m in mlp.modules()]
    assert make_fast(mlp) is mlp and [type(m) for m in mlp.modules()] == before


def test_pretrained_digits_loads_fast_with_the_plain_outputs():
    ddpm = load_model("pretrained:digits")
    net = ddpm.model
    assert {FastBlock, FastAttention, FastUpsample} <= {type(m) for m in net.modules()}
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        fast_out = net(x, t)
        plain_out = make_plain(net)(x, t)
    torch.testing.assert_close(fast_out, plain_out, atol=1e-5, rtol=1e-4)
