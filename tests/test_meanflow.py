"""Turbo's mean-flow S3Gen: parity with the reference (fixture from scripts/parity/meanflow.py), header
detection, step count and schedule, no guidance rows, the CUDA graph path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rounding import rounding_tolerance
from safetensors.torch import load_file, save_file
from test_s3gen import assert_wav_matches
from torch import nn

from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.models.conds import GenCond
from chatterbox_cli.models.s3gen import (
    MEANFLOW_KEY,
    SPEECH_PARTS,
    VOICE_PARTS,
    MeanflowS3GenConfig,
    S3Gen,
    S3GenConfig,
    infer_config,
    is_meanflow_file,
    random_state_dict,
)
from chatterbox_cli.models.s3gen.flow import Flow, FlowConfig
from chatterbox_cli.models.s3gen.flow import random_state_dict as flow_random_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "parity_meanflow"
# fp32 on both sides, op order differs. Sum of the reduction lengths (in_features, or in_channels x
# kernel) of every linear and convolution that runs (`_reductions` below counts them with forward hooks):
# the encoder and every Euler step of the estimator, whose time embedding runs twice (t and r) and
# whose mixer reduces over both embeddings. Each length-k sum rounds by <= 6 sqrt(k) u of its terms in
# any order (tests/rounding.py); 2 or 3 steps of size <= 1/2 do not amplify the errors beyond that.
MEL_REDUCTIONS = {("tiny", 2): 20_608, ("tiny", 3): 29_312, ("english", 2): 441_792}


def _reductions(module: nn.Module, run: Callable[[], object]) -> int:
    total = 0

    def hook(m: nn.Module, _inputs: object, _output: object) -> None:
        nonlocal total
        total += m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * m.kernel_size[0]

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear | nn.Conv1d)
    ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return total


def _fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(f"{FIXTURE}.safetensors"), json.loads(Path(f"{FIXTURE}.json").read_text())


def _speaking_model(size: str, seed: int) -> S3Gen:
    config = getattr(MeanflowS3GenConfig, size)()
    model = S3Gen(config, parts=SPEECH_PARTS)
    sd = random_state_dict(config, seed)
    model.load_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in SPEECH_PARTS}, strict=True)
    return model.eval()


def _parity(name: str) -> None:
    t, meta = _fixture()
    size, steps = meta[name]["config"], meta[name]["n_timesteps"]
    model = _speaking_model(size, meta["seed"])
    cond = GenCond(
        prompt_token=t[f"{name}.prompt_token"],
        prompt_token_len=t[f"{name}.prompt_token_len"],
        prompt_feat=t[f"{name}.prompt_feat"],
        embedding=t[f"{name}.embedding"],
    )
    tokens = t[f"{name}.tokens"]

    def mel_of(n_timesteps: int | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(meta["noise_seed"])
        return model.tokens_to_mel(tokens, cond, n_timesteps=n_timesteps, generator=gen)

    reductions = _reductions(model.flow, lambda: mel_of(steps))
    assert reductions == MEL_REDUCTIONS[(size, steps)]
    mel, ref_mel = mel_of(steps), t[f"{name}.mel"]
    assert mel.shape == ref_mel.shape
    err = (mel - ref_mel).abs().max().item()
    bound = rounding_tolerance(reductions) * ref_mel.abs().max().item()
    assert err <= bound, (err, bound)
    if steps == 2:  # Turbo's default: the same computation as an explicit 2
        assert torch.equal(mel_of(None), mel)

    assert_wav_matches(
        model, tokens, cond, steps, meta["noise_seed"], mel, ref_mel, t[f"{name}.wav"], reductions, size
    )


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny2", "tiny3"])
def test_meanflow_matches_reference_tiny(name: str) -> None:
    _parity(name)


@pytest.mark.parity
@pytest.mark.slow
def test_meanflow_matches_reference_english() -> None:
    torch.set_num_threads(1)
    _parity("english2")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {"plain": folder / "s3gen.safetensors", "meanflow": folder / "s3gen_meanflow.safetensors"}
    save_file(random_state_dict(S3GenConfig.tiny(), seed=0), str(paths["plain"]))
    save_file(random_state_dict(MeanflowS3GenConfig.tiny(), seed=0), str(paths["meanflow"]))
    return paths


def test_meanflow_state_dict_is_the_plain_one_plus_the_mixer() -> None:
    plain = random_state_dict(S3GenConfig.tiny(), seed=5)
    meanflow = random_state_dict(S3GenConfig.tiny(meanflow=True), seed=5)
    assert meanflow.keys() - plain.keys() == {MEANFLOW_KEY}
    assert all(torch.equal(plain[k], meanflow[k]) for k in plain)
    assert meanflow[MEANFLOW_KEY].shape == (256, 512)  # tiny: 4 * est_channels, from [t, r] embeddings
    # the reference's S3Gen(meanflow=True) loads (strictly) the English layout plus the mixer
    with gzip.open(FIXTURE.parent / "official_tensor_inventory.json.gz") as f:
        inventory = json.loads(f.read())["s3gen.safetensors"]
    with torch.device("meta"):
        english = S3Gen(S3GenConfig.english(meanflow=True)).state_dict()
    assert english.keys() == inventory.keys() | {MEANFLOW_KEY}
    assert all(list(english[k].shape) == inventory[k][0] for k in inventory)
    assert english[MEANFLOW_KEY].shape == (1024, 2048)


def test_header_says_which_model(files: dict[str, Path]) -> None:
    assert not is_meanflow_file(files["plain"]) and is_meanflow_file(files["meanflow"])
    assert infer_config(files["plain"]) == S3GenConfig.tiny()
    config = infer_config(files["meanflow"])
    assert config == S3GenConfig.tiny(meanflow=True) == MeanflowS3GenConfig.tiny()
    assert config.meanflow and config.flow.n_timesteps == 2
    assert S3GenConfig.english(meanflow=True).flow.n_timesteps == 2
    assert S3GenConfig.english().flow.n_timesteps == 10 and not S3GenConfig.english().meanflow

    model = S3Gen.load(files["meanflow"])
    assert model.config.meanflow and model.flow.decoder.meanflow
    mixer = model.flow.decoder.estimator.time_embed_mixer
    assert torch.equal(mixer.weight, load_file(str(files["meanflow"]))[MEANFLOW_KEY])
    assert S3Gen.load(files["plain"]).flow.decoder.estimator.time_embed_mixer is None
    assert S3Gen.load(files["meanflow"], parts=VOICE_PARTS).config.meanflow

    with pytest.raises(CheckpointError, match="mean-flow"):
        S3Gen.load(files["plain"], parts=("flow",), config=S3GenConfig.tiny(meanflow=True))
    with pytest.raises(CheckpointError, match="plain"):
        S3Gen.load(files["meanflow"], parts=("flow",), config=S3GenConfig.tiny())


def _flow(meanflow: bool, seed: int = 0) -> Flow:
    config = FlowConfig.tiny().with_meanflow() if meanflow else FlowConfig.tiny()
    flow = Flow(config)
    flow.load_state_dict(flow_random_state_dict(config, seed), strict=True)
    return flow.eval()


def _cond_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_token": torch.randint(0, 6561, (1, 6), generator=g),
        "prompt_feat": torch.randn(1, 12, 80, generator=g),
        "embedding": torch.randn(1, 192, generator=g),
    }


def _estimator_calls(flow: Flow, n_timesteps: int | None, rows: int = 2) -> list[dict[str, object]]:
    """Run the flow on `rows` rows; per estimator call, its batch and the t (and r) it was given."""
    calls: list[dict[str, object]] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        calls.append(
            {
                "batch": args[0].size(0),
                "t": args[3].unique().tolist(),
                "r": args[6].unique().tolist() if len(args) > 6 else None,
            }
        )

    handle = flow.decoder.estimator.register_forward_pre_hook(hook)
    tokens = torch.randint(0, 6561, (rows, 5), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            flow.inference(tokens, torch.full((rows,), 5), **_cond_inputs(), n_timesteps=n_timesteps)
    finally:
        handle.remove()
    return calls


def test_default_two_linear_steps_without_guidance_rows() -> None:
    calls = _estimator_calls(_flow(meanflow=True), None)
    assert [c["batch"] for c in calls] == [2, 2]  # B rows, not 2B: no CFG
    assert [c["t"] for c in calls] == [[0.0], [0.5]]
    assert [c["r"] for c in calls] == [[0.5], [1.0]]


def test_explicit_step_count_is_honoured() -> None:
    calls = _estimator_calls(_flow(meanflow=True), 4)
    assert [c["t"] for c in calls] == [[0.0], [0.25], [0.5], [0.75]]  # linear, not cosine
    assert [c["r"] for c in calls] == [[0.25], [0.5], [0.75], [1.0]]
    assert len(_estimator_calls(_flow(meanflow=True), 1)) == 1


def test_plain_flow_keeps_its_ten_guided_cosine_steps() -> None:
    calls = _estimator_calls(_flow(meanflow=False), None)
    assert len(calls) == 10 and all(c["batch"] == 4 and c["r"] is None for c in calls)
    assert 0.0 < calls[1]["t"][0] < 0.1  # cosine: small steps near the noise


def test_estimator_needs_r_exactly_when_meanflow() -> None:
    x = torch.zeros(1, 80, 4)
    mask, t, spks = torch.ones(1, 1, 4), torch.zeros(1), torch.zeros(1, 80)
    with pytest.raises(ValueError, match="end time r"):
        _flow(meanflow=True).decoder.estimator(x, mask, x, t, spks, x)
    with pytest.raises(ValueError, match="end time r"):
        _flow(meanflow=False).decoder.estimator(x, mask, x, t, spks, x, t)


def test_mixer_mixes_in_the_end_time() -> None:
    """With the mixer's paper init (identity on the t half, zero on the r half) the mean-flow estimator
    is the plain one; the random mixer of the fixtures makes r matter."""
    meanflow, plain = _flow(meanflow=True), _flow(meanflow=False)
    g = torch.Generator().manual_seed(2)
    x, mu, cond = (torch.randn(1, 80, 8, generator=g) for _ in range(3))
    mask, spks, t = torch.ones(1, 1, 8), torch.randn(1, 80, generator=g), torch.tensor([0.25])
    with torch.inference_mode():
        v_half = meanflow.decoder.estimator(x, mask, mu, t, spks, cond, torch.tensor([0.5]))
        v_one = meanflow.decoder.estimator(x, mask, mu, t, spks, cond, torch.tensor([1.0]))
        assert not torch.allclose(v_half, v_one)
        mixer = meanflow.decoder.estimator.time_embed_mixer
        dim = mixer.out_features
        mixer.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1))
        torch.testing.assert_close(
            meanflow.decoder.estimator(x, mask, mu, t, spks, cond, torch.tensor([1.0])),
            plain.decoder.estimator(x, mask, mu, t, spks, cond),
        )


def test_per_row_generators_give_each_row_its_own_noise() -> None:
    flow = _flow(meanflow=True)
    tokens = torch.randint(0, 6561, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        mel, _ = flow.inference(
            tokens,
            torch.tensor([10, 6]),
            **_cond_inputs(),
            generator=[torch.Generator().manual_seed(s) for s in (8, 9)],
        )
        short, _ = flow.inference(
            tokens[1:, :6], torch.tensor([6]), **_cond_inputs(), generator=torch.Generator().manual_seed(9)
        )
    bound = rounding_tolerance(MEL_REDUCTIONS[("tiny", 2)]) * short.abs().max().item()
    assert (mel[1, :, :12] - short[0]).abs().max().item() <= bound  # other kernels: rounding only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("steps", [2, 3])
def test_graphed_meanflow_steps_equal_eager_steps(steps: int) -> None:
    """2 steps: no graph unless kept (capturing costs about a step); a kept graph then replays every
    step. 3 steps: steps 2.. replay a graph as for the plain flow."""
    flow = _flow(meanflow=True, seed=3).to("cuda")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6561, (2, 12), generator=g).cuda()
    cond = {k: v.cuda() for k, v in _cond_inputs().items()}

    def mel(graph: bool, keep: bool = False) -> torch.Tensor:
        flow.decoder.cuda_graph = graph
        gens = [torch.Generator("cuda").manual_seed(s) for s in (1, 2)]
        lens = torch.tensor([12, 7], device="cuda")
        with torch.inference_mode():
            return flow.inference(tokens, lens, **cond, n_timesteps=steps, generator=gens, keep_graph=keep)[0]

    eager = mel(False)
    torch.testing.assert_close(mel(True), eager, rtol=1e-5, atol=1e-5)
    assert not flow.decoder.kept
    torch.testing.assert_close(mel(True, keep=True), eager, rtol=1e-5, atol=1e-5)
    (kept,) = flow.decoder.kept.values()
    torch.testing.assert_close(mel(True), eager, rtol=1e-5, atol=1e-5)  # every step replays the kept graph
    assert list(flow.decoder.kept.values()) == [kept]
