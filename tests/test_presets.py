"""Presets and the one rule that decides which Linears are quantized, checked on the official tensor layout
(tests/fixtures/official_tensor_inventory.json.gz, written by scripts/parity/memory_inventory.py from the
reference modules: every tensor name and shape, and the type of the module that owns it)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from chatterbox_cli.checkpoint import TensorInfo
from chatterbox_cli.errors import UsageError
from chatterbox_cli.presets import PRESETS, plan_for, preset_names
from chatterbox_cli.quant.plan import (
    COMPONENT_SOURCES,
    COMPONENTS,
    linear_shapes_from_header,
    parse_plan_spec,
    which_linears,
)
from chatterbox_cli.variants import ENGLISH

INVENTORY = Path(__file__).parent / "fixtures" / "official_tensor_inventory.json.gz"


@pytest.fixture(scope="module")
def inventory() -> dict[str, dict[str, list]]:
    return json.loads(gzip.open(INVENTORY).read())


def header_of(tensors: dict[str, list]) -> dict[str, TensorInfo]:
    return {name: TensorInfo("F32", tuple(shape)) for name, (shape, _kind) in tensors.items()}


def test_preset_order_and_modes() -> None:
    assert preset_names() == ["fp16", "bnb-8bit", "awq", "bnb-4bit", "bnb-4bit-swap"]
    expected = {
        "fp16": {},
        "bnb-8bit": {"t3": "int8", "flow": "int8"},
        "awq": {"t3": "awq"},
        "bnb-4bit": {"t3": "nf4", "flow": "int8"},
        "bnb-4bit-swap": {"t3": "nf4", "flow": "int8"},  # T3 and S3Gen take turns on the GPU
    }
    for preset, quantized in expected.items():
        plan = plan_for(preset)
        assert set(plan.components) == set(COMPONENTS)
        for comp in COMPONENTS:
            assert plan[comp].mode == quantized.get(comp, "16bit"), (preset, comp)


def test_awq_is_for_t3_only_and_takes_every_backbone_linear(inventory: dict) -> None:
    assert PRESETS["awq"].available
    assert plan_for("fp16", {"t3": "awq"})["t3"].mode == "awq"
    with pytest.raises(UsageError, match="T3 only"):
        plan_for("fp16", {"flow": "awq"})
    shapes = linear_shapes_from_header(header_of(inventory["t3_cfg.safetensors"]))
    # the same layers as nf4 on the official checkpoint: 30 layers x q, k, v, o, gate, up, down
    assert which_linears(plan_for("awq")["t3"], shapes) == which_linears(plan_for("bnb-4bit")["t3"], shapes)
    assert len(which_linears(plan_for("awq")["t3"], shapes)) == 210


def test_unknown_names_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown preset"):
        plan_for("int3")
    with pytest.raises(UsageError, match="unknown component"):
        plan_for("fp16", {"vocoder": "int8"})
    with pytest.raises(UsageError, match="unknown mode"):
        plan_for("fp16", {"t3": "int4"})
    with pytest.raises(UsageError, match="component=mode"):
        parse_plan_spec("t3:nf4")


def test_overrides_make_per_component_plans() -> None:
    plan = plan_for("bnb-4bit", parse_plan_spec("flow=16bit, t3=int8"))
    assert plan["t3"].mode == "int8" and plan["flow"].mode == "16bit"
    assert plan.preset == "bnb-4bit+flow=16bit,t3=int8"


def test_header_linear_detection_matches_module_types(inventory: dict) -> None:
    # From a header alone, a Linear is a 2-D `.weight` that is not an embedding table.
    for tensors in inventory.values():
        truth = {
            n[: -len(".weight")]
            for n, (shape, kind) in tensors.items()
            if kind == "Linear" and n.endswith(".weight")
        }
        assert set(linear_shapes_from_header(header_of(tensors))) == truth


def test_t3_plan_takes_exactly_the_210_backbone_linears(inventory: dict) -> None:
    shapes = linear_shapes_from_header(header_of(inventory["t3_cfg.safetensors"]))
    for mode in ("int8", "nf4"):
        chosen = which_linears(plan_for("bnb-4bit", {"t3": mode})["t3"], shapes)
        assert len(chosen) == 210
        assert all(
            re.fullmatch(r"tfmr\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj", n)
            for n in chosen
        )
        assert sum(shapes[n][0] * shapes[n][1] for n in chosen) == 503_316_480
    assert which_linears(plan_for("fp16")["t3"], shapes) == []


def test_flow_plan_skips_tiny_linears_and_other_components(inventory: dict) -> None:
    header = header_of(inventory["s3gen.safetensors"])
    shapes = linear_shapes_from_header(header)
    plan = plan_for("bnb-8bit")
    flow = which_linears(plan["flow"], shapes)
    # independent count: flow Linears with >= 65,536 weights and >= 64 input features
    expected = {n for n, (o, i) in shapes.items() if n.startswith("flow.") and o * i >= 65_536 and i >= 64}
    assert set(flow) == expected and len(flow) == 424
    for tiny in ("flow.encoder_proj", "flow.spk_embed_affine_layer"):
        assert tiny in shapes and tiny not in flow
    assert not any(n.startswith(("mel2wav.", "tokenizer.", "speaker_encoder.")) for n in flow)
    # mel2wav / voice-preparation components have nothing planned in any preset
    for preset in preset_names():
        for comp in ("mel2wav", "s3tokenizer", "speaker_encoder"):
            assert which_linears(plan_for(preset)[comp], shapes) == []


def test_small_in_features_rule_keeps_emotion_fc_16bit(inventory: dict) -> None:
    # int8 with in_features=1 measured 6.7e6 % relative error; such layers must never be chosen even if a
    # custom include pattern names them.
    from dataclasses import replace

    shapes = linear_shapes_from_header(header_of(inventory["t3_cfg.safetensors"]))
    cp = replace(plan_for("bnb-8bit")["t3"], include=("*",), exclude=(), min_params=0)
    chosen = which_linears(cp, shapes)
    assert "cond_enc.emotion_adv_fc" not in chosen and "cond_enc.spkr_enc" in chosen


def test_component_sources_cover_every_official_tensor(inventory: dict) -> None:
    for file, tensors in inventory.items():  # the English checkpoint's files
        prefixes = [p for role, p in COMPONENT_SOURCES.values() if ENGLISH.file(role) == file]
        for name in tensors:
            owners = [p for p in prefixes if name.startswith(p)]
            assert len(owners) == 1, (file, name, owners)
