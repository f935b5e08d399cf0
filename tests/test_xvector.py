"""CAMPPlus x-vector and Kaldi fbank: layout, behaviour on tiny weights, parity with the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.s3gen.xvector import (
    CAMPPlus,
    CAMPPlusConfig,
    extract_features,
    kaldi_fbank,
    kaldi_mel_banks,
    random_state_dict,
)

FIXTURES = Path(__file__).parent / "fixtures"
SR = 16_000


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
    feats = extract_features([_clip(16_000, 1), _clip(8_000, 2)])
    assert feats.shape == (2, 98, 80)
    assert feats[0].mean(0).abs().max() < 1e-4
    assert feats[1, :48].mean(0).abs().max() < 1e-4
    assert (feats[1, 48:] == 0).all()


def test_tiny_inference_shapes_and_batch_consistency(tiny: CAMPPlus) -> None:
    assert not tiny.training
    a, b = _clip(24_000, 3), _clip(24_000, 4, hz=330.0)
    one = tiny.inference(a)
    assert one.shape == (1, 24)
    both = tiny.inference(torch.stack([a, b]))
    assert both.shape == (2, 24) and torch.isfinite(both).all()
    torch.testing.assert_close(both[0:1], one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])
    # list input of different lengths: the longest clip is unaffected by the others' padding
    mixed = tiny.inference([a, _clip(12_000, 5)])
    torch.testing.assert_close(mixed[0:1], one, rtol=1e-5, atol=1e-5)
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


def test_parity_fbank(parity: tuple[CAMPPlus, dict[str, torch.Tensor]]) -> None:
    _, fx = parity
    # torchaudio's Kaldi fbank computes the mel filters in float32; ours follows it step by step
    _assert_close(extract_features([fx["pcm_a"].float() / 32768])[0], fx["fbank_a"], 1e-6)
    _assert_close(extract_features([fx["pcm_b"].float() / 32768])[0], fx["fbank_b"], 1e-6)


def test_parity_xvector(parity: tuple[CAMPPlus, dict[str, torch.Tensor]]) -> None:
    model, fx = parity
    wav_a, wav_b = fx["pcm_a"].float() / 32768, fx["pcm_b"].float() / 32768
    _assert_close(model.inference(wav_a[None]), fx["xvector_a"], 1e-5)
    _assert_close(model.inference([wav_a, wav_b]), fx["xvector_ab"], 1e-5)
