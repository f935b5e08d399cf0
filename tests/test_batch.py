"""Batch conversion: manifest bookkeeping, and `synthesize --output-dir` runs, reruns, --force and redo."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_cli.audio import Subtype
from chatterbox_cli.batch import (
    MANIFEST_NAME,
    BatchItem,
    Manifest,
    is_done,
    make_items,
    partial_path,
    pending,
    settings_hash,
)
from chatterbox_cli.jobs import HoldInterrupts, Runner, RunState, SynthesizeJob
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.progress import Progress
from chatterbox_cli.service import LoadRequest

FAST = ("--device", "cpu", "--max-tokens", "20", "--flow-steps", "2")
LINES = "First line to speak.\nSecond line, a little longer.\n\n   \nThird and last line.\n"


# --------------------------------------------------------------------------------------------------
# Bookkeeping


def test_items_are_numbered_from_one() -> None:
    items = make_items(["a", "b"])
    assert items == [BatchItem(1, "a"), BatchItem(2, "b")]
    assert items[1].filename == "0002.wav"
    assert partial_path(Path("out"), items[1]) == Path("out/.0002.wav.part")


def test_settings_hash_is_stable_and_order_free() -> None:
    a = settings_hash({"temperature": 0.8, "seed": None, "voice": "builtin"})
    assert a == settings_hash({"voice": "builtin", "seed": None, "temperature": 0.8})
    assert a != settings_hash({"temperature": 0.7, "seed": None, "voice": "builtin"})
    assert len(a) == 16 and int(a, 16) >= 0


def _write_item(folder: Path, item: BatchItem, frames: int, digest: str, text: str | None = None) -> None:
    sf.write(folder / item.filename, np.zeros(frames, dtype=np.float32), 24_000)
    Manifest(folder).append(
        {"file": item.filename, "text": text or item.text, "frames": frames, "settings_hash": digest}
    )


def test_done_means_wav_text_settings_and_frames_all_match(tmp_path: Path) -> None:
    items = make_items(["one", "two", "three", "four"])
    _write_item(tmp_path, items[0], 100, "h")
    _write_item(tmp_path, items[1], 100, "other-hash")
    _write_item(tmp_path, items[2], 100, "h", text="edited since")
    _write_item(tmp_path, items[3], 100, "h")
    sf.write(tmp_path / items[3].filename, np.zeros(50, dtype=np.float32), 24_000)  # WAV cut short
    entries = Manifest(tmp_path).entries()
    assert [is_done(it, tmp_path, entries.get(it.filename), "h") for it in items] == [
        True,
        False,
        False,
        False,
    ]
    assert pending(items, tmp_path, "h", force=False) == items[1:]
    assert pending(items, tmp_path, "h", force=True) == items


def test_manifest_tolerates_a_line_cut_by_a_kill_and_last_line_wins(tmp_path: Path) -> None:
    item = make_items(["x"])[0]
    _write_item(tmp_path, item, 10, "old")
    _write_item(tmp_path, item, 10, "new")
    with (tmp_path / MANIFEST_NAME).open("a") as f:
        f.write('{"file": "0002.wav", "te')
    entries = Manifest(tmp_path).entries()
    assert set(entries) == {"0001.wav"} and entries["0001.wav"]["settings_hash"] == "new"


# --------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def batch(synth_json: Callable[..., tuple[int, dict, str]]) -> Callable[..., tuple[int, dict, str]]:
    return synth_json


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def test_lines_batch_rerun_force_and_changed_settings(
    batch: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    book, out = tmp_path / "book.txt", tmp_path / "out"
    book.write_text(LINES)
    code, doc, err = batch("--input", str(book), "--output-dir", str(out), "--split", "lines", "--seed", "3")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["0001.wav", "0002.wav", "0003.wav", MANIFEST_NAME]
    lines = _manifest(out)
    assert [m["file"] for m in lines] == ["0001.wav", "0002.wav", "0003.wav"]
    assert [m["text"] for m in lines] == [
        "First line to speak.",
        "Second line, a little longer.",
        "Third and last line.",
    ]
    for m in lines:
        assert set(m) >= {"file", "text", "frames", "duration", "preset", "seed", "settings_hash"}
        info = sf.info(str(out / m["file"]))
        assert info.frames == m["frames"] and m["duration"] == pytest.approx(info.frames / 24_000, abs=1e-3)
        assert m["preset"] == "fp32" and m["settings_hash"] == doc["settings_hash"]
    assert len({m["seed"] for m in lines}) == 3
    assert doc["items"] == {"total": 3, "made": 3, "skipped": 0}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")}

    # rerun: everything is done, nothing is rewritten
    code, doc, _ = batch("--input", str(book), "--output-dir", str(out), "--split", "lines", "--seed", "3")
    assert code == 0 and doc["items"] == {"total": 3, "made": 0, "skipped": 3}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")} == stamps
    assert len(_manifest(out)) == 3

    # one line edited: only that item is redone
    book.write_text(LINES.replace("Second line", "Second, edited line"))
    code, doc, _ = batch("--input", str(book), "--output-dir", str(out), "--split", "lines", "--seed", "3")
    assert doc["items"] == {"total": 3, "made": 1, "skipped": 2}
    assert [f["path"].endswith("0002.wav") for f in doc["files"] if not f.get("skipped")] == [True]

    # --force redoes everything, with the same seeds (hence the same audio)
    before = (out / "0001.wav").read_bytes()
    code, doc, _ = batch(
        "--input", str(book), "--output-dir", str(out), "--split", "lines", "--seed", "3", "--force"
    )
    assert doc["items"]["made"] == 3 and (out / "0001.wav").read_bytes() == before

    # changed settings: everything is redone
    code, doc, _ = batch(
        "--input",
        str(book),
        "--output-dir",
        str(out),
        "--split",
        "lines",
        "--seed",
        "3",
        "--temperature",
        "0.5",
    )
    assert doc["items"]["made"] == 3
    assert {m["settings_hash"] for m in _manifest(out)[-3:]} == {doc["settings_hash"]}
    assert not list(out.glob(".*.part"))


def test_without_a_seed_finished_items_still_count_as_done(
    batch: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert batch("One.\nTwo.", "--output-dir", str(out))[1]["items"]["made"] == 2
    assert batch("One.\nTwo.", "--output-dir", str(out))[1]["items"]["skipped"] == 2


def test_paragraphs_batch_and_a_stale_part_file(
    batch: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".0001.wav.part").write_bytes(b"RIFF left by a killed run")
    text = "A first paragraph,\nwrapped over two lines.\n\nThe second paragraph.\n\n\nA third 😀 one."
    code, doc, err = batch(text, "--output-dir", str(out), "--split", "paragraphs")
    assert code == 0, err
    assert [m["text"] for m in _manifest(out)] == [
        "A first paragraph, wrapped over two lines.",
        "The second paragraph.",
        "A third 😀 one.",
    ]
    assert doc["dropped_chars"] == ["😀"]
    assert not (out / ".0001.wav.part").exists() and sf.info(str(out / "0001.wav")).frames > 0


def test_an_item_with_nothing_speakable_becomes_silence(
    batch: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, doc, err = batch("Words.\n😀😀\nMore words.", "--output-dir", str(out), "--pause", "0.2")
    assert code == 0 and "item 2 (0002.wav)" in err and "writing silence" in err
    data, _ = sf.read(str(out / "0002.wav"))
    assert data.shape == (4800,) and not data.any()


# --------------------------------------------------------------------------------------------------
# The settings hash covers everything that changes an item's audio or file


def _clip(path: Path, hz: float = 140.0) -> Path:
    """A 4 s voiced-sounding clip (a tone with harmonics, amplitude-modulated)."""
    t = np.arange(4 * 16_000) / 16_000
    tone = sum(np.sin(2 * np.pi * hz * k * t) / k for k in range(1, 6))
    sf.write(path, (0.25 * tone * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32), 16_000)
    return path


def _ignore(message: str) -> None:
    pass


def _job_hash(
    out: Path,
    settings: SynthesisSettings | None = None,
    voice: Path | None = None,
    subtype: Subtype = "PCM_16",
    audio_format: str | None = None,
    **load: object,
) -> str:
    """The settings hash a batch run of this job would record (no model needed: the revision is given)."""
    request = LoadRequest(**{"model": "some/model", "revision": "rev1", **load})  # type: ignore[arg-type]
    job = SynthesizeJob(
        text="One.\nTwo.",
        input_file=None,
        output=None,
        output_dir=str(out),
        split="lines",
        settings=settings or SynthesisSettings(seed=3),
        load=request,
        voice=None if voice is None else str(voice),
        subtype=subtype,
        audio_format=audio_format,
    )
    runner = Runner(job, RunState(), Progress(enabled=False), HoldInterrupts(), _ignore, _ignore)
    return settings_hash(runner.hash_inputs())


# One changed value per SynthesisSettings field (base: the defaults with seed 3).
SETTING_CHANGES: dict[str, object] = {
    "exaggeration": 0.7,
    "cfg_weight": 0.3,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "min_p": 0.1,
    "repetition_penalty": 1.3,
    "seed": 4,
    "flow_steps": 5,
    "max_tokens": 500,
    "pause_seconds": 0.3,
    "chunk_tokens": 40,
    "language": "fr",
}


def test_every_synthesis_setting_has_a_hash_case() -> None:
    assert set(SETTING_CHANGES) == {f.name for f in dataclasses.fields(SynthesisSettings)}


def test_the_same_job_hashes_the_same(tmp_path: Path) -> None:
    clip = _clip(tmp_path / "me.wav")
    assert _job_hash(tmp_path, voice=clip) == _job_hash(tmp_path, voice=clip)
    # without --seed, the run's own random seed is left out
    unseeded = SynthesisSettings(seed=None)
    assert _job_hash(tmp_path, unseeded) == _job_hash(tmp_path, unseeded) != _job_hash(tmp_path)


@pytest.mark.parametrize(("name", "value"), SETTING_CHANGES.items(), ids=list(SETTING_CHANGES))
def test_each_synthesis_setting_changes_the_hash(tmp_path: Path, name: str, value: object) -> None:
    changed = dataclasses.replace(SynthesisSettings(seed=3), **{name: value})
    assert _job_hash(tmp_path, changed) != _job_hash(tmp_path)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", "other/model"),
        ("revision", "rev2"),
        ("preset", "bnb-4bit"),
        ("plan", "t3=nf4"),
        ("variant", "multilingual"),
    ],
)
def test_each_load_setting_changes_the_hash(tmp_path: Path, name: str, value: str) -> None:
    assert _job_hash(tmp_path, **{name: value}) != _job_hash(tmp_path)


def test_subtype_changes_the_hash(tmp_path: Path) -> None:
    assert _job_hash(tmp_path, subtype="FLOAT") != _job_hash(tmp_path, subtype="PCM_16")


def test_the_format_changes_the_hash_and_wav_keeps_the_old_one(tmp_path: Path) -> None:
    hashes = {name: _job_hash(tmp_path, audio_format=name) for name in ("wav", "mp3", "flac", "opus", "pcm")}
    assert len(set(hashes.values())) == 5
    # Folders made before --format existed hashed no format: WAV adds none, so their items stay done.
    assert hashes["wav"] == _job_hash(tmp_path)
    request = LoadRequest(model="some/model", revision="rev1")
    job = SynthesizeJob("One.", None, None, str(tmp_path), "lines", SynthesisSettings(), request)
    runner = Runner(job, RunState(), Progress(enabled=False), HoldInterrupts(), _ignore, _ignore)
    assert "format" not in runner.hash_inputs()


def test_the_voice_is_hashed_by_content(tmp_path: Path) -> None:
    a, b = _clip(tmp_path / "a.wav", 140.0), _clip(tmp_path / "b.wav", 180.0)
    builtin, with_a = _job_hash(tmp_path), _job_hash(tmp_path, voice=a)
    assert len({builtin, with_a, _job_hash(tmp_path, voice=b)}) == 3
    # the same clip under another name counts as the same voice
    copy = tmp_path / "elsewhere.wav"
    copy.write_bytes(a.read_bytes())
    assert _job_hash(tmp_path, voice=copy) == with_a
    # a clip changed in place (same path) is another voice
    _clip(a, 200.0)
    assert _job_hash(tmp_path, voice=a) != with_a


def test_a_rerun_with_another_voice_redoes_the_items(
    batch: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    # (pitches no other test uses: prepared voices are cached by content for the whole session)
    out, clip = tmp_path / "out", _clip(tmp_path / "voice.wav", 151.0)
    other = _clip(tmp_path / "other.wav", 193.0)

    def items(voice: Path) -> dict:
        code, doc, err = batch("One.\nTwo.", "--output-dir", str(out), "--voice", str(voice), "--seed", "2")
        assert code == 0, err
        return doc["items"]

    assert items(clip) == {"total": 2, "made": 2, "skipped": 0}
    first = (out / "0001.wav").read_bytes()
    assert items(clip) == {"total": 2, "made": 0, "skipped": 2}
    assert items(other) == {"total": 2, "made": 2, "skipped": 0}
    assert (out / "0001.wav").read_bytes() != first  # the other voice's audio replaced the old one
    _clip(other, 233.0)  # the same path, a changed clip
    assert items(other) == {"total": 2, "made": 2, "skipped": 0}
