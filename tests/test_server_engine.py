"""The server's engine in this process (tiny random checkpoint, CPU): how it groups requests into rounds."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.server.engine import Engine, Speech
from chatterbox_cli.service import LoadRequest, ModelHolder


def _speech(
    engine: Engine, i: int, finished: threading.Semaphore, audio: list[np.ndarray] | None = None
) -> Speech:
    """Request i, one short chunk: its audio goes to `audio`, its end releases `finished`."""

    def deliver(item: np.ndarray | BaseException | None) -> None:
        assert not isinstance(item, BaseException), item
        if item is None:
            finished.release()
        elif audio is not None:
            audio.append(item)

    assert engine.builtin is not None
    settings = SynthesisSettings(max_tokens=10, flow_steps=2, seed=i)
    return Speech([f"Request {i} has one short chunk."], engine.builtin, "builtin", settings, deliver)


@contextlib.contextmanager
def _running(checkpoint: str, **gather: float) -> Iterator[Engine]:
    """A started engine on the tiny checkpoint (CPU, up to 4 chunks a round) with these gather windows,
    stopped at the end."""
    engine = Engine(
        ModelHolder(LoadRequest(model=checkpoint, device="cpu", max_tokens=10, batch=4)), **gather
    )
    engine.start()
    try:
        yield engine
    finally:
        engine.stop(timeout=60)


def _end_a_round_of_two(engine: Engine, finished: threading.Semaphore) -> None:
    """Requests 0 and 1 arrive together, share the first round and end."""
    engine.submit(_speech(engine, 0, finished))
    engine.submit(_speech(engine, 1, finished))
    for _ in range(2):
        assert finished.acquire(timeout=120)
    assert engine.rounds == 1 and engine.largest_group == 2


def _gathered(log: str) -> list[float]:
    """How long each round gathered, from the engine's round log lines."""
    return [float(m) for m in re.findall(r"gathered for ([0-9.]+) s", log)]


def test_requests_arriving_together_start_one_round(tiny_checkpoint: str) -> None:
    """A request arrives at an idle engine, two more 50 ms later: with a quiet window of 0.5 s they all
    start in the first round. Without the wait, the worker, woken by the first request, would have
    started a round of one 50 ms before the others came (the engine's default window is 20 ms; the test's
    is long so that a slow machine's thread scheduling cannot decide it)."""
    finished = threading.Semaphore(0)
    audio: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    with _running(tiny_checkpoint, gather_quiet_s=0.5, gather_max_s=5.0) as engine:
        engine.submit(_speech(engine, 0, finished, audio[0]))
        time.sleep(0.05)
        engine.submit(_speech(engine, 1, finished, audio[1]))
        engine.submit(_speech(engine, 2, finished, audio[2]))
        for _ in range(3):
            assert finished.acquire(timeout=120)
    assert engine.rounds == 1 and engine.largest_group == 3
    assert all(sum(a.shape[0] for a in pieces) > 0 for pieces in audio.values())


def test_after_a_round_that_ended_requests_the_next_waits_for_as_many(tiny_checkpoint: str) -> None:
    """Two requests share a round and end. The next two arrive 0.5 s apart, ten times the quiet window:
    the quiet window alone would start a round of one, but the engine waits (while requests come no more
    than its 2 s return gap apart, up to its 5 s maximum) until as many requests wait as the last round
    ended, so both share the second round."""
    finished = threading.Semaphore(0)
    with _running(tiny_checkpoint, gather_quiet_s=0.05, return_gap_s=2.0, gather_max_s=5.0) as engine:
        _end_a_round_of_two(engine, finished)
        engine.submit(_speech(engine, 2, finished))
        time.sleep(0.5)
        engine.submit(_speech(engine, 3, finished))
        for _ in range(2):
            assert finished.acquire(timeout=120)
    assert engine.rounds == 2


def test_when_as_many_came_back_as_ended_the_round_starts_without_the_quiet_window(
    tiny_checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two requests share a round and end; their clients' next two arrive together. With as many waiting
    as the round ended, the second round starts at once instead of after the quiet window (2 s): waiting it
    would log at least 2 s; 1 s leaves room for a slow machine's thread wake-ups."""
    caplog.set_level(logging.INFO, logger="chatterbox.server")
    finished = threading.Semaphore(0)
    with _running(tiny_checkpoint, gather_quiet_s=2.0, return_gap_s=5.0, gather_max_s=10.0) as engine:
        _end_a_round_of_two(engine, finished)
        engine.submit(_speech(engine, 2, finished))
        engine.submit(_speech(engine, 3, finished))
        for _ in range(2):
            assert finished.acquire(timeout=120)
    gathered = _gathered(caplog.text)
    assert len(gathered) == 2 and engine.rounds == 2 and gathered[1] < 1.0


def test_a_client_that_does_not_come_back_delays_the_next_round_by_the_return_gap_only(
    tiny_checkpoint: str,
) -> None:
    """Two requests share a round and end; only one client sends another. The engine waits for the second
    no longer than the return gap (0.3 s) after the last arrival, not for its 60 s maximum: the request is
    done well within the test's 30 s (a round of the tiny model on a CPU takes about a second)."""
    finished = threading.Semaphore(0)
    with _running(tiny_checkpoint, gather_quiet_s=0.05, return_gap_s=0.3, gather_max_s=60.0) as engine:
        _end_a_round_of_two(engine, finished)
        engine.submit(_speech(engine, 2, finished))
        assert finished.acquire(timeout=30)
    assert engine.rounds == 2


def test_a_request_long_after_a_round_ended_waits_only_for_quiet(
    tiny_checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two requests share a round and end; a request arrives 1.5 s later, past the return gap (1 s): the
    ended round's clients are not returning together, so it starts after the quiet window (0.05 s), not
    the return gap. Waiting the gap would log at least 1 s; 0.5 s leaves room for a slow machine's thread
    wake-ups."""
    caplog.set_level(logging.INFO, logger="chatterbox.server")
    finished = threading.Semaphore(0)
    with _running(tiny_checkpoint, gather_quiet_s=0.05, return_gap_s=1.0, gather_max_s=5.0) as engine:
        _end_a_round_of_two(engine, finished)
        time.sleep(1.5)
        engine.submit(_speech(engine, 2, finished))
        assert finished.acquire(timeout=120)
    gathered = _gathered(caplog.text)
    assert len(gathered) == 2 and gathered[1] < 0.5


def test_a_round_that_goes_on_with_waiting_chunks_does_not_wait_for_quiet(
    tiny_checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A two-chunk request: its first round gathers for the quiet window (1 s) after it arrived; its second
    round, with nothing new arriving, starts at once (the log says how long each round gathered). Waiting
    the window again would log at least 1 s; 0.5 s leaves room for a slow machine's thread wake-ups."""
    caplog.set_level(logging.INFO, logger="chatterbox.server")
    finished = threading.Semaphore(0)
    with _running(tiny_checkpoint, gather_quiet_s=1.0, gather_max_s=5.0) as engine:
        speech = _speech(engine, 0, finished)
        speech.chunks = ["The first chunk of the request.", "And its second chunk."]
        engine.submit(speech)
        assert finished.acquire(timeout=120)
    gathered = _gathered(caplog.text)
    assert len(gathered) == 2 and engine.rounds == 2
    assert gathered[0] >= 0.9 and gathered[1] < 0.5
