"""CAMPPlus x-vector and Kaldi fbank: layout, behaviour on tiny weights, parity with the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rounding import U, rounding_tolerance
from safetensors.torch import load_file

from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.s3gen.xvector import (
    CAMPPlus,
    CAMPPlusConfig,
    extract_features,
    kaldi_fbank,
    kaldi_mel_banks,
    povey_window,
    random_state_dict,
)

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURES = Path(__file__).parent / "fixtures"
SR = 16_000
FLT_EPS = torch.finfo(torch.float32).eps  # Kaldi's floor of the mel energies


# in_channels x kernel of every convolution and linear layer of CAM++ (forward hooks), plus the fbank's
# 512-point FFT and 256-bin bands; the tiny config's
XVECTOR_REDUCTIONS = 68_457 + 512 + 256
TINY_REDUCTIONS = 1_221 + 512 + 256


def _clip(n: int, seed: int, hz: float = 200.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SR
    return 0.3 * torch.sin(2 * math.pi * hz * t) + 0.05 * torch.randn(n, generator=g)


@pytest.fixture(scope="module")
def tiny() -> CAMPPlus:
    cfg = CAMPPlusConfig.tiny()
    model = CAMPPlus(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=1), strict=True)
    return model


def test_state_dict_matches_official_layout() -> None:
    with torch.device("meta"):
        sd = CAMPPlus(CAMPPlusConfig.english()).state_dict()
    assert len(sd) == 937  # entries in the reference CAMPPlus state_dict(), BatchNorm stats included
    expected = {
        "head.conv1.weight": (32, 1, 3, 3),
        "head.layer1.0.shortcut.0.weight": (32, 32, 1, 1),
        "head.layer2.0.shortcut.1.running_var": (32,),
        "xvector.tdnn.linear.weight": (128, 320, 5),
        "xvector.block1.tdnnd12.cam_layer.linear_local.weight": (32, 128, 3),
        "xvector.block2.tdnnd24.nonlinear1.batchnorm.weight": (256 + 23 * 32,),
        "xvector.block3.tdnnd16.cam_layer.linear2.bias": (32,),
        "xvector.transit3.linear.weight": (512, 1024, 1),
        "xvector.out_nonlinear.batchnorm.bias": (512,),
        "xvector.dense.linear.weight": (192, 1024, 1),
        "xvector.dense.nonlinear.batchnorm.running_mean": (192,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "head.layer1.1.shortcut.0.weight" not in sd
    assert "xvector.dense.nonlinear.batchnorm.weight" not in sd  # non-affine
    assert sd["xvector.tdnn.nonlinear.batchnorm.num_batches_tracked"].dtype == torch.int64


def test_random_state_dict() -> None:
    cfg = CAMPPlusConfig.tiny()
    sd = random_state_dict(cfg, seed=5)
    with torch.device("meta"):
        ref = CAMPPlus(cfg).state_dict()
    assert list(sd) == list(ref)
    for name, t in sd.items():
        assert t.shape == ref[name].shape, name
        if name.endswith("num_batches_tracked"):
            assert t.dtype == torch.int64 and t.item() == 0
        else:
            assert t.dtype == torch.float32
    assert all((sd[k] == 0).all() for k in sd if k.endswith("running_mean"))
    assert all((sd[k] == 1).all() for k in sd if k.endswith("running_var"))
    again = random_state_dict(cfg, seed=5)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = random_state_dict(cfg, seed=6)
    assert not torch.equal(sd["head.conv1.weight"], other["head.conv1.weight"])


def test_kaldi_mel_banks_shape_and_coverage() -> None:
    banks = kaldi_mel_banks(80, 512, 16_000)
    assert banks.shape == (80, 256)
    assert (banks >= 0).all() and (banks <= 1).all()
    assert (banks.sum(dim=1) > 0.4).all()  # no band falls between FFT bins
    assert banks[:, 0].sum() == 0  # 0 Hz is below the 20 Hz lower edge


def test_fbank_frames_and_short_clip() -> None:
    for n in (400, 401, 560, 16_000, 16_123):
        assert kaldi_fbank(_clip(n, 0)).shape == (1 + (n - 400) // 160, 80)
    with pytest.raises(UsageError, match="too short"):
        kaldi_fbank(torch.zeros(399))
    # silence is floored, not -inf
    assert torch.isfinite(kaldi_fbank(torch.zeros(1600))).all()


def test_features_are_mean_normalised_and_zero_padded() -> None:
    clips = [_clip(16_000, 1), _clip(8_000, 2)]
    feats = extract_features(clips)
    assert feats.shape == (2, 98, 80)
    for row, (clip, n) in enumerate(zip(clips, (98, 48), strict=True)):
        raw, normed = kaldi_fbank(clip).double(), feats[row, :n].double()
        # a float32 mean of n values is off by <= n u mean|x| in any order; the subtraction by u|result|
        bound = n * U * raw.abs().mean(0) + U * normed.abs().mean(0)
        assert (normed.mean(0).abs() <= bound).all()
    assert (feats[1, 48:] == 0).all()


def test_tiny_inference_shapes_and_batch_consistency(tiny: CAMPPlus) -> None:
    assert not tiny.training
    a, b = _clip(24_000, 3), _clip(24_000, 4, hz=330.0)
    one = tiny.inference(a)
    assert one.shape == (1, 24)
    both = tiny.inference(torch.stack([a, b]))
    assert both.shape == (2, 24) and torch.isfinite(both).all()
    # a batch may take other kernels: rounding only
    tol = rounding_tolerance(TINY_REDUCTIONS) * one.abs().max().item()
    torch.testing.assert_close(both[0:1], one, rtol=0, atol=tol)
    assert not torch.allclose(both[0], both[1])
    # list input of different lengths: the longest clip is unaffected by the others' padding
    mixed = tiny.inference([a, _clip(12_000, 5)])
    torch.testing.assert_close(mixed[0:1], one, rtol=0, atol=tol)
    with pytest.raises(UsageError):
        tiny.inference([])


# ----------------------------------------------------------------------------------------------------
# parity with the reference, full-size random weights (scripts/parity/xvector.py)


@pytest.fixture(scope="module")
def parity() -> tuple[CAMPPlus, dict[str, torch.Tensor]]:
    facts = json.loads((FIXTURES / "parity_xvector.json").read_text())
    cfg = CAMPPlusConfig.english()
    model = CAMPPlus(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=facts["seed"]), strict=True)
    return model, load_file(str(FIXTURES / "parity_xvector.safetensors"))


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} x scale {scale:.3g}"


def _log_energy_tolerance(wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our log mel energies [frames, 80] of wav, and a bound on how far float32 rounding moves each one."""
    log_e = kaldi_fbank(wav)
    frames = wav.double().unfold(0, 400, 160)
    dc_free = (frames - frames.mean(1, keepdim=True)).abs()
    # sum of |terms| of the pre-emphasised, windowed frame: x_n = w_n (s_n - 0.97 s_(n-1))
    previous = torch.cat([dc_free[:, :1], dc_free[:, :-1]], 1)
    abs_sum = (dc_free + 0.97 * previous) @ povey_window(400).double()
    # |delta X| per bin: ceil(log2 512) + 1 butterfly levels, <= 6u of sum |x| each; +8u for the DC removal,
    # the pre-emphasis and the window (pow 0.85 of a cosine) and its product
    d = ((6 * (9 + 1) + 8) * U * abs_sum)[:, None]
    banks = kaldi_mel_banks(80, 512, SR).double()
    rows, nnz = banks.sum(1)[None, :], (banks > 0).sum(1)[None, :]

    def one_side(energy: torch.Tensor) -> torch.Tensor:
        # |delta |X|^2| <= 2|X| d + d^2 + 3u|X|^2, and sum B|X| <= sqrt(sum B * sum B|X|^2) (Cauchy-Schwarz);
        # a band sums nnz non-zero products (sums with exact zeros are exact): gamma_(nnz) of the energy
        return 2 * d * (rows * energy).sqrt() + rows * d**2 + (nnz + 3) * U * energy

    energy = log_e.double().exp()
    bound = one_side(energy + 2 * one_side(energy))  # evaluated at an upper bound of the exact energy
    # |log x - log y| <= |x - y| / min(x, y); the floor is 1-Lipschitz; each log rounds within 2u|.|
    tau = 2 * bound / (energy - 2 * bound).clamp_min(FLT_EPS) + 4 * U * log_e.double().abs()
    return log_e, tau


def _assert_features_close(wav: torch.Tensor, ref: torch.Tensor) -> None:
    ours = extract_features([wav])[0]
    assert ours.shape == ref.shape
    log_e, tau = _log_energy_tolerance(wav)
    tau = tau + 2 * U * ref.double().abs()  # the subtraction of the mean
    # Each side subtracts its own time-mean, which summation order may move by up to u * sum_t |log E|
    # (any order): the features may differ by one constant c per band, |c| <= mean(tau) + that, plus tau.
    diff = (ours - ref).double()
    c_lo, c_hi = (diff - tau).max(0).values, (diff + tau).min(0).values
    c_max = tau.mean(0) + 2 * U * log_e.double().abs().sum(0)
    assert (c_lo <= c_hi).all(), f"no common offset in bands {(c_lo > c_hi).nonzero().flatten().tolist()}"
    assert (c_lo <= c_max).all() and (c_hi >= -c_max).all(), "the band offsets exceed the mean's rounding"


def test_parity_fbank(parity: tuple[CAMPPlus, dict[str, torch.Tensor]]) -> None:
    _, fx = parity
    # torchaudio's Kaldi fbank computes the mel filters in float32; ours follows it step by step
    _assert_features_close(fx["pcm_a"].float() / 32768, fx["fbank_a"])
    _assert_features_close(fx["pcm_b"].float() / 32768, fx["fbank_b"])


def test_parity_xvector(parity: tuple[CAMPPlus, dict[str, torch.Tensor]]) -> None:
    model, fx = parity
    wav_a, wav_b = fx["pcm_a"].float() / 32768, fx["pcm_b"].float() / 32768
    _assert_close(model.inference(wav_a[None]), fx["xvector_a"], rounding_tolerance(XVECTOR_REDUCTIONS))
    _assert_close(model.inference([wav_a, wav_b]), fx["xvector_ab"], rounding_tolerance(XVECTOR_REDUCTIONS))
