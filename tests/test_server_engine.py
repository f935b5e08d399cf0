"""The server's engine in this process (tiny random checkpoint, CPU): how it groups requests into rounds."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np

from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.server.engine import Engine, Speech
from chatterbox_cli.service import LoadRequest, ModelHolder


def test_requests_arriving_together_start_one_round(tiny_checkpoint: str) -> None:
    """A request arrives at an idle engine, two more 50 ms later: with a quiet window of 0.5 s they all
    start in the first round. Without the wait, the worker, woken by the first request, would have
    started a round of one 50 ms before the others came (the engine's default window is 20 ms; the test's
    is long so that a slow machine's thread scheduling cannot decide it)."""
    holder = ModelHolder(LoadRequest(model=tiny_checkpoint, device="cpu", max_tokens=10, batch=4))
    engine = Engine(holder, gather_quiet_s=0.5, gather_max_s=5.0)
    assert engine.builtin is not None
    settings = SynthesisSettings(max_tokens=10, flow_steps=2)
    finished = threading.Semaphore(0)
    audio: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}

    def speech(i: int) -> Speech:
        def deliver(item: np.ndarray | BaseException | None) -> None:
            assert not isinstance(item, BaseException), item
            if item is None:
                finished.release()
            else:
                audio[i].append(item)

        chunks = [f"Request {i} has one short chunk."]
        return Speech(chunks, engine.builtin, "builtin", replace(settings, seed=i), deliver)

    engine.start()
    try:
        engine.submit(speech(0))
        time.sleep(0.05)
        engine.submit(speech(1))
        engine.submit(speech(2))
        for _ in range(3):
            assert finished.acquire(timeout=120)
    finally:
        engine.stop(timeout=60)
    assert engine.rounds == 1 and engine.largest_group == 3
    assert all(sum(a.shape[0] for a in pieces) > 0 for pieces in audio.values())


def test_after_a_round_that_ended_requests_the_next_waits_for_as_many(tiny_checkpoint: str) -> None:
    """Two requests share a round and end. The next two arrive 0.5 s apart, ten times the quiet window:
    the quiet window alone would start a round of one, but the engine waits (up to its 5 s maximum) until
    as many requests wait as the last round ended, so both share the second round."""
    holder = ModelHolder(LoadRequest(model=tiny_checkpoint, device="cpu", max_tokens=10, batch=4))
    engine = Engine(holder, gather_quiet_s=0.05, gather_max_s=5.0)
    assert engine.builtin is not None
    settings = SynthesisSettings(max_tokens=10, flow_steps=2)
    finished = threading.Semaphore(0)

    def speech(i: int) -> Speech:
        def deliver(item: np.ndarray | BaseException | None) -> None:
            assert not isinstance(item, BaseException), item
            if item is None:
                finished.release()

        return Speech([f"Request {i}."], engine.builtin, "builtin", replace(settings, seed=i), deliver)

    engine.start()
    try:
        engine.submit(speech(0))
        engine.submit(speech(1))
        for _ in range(2):
            assert finished.acquire(timeout=120)
        assert engine.rounds == 1 and engine.largest_group == 2
        engine.submit(speech(2))
        time.sleep(0.5)
        engine.submit(speech(3))
        for _ in range(2):
            assert finished.acquire(timeout=120)
    finally:
        engine.stop(timeout=60)
    assert engine.rounds == 2
