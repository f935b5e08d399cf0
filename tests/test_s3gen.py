"""S3Gen wrapper: official layout, part-wise loading/freeing, token -> waveform parity, voice preparation."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from rounding import U, rounding_tolerance
from safetensors.torch import load_file, save_file

from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.models.conds import GenCond
from chatterbox_cli.models.s3gen import (
    SPEECH_PARTS,
    VOICE_PARTS,
    S3Gen,
    S3GenConfig,
    infer_config,
    random_state_dict,
)
from chatterbox_cli.models.s3gen.hifigan import SourceNoise, draw_source_noise
from chatterbox_cli.models.s3gen.s3gen import trim_fade

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURES = Path(__file__).parent / "fixtures"
# fp32 on both sides, op order differs. Sum of the reduction lengths (in_features, or in_channels x
# kernel) of every linear and convolution that runs, counted with forward hooks: flow (encoder and every
# ODE step) for the mel, HiFT's F0 predictor and decoder (tests/test_hift.py) for the waveform.
MEL_REDUCTIONS = {"tiny": 79_360, "english": 998_912}
F0_REDUCTIONS = {"tiny": 448, "english": 6_896}
DECODER_REDUCTIONS = {"tiny": 6_171, "english": 80_359}


def f0_drift(model: S3Gen, mel: torch.Tensor, shift: float, noise: SourceNoise) -> float:
    """How far the (faded-in) waveform of mel moves when its F0 is raised by `shift` Hz in every frame.

    The NSF source integrates F0 into a phase over every sample, so an F0 error grows with time; an
    error of at most `shift` in every frame drifts the phase no further than a constant shift does.
    """
    hift = model.mel2wav
    with torch.inference_mode():
        f0 = hift.predict_f0(mel)
        limit = hift.config.nsf_voiced_threshold
        assert torch.equal(f0 > limit, f0 + shift > limit)  # the shift flips no frame's voicing
        a, b = (hift.decode(mel, hift.source(f, noise=noise)) for f in (f0, f0 + shift))
    fade = torch.cat([trim_fade(), torch.ones(a.shape[-1] - trim_fade().numel())])
    return ((a - b) * fade).abs().max().item()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "s3gen.safetensors"
    save_file(random_state_dict(S3GenConfig.tiny(), seed=0), str(path))
    return path


def _cond(config: S3GenConfig, n_prompt: int = 5, seed: int = 0) -> GenCond:
    g = torch.Generator().manual_seed(seed)
    return GenCond(
        prompt_token=torch.randint(0, 6561, (1, n_prompt), generator=g),
        prompt_token_len=torch.tensor([n_prompt]),
        prompt_feat=torch.randn(1, 2 * n_prompt, 80, generator=g) * 2.0 - 6.0,
        embedding=torch.randn(1, config.flow.spk_embed_dim, generator=g),
    )


def test_english_layout_equals_the_reference_inventory() -> None:
    with gzip.open(FIXTURES / "official_tensor_inventory.json.gz") as f:
        inventory = json.loads(f.read())["s3gen.safetensors"]
    with torch.device("meta"):
        model = S3Gen(S3GenConfig.english())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours.keys() == inventory.keys()
    assert all(ours[k] == inventory[k][0] for k in ours)


def test_random_state_dict_leaves_out_derived_tokenizer_buffers() -> None:
    sd = random_state_dict(S3GenConfig.tiny(), seed=0)
    with torch.device("meta"):
        expected = set(S3Gen(S3GenConfig.tiny()).state_dict())
    assert expected - set(sd) == {"tokenizer._mel_filters", "tokenizer.window"}
    assert set(sd) <= expected
    assert {k.split(".")[0] for k in sd} == {"tokenizer", "speaker_encoder", "flow", "mel2wav"}


def test_load_speech_parts_only_then_voice_parts_then_free(tiny_file: Path) -> None:
    assert infer_config(tiny_file) == S3GenConfig.tiny()
    model = S3Gen.load(tiny_file, parts=SPEECH_PARTS)
    assert model.tokenizer is None and model.speaker_encoder is None
    assert model.flow is not None and model.mel2wav is not None
    stored = load_file(str(tiny_file))
    torch.testing.assert_close(
        model.flow.encoder_proj.weight, stored["flow.encoder_proj.weight"], atol=0, rtol=0
    )
    with pytest.raises(UsageError, match="load_parts"):
        model.embed_ref(torch.zeros(24000), 24000)

    model.load_parts(tiny_file, VOICE_PARTS)
    assert model.tokenizer is not None and model.speaker_encoder is not None
    model.free(VOICE_PARTS)
    assert model.tokenizer is None and model.speaker_encoder is None


def test_load_in_half_precision(tiny_file: Path) -> None:
    model = S3Gen.load(tiny_file, dtype=torch.float16, parts=("flow",))
    assert model.flow.encoder_proj.weight.dtype == torch.float16
    assert model.mel2wav is None


def test_missing_and_misshapen_tensors_are_checkpoint_errors(tiny_file: Path, tmp_path: Path) -> None:
    sd = load_file(str(tiny_file))
    broken = dict(sd)
    del broken["flow.encoder_proj.bias"]
    save_file(broken, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="flow.encoder_proj.bias"):
        S3Gen.load(tmp_path / "missing.safetensors", parts=("flow",), config=S3GenConfig.tiny())

    broken = dict(sd)
    broken["flow.encoder_proj.bias"] = torch.zeros(7)
    save_file(broken, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="has shape"):
        S3Gen.load(tmp_path / "shape.safetensors", parts=("flow",), config=S3GenConfig.tiny())
    with pytest.raises(CheckpointError, match="does not match"):
        infer_config(tmp_path / "shape.safetensors", parts=("flow",))


def test_trim_fade_is_the_references() -> None:
    # the waveform parity bound (F0 drift) is too wide to see a fade off by a sample, so check it here
    n = 480
    expected = torch.zeros(2 * n)
    expected[n:] = (torch.cos(torch.linspace(torch.pi, 0, n)) + 1) / 2
    # each side: the angle (half an ulp of pi), cos and the halving round by <= 3u in all
    torch.testing.assert_close(trim_fade(), expected, rtol=0, atol=6 * U)


def test_synthesize_shapes_seed_and_fade(tiny_file: Path) -> None:
    model = S3Gen.load(tiny_file)
    cond = _cond(model.config)
    tokens = torch.randint(0, 6561, (1, 10), generator=torch.Generator().manual_seed(1))

    def run(seed: int, steps: int = 10) -> torch.Tensor:
        return model.synthesize(
            tokens, cond, n_timesteps=steps, generator=torch.Generator().manual_seed(seed)
        )

    wav = run(3)
    assert wav.shape == (1, 10 * 2 * 480) and wav.dtype == torch.float32
    assert torch.isfinite(wav).all() and wav.abs().max() <= 0.99
    assert torch.all(wav[:, :480] == 0)  # the first 20 ms are silenced, the next 20 ms faded in
    assert wav[:, 480:].abs().max() > 0
    torch.testing.assert_close(run(3), wav, atol=0, rtol=0)
    assert not torch.allclose(run(4), wav)
    assert not torch.allclose(run(3, steps=5), wav)

    mel = model.tokens_to_mel(tokens, cond, generator=torch.Generator().manual_seed(3))
    assert mel.shape == (1, 80, 20)


def _parity(name: str) -> None:
    t = load_file(str(FIXTURES / "parity_s3gen.safetensors"))
    meta = json.loads((FIXTURES / "parity_s3gen.json").read_text())
    config = S3GenConfig.english() if meta[name]["config"] == "english" else S3GenConfig.tiny()
    model = S3Gen(config, parts=SPEECH_PARTS)
    sd = random_state_dict(config, meta["seed"])
    model.load_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in SPEECH_PARTS}, strict=False)
    del sd
    model.eval()
    cond = GenCond(
        prompt_token=t[f"{name}.prompt_token"],
        prompt_token_len=t[f"{name}.prompt_token_len"],
        prompt_feat=t[f"{name}.prompt_feat"],
        embedding=t[f"{name}.embedding"],
    )
    steps = meta[name]["n_timesteps"]
    tokens = t[f"{name}.tokens"]
    mel = model.tokens_to_mel(
        tokens, cond, n_timesteps=steps, generator=torch.Generator().manual_seed(meta["noise_seed"])
    )
    ref_mel = t[f"{name}.mel"]
    assert mel.shape == ref_mel.shape
    size = meta[name]["config"]
    assert (mel - ref_mel).abs().max() <= rounding_tolerance(MEL_REDUCTIONS[size]) * ref_mel.abs().max()

    assert_wav_matches(
        model,
        tokens,
        cond,
        steps,
        meta["noise_seed"],
        mel,
        ref_mel,
        t[f"{name}.wav"],
        MEL_REDUCTIONS[size],
        size,
    )


def assert_wav_matches(
    model: S3Gen,
    tokens: torch.Tensor,
    cond: GenCond,
    steps: int,
    noise_seed: int,
    mel: torch.Tensor,
    ref_mel: torch.Tensor,
    ref_wav: torch.Tensor,
    mel_reductions: int,
    size: str,
) -> None:
    """Our waveform of `tokens` against the reference's, given both mels.

    The reference's F0 differs from ours by what the mel difference moves (our F0 predictor on both
    mels) plus the predictors' rounding; through the phase that is a drift, bounded by a constant F0
    shift of that size. The rest is rounding of the flow and the decoder."""
    gen = torch.Generator().manual_seed(noise_seed)
    wav = model.synthesize(tokens, cond, n_timesteps=steps, generator=gen)
    assert wav.shape == ref_wav.shape
    gen = torch.Generator().manual_seed(noise_seed)
    model.tokens_to_mel(tokens, cond, n_timesteps=steps, generator=gen)  # the draws synthesize made
    noise = draw_source_noise(1, 9, wav.shape[-1], gen)
    with torch.inference_mode():
        f0, ref_f0 = model.mel2wav.predict_f0(mel), model.mel2wav.predict_f0(ref_mel)
    shift = (f0 - ref_f0).abs().max().item() + rounding_tolerance(F0_REDUCTIONS[size]) * f0.abs().max().item()
    rounding = rounding_tolerance(mel_reductions + DECODER_REDUCTIONS[size]) * ref_wav.abs().max().item()
    assert (wav - ref_wav).abs().max().item() <= f0_drift(model, mel, shift, noise) + rounding


def test_tokens_to_waveform_matches_reference_tiny() -> None:
    _parity("tiny")


@pytest.mark.slow
def test_tokens_to_waveform_matches_reference_english() -> None:
    torch.set_num_threads(1)
    _parity("english")


def _voice_clip(seconds: float, sr: int) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * torch.sin(2 * math.pi * 1.3 * t)
    phase = 2 * math.pi * torch.cumsum(f0 / sr, 0)
    return 0.3 * torch.sin(phase) * (0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t) ** 2)


@pytest.mark.parametrize("sr", [24000, 22050])
def test_embed_ref_builds_consistent_conditionals(tiny_file: Path, sr: int) -> None:
    model = S3Gen.load(tiny_file, parts=("tokenizer", "speaker_encoder", "flow", "mel2wav"))
    cond = model.embed_ref(_voice_clip(1.5, sr), sr)
    n = cond.prompt_token.size(1)
    assert n in (37, 38)  # 1.5 s at 25 tokens/s, cut to whole mel-frame pairs
    assert cond.prompt_token.dtype == torch.long and cond.prompt_token_len.tolist() == [n]
    assert cond.prompt_feat.shape == (1, 2 * n, 80)
    assert cond.embedding.shape == (1, 192)
    assert torch.isfinite(cond.prompt_feat).all() and torch.isfinite(cond.embedding).all()
    wav = model.synthesize(torch.tensor([[1, 2, 3, 4]]), cond, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 4 * 960)


def test_embed_ref_rejects_stereo_shape(tiny_file: Path) -> None:
    model = S3Gen.load(tiny_file, parts=VOICE_PARTS)
    with pytest.raises(UsageError, match="mono"):
        model.embed_ref(torch.zeros(2, 24000), 24000)


def test_random_checkpoint_folder_speaks_with_its_builtin_voice(tmp_path: Path) -> None:
    from chatterbox_cli.models.conds import load_builtin_conds
    from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path, size="tiny", seed=0)
    conds = load_builtin_conds(folder / "conds.pt")
    model = S3Gen.load(folder / "s3gen.safetensors")
    assert model.config == S3GenConfig.tiny()
    wav = model.synthesize(torch.tensor([[5, 6, 7]]), conds.gen, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 3 * 960) and torch.isfinite(wav).all()


# Batched rows vs the same rows alone, fp32: other kernels, rounding only (flow: 4 of the 10 steps that
# MEL_REDUCTIONS counts). HiFT runs each row alone on its own frames: bit-identical.
ROW_LENGTHS = (14, 9, 5)


def _rows(seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 6561, (n,), generator=g) for n in ROW_LENGTHS]


def test_padded_batch_mel_and_waveform_equal_each_row_alone(tiny_file: Path) -> None:
    model = S3Gen.load(tiny_file)
    cond = _cond(model.config)
    rows = _rows()
    longest, prompt_frames = max(ROW_LENGTHS), 2 * cond.prompt_token.size(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6561, (len(rows), longest), generator=g)  # arbitrary values past each length
    noise = torch.randn(len(rows), 80, prompt_frames + 2 * longest, generator=g)
    for k, row in enumerate(rows):
        tokens[k, : row.numel()] = row
    lens = torch.tensor(ROW_LENGTHS)
    mel = model.tokens_to_mel(tokens, cond, lens, n_timesteps=4, noise=noise)
    wav = model.mel_to_wav(mel, mel_lens=2 * lens, generator=torch.Generator().manual_seed(1))
    for k, row in enumerate(rows):
        n_frames = 2 * row.numel()
        row_noise = noise[k : k + 1, :, : prompt_frames + n_frames].contiguous()
        alone = model.tokens_to_mel(row[None], cond, n_timesteps=4, noise=row_noise)
        err = (mel[k, :, :n_frames] - alone[0]).abs().max() / alone.abs().max()
        assert err.item() <= rounding_tolerance(MEL_REDUCTIONS["tiny"])
        assert torch.all(mel[k, :, n_frames:] == 0)
    # HiFT on the batch's mel, row by row, with each row's slice of the batch's source noise
    hift = model.mel2wav
    samples = wav.size(1)
    source = draw_source_noise(len(rows), 9, samples, torch.Generator().manual_seed(1))
    batched, _ = hift.inference(mel, noise=source, lengths=2 * lens)
    for k, row in enumerate(rows):
        n = 960 * row.numel()
        row_noise = SourceNoise(source.phase[k : k + 1], source.noise[k : k + 1, :, :n])
        alone, _ = hift.inference(mel[k : k + 1, :, : 2 * row.numel()], noise=row_noise)
        assert torch.equal(batched[k, :n], alone[0])
        assert torch.all(batched[k, n:] == 0)


def _row_tolerance(
    model: S3Gen,
    cond: GenCond,
    rows: list[torch.Tensor],
    seeds: list[int],
    k: int,
    peak: float,
    width: int = 0,
) -> float:
    """Bound on |row k of synthesize_rows - row k synthesized alone| (peak: its largest |sample|): the
    batched flow's rounding, and the F0 drift it causes (see f0_drift), measured on the two mels. `width`:
    the batch's tokens per row, if padded past the longest."""
    lengths = [r.numel() for r in rows]
    tokens = torch.zeros(len(rows), max(width, *lengths), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : row.numel()] = row
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = model.tokens_to_mel(tokens, cond, torch.tensor(lengths), n_timesteps=4, generator=gens)
    gen = torch.Generator().manual_seed(seeds[k])
    alone = model.tokens_to_mel(rows[k][None], cond, n_timesteps=4, generator=gen)
    noise = draw_source_noise(1, 9, model.samples_per_token * lengths[k], gen)
    with torch.inference_mode():
        f0 = model.mel2wav.predict_f0(alone)
        shift = (model.mel2wav.predict_f0(batched[k : k + 1, :, : alone.shape[-1]]) - f0).abs().max().item()
    rounding = rounding_tolerance(MEL_REDUCTIONS["tiny"] + DECODER_REDUCTIONS["tiny"]) * peak
    return f0_drift(model, alone, shift, noise) + rounding


def test_synthesize_rows_equals_synthesize_of_each_row_with_its_seed(tiny_file: Path) -> None:
    model = S3Gen.load(tiny_file)
    cond = _cond(model.config)
    rows = _rows()
    seeds = [101, 202, 303]
    out = model.synthesize_rows(rows, cond, [torch.Generator().manual_seed(s) for s in seeds], n_timesteps=4)
    assert [w.shape for w in out] == [(960 * n,) for n in ROW_LENGTHS]
    for k, (wav, row, seed) in enumerate(zip(out, rows, seeds, strict=True)):
        alone = model.synthesize(
            row[None], cond, n_timesteps=4, generator=torch.Generator().manual_seed(seed)
        )
        tol = _row_tolerance(model, cond, rows, seeds, k, alone.abs().max().item())
        assert (wav - alone[0]).abs().max().item() <= tol
        assert torch.all(wav[:480] == 0)  # faded in per row
    # padded to a block of 8 tokens (14 -> 16) and 5 rows (two blank): each row is still its own, and as long
    padded = model.synthesize_rows(
        rows, cond, [torch.Generator().manual_seed(s) for s in seeds], n_timesteps=4, pad_to=8, batch_rows=5
    )
    assert [w.shape for w in padded] == [(960 * n,) for n in ROW_LENGTHS]
    for k, (wav, row, seed) in enumerate(zip(padded, rows, seeds, strict=True)):
        alone = model.synthesize(
            row[None], cond, n_timesteps=4, generator=torch.Generator().manual_seed(seed)
        )
        tol = _row_tolerance(model, cond, rows, seeds, k, alone.abs().max().item(), width=16)
        assert (wav - alone[0]).abs().max().item() <= tol
    # a row does not depend on its batchmates
    again = model.synthesize_rows(
        [rows[1], rows[0]], cond, [torch.Generator().manual_seed(s) for s in (202, 999)], n_timesteps=4
    )
    peak = out[1].abs().max().item()
    tol = _row_tolerance(model, cond, [rows[1], rows[0]], [202, 999], 0, peak)
    tol += _row_tolerance(model, cond, rows, seeds, 1, peak)
    assert (again[0] - out[1]).abs().max().item() <= tol
    assert model.synthesize_rows([], cond, []) == []
    with pytest.raises(ValueError, match="generators"):
        model.synthesize_rows(rows, cond, [torch.Generator()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parked_vocoder_visits_the_gpu_only_during_a_call(tiny_file: Path) -> None:
    config = S3GenConfig.tiny()
    resident = S3Gen.load(tiny_file, "cuda", torch.float32)
    parked = S3Gen.load(tiny_file, "cuda", torch.float32)
    parked.park_vocoder("cuda")
    assert next(parked.mel2wav.parameters()).device.type == "cpu"
    mel = torch.randn(1, config.flow.mel_dim, 20, device="cuda")
    a = resident.mel_to_wav(mel, torch.Generator("cuda").manual_seed(0))
    b = parked.mel_to_wav(mel, torch.Generator("cuda").manual_seed(0))
    assert b.device.type == "cuda" and torch.equal(a, b)
    assert next(parked.mel2wav.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_groups_of_nearby_sizes_share_one_kept_flow_graph(tiny_file: Path) -> None:
    """Three rows and four rows both run the flow as four (s3gen.flow_batch_rows): one kept graph serves
    both calls. The three rows come out the same beside a blank row as beside a real one: the same
    kernels on the same shapes compute each row from its own inputs only, and HiFT runs the real rows."""
    model = S3Gen.load(tiny_file, "cuda", torch.float32)
    cond = _cond(model.config).to("cuda")
    rows = _rows()
    extra = torch.randint(0, 6561, (11,), generator=torch.Generator().manual_seed(9))

    def call(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        gens = [torch.Generator("cuda").manual_seed(s) for s in range(len(rows))]
        return model.synthesize_rows(rows, cond, gens, n_timesteps=4, keep_graph=True, pad_to=8, batch_rows=4)

    call([*rows, extra])  # captures the graph (its first step runs eagerly); the calls below replay it
    three, four = call(rows), call([*rows, extra])
    assert len(model.flow.decoder.kept) == 1
    assert [w.shape for w in four] == [(960 * n,) for n in (*ROW_LENGTHS, 11)]
    for a, b in zip(three, four, strict=False):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
