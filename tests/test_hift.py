"""HiFT vocoder: official key layout, weight-norm loading, parity with the reference, seeding, batching.

Parity fixture: scripts/parity/hift.py (reference HiFTGenerator, our seeded weights, our seeded source
noise injected into its SineGen). Tolerances: F0 1e-3 Hz (values up to ~300 Hz); source 1e-4 and
waveform 3e-4 absolute (peaks ~0.4-0.6). F0 of the batch matches bit for bit. `inference` runs each row
alone, while the reference ran the fixture's 2 rows as one batch: the F0 convolutions round differently
(last ulp), and the source integrates F0 into a phase over 24,000 samples; measured source 2.7e-5,
waveform 9.3e-5 (english), 3.1e-5 (tiny). The slack also covers other CPUs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatterbox_cli.models.s3gen.hifigan import (
    DECODE_CONTEXT_FRAMES,
    HiFTConfig,
    HiFTGenerator,
    SourceNoise,
    decode_windows,
    draw_source_noise,
    random_state_dict,
)

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "parity_hift.json").read_text())
SILENCE = -11.5129  # log(1e-5), the mel of silence


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "parity_hift.safetensors")


@pytest.fixture(scope="module")
def tiny() -> HiFTGenerator:
    model = HiFTGenerator(HiFTConfig.tiny()).eval()
    model.load_state_dict(random_state_dict(HiFTConfig.tiny(), META["weight_seed"]), strict=True)
    return model


def _fixture_noise(mel: torch.Tensor) -> SourceNoise:
    gen = torch.Generator().manual_seed(META["noise_seed"])
    return draw_source_noise(mel.shape[0], 9, mel.shape[-1] * 480, gen)


def _check_parity(model: HiFTGenerator, size: str, fixture: dict[str, torch.Tensor]) -> None:
    mel = fixture["mel"]
    f0_ref, wav_ref = fixture[f"{size}.f0"], fixture[f"{size}.wav"]
    unvoiced = (f0_ref <= 10).float().mean().item()
    assert 0 < unvoiced < 1, "fixture must exercise both voiced and unvoiced frames"
    with torch.inference_mode():
        f0 = model.predict_f0(mel)
    wav, source = model.inference(mel, noise=_fixture_noise(mel))
    assert (f0 - f0_ref).abs().max().item() <= 1e-3
    src_ref = fixture[f"{size}.source"]
    assert (source[:, :, : src_ref.shape[-1]] - src_ref).abs().max().item() <= 1e-4
    assert wav.shape == wav_ref.shape == (2, 24000)
    assert (wav - wav_ref).abs().max().item() <= 3e-4


def test_parity_tiny(tiny: HiFTGenerator, fixture: dict[str, torch.Tensor]) -> None:
    _check_parity(tiny, "tiny", fixture)


@pytest.mark.slow
def test_parity_full_size(fixture: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)
    config = HiFTConfig.english()
    model = HiFTGenerator(config).eval()
    model.load_state_dict(random_state_dict(config, META["weight_seed"]), strict=True)
    _check_parity(model, "english", fixture)


def test_state_dict_keys_and_shapes_are_the_official_ones() -> None:
    with torch.device("meta"):
        ours = HiFTGenerator(HiFTConfig.english()).state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == META["english_keys"]


def test_random_state_dict_uses_official_keys_and_is_seeded() -> None:
    config = HiFTConfig.tiny()
    a, b, c = random_state_dict(config, 1), random_state_dict(config, 1), random_state_dict(config, 2)
    with torch.device("meta"):
        keys = HiFTGenerator(config).state_dict().keys()
    assert list(a) == list(keys)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["conv_pre.parametrizations.weight.original1"], c["conv_pre.parametrizations.weight.original1"]
    )
    assert any(k.endswith("parametrizations.weight.original0") for k in a)
    assert not any(k.endswith(".weight_g") or k.endswith(".weight_v") for k in a)


def _to_legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        renamed[k.replace("parametrizations.weight.original1", "weight_v")] = v
    return renamed


def test_weight_norm_is_folded_from_either_key_form() -> None:
    config = HiFTConfig.tiny()
    sd = random_state_dict(config, 5)
    official, legacy = HiFTGenerator(config), HiFTGenerator(config)
    official.load_state_dict(sd, strict=True)
    legacy.load_state_dict(_to_legacy(sd), strict=True)
    for (name, p), q in zip(official.named_parameters(), legacy.parameters(), strict=True):
        assert torch.equal(p, q), name
    g = sd["ups.1.parametrizations.weight.original0"]  # ConvTranspose1d: g over input channels
    v = sd["ups.1.parametrizations.weight.original1"]
    expected = v * g / v.flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(official.ups[1].weight, expected, rtol=1e-5, atol=1e-7)
    assert not any(".parametrizations." in n or n.endswith("_g") for n, _ in official.named_parameters())


def test_state_dict_round_trip(tiny: HiFTGenerator) -> None:
    sd = tiny.state_dict()
    again = HiFTGenerator(HiFTConfig.tiny())
    again.load_state_dict(sd, strict=True)
    for (name, p), q in zip(tiny.named_parameters(), again.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), name


def test_half_a_weight_norm_pair_is_rejected() -> None:
    sd = random_state_dict(HiFTConfig.tiny(), 0)
    del sd["conv_pre.parametrizations.weight.original0"]
    with pytest.raises(RuntimeError, match="conv_pre.weight"):
        HiFTGenerator(HiFTConfig.tiny()).load_state_dict(sd, strict=True)


def _mel(frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=gen) * 2 - 6


def test_output_shape_range_and_source(tiny: HiFTGenerator) -> None:
    mel = _mel(37, 0, batch=2)
    wav, source = tiny.inference(mel, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (2, 37 * 480) and source.shape == (2, 1, 37 * 480)
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()
    assert wav.abs().max().item() <= 0.99 and wav.std().item() > 1e-3
    loud_model = copy.deepcopy(tiny)
    with torch.no_grad():
        loud_model.conv_post.bias[:9] += 8.0  # log-magnitudes: e^8 > the 1e2 magnitude clip
    loud, _ = loud_model.inference(mel, generator=torch.Generator().manual_seed(0))
    assert loud.abs().max().item() == pytest.approx(0.99)  # the audio limit clamps


def test_seed_reproduces_the_waveform(tiny: HiFTGenerator) -> None:
    mel = _mel(20, 1)
    a = tiny(mel, generator=torch.Generator().manual_seed(11))
    b = tiny(mel, generator=torch.Generator().manual_seed(11))
    c = tiny(mel, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-4


def test_explicit_noise_matches_generator_draw(tiny: HiFTGenerator) -> None:
    mel = _mel(20, 2)
    by_gen, _ = tiny.inference(mel, generator=torch.Generator().manual_seed(4))
    noise = draw_source_noise(1, 9, 20 * 480, torch.Generator().manual_seed(4))
    by_noise, _ = tiny.inference(mel, noise=noise)
    assert torch.equal(by_gen, by_noise)


def test_cache_source_overwrites_the_start(tiny: HiFTGenerator) -> None:
    mel = _mel(20, 3)
    cache = torch.full((1, 1, 960), 0.25)
    plain, _ = tiny.inference(mel, generator=torch.Generator().manual_seed(0))
    wav, source = tiny.inference(mel, cache_source=cache, generator=torch.Generator().manual_seed(0))
    assert torch.equal(source[:, :, :960], cache)
    assert (wav[:, :960] - plain[:, :960]).abs().max().item() > 1e-5


def test_padded_batch_rows_equal_single_rows(tiny: HiFTGenerator) -> None:
    long_mel, short_mel = _mel(50, 4), _mel(30, 5)
    gen = torch.Generator().manual_seed(9)
    n_long = draw_source_noise(1, 9, 50 * 480, gen)
    n_short = draw_source_noise(1, 9, 30 * 480, gen)
    single_long, _ = tiny.inference(long_mel, noise=n_long)
    single_short, _ = tiny.inference(short_mel, noise=n_short)

    batch_mel = torch.full((2, 80, 50), SILENCE)
    batch_mel[0], batch_mel[1, :, :30] = long_mel[0], short_mel[0]
    batch_mel[1, :, 30:] = torch.randn(80, 20, generator=gen) * 5  # what padding holds must not matter
    pad_noise = torch.randn(1, 9, 20 * 480, generator=gen)
    noise = SourceNoise(
        torch.cat([n_long.phase, n_short.phase]),
        torch.cat([n_long.noise, torch.cat([n_short.noise, pad_noise], dim=-1)]),
    )
    wav, source = tiny.inference(batch_mel, noise=noise, lengths=torch.tensor([50, 30]))
    # each row runs alone on its own frames: the same computation, to the bit
    assert torch.equal(wav[0], single_long[0])
    assert torch.equal(wav[1, : 30 * 480], single_short[0])
    assert torch.all(wav[1, 30 * 480 :] == 0) and torch.all(source[1, :, 30 * 480 :] == 0)


def test_per_row_generators_draw_each_row_as_if_alone(tiny: HiFTGenerator) -> None:
    mels = [_mel(40, 12), _mel(25, 13)]
    batch_mel = torch.zeros(2, 80, 40)
    batch_mel[0], batch_mel[1, :, :25] = mels[0][0], mels[1][0]
    gens = [torch.Generator().manual_seed(s) for s in (21, 22)]
    wav, _ = tiny.inference(batch_mel, generator=gens, lengths=torch.tensor([40, 25]))
    for row, (mel, seed) in enumerate(zip(mels, (21, 22), strict=True)):
        alone, _ = tiny.inference(mel, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(wav[row, : alone.shape[-1]], alone[0])
    with pytest.raises(ValueError, match="generators"):
        tiny.inference(batch_mel, generator=gens[:1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inference_keeps_f0_and_source_in_float32(tiny: HiFTGenerator, dtype: torch.dtype) -> None:
    mel = _mel(30, 6)
    noise = draw_source_noise(1, 9, 30 * 480, torch.Generator().manual_seed(2))
    reference, ref_source = tiny.inference(mel, noise=noise)
    low = copy.deepcopy(tiny).to_inference_dtype(dtype)
    assert low.conv_post.weight.dtype == dtype and low.f0_predictor.classifier.weight.dtype == torch.float32
    with torch.inference_mode():
        assert torch.equal(low.predict_f0(mel), tiny.predict_f0(mel))
    wav, source = low.inference(mel, noise=noise)
    assert torch.equal(source, ref_source)
    assert wav.dtype == torch.float32
    # measured: fp16 3e-4, bf16 3e-3 (peak ~0.3)
    assert (wav - reference).abs().max().item() <= (2e-3 if dtype == torch.float16 else 1e-2)


@pytest.mark.parametrize("chunk", [48, 100])
def test_chunked_decode_equals_one_pass(tiny: HiFTGenerator, chunk: int) -> None:
    mel = torch.cat([_mel(230, 10), _mel(230, 11)])
    source = torch.randn(2, 1, 230 * 480, generator=torch.Generator().manual_seed(4)) * 0.1
    with torch.inference_mode():
        one_pass = tiny.decode(mel, source, chunk_frames=10_000)
        chunked = tiny.decode(mel, source, chunk_frames=chunk)
    assert tiny.decode_chunk_frames(1, torch.float32) >= 2 * DECODE_CONTEXT_FRAMES
    assert (chunked - one_pass).abs().max().item() <= 1e-6  # measured 1e-7 (rounding)


@pytest.mark.parametrize("total", [10, 175, 176, 177, 300, 700])
def test_decode_windows_cover_every_frame_once_with_context(total: int) -> None:
    for window, align in ((128, True), (100, False)):
        spans = decode_windows(total, window, DECODE_CONTEXT_FRAMES, align_end=align)
        assert [s for _, _, s, _ in spans] == [0] + [e for _, _, _, e in spans[:-1]]
        assert spans[-1][3] == total
        for lo, hi, start, end in spans:
            assert 0 <= lo <= start < end <= hi <= total
            assert start - lo >= DECODE_CONTEXT_FRAMES or lo == 0
            assert hi - end >= DECODE_CONTEXT_FRAMES or hi == total
        if align and len(spans) > 1:  # every chunk is a whole window: two span lengths in all
            assert {hi - lo for lo, hi, _, _ in spans} <= {window + DECODE_CONTEXT_FRAMES, window + 48}


def test_rows_decoded_together_equal_one_pass_each(tiny: HiFTGenerator) -> None:
    lengths = [230, 40, 300]  # several windows, one short row, more windows
    mels = [_mel(n, 20 + i) for i, n in enumerate(lengths)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(lengths))]
    sources = [torch.randn(1, 1, n * 480, generator=g) * 0.1 for g, n in zip(gens, lengths, strict=True)]
    with torch.inference_mode():
        together = tiny.decode_rows(mels, sources)
        alone = [tiny.decode(m, s, chunk_frames=10_000) for m, s in zip(mels, sources, strict=True)]
    for a, b, n in zip(together, alone, lengths, strict=True):
        assert a.shape == b.shape == (1, n * 480)
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_rows_equal_single_rows_and_the_cpu(tiny: HiFTGenerator) -> None:
    gpu = HiFTGenerator(HiFTConfig.tiny()).eval()
    gpu.load_state_dict(tiny.state_dict())
    gpu = gpu.cuda()
    mels = [_mel(300, 30), _mel(60, 31)]
    gen = torch.Generator().manual_seed(3)
    noises = [draw_source_noise(1, 9, m.shape[-1] * 480, gen) for m in mels]
    batch_mel = torch.zeros(2, 80, 300)
    batch_mel[0], batch_mel[1, :, :60] = mels[0][0], mels[1][0]
    short = torch.cat([noises[1].noise, torch.zeros(1, 9, 240 * 480)], dim=-1)
    phase, samples = torch.cat([n.phase for n in noises]), torch.cat([noises[0].noise, short])
    cuda_noise = SourceNoise(phase.cuda(), samples.cuda())
    wav, _ = gpu.inference(batch_mel.cuda(), noise=cuda_noise, lengths=torch.tensor([300, 60]))
    for row, (mel, n) in enumerate(zip(mels, noises, strict=True)):
        alone, _ = gpu.inference(mel.cuda(), noise=SourceNoise(n.phase.cuda(), n.noise.cuda()))
        cpu, _ = tiny.inference(mel, noise=n)
        frames = mel.shape[-1] * 480
        torch.testing.assert_close(wav[row, :frames], alone[0], rtol=0, atol=1e-3)  # measured 1e-4
        torch.testing.assert_close(wav[row, :frames].cpu(), cpu[0], rtol=0, atol=2e-2)  # TF32 convs
