"""turns.Turns: modules that take turns in one weight arena keep every weight's value, share one buffer,
and keep views of one storage (fused projections) sharing it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatterbox_cli.models.t3 import LlamaBackbone, T3Config
from chatterbox_cli.turns import Turns, weight_tensors


def _backbone() -> LlamaBackbone:
    torch.manual_seed(0)
    model = LlamaBackbone(T3Config.tiny()).eval()
    model.fuse_projections()
    model.init_non_persistent_buffers("cpu")
    return model


def _values(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for _, _, t in weight_tensors(module)]


def test_each_turn_restores_every_weight_in_one_shared_arena() -> None:
    backbone = _backbone()
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(2, 5, backbone.config.hidden_size)
    y = torch.randn(3, 16)
    with torch.no_grad():
        before = (backbone(x), mlp(y))
    values = (_values(backbone), _values(mlp))

    turns = Turns(torch.device("cpu"))
    turns.add("backbone", backbone)
    turns.add("mlp", mlp)
    sizes = dict(turns.modules_bytes())
    assert turns.nbytes == max(sizes.values()) and sizes["mlp"] < sizes["backbone"]

    with torch.no_grad():
        turns.use("backbone")
        first = backbone(x)
        turns.use("mlp")
        mlp_out = mlp(y)
        turns.use("backbone")
        again = backbone(x)
    # the same bytes at the same addresses: the same kernels, the same result
    assert torch.equal(first, again)
    # against the unpacked module only the addresses differ, which may change a CPU GEMM's blocking:
    # a few fp32 roundings (2^-24 each) of values of order 1
    assert torch.allclose(first, before[0], rtol=0, atol=64 * 2.0**-24 * before[0].abs().max().item())
    assert torch.allclose(mlp_out, before[1], rtol=0, atol=64 * 2.0**-24 * before[1].abs().max().item())

    # every weight of the module whose turn it is holds its value, inside the arena
    arena = turns.arena
    assert arena is not None
    for (_, _, t), v in zip(weight_tensors(backbone), values[0], strict=True):
        assert torch.equal(t, v)
        assert t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
    for _, _, t in weight_tensors(mlp):  # the idle module points into the same buffer
        assert t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
    turns.use("mlp")
    for (_, _, t), v in zip(weight_tensors(mlp), values[1], strict=True):
        assert torch.equal(t, v)


def test_fused_projections_stay_views_of_their_fused_weight() -> None:
    backbone = _backbone()
    attn = backbone.layers[0].self_attn
    assert attn.qkv_weight is not None
    q_rows = attn.q_proj.weight.shape[0]
    turns = Turns(torch.device("cpu"))
    turns.add("backbone", backbone)
    turns.use("backbone")
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[q_rows:].data_ptr()
    assert isinstance(attn.q_proj.weight, nn.Parameter)


def test_modules_are_added_before_the_first_turn() -> None:
    turns = Turns(torch.device("cpu"))
    turns.add("a", nn.Linear(4, 4))
    turns.use("a")
    with pytest.raises(RuntimeError, match="before the first turn"):
        turns.add("b", nn.Linear(4, 4))
