"""bitsandbytes' two notices that ask nothing of the user are dropped, and nothing else it says."""

from __future__ import annotations

import logging

import pytest
import torch

from chatterbox_cli.bitsandbytes_quiet import import_bitsandbytes


def test_the_int8_cast_notice_is_dropped_and_other_messages_stay(caplog: pytest.LogCaptureFixture) -> None:
    bnb = import_bitsandbytes()
    layer = bnb.nn.Linear8bitLt(256, 128, bias=False, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(
        torch.randn(128, 256) * 0.02, requires_grad=False, has_fp16_weights=False
    )
    layer = layer.to("cpu")
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.inference_mode():
        for _ in range(3):  # bitsandbytes logs the notice at every call
            out = layer(torch.randn(4, 256, dtype=torch.bfloat16))
        logger.warning("MatMul8bitLt: some other problem")
    assert out.shape == (4, 128) and out.dtype == torch.bfloat16
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["MatMul8bitLt: some other problem"]
