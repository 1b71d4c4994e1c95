"""Failed writes (disk full, permission denied) leave every file whole, listed, and recoverable.

Each scenario is run once per operating-system call the store makes on the way (every
``os.open``, ``os.write``, ``os.fsync``, ``os.link``, ``os.replace``, ``os.mkdir``), with
that one call failing with ENOSPC or EACCES. After each run the folder must be either
exactly as before (the write failed, with an :class:`OutputWriteError` naming the path and
the cause) or as before plus the new output (the fault was never reached), with no
temporary file left, and the manifest listing exactly the files on disk.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import BBDecoder
from BBDecoder.errors import BBDecoderError, OutputWriteError
from BBDecoder.output.store import Store

CALLS = ("open", "write", "fsync", "link", "replace", "mkdir")
CODES = (errno.ENOSPC, errno.EACCES)
METADATA = {"manifest.json", "run.json", "report.html"}


def outputs_on_disk(root: Path, extra: Path | None = None) -> dict[str, bytes]:
    """Every output file (relative to ``root`` as the manifest names it) and its bytes."""
    found: dict[str, bytes] = {}
    for base in (root, extra):
        if base is None or not base.exists():
            continue
        for path in base.rglob("*"):
            parts = path.relative_to(base).parts
            if not path.is_file():
                continue
            assert not path.name.endswith(".tmp"), f"temporary file left behind: {path}"
            if any(p.startswith(".") for p in parts):
                continue
            if base == root and len(parts) == 1 and parts[0] in METADATA:
                continue
            found[os.path.relpath(path, root).replace(os.sep, "/")] = path.read_bytes()
    return found


def consistent_state(root: Path, extra: Path | None = None) -> dict[str, bytes]:
    """The outputs on disk, after checking that the manifest lists exactly them."""
    files = outputs_on_disk(root, extra)
    manifest = root / "manifest.json"
    entries = json.loads(manifest.read_text()) if manifest.exists() else []
    listed = [e["path"] for e in entries]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(files), f"listed {sorted(listed)} but on disk {sorted(files)}"
    return files


class Fault:
    """While armed, the ``at``-th call of ``os.<name>`` raises ``OSError(code)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, code: int, at: int) -> None:
        self.calls, self.hit, self.armed = 0, False, False
        original = getattr(os, name)

        def failing(*args: object, **kwargs: object) -> object:
            if self.armed:
                index, self.calls = self.calls, self.calls + 1
                if index == at:
                    self.hit = True
                    raise OSError(code, os.strerror(code))
            return original(*args, **kwargs)

        monkeypatch.setattr(os, name, failing)


def prepare(root: Path, named: Path) -> tuple[Store, Path]:
    store = Store(root)
    store.write_text("g/old.txt", "old", section="g", meta={"call": 1})
    store.write_text("g/trend.txt", "trend v1", section="g", overwrite=True, meta={"call": 1})
    store.append_csv("g/table.csv", ["call", "layer"], [(1, "a,b")], section="g", meta={"call": 1})
    folder = store.subfolder(named, "save_folder", default="g")
    return store, folder


# Each scenario: what it does, and which files it adds or changes when it succeeds.
Scenario = Callable[[Store, Path], None]
SCENARIOS: dict[str, tuple[Scenario, dict[str, bytes]]] = {
    "new file": (
        lambda s, _: s.write_text("g/sub/new.txt", "new", section="g", meta={"call": 2}),
        {"g/sub/new.txt": b"new"},
    ),
    "taken name": (
        lambda s, _: s.write_text("g/old.txt", "second", section="g", meta={"call": 2}),
        {"g/old-1.txt": b"second"},
    ),
    "redrawn in place": (
        lambda s, _: s.write_text("g/trend.txt", "trend v2", section="g", overwrite=True, meta={"call": 2}),
        {"g/trend.txt": b"trend v2"},
    ),
    "first redraw": (
        lambda s, _: s.write_text("g/fresh.txt", "fresh", section="g", overwrite=True),
        {"g/fresh.txt": b"fresh"},
    ),
    "append rows": (
        lambda s, _: s.append_csv("g/table.csv", ["call", "layer"], [(2, 'q"'), (2, "x\ny")], section="g"),
        {"g/table.csv": b'call,layer\n1,"a,b"\n2,"q"""\n2,"x\ny"\n'},
    ),
    "new table": (
        lambda s, _: s.append_csv("g/t2.csv", ["x"], [(1,)], section="g"),
        {"g/t2.csv": b"x\n1\n"},
    ),
    "user-named folder": (
        lambda s, folder: s.write_text(folder / "000_fc" / "hist.csv", "h", section="weights"),
        {"../named/000_fc/hist.csv": b"h"},
    ),
}


def adopt_scenario(store: Store, folder: Path) -> None:
    scratch = store.scratch_file(".mp4")
    scratch.write_bytes(b"video")
    store.adopt(scratch, "features/v.mp4", section="video")


SCENARIOS["adopted video"] = (adopt_scenario, {"features/v.mp4": b"video"})


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_failing_call_leaves_the_folder_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str, code: int
) -> None:
    action, added = SCENARIOS[scenario]
    injected = 0
    for name in CALLS:
        at = 0
        while True:  # fail the first call of os.<name>, then the second… until the write never reaches it
            case = tmp_path / f"{name}{at}"
            store, folder = prepare(case / "run", case / "named")
            before = consistent_state(store.root, case / "named")
            with monkeypatch.context() as patch:
                fault = Fault(patch, name, code, at)
                fault.armed = True
                try:
                    action(store, folder)
                    error = None
                except OutputWriteError as raised:
                    error = raised
                fault.armed = False
            after = consistent_state(store.root, case / "named")
            assert not (case / "run" / ".tmp").exists() or not list((case / "run" / ".tmp").iterdir())
            if error is None:  # the fault was never reached, or the store worked around it
                assert after == {**before, **added}, f"os.{name} call {at}: the new output is wrong"
                if not fault.hit:
                    break
                at += 1
                continue
            injected += 1
            assert after == before, f"os.{name} call {at}: the folder changed"
            assert error.errno == code and os.strerror(code) in str(error)
            assert str(case) in str(error)  # names the path
            assert isinstance(error, OSError) and isinstance(error, BBDecoderError)
            at += 1
    assert injected >= 6  # every scenario passes through several calls that can fail


def test_a_file_whose_manifest_entry_cannot_be_written_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.write_text("g/a.txt", "a", section="g")
    original = Store._commit

    def manifest_fails(self: Store, target: Path, data: bytes, *, overwrite: bool) -> Path:
        if target.name == "manifest.json":
            raise OutputWriteError(errno.ENOSPC, f"cannot write {str(target)!r}: disk full", str(target))
        return original(self, target, data, overwrite=overwrite)

    monkeypatch.setattr(Store, "_commit", manifest_fails)
    with pytest.raises(OutputWriteError, match=r"cannot list 'g/b.txt' in .*manifest.json.*removed again") as caught:
        store.write_text("g/b.txt", "b", section="g")
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["a.txt"]
    assert [e["path"] for e in json.loads((tmp_path / "manifest.json").read_text())] == ["g/a.txt"]
    monkeypatch.undo()
    assert store.write_text("g/b.txt", "b", section="g").read_text() == "b"  # the same name is free again


def test_output_write_error_is_public_catchable_and_picklable() -> None:
    assert "OutputWriteError" in BBDecoder.__all__ and BBDecoder.OutputWriteError is OutputWriteError
    error = OutputWriteError(errno.ENOSPC, "cannot write '/x/y': No space left on device", "/x/y")
    assert (str(error), error.errno, error.filename) == ("cannot write '/x/y': No space left on device", 28, "/x/y")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is OutputWriteError and str(again) == str(error) and again.errno == errno.ENOSPC


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_folder_made_read_only_mid_run(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("g/a.txt", "a", section="g")
    (tmp_path / "g").chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match=r"g/b\.txt.*Permission denied.*read-only") as caught:
            store.write_text("g/b.txt", "b", section="g")
        assert caught.value.errno == errno.EACCES
    finally:
        (tmp_path / "g").chmod(0o755)
    assert consistent_state(tmp_path) == {"g/a.txt": b"a"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root and a mount the container allows; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small disk needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk(small_disk: Path) -> None:
    store = Store(small_disk / "run")
    payload = os.urandom(20_000)
    written, failures = [], []
    for i in range(40):  # about three times what fits
        try:
            written.append(store.write_bytes(f"g/{i:03d}.bin", payload, section="g", meta={"i": i}))
        except OutputWriteError as error:
            failures.append(error)
        try:
            store.append_csv("g/t.csv", ["i", "name"], [(i, f"layer,{i}")], section="g")
        except OutputWriteError as error:
            failures.append(error)
    assert failures and all(e.errno == errno.ENOSPC and "No space left" in str(e) for e in failures)
    files = consistent_state(store.root)  # nothing partial, nothing unlisted, no temporary file
    assert all(files[store.relative(p)] == payload for p in written)
    assert all(content == payload for name, content in files.items() if name.endswith(".bin"))
    rows = files["g/t.csv"].decode().splitlines()
    assert rows[0] == "i,name" and all(r.endswith(f'"layer,{r.split(",")[0]}"') for r in rows[1:])
    for path in written[:5]:  # free some space: writing works again, under a fresh name
        path.unlink()
    store.write_bytes("g/after.bin", b"ok", section="g")
    assert store.outputs()[-1]["path"] == "g/after.bin"


def test_adopting_into_a_folder_on_another_file_system_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user-named folder on another disk: the scratch video cannot be linked there (EXDEV), so it is copied."""
    store = Store(tmp_path / "run")
    folder = store.subfolder(tmp_path / "other_disk", "path", default="features")
    scratch = store.scratch_file(".webm")
    payload = os.urandom(3 * (1 << 20) + 17)  # more than one copy chunk
    scratch.write_bytes(payload)
    link = os.link

    def cross_device(source: str, *args: object, **kwargs: object) -> None:
        if str(source).startswith("scratch-"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        link(source, *args, **kwargs)

    monkeypatch.setattr(os, "link", cross_device)
    final = store.adopt(scratch, folder / "0_x_evolution.webm", section="video", meta={"kind": "webm"})
    assert final == tmp_path / "other_disk" / "0_x_evolution.webm" and final.read_bytes() == payload
    assert not scratch.exists() and consistent_state(store.root, tmp_path / "other_disk") == {
        "../other_disk/0_x_evolution.webm": payload
    }
