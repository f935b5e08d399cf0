"""`synthesize --engine ray`: batch conversion on Ray Data, against the single-process batch mode.

One local Ray (2 CPUs) serves the whole session; the CLI runs in this process and joins it, except where
a real driver process must be interrupted. Each CPU worker gets one CPU, so Ray sets its torch thread
count to 1; float sums depend on the thread count, so the single-process runs compared against it run on
one thread too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_cli.batch import MANIFEST_NAME, Manifest
from chatterbox_cli.cli import run
from chatterbox_cli.errors import UsageError
from chatterbox_cli.jobs import SynthesizeJob
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.ray_engine.resources import WorkerPlan, items_per_batch, plan_workers
from chatterbox_cli.ray_engine.shards import SHARD_DIR, mark_run, merge_shards, shard_manifest, unmark_run
from chatterbox_cli.ray_engine.speaker import Speaker
from chatterbox_cli.service import LoadRequest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

FAST = ("--device", "cpu", "--max-tokens", "20", "--flow-steps", "2")
LINES = "\n".join(
    [
        "First line to speak.",
        "Second line, a little longer.",
        "😀😀",
        "A fourth one.",
        "Fifth.",
        "Sixth and last.",
    ]
)
EnvFactory = Callable[..., dict[str, str]]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def synth(synth_json: Callable[..., tuple[int, dict, str]]) -> Callable[..., tuple[int, dict, str]]:
    return synth_json


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def _book(folder: Path, lines: int) -> Path:
    book = folder / "book.txt"
    book.write_text("\n".join(f"Line number {i} of the book." for i in range(lines)))
    return book


# --------------------------------------------------------------------------------------------------
# Pieces without Ray


def test_workers_follow_the_cluster() -> None:
    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 4}]
    assert plan_workers(gpu_nodes, None, "auto") == WorkerPlan(6, 1, 1)
    assert plan_workers(gpu_nodes, 2, "cuda") == WorkerPlan(2, 1, 1)
    assert plan_workers(gpu_nodes, 3, "cpu") == WorkerPlan(3, 0, 8)  # 16 // 8 + 16 // 8 >= 3
    assert plan_workers([{"CPU": 2}], None, "auto") == WorkerPlan(1, 0, 2)
    assert plan_workers([{"CPU": 2}], 2, "auto") == WorkerPlan(2, 0, 1)
    assert plan_workers([{"CPU": 8}, {"CPU": 8}], 3, "auto") == WorkerPlan(3, 0, 4)  # 5 each would not fit
    with pytest.raises(UsageError, match="has room for 6 GPU worker"):
        plan_workers(gpu_nodes, 7, "auto")
    with pytest.raises(UsageError, match="has no GPU"):
        plan_workers([{"CPU": 4}], None, "cuda")  # a GPU request no node can meet would wait forever
    with pytest.raises(UsageError, match="has 2 CPU"):
        plan_workers([{"CPU": 2}], 3, "auto")
    assert [items_per_batch(n, 2) for n in (1, 8, 80, 10_000)] == [1, 1, 10, 16]


def test_shards_merge_into_one_line_per_file(tmp_path: Path) -> None:
    Manifest(tmp_path).append({"file": "0002.wav", "frames": 1})
    Manifest(tmp_path).append({"file": "0001.wav", "frames": 1})
    mark = mark_run(tmp_path)
    a, b = shard_manifest(tmp_path, "a", mark), shard_manifest(tmp_path, "b", mark)
    a.append({"file": "0003.wav", "frames": 3})
    b.append({"file": "0002.wav", "status": "failed"})
    b.append({"file": "0002.wav", "frames": 2})  # the last line for a file wins
    with b.path.open("a") as f:
        f.write('{"file": "0004.wav", "fra')  # cut short by a kill
    assert merge_shards(tmp_path) == 2
    assert _manifest(tmp_path) == [
        {"file": "0001.wav", "frames": 1},
        {"file": "0002.wav", "frames": 2},
        {"file": "0003.wav", "frames": 3},
    ]
    assert merge_shards(tmp_path) == 0
    unmark_run(tmp_path)
    assert not (tmp_path / SHARD_DIR).exists()


@pytest.mark.usefixtures("ray_session")
def test_a_worker_that_does_not_see_the_drivers_folder_stops_the_run(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    job = SynthesizeJob(
        text=None,
        input_file=None,
        output=None,
        output_dir=str(tmp_path),  # a folder of the same name, but not the driver's (no mark in it)
        split="lines",
        settings=SynthesisSettings(seed=1),
        load=LoadRequest(model=tiny_checkpoint, device="cpu"),
        engine="ray",
    )
    rows = Speaker(job, "digest", "run-0")({"index": np.array([1, 2]), "text": np.array(["One.", "Two."])})
    assert rows["status"].tolist() == ["stopped", "stopped"] and rows["exit_code"].tolist() == [2, 2]
    assert "is not the driver's folder" in rows["error"][0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Hello.", "-o", "x.wav"), "--engine ray converts a batch"),
        (("A.\nB.", "--output-dir", "out", "--save-voice", "v.voice"), "--save-voice needs the default"),
        (("A.\nB.", "--output-dir", "out", "--device", "cuda:1"), "each Ray worker gets its own GPU"),
        (("A.\nB.", "--output-dir", "out", "--ray-address", "10.0.0.1:6379"), "relative"),
    ],
)
def test_usage_errors(
    args: tuple[str, ...],
    message: str,
    tiny_checkpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["synthesize", *args, "--engine", "ray", "--model", tiny_checkpoint]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_relative_output_dir_is_refused_for_the_cluster_in_ray_address(
    tiny_checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "ray-head:6379")  # as `ray job submit` sets it
    assert (
        run(["synthesize", "A.", "--output-dir", "out", "--engine", "ray", "--model", tiny_checkpoint]) == 2
    )
    assert "relative" in capsys.readouterr().err


def test_ray_options_need_the_ray_engine(tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(["synthesize", "A.\nB.", "--output-dir", "out", "--workers", "2", "--model", tiny_checkpoint])
        == 2
    )
    assert "apply to --engine ray" in capsys.readouterr().err


def test_without_the_extra_the_error_names_the_install(
    tiny_checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    code = run(
        [
            "synthesize",
            "A.",
            "--output-dir",
            str(tmp_path / "o"),
            "--engine",
            "ray",
            "--model",
            tiny_checkpoint,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'chatterbox-cli[ray]'" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# Runs on Ray


@pytest.mark.usefixtures("ray_session", "one_thread")
def test_same_files_and_audio_as_the_local_engine(
    synth: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    book = tmp_path / "book.txt"
    book.write_text(LINES)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    code, plain, err = synth("--input", str(book), "--output-dir", str(local), "--seed", "5")
    assert code == 0, err
    code, doc, err = synth(
        "--input",
        str(book),
        "--output-dir",
        str(distributed),
        "--seed",
        "5",
        "--engine",
        "ray",
        "--workers",
        "2",
    )
    assert code == 0, err
    assert "item 3 (0003.wav)" in err and "writing silence" in err  # a worker's warning reaches the driver
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in distributed.iterdir())
    assert names == [f"{i:04d}.wav" for i in range(1, 7)] + [MANIFEST_NAME]
    for name in names:
        assert (local / name).read_bytes() == (distributed / name).read_bytes(), name
    assert doc["settings_hash"] == plain["settings_hash"] and doc["seed"] == plain["seed"] == 5
    assert doc["items"] == {"total": 6, "made": 6, "skipped": 0, "failed": 0}
    assert doc["engine"] == "ray" and doc["preset"] == "fp32" and doc["device"] == "cpu"

    # either engine continues the other's folder: nothing is left to do
    code, doc, _ = synth("--input", str(book), "--output-dir", str(local), "--seed", "5", "--engine", "ray")
    assert code == 0 and doc["items"] == {"total": 6, "made": 0, "skipped": 6, "failed": 0}


@pytest.mark.usefixtures("ray_session")
def test_a_failing_item_is_recorded_and_reported(
    synth: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "0002.wav").mkdir(parents=True)  # item 2's file cannot be renamed into place
    code, doc, err = synth(
        "One.\nTwo.\nThree.\nFour.", "--output-dir", str(out), "--engine", "ray", "--workers", "2"
    )
    assert code == 1
    assert doc["exit_code"] == 1 and "1 of 4 item(s) failed" in doc["error"]
    assert doc["items"] == {"total": 4, "made": 3, "skipped": 0, "failed": 1}
    assert "0002.wav failed: cannot rename" in err
    lines = {m["file"]: m for m in _manifest(out)}
    assert sorted(lines) == ["0001.wav", "0002.wav", "0003.wav", "0004.wav"]
    assert lines["0002.wav"]["status"] == "failed" and "cannot rename" in lines["0002.wav"]["error"]
    assert all("status" not in lines[f"{i:04d}.wav"] for i in (1, 3, 4))
    assert not list(out.glob(".*.part"))


@pytest.mark.usefixtures("ray_session")
def test_a_worker_that_cannot_start_stops_the_run_with_its_exit_code(
    synth: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_text("not audio")  # exists (the driver's check passes); only a worker reads it
    code, doc, _ = synth(
        "One.\nTwo.", "--output-dir", str(tmp_path / "out"), "--engine", "ray", "--voice", str(clip)
    )
    assert code == 2 and doc["exit_code"] == 2
    assert doc["error"].startswith("a Ray worker could not start: ") and "cannot be read" in doc["error"]
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def _part_writer(out: Path) -> tuple[int, str] | None:
    """A Ray worker process writing an item's `.part` file in `out` now, and that file's name."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(out)) and target.endswith(".part"):
                    return int(pid), Path(target).name
        except OSError:  # gone meanwhile
            continue
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
@pytest.mark.usefixtures("ray_session")
def test_a_killed_worker_is_restarted_and_its_batch_redone(
    synth: Callable[..., tuple[int, dict, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    book = _book(tmp_path, 8)
    killed: list[tuple[int, str]] = []
    done = threading.Event()

    def kill_one_worker_mid_item() -> None:
        while not done.is_set() and not killed:
            found = _part_writer(out)
            if found is not None:
                os.kill(found[0], signal.SIGKILL)
                killed.append(found)
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_worker_mid_item, daemon=True)
    killer.start()
    try:
        code, doc, err = synth(
            "--input", str(book), "--output-dir", str(out), "--engine", "ray", "--workers", "2"
        )
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught writing an item"
    assert code == 0, err
    assert doc["items"] == {"total": 8, "made": 8, "skipped": 0, "failed": 0}
    lines = _manifest(out)
    assert [m["file"] for m in lines] == [f"{i:04d}.wav" for i in range(1, 9)]
    for m in lines:
        assert sf.info(str(out / m["file"])).frames == m["frames"]
    assert not list(out.glob(".*.part"))  # the item cut by the kill was spoken again and renamed


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_an_interrupted_driver_resumes_without_redoing_items(
    synth: Callable[..., tuple[int, dict, str]],
    tiny_checkpoint: str,
    tmp_path: Path,
    make_child_env: EnvFactory,
) -> None:
    out, book = tmp_path / "out", _book(tmp_path, 16)
    args = ["--input", str(book), "--output-dir", str(out), "--engine", "ray", "--workers", "2"]
    proc = subprocess.Popen(  # a driver with its own local Ray
        [sys.executable, "-m", "chatterbox_cli", "synthesize", *args, "--model", tiny_checkpoint, *FAST],
        cwd=tmp_path,
        env=make_child_env(RAY_ADDRESS=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    shards = out / SHARD_DIR
    deadline = time.monotonic() + 300  # a loaded CI machine: Ray and two workers start slowly
    while sum(p.read_text().count("\n") for p in shards.glob("*.jsonl")) < 3:  # items finished by workers
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no item was finished in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr.decode()
    assert b"run the same command again to continue" in stderr
    assert not shards.exists()  # the driver merged its workers' lines before exiting
    before = {m["file"]: (out / m["file"]).stat().st_mtime_ns for m in _manifest(out)}
    assert 3 <= len(before) < 16

    code, doc, err = synth(*args)
    assert code == 0, err
    assert doc["items"] == {"total": 16, "made": 16 - len(before), "skipped": len(before), "failed": 0}
    assert [m["file"] for m in _manifest(out)] == [f"{i:04d}.wav" for i in range(1, 17)]  # each once
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # not redone
    assert not list(out.glob(".*.part"))
