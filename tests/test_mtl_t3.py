"""The multilingual T3 against the reference (chatterbox-tts 0.1.7) on shared random weights: teacher-forced
logits with and without CFG, and seeded decoding with the alignment guard on, which decides when the stop
token may come (fixture: scripts/parity/mtl_t3.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from chatterbox_cli import service
from chatterbox_cli.models.alignment import alignment_heads
from chatterbox_cli.models.conds import T3Cond
from chatterbox_cli.models.loading import load_t3
from chatterbox_cli.models.sampling import SamplingSettings
from chatterbox_cli.models.t3 import T3, combine_cfg
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from tests.test_t3 import assert_close

FIXTURE = Path(__file__).parent / "fixtures" / "parity_mtl_t3.safetensors"
Fixture = tuple[dict[str, torch.Tensor], dict[str, str]]


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def folder(fixture: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, meta = fixture
    folder = tmp_path_factory.mktemp("mtl-parity")
    return write_random_checkpoint(folder, "tiny", seed=int(meta["seed"]), variant="multilingual")


@pytest.fixture(scope="module")
def t3(folder: Path) -> T3:
    """The multilingual T3 as the service loads it from a checkpoint in the official layout."""
    model = service.load(service.LoadRequest(model=str(folder), device="cpu")).t3
    assert model.config.text_vocab_size == 2454 and model.text_head is None  # not needed to decode
    return model


def _cond(fx: dict[str, torch.Tensor]) -> T3Cond:
    return T3Cond(fx["speaker_emb"], fx["cond_prompt_speech_tokens"], fx["emotion_adv"])


def test_the_loader_turns_the_guard_on_with_the_reference_heads(t3: T3, fixture: Fixture) -> None:
    _, meta = fixture
    assert [list(h) for h in t3.alignment_heads] == json.loads(meta["alignment_heads"])
    assert alignment_heads(30, 16) == ((12, 15), (13, 11), (9, 2))  # the full-size model's own heads


def test_parity_teacher_forced_logits(folder: Path, fixture: Fixture) -> None:
    """The whole checkpoint file, text head included (the service leaves it out: decoding never reads it)."""
    fx, meta = fixture
    t3 = load_t3(folder / "t3_mtl23ls_v2.safetensors")
    with torch.inference_mode():
        out = t3(fx["text_fr"], fx["speech_tokens"], _cond(fx))
        cfg = t3(fx["text_fr"], fx["speech_tokens"], _cond(fx), cfg=True)
    assert_close(out.hidden, fx["hidden"])
    assert_close(cfg.hidden, fx["cfg_hidden"])
    assert_close(out.text_logits, fx["text_logits"])
    assert_close(out.speech_logits, fx["speech_logits"])
    assert_close(cfg.text_logits, fx["cfg_text_logits"])
    w = float(meta["cfg_weight"])
    assert_close(combine_cfg(cfg.speech_logits, w), combine_cfg(fx["cfg_speech_logits"], w))


def _decode_run(t3: T3, fixture: Fixture, run: list[Any]) -> list[int]:
    """Our tokens for one of the fixture's decode runs, on its weights ("plain" or "eager-stop")."""
    fx, meta = fixture
    kind, language, seed, n, w, temperature, min_p, top_p, penalty = run
    plain = t3.speech_head.weight.detach().clone()
    try:
        if kind == "eager-stop":
            with torch.no_grad():
                t3.speech_head.weight[t3.config.stop_speech_token] *= float(meta["stop_row_scale"])
        tokens = t3.generate(
            fx[f"text_{language}"],
            _cond(fx),
            max_new_tokens=n,
            cfg_weight=w,
            sampling=SamplingSettings(temperature, min_p, top_p, penalty),
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        with torch.no_grad():
            t3.speech_head.weight.copy_(plain)
    return tokens.tolist()


def test_parity_seeded_decoding_with_the_alignment_guard(t3: T3, fixture: Fixture) -> None:
    """Same seeds, same tokens, including runs whose stop row is scaled up so that the stop token is the
    most likely one at many steps: the guard holds it back there exactly as the reference's analyzer does."""
    fx, meta = fixture
    for i, run in enumerate(json.loads(meta["decode_runs"])):
        expected = fx[f"decode{i}_tokens"].tolist()
        if expected and expected[-1] == t3.config.stop_speech_token:  # the reference returns it, we do not
            expected = expected[:-1]
        assert _decode_run(t3, fixture, run) == expected, f"run {i} ({run[0]}, {run[1]})"


def test_without_the_guard_the_eager_stop_weights_stop_sooner(t3: T3, fixture: Fixture) -> None:
    """The eager-stop runs test the guard: the same decoding without it stops where the guard held back."""
    fx, meta = fixture
    runs = json.loads(meta["decode_runs"])
    assert runs[-1][0] == "eager-stop"
    heads = t3.alignment_heads
    try:
        t3.alignment_heads = ()
        tokens = _decode_run(t3, fixture, runs[-1])
    finally:
        t3.alignment_heads = heads
    assert len(tokens) < fx[f"decode{len(runs) - 1}_tokens"].numel() == runs[-1][3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_with_the_guard_equals_eager_decoding(t3: T3, fixture: Fixture) -> None:
    """The guard runs inside the captured decode step, its state updated in place: replaying the graph
    gives the tokens of eager steps, for a batch whose texts finish at different steps."""
    fx, meta = fixture
    gpu = T3(t3.config)
    gpu.drop_text_head()  # as the loaded t3 has it
    gpu.load_state_dict(t3.state_dict())
    gpu = gpu.to("cuda").eval()
    gpu.alignment_heads = t3.alignment_heads
    with torch.no_grad():
        gpu.speech_head.weight[t3.config.stop_speech_token] *= float(meta["stop_row_scale"])
    texts = [fx["text_fr"], fx["text_de"]]

    def decode(graph: bool) -> list[list[int]]:
        generators = [torch.Generator(device="cuda").manual_seed(s) for s in (3, 4)]
        out = gpu.generate_batch(
            texts, _cond(fx).to("cuda"), max_new_tokens=120, generators=generators, cuda_graph=graph
        )
        return [t.tolist() for t in out]

    eager = decode(False)
    graphed = decode(True)
    assert gpu.last_decode_mode == "cuda-graph"
    assert graphed == eager
