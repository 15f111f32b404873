"""CUDA checks: training with mixed precision (fp16 and bf16), exact resume, sampling and scoring on the GPU.

Run them with `pytest -m gpu` on a machine with a CUDA device; they are skipped only where CUDA is absent."""

import pytest
import torch

from ddpm_course.checkpoint import load_checkpoint, load_model
from ddpm_course.metrics import extract_features, load_classifier, sample_and_score
from ddpm_course.training import TrainConfig, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")]

TINY = dict(dim=16, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4)


def cfg(**kw):
    "A tiny CUDA run; a constant rate after warm-up, so that a run raised from 10 to 30 steps equals a straight one."
    base = dict(steps=30, batch_size=32, unet_overrides=TINY, timesteps=100, log_every=5, sample_every=30,
                checkpoint_every=10, n_samples=8, device="cuda", seed=0, lr_decay="constant")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_training_on_cuda_with_mixed_precision(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    result = train(cfg(amp=amp), tmp_path, progress=False)
    assert result.step == 30 and result.last_loss is not None and result.last_loss < 1.5
    assert next(result.ddpm.parameters()).device.type == "cuda"
    ck = load_checkpoint(tmp_path)
    assert (ck.scaler is not None) == (amp == "fp16")  # only fp16 needs the loss scaler, and saves its state
    assert all(torch.isfinite(v).all() for v in ck.tensors["ema"].values())


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_resume_on_cuda_matches_a_straight_run(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    train(cfg(amp=amp), tmp_path / "straight", progress=False)
    train(cfg(amp=amp, steps=10), tmp_path / "resumed", progress=False)
    assert train(cfg(amp=amp), tmp_path / "resumed", progress=False).resumed_from == 10
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for k, v in a.tensors["ema"].items():  # the same kernels in the same order: equal up to GPU nondeterminism
        torch.testing.assert_close(b.tensors["ema"][k], v, rtol=1e-3, atol=1e-4)


def test_sample_and_score_with_a_cuda_model():
    ddpm = load_model("pretrained:digits", device="cuda")
    row, x = sample_and_score(ddpm, "ddim", steps=10, n=100, n_sets=2)
    assert x.device.type == "cuda" and row["n"] == 50 and row["ratio"] > 0


def test_features_of_cuda_images_with_a_cpu_or_cuda_classifier():
    x = torch.rand(16, 1, 8, 8, device="cuda") * 2 - 1
    cpu = extract_features(load_classifier(), x)
    gpu = extract_features(load_classifier().to("cuda"), x)
    assert (cpu[1] == gpu[1]).mean() > 0.9
    torch.testing.assert_close(torch.from_numpy(gpu[0]), torch.from_numpy(cpu[0]), rtol=1e-3, atol=1e-3)
