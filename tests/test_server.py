"""`chatterbox serve` as users run it: a real server process on loopback (tiny random checkpoint, CPU),
reached through the official openai client and httpx. Covers the API, the formats, streaming, batching of
concurrent requests, limits, bad input, authentication, a client leaving mid-stream, and SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import child_env

openai = pytest.importorskip("openai")  # the test extra installs it; CI fails loudly if it is missing

KEY = "test-key"
ORIGIN = "http://app.example:3000"  # the module's server lets web pages from here call it (CORS)
TWO = "The first sentence is short. The second sentence is a little longer than the first."
# about 500 characters: three chunks of about 150 text tokens (text.DEFAULT_MAX_TOKENS)
LONG = " ".join(f"Sentence {i} goes on for a while with several more words." for i in range(9))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(
    checkpoint: str, folder: Path, env: dict[str, str], *options: str, timeout: float = 180.0
) -> Server:
    port = free_port()
    log = folder / f"server-{port}.log"
    command = [sys.executable, "-m", "chatterbox_cli", "serve", "--model", checkpoint, "--device", "cpu"]
    command += ["--port", str(port), "--max-tokens", "20", *options]
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, text=True)
    server = Server(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"the server did not answer within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def library(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A voice library with one voice, `narrator`, added as users add one."""
    folder = tmp_path_factory.mktemp("voices")
    t = np.arange(24_000 * 4) / 24_000
    wav = 0.2 * np.sin(2 * np.pi * 160 * t) * (1 + 0.2 * np.random.default_rng(0).standard_normal(t.size))
    sf.write(folder / "me.wav", wav.astype(np.float32), 24_000)
    env = child_env(CHATTERBOX_VOICES=str(folder / "library"))
    add = [sys.executable, "-m", "chatterbox_cli", "voices", "add", "narrator", str(folder / "me.wav")]
    proc = subprocess.run(
        [*add, "--model", tiny_checkpoint, "--device", "cpu"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return folder / "library"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: str, library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a key, decoding up to 4 chunks of concurrent requests together, small limits."""
    env = child_env(CHATTERBOX_VOICES=str(library), CHATTERBOX_API_KEY=KEY)
    options = ("--max-batch", "4", "--max-input-chars", "600", "--max-body", "2000", "--allow-origin", ORIGIN)
    s = start_server(tiny_checkpoint, tmp_path_factory.mktemp("server"), env, *options)
    yield s
    s.stop()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def speak(server: Server, timeout: float = 120.0, **body: object) -> httpx.Response:
    payload = {"model": "tts-1", "voice": "alloy", "input": TWO, "response_format": "wav", **body}
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(server.url + "/v1/audio/speech", json=payload, headers=headers, timeout=timeout)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    return audio, rate


def test_openai_client_speaks_wav_and_streams(client: openai.OpenAI, tmp_path: Path) -> None:
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=TWO, response_format="wav")
    audio, rate = decode(response.content)
    assert rate == 24_000 and audio.ndim == 1 and audio.shape[0] > 0

    with client.audio.speech.with_streaming_response.create(
        model="chatterbox", voice="narrator", input=LONG, response_format="pcm"
    ) as streamed:
        assert streamed.headers["content-type"] == "audio/pcm"
        parts = list(streamed.iter_bytes())
    pcm = b"".join(parts)
    assert len(pcm) % 2 == 0 and len(pcm) > 0
    assert len(parts) >= 2  # the chunks leave as each is made, in separate pieces of the body


@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus", "wav", "pcm"])
def test_every_response_format_decodes(server: Server, fmt: str) -> None:
    seeded = speak(server, seed=7, response_format="wav")
    reference, _ = decode(seeded.content)
    response = speak(server, seed=7, response_format=fmt)
    assert response.status_code == 200, response.text
    assert (
        response.headers["content-type"]
        == {
            "mp3": "audio/mpeg",
            "flac": "audio/flac",
            "opus": "audio/ogg",
            "wav": "audio/wav",
            "pcm": "audio/pcm",
        }[fmt]
    )
    if fmt == "pcm":
        audio = np.frombuffer(response.content, dtype="<i2")
    else:
        audio, rate = decode(response.content)
        assert rate == 24_000
    n = reference.shape[0]
    if fmt in ("wav", "flac", "pcm"):  # lossless: the same samples (same seed: the same audio)
        np.testing.assert_array_equal(audio, reference)
    else:  # lossy: the codec's delay and padding come on top (formats.py; at most 2,303 for MP3, 960 Opus)
        assert n <= audio.shape[0] <= n + 2_303


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["chatterbox"]
    health = httpx.get(server.url + "/health").json()  # no key needed: for load balancers
    assert health["status"] == "ok" and health["preset"] == "fp32" and health["device"] == "cpu"
    assert "running on the CPU" in health["reason"]


def test_concurrent_requests_decode_together_and_keep_their_audio(server: Server) -> None:
    """Requests in flight at once share decoding rounds (largest_group > 1), yet each gets the audio it
    gets alone: every chunk is seeded by its own request. Batched and single decoding differ by float
    rounding only (test_pipeline bounds the audio within 1e-5), under half a 16-bit step: the WAV samples
    differ by at most 1."""
    seeds = [11, 12, 13, 14]
    alone = [decode(speak(server, seed=seed).content)[0] for seed in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda seed: speak(server, seed=seed), seeds))
    health = httpx.get(server.url + "/health").json()
    assert health["largest_group"] > 1, health
    for response, expected in zip(together, alone, strict=True):
        assert response.status_code == 200
        audio = decode(response.content)[0]
        assert audio.shape == expected.shape
        assert np.abs(audio.astype(np.int32) - expected).max() <= 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"input": "   "}, 400, "input is empty"),
        ({"input": "word " * 200}, 400, "at most 600"),
        ({"voice": "nobody"}, 400, "no voice 'nobody'"),
        ({"voice": "../../etc/passwd"}, 400, "is not a voice name"),
        ({"response_format": "aac"}, 400, "response_format"),
        ({"speed": 1.5}, 400, "no time-stretch"),
        ({"speed": 9}, 400, "speed"),
        ({"model": "whisper-1"}, 404, "not served here"),
        ({"language": "fr"}, 400, "not one the english model speaks"),
        ({"temperature": -1}, 400, "temperature"),
        ({"seed": -5}, 400, "seed must be between 0 and"),
        ({"unknown_field": 1}, 400, "unknown_field"),
        ({"instructions": "Speak softly."}, 400, "no counterpart in Chatterbox"),
        ({"stream_format": "events"}, 400, "stream_format"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: Server, body: dict[str, object], status: int, words: str
) -> None:
    response = speak(server, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_body_limit_and_bad_json(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/audio/speech"
    big = httpx.post(url, content=b"x" * 5000, headers=headers)
    assert big.status_code == 413 and "at most 2000" in big.json()["error"]["message"]
    bad = httpx.post(url, content=b"{not json", headers=headers)
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]
    listed = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert listed.status_code == 400 and "must be a JSON object" in listed.json()["error"]["message"]


def test_a_number_too_large_for_a_float_is_refused(server: Server) -> None:
    """1e999 is valid JSON; Python reads it as infinity, which would make guidance's logits meaningless."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = '{"model": "tts-1", "voice": "alloy", "input": "Hi.", "cfg_weight": 1e999}'
    response = httpx.post(server.url + "/v1/audio/speech", content=body, headers=headers)
    assert response.status_code == 400 and "cfg_weight must be a finite number" in response.text


def test_a_wrong_or_missing_key_is_refused(server: Server) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
    bare = httpx.post(
        server.url + "/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."}
    )
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"


def test_sse_events_carry_the_plain_streams_audio_and_the_usage(
    server: Server, client: openai.OpenAI
) -> None:
    """stream_format "sse" through the openai client: speech.audio.delta events whose base64 audio joins
    into the same bytes as the plain stream's for the same seed, then one speech.audio.done with the
    usage. S3Gen makes 960 samples per speech token and a one-chunk input has no pause, so the pcm (2 bytes
    a sample) is exactly output_tokens * 960 * 2 bytes."""
    plain = speak(server, response_format="pcm", seed=7)
    assert plain.status_code == 200
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input=TWO,
        response_format="pcm",
        stream_format="sse",
        extra_body={"seed": 7},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    *deltas, done = events
    assert deltas and {e["type"] for e in deltas} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert audio == plain.content
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert len(audio) == usage["output_tokens"] * 960 * 2


def test_web_pages_from_the_allowed_origin_only_may_call_the_api(server: Server) -> None:
    """A browser asks before a POST with a key (preflight), then sends it with its page's Origin: the
    allowed origin gets the headers that let the page read the audio, another gets none."""
    url = server.url + "/v1/audio/speech"
    for origin, allowed in ((ORIGIN, True), ("http://elsewhere.example", False)):
        ask = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        preflight = httpx.options(url, headers=ask)
        assert preflight.status_code == (200 if allowed else 400)
        assert preflight.headers.get("access-control-allow-origin") == (origin if allowed else None)
        payload = {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "pcm"}
        headers = {"Origin": origin, "Authorization": f"Bearer {KEY}"}
        response = httpx.post(url, json=payload, headers=headers, timeout=120)
        assert response.status_code == 200 and len(response.content) > 0
        assert response.headers.get("access-control-allow-origin") == (origin if allowed else None)


def test_a_client_leaving_mid_stream_does_not_stop_the_others(server: Server) -> None:
    payload = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "pcm"}
    headers = {"Authorization": f"Bearer {KEY}"}
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(speak, server, seed=3)
        with httpx.stream("POST", server.url + "/v1/audio/speech", json=payload, headers=headers) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the first audio, then the client goes away
        assert other.result().status_code == 200
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["requests_in_flight"] == 0
    assert speak(server, seed=4).status_code == 200


@pytest.fixture
def lone_server(tiny_checkpoint: str, tmp_path: Path) -> Iterator[Server]:
    """A server without a key that takes one request at a time."""
    s = start_server(tiny_checkpoint, tmp_path, child_env(), "--max-concurrent", "1")
    yield s
    s.stop()


def test_sigterm_drains_the_request_in_flight(lone_server: Server, tiny_checkpoint: str) -> None:
    """SIGTERM stops new connections, lets the request in flight finish whole, then the server exits;
    meanwhile a second request over the one-request limit gets 429."""
    text = " ".join(f"Sentence {i} is spoken before the server stops." for i in range(60))
    payload = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav", "seed": 1}
    url = lone_server.url + "/v1/audio/speech"
    with httpx.stream("POST", url, json=payload, timeout=120) as r:
        assert r.status_code == 200
        pieces = r.iter_bytes()
        parts = [next(pieces)]
        busy = httpx.post(url, json=payload, timeout=30)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        lone_server.process.send_signal(signal.SIGTERM)
        parts += list(pieces)
    audio, _ = decode(b"".join(parts))
    # uvicorn re-raises the signal once drained (since 0.29): the process ends as SIGTERM ends one
    assert lone_server.process.wait(60) in (0, -signal.SIGTERM), lone_server.log.read_text()
    assert "Waiting for connections to close" in lone_server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.post(url, json=payload, timeout=5)
    # the drained response is the whole text: the same audio as an undisturbed run of it
    rerun = start_server(tiny_checkpoint, lone_server.log.parent, child_env())
    try:
        again = httpx.post(rerun.url + "/v1/audio/speech", json=payload, timeout=120)
        np.testing.assert_array_equal(audio, decode(again.content)[0])
    finally:
        rerun.stop()


README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = dict(
    re.findall(r"<!-- server-example: (\w+) -->\s*```(?:sh|python)\n(.*?)```", README.read_text(), re.DOTALL)
)


def test_readme_server_examples_run(lone_server: Server, tmp_path: Path) -> None:
    """The README's curl and openai-client examples, as written, against a real server."""
    assert set(EXAMPLES) == {"curl", "openai"}
    address = f"127.0.0.1:{lone_server.port}"
    curl = EXAMPLES["curl"].replace("127.0.0.1:8000", address)
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + curl], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert '"id":"chatterbox"' in proc.stdout  # /v1/models
    assert decode((tmp_path / "hello.wav").read_bytes())[1] == 24_000
    assert (tmp_path / "speech.pcm").stat().st_size > 0
    script = EXAMPLES["openai"].replace("127.0.0.1:8000", address)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(tmp_path / "hello.mp3")).format == "MP3"


def test_a_request_out_of_time_gets_504(tiny_checkpoint: str, tmp_path: Path) -> None:
    """--timeout counts from the request's arrival; with no audio by then, a 504 in OpenAI's shape (the
    tiny model's first chunk takes longer than 10 ms on any CPU: it is 20 T3 steps and 10 flow steps)."""
    s = start_server(tiny_checkpoint, tmp_path, child_env(), "--timeout", "0.01")
    try:
        payload = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "wav"}
        response = httpx.post(s.url + "/v1/audio/speech", json=payload, timeout=60)
        assert response.status_code == 504 and "ran out of time" in response.json()["error"]["message"]
        assert httpx.get(s.url + "/health").json()["status"] == "ok"  # and it goes on serving
    finally:
        s.stop()


def test_a_missing_extra_and_bad_serve_options_are_usage_errors(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing server extra, a taken port, a port past 65535, an origin that is not one and limits out of
    range: each is said in one line, before the model loads (exit 2, no traceback)."""
    from chatterbox_cli.cli import run

    args = ["serve", "--model", tiny_checkpoint, "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "uvicorn", None)  # as if the server extra were not installed
        assert run([*args, "--port", str(free_port())]) == 2
    assert "pip install 'chatterbox-cli[server]'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert run([*args, "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "is in use; choose another --port" in err and "Traceback" not in err
    assert run([*args, "--port", "99999"]) == 2  # socket.bind would raise OverflowError
    err = capsys.readouterr().err
    assert "less than or equal to 65535" in err and "Traceback" not in err
    assert run([*args, "--port", str(free_port()), "--allow-origin", "localhost:3000"]) == 2
    err = capsys.readouterr().err
    assert "'localhost:3000' is not an origin; give scheme://host[:port]" in err and "Traceback" not in err
    for option, value in (("--max-concurrent", "0"), ("--timeout", "0"), ("--max-batch", "-1")):
        assert run([*args, "--port", str(free_port()), option, value]) == 2
        err = capsys.readouterr().err
        assert f"Invalid value for '{option}'" in err and "Traceback" not in err
