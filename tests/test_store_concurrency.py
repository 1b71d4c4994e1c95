"""Many writers, one folder: real processes lose no file, no manifest entry and no table row.

Also: a thread swapping a folder for a symbolic link while the store writes gets no byte
written outside save_path.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from BBDecoder.errors import OutputWriteError, SavePathError
from BBDecoder.output.store import Store

FILES = 30  # per process, each with its own name, plus one from a shared name and one table row


def writer(root: str, worker: int, files: int, barrier: Any) -> None:
    """One process's writes (run in a spawned process)."""
    store = Store(root)
    barrier.wait()  # every process starts writing at once
    for i in range(files):
        store.write_text(f"own/w{worker}_{i:03d}.txt", f"{worker}:{i}", section="own", meta={"w": worker, "i": i})
        store.write_text("shared/same.txt", f"{worker}:{i}", section="shared", meta={"w": worker, "i": i})
        store.append_csv(
            "table/rows.csv",
            ["worker", "i", "layer_name"],
            [(worker, i, f"layer,{worker}\n{i}")],
            section="table",
            meta={"kind": "csv"},
        )


def run_writers(root: Path, processes: int, files: int) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    workers = [context.Process(target=writer, args=(str(root), w, files, barrier)) for w in range(processes)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=600)
    assert [p.exitcode for p in workers] == [0] * processes


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_writing_into_one_folder_lose_nothing(tmp_path: Path, processes: int) -> None:
    run_writers(tmp_path, processes, FILES)
    entries = json.loads((tmp_path / "manifest.json").read_text())
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)) == 2 * processes * FILES + 1
    # every file each process wrote under its own name is there and listed with its metadata
    own = {(e["w"], e["i"]): e["path"] for e in entries if e["section"] == "own"}
    assert set(own) == {(w, i) for w in range(processes) for i in range(FILES)}
    assert all((tmp_path / path).read_text() == f"{w}:{i}" for (w, i), path in own.items())
    # the shared name was never overwritten: each write took a free variant
    shared = [e for e in entries if e["section"] == "shared"]
    contents = {(tmp_path / e["path"]).read_text() for e in shared}
    assert contents == {f"{w}:{i}" for w in range(processes) for i in range(FILES)}
    assert all((tmp_path / e["path"]).read_text() == f"{e['w']}:{e['i']}" for e in shared)
    # no row of any process was lost, and every row reads back whole
    with open(tmp_path / "table/rows.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["worker", "i", "layer_name"]
    expected = sorted([str(w), str(i), f"layer,{w}\n{i}"] for w in range(processes) for i in range(FILES))
    assert sorted(rows[1:]) == expected
    # the manifest lists exactly the files on disk, and no temporary file is left
    on_disk = {
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }
    assert on_disk == set(paths)
    assert not [p for p in tmp_path.rglob("*.tmp") if p.is_file()]


def test_threads_of_one_process_share_a_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    second = Store(tmp_path)  # a second analyzer on the same folder, in the same process

    def work(which: Store, worker: int) -> None:
        for i in range(40):
            which.write_text(f"t/{worker}_{i}.txt", "x", section="t")
            which.append_csv("t/rows.csv", ["w", "i"], [(worker, i)], section="t")

    threads = [threading.Thread(target=work, args=(store if w % 2 else second, w)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(Store(tmp_path).outputs("t")) == 4 * 40 + 1
    assert len((tmp_path / "t/rows.csv").read_text().splitlines()) == 1 + 4 * 40


def test_a_folder_swapped_for_a_link_during_writes_gets_nothing_outside(tmp_path: Path) -> None:
    """An attacker thread keeps swapping ``save_path/g`` for a link to a folder outside."""
    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    store = Store(root)
    store.folder("g")
    stop, swaps = threading.Event(), [0]

    def attacker() -> None:
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:  # move the real folder aside (it stays inside save_path), put a link in its place
                os.rename(root / "g", root / f"aside{attempt}")
                os.symlink(outside, root / "g")
            except OSError:
                time.sleep(0.0001)
                continue
            swaps[0] += 1
            time.sleep(0.0002)
            os.unlink(root / "g")  # the store makes a new real folder at its next write
            time.sleep(0.0002)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # switch threads often, so the swap falls between check and use
    thread = threading.Thread(target=attacker)
    thread.start()
    written, refused = [], 0
    try:
        for i in range(2000):  # at least 300 writes, and on until the attack has hit some of them
            try:
                written.append(store.write_text(f"g/f{i}.txt", f"secret {i}", section="g"))
            except (SavePathError, OutputWriteError):  # a link refused, or the folder moved away mid-write
                refused += 1
            if i >= 300 and refused >= 5 and swaps[0] > 10:
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert swaps[0] > 10 and refused >= 5, (swaps, refused, len(written))
    assert list(outside.iterdir()) == []  # not one byte landed outside
    landed = {p.name: p.read_text() for p in root.rglob("f*.txt") if not p.is_symlink()}
    assert len(landed) == len(written), (len(landed), len(written))  # every successful write is inside, whole
    assert all(landed[p.name] == f"secret {p.name[1:-4]}" for p in written)
