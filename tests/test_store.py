"""The store: atomic writes, no overwrite, no escape from save_path, manifest."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from BBDecoder.errors import BBDecoderValueError, OutputDamagedWarning, SavePathError
from BBDecoder.output.store import Store, safe_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("layer1.0.conv1", "layer1.0.conv1"),
        ("/etc/passwd", "etc_passwd"),
        ("..", "unnamed"),
        ("../../x", "x"),
        ("<script>", "script"),
        ("a b&c", "a_b_c"),
        ("\n", "unnamed"),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name) == expected
    assert "/" not in safe_name(name) and not safe_name(name).startswith(".")


def test_safe_name_keeps_long_names_distinct() -> None:
    a, b = safe_name("x" * 300 + "a"), safe_name("x" * 300 + "b")
    assert a != b and len(a) <= 80


def test_writes_are_never_overwritten(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.write_text("g/epoch_001.csv", "one")
    second = store.write_text("g/epoch_001.csv", "two")
    third = store.write_text("g/epoch_001.csv", "three")
    assert [p.name for p in (first, second, third)] == ["epoch_001.csv", "epoch_001-1.csv", "epoch_001-2.csv"]
    assert first.read_text() == "one" and second.read_text() == "two"
    assert sorted(os.listdir(tmp_path / "g")) == ["epoch_001-1.csv", "epoch_001-2.csv", "epoch_001.csv"]


def test_overwrite_is_explicit_and_atomic(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_json("meta.json", {"a": 1}, overwrite=True)
    store.write_json("meta.json", {"a": 2}, overwrite=True)
    assert json.loads((tmp_path / "meta.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("bad", ["../outside.txt", "/tmp/elsewhere.txt", "a/../../b.txt"])
def test_paths_cannot_escape(tmp_path: Path, bad: str) -> None:
    store = Store(tmp_path / "root")
    with pytest.raises(SavePathError, match="outside save_path"):
        store.write_text(bad, "x")


def test_save_path_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "taken"
    file.write_text("user data")
    with pytest.raises(SavePathError, match="taken"):
        Store(file)
    with pytest.raises(SavePathError, match="cannot be created"):
        Store(file / "sub")
    assert file.read_text() == "user data"


def test_arrays_and_csv_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    array = np.arange(12.0).reshape(3, 4)
    path = store.write_npy("a.npy", array)
    assert np.array_equal(np.load(path, allow_pickle=False), array)
    npz = store.write_npz("b.npz", {"edges": array[0], "counts": array[1]})
    with np.load(npz) as data:
        assert np.array_equal(data["counts"], array[1])
    csv_path = store.write_csv("t.csv", ["x", "y"], [(1, 2.5), (3, float("nan"))])
    assert csv_path.read_text() == "x,y\n1,2.5\n3,nan\n"


def test_manifest_survives_a_new_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("f/1.txt", "a", section="features", meta={"frame": 0})
    store.write_text("f/1.txt", "b", section="features", meta={"frame": 1})
    store.write_text("w.txt", "c", section="weights")
    again = Store(tmp_path)
    frames = again.outputs("features")
    assert [(e["path"], e["frame"]) for e in frames] == [("f/1.txt", 0), ("f/1-1.txt", 1)]
    assert len(again.outputs()) == 3


def test_adopt_moves_scratch_file_into_place(tmp_path: Path) -> None:
    store = Store(tmp_path)
    scratch = store.scratch_file(".bin")
    scratch.write_bytes(b"video")
    final = store.adopt(scratch, "videos/v.bin", section="video")
    assert final.read_bytes() == b"video" and not scratch.exists()
    assert store.outputs("video")[0]["path"] == "videos/v.bin"


def test_two_stores_on_one_folder_keep_each_others_entries(tmp_path: Path) -> None:
    first, second = Store(tmp_path), Store(tmp_path)
    first.write_text("a.txt", "a", section="x")
    second.write_text("b.txt", "b", section="x")
    first.write_text("c.txt", "c", section="x")
    assert [e["path"] for e in Store(tmp_path).outputs("x")] == ["a.txt", "b.txt", "c.txt"]


def test_outputs_are_readable_files(tmp_path: Path) -> None:
    path = Store(tmp_path).write_text("a.txt", "a")
    assert path.stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------ user folders
def test_subfolder_reads_relative_paths_from_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "run"
    store = Store(root)
    monkeypatch.chdir(tmp_path)
    assert store.subfolder(None, "save_folder", default="weights") == Path("weights")
    assert store.subfolder("a/b", "save_folder", default="weights") == Path("a/b")
    assert store.subfolder(root / "abs", "save_folder", default="weights") == Path("abs")
    assert store.subfolder(root, "save_folder", default="weights") == Path(".")
    # "run/x" read from the working directory already lies inside the root: taken as it is
    assert store.subfolder("run/x", "path", default="features") == Path("x")
    assert store.subfolder("y", "path", default="features") == Path("y")
    assert not (root / "a").exists() and not (root / "run").exists()  # nothing is created


@pytest.mark.parametrize("given", ["../saves", "a/../../saves", "<tmp>/saves"])
def test_subfolder_outside_the_root_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    """Issue 11.6: a folder the user names outside save_path is written where they said, and listed."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative folder that leaves the root is read from the working directory
    store = Store(work / "run")
    given = given.replace("<tmp>", str(tmp_path))
    expected = tmp_path / "saves"
    folder = store.subfolder(given, "save_folder", default="gradients")
    assert folder == expected and not expected.exists()  # nothing is created before a write
    written = store.write_text(folder / "epoch_001_flow.csv", "x,y\n1,2\n", section="gradients", meta={"epoch": 1})
    deep = store.write_text(folder / "000_fc" / "hist.csv", "z\n", section="weights")
    assert written == expected / "epoch_001_flow.csv" and written.read_text() == "x,y\n1,2\n"
    assert deep.read_text() == "z\n"
    entries = json.loads((store.root / "manifest.json").read_text())
    relative = os.path.relpath(expected, store.root).replace(os.sep, "/")
    assert [(e["section"], e["path"], e.get("external")) for e in entries] == [
        ("gradients", f"{relative}/epoch_001_flow.csv", True),
        ("weights", f"{relative}/000_fc/hist.csv", True),
    ]
    assert entries[0]["epoch"] == 1
    assert store.locate(entries[0]) == written  # the report links it relative to report.html
    assert (store.root / entries[0]["path"]).resolve() == written
    assert store.relative(written) == entries[0]["path"]
    # nothing else was written outside save_path: only the named folder, with exactly these files
    outside = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [p for p in outside if not p.startswith("work/run/")] == [
        "saves/000_fc/hist.csv",
        "saves/epoch_001_flow.csv",
    ]
    # the named folder is a root of its own: names still cannot climb out of it
    with pytest.raises(SavePathError, match="outside save_path"):
        store.write_text(folder / ".." / "escaped.txt", "x")
    assert not (tmp_path / "escaped.txt").exists()


def test_external_files_never_overwrite_and_survive_a_new_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    folder = store.subfolder(tmp_path / "saves", "path", default="features")
    first = store.write_text(folder / "f.txt", "one", section="features", meta={"frame": 1})
    second = store.write_text(folder / "f.txt", "two", section="features", meta={"frame": 2})
    assert (first.read_text(), second.read_text(), second.name) == ("one", "two", "f-1.txt")
    again = Store(tmp_path / "run")
    assert [(e["path"], e["frame"]) for e in again.outputs("features")] == [
        ("../saves/f.txt", 1),
        ("../saves/f-1.txt", 2),
    ]
    assert [again.locate(e).read_text() for e in again.outputs("features")] == ["one", "two"]
    assert again.next_number("features", "frame") == 3
    # a new store has not been told about the folder: writing there needs the user to name it again
    with pytest.raises(SavePathError, match="outside save_path"):
        again.write_text(tmp_path / "saves" / "g.txt", "x")


def test_locate_ignores_paths_that_leave_the_root_unless_marked_external(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    assert store.locate({"section": "x", "path": "a/b.png"}) == tmp_path / "run" / "a" / "b.png"
    assert store.locate({"section": "x", "path": "../outside.png"}) is None
    assert store.locate({"section": "x", "path": "../o.png", "external": True}) == tmp_path / "o.png"
    assert store.locate("/etc/passwd") is None


def test_subfolder_that_is_a_file_or_empty(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    (tmp_path / "taken").write_text("user data")
    with pytest.raises(SavePathError, match=r"^save_folder='.*taken' is a file"):
        store.subfolder(tmp_path / "taken", "save_folder", default="weights")
    for empty in ("", "  "):
        with pytest.raises(SavePathError, match=rf"^path='{empty}' names no folder"):
            store.subfolder(empty, "path", default="features")
    assert (tmp_path / "taken").read_text() == "user data"


@pytest.mark.parametrize("empty", ["", "   ", "\t"])
def test_empty_save_path_is_refused(empty: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SavePathError, match=r"^save_path must name a folder, got save_path="):
        Store(empty)
    assert list(tmp_path.iterdir()) == []  # nothing was written into the working directory


def test_subfolder_rejects_non_paths(tmp_path: Path) -> None:
    from BBDecoder.errors import BBDecoderTypeError

    with pytest.raises(BBDecoderTypeError, match=r"^save_folder must be a str or os.PathLike folder, got int 3"):
        Store(tmp_path).subfolder(3, "save_folder", default="weights")


# ---------------------------------------------------- cumulative outputs
def test_overwritten_output_keeps_its_first_manifest_entry(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("s/trend.csv", "1", overwrite=True, section="s", meta={"call": 1})
    store.write_text("s/trend.csv", "2", overwrite=True, section="s", meta={"call": 2})
    store.write_text("s/bar.csv", "1", section="s", meta={"call": 2})
    assert [(e["path"], e["call"]) for e in store.outputs("s")] == [("s/trend.csv", 1), ("s/bar.csv", 2)]
    assert (tmp_path / "s/trend.csv").read_text() == "2"
    again = Store(tmp_path)  # a later process continues the same manifest
    again.write_text("s/trend.csv", "3", overwrite=True, section="s", meta={"call": 3})
    assert len(again.outputs("s")) == 2


def test_next_number_continues_the_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.next_number("w") == 1
    store.write_text("w/a.txt", "x", section="w", meta={"call": 4, "layer_name": "fc"})
    store.write_text("w/b.txt", "x", section="w", meta={"call": 7, "layer_name": "conv"})
    store.write_text("w/c.txt", "x", section="w", meta={"call": "9"})  # not an int: ignored
    store.write_text("f/d.txt", "x", section="f", meta={"frame": 2, "kind": "raw"})
    assert store.next_number("w") == 8
    assert store.next_number("w", layer_name="fc") == 5
    assert store.next_number("f", "frame", kind="raw") == 3
    assert store.next_number("f", "frame", kind="picture") == 1
    assert Store(tmp_path).next_number("w") == 8


# ------------------------------------------------------- every file reads back
HOSTILE = ["a,b", '"q"', "x\ny", "\x1b[31m", "cr\ronly", "tab\tsep", "", "é ü", "trailing\\"]


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.reader(stream))


def test_csv_rows_of_hostile_names_read_back_whole(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rows = [(i, name, 0.5) for i, name in enumerate(HOSTILE)]
    path = store.write_csv("t.csv", ["id", "layer_name", "value"], rows)
    expected = [["id", "layer_name", "value"], *[[str(i), name, "0.5"] for i, name, _ in rows]]
    assert read_rows(path) == expected
    appended = store.append_csv("a.csv", ["id", "layer_name", "value"], rows[:4])
    store.append_csv("a.csv", ["id", "layer_name", "value"], rows[4:])
    assert read_rows(appended) == expected
    assert path.read_text(encoding="utf-8").count("\n") > len(rows)  # the newline inside a name is quoted, not lost


def test_printable_escapes_control_characters() -> None:
    from BBDecoder.summary import printable

    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("x\ny\r\t") == "x\\ny\\r\\t"
    assert printable("\u202eevil") == "\\u202eevil"  # a right-to-left override cannot reorder the line
    assert printable("é ü a,b") == "é ü a,b"
    assert all(character.isprintable() for name in HOSTILE for character in printable(name))


# ------------------------------------------------------------ cumulative tables
def test_append_csv_keeps_every_row_and_the_first_entry(tmp_path: Path) -> None:
    store = Store(tmp_path)
    header = ["call", "layer"]
    store.append_csv("s/sim.csv", header, [(1, "a")], section="similarity", meta={"call": 1, "kind": "csv"})
    store.append_csv("s/sim.csv", header, [(2, "b"), (2, "c,d")], section="similarity", meta={"call": 2})
    Store(tmp_path).append_csv("s/sim.csv", header, [(3, "e")], section="similarity", meta={"call": 3})
    assert (tmp_path / "s/sim.csv").read_text() == 'call,layer\n1,a\n2,b\n2,"c,d"\n3,e\n'
    assert [(e["path"], e["call"], e["kind"]) for e in Store(tmp_path).outputs()] == [("s/sim.csv", 1, "csv")]
    with pytest.raises(BBDecoderValueError, match=r"has the columns \['call', 'layer'\], not header=\['call', 'v'\]"):
        store.append_csv("s/sim.csv", ["call", "v"], [(4, 1.0)])
    assert (tmp_path / "s/sim.csv").read_text().endswith("3,e\n")
    (tmp_path / "s/sim.csv").write_text("call,layer\n1,a")  # a hand edit without the last line end
    store.append_csv("s/sim.csv", header, [(5, "f")])
    assert read_rows(tmp_path / "s/sim.csv") == [header, ["1", "a"], ["5", "f"]]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sim.csv"]  # no temporary file left


# ------------------------------------------------ damaged manifest and run.json
def test_damaged_manifest_is_kept_aside_and_rebuilt_from_disk(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("gradients/epoch_001_flow.png", "a", section="gradients", meta={"epoch": 1, "kind": "flow"})
    store.write_text("weights/000_fc/hist_call002.npz", "b", section="weights", meta={"call": 2, "layer_name": "fc"})
    store.write_text("features/0_x/frame_0003.npy", "c", section="features", meta={"frame": 3, "kind": "raw"})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("never listed")
    (tmp_path / "gradients" / ".epoch_002_flow.png.abcd.tmp").write_text("half")  # a temporary file: not an output
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "scratch.mp4").write_text("scratch")
    for offset, name in enumerate(["features/0_x/frame_0003.npy", "notes/readme.txt"]):
        os.utime(tmp_path / name, (1_700_000_000 + offset, 1_700_000_000 + offset))
    good = json.loads((tmp_path / "manifest.json").read_text())
    # a hand edit gone wrong: the last entry is cut off, and a trailing comma follows the second
    damaged = json.dumps(good[:2], indent=1)[:-2] + ',\n {"section": "features", "path": "feat,\n]\n'
    (tmp_path / "manifest.json").write_text(damaged)

    with pytest.warns(OutputDamagedWarning) as caught:
        again = Store(tmp_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "manifest.json" in message and "manifest.damaged.json" in message and "lost" in message
    assert (tmp_path / "manifest.damaged.json").read_text() == damaged  # kept byte for byte
    rebuilt = json.loads((tmp_path / "manifest.json").read_text())
    assert rebuilt[:2] == good[:2]  # what could be parsed keeps its metadata
    assert [{k: v for k, v in e.items() if k != "time"} for e in rebuilt[2:]] == [
        {"section": "features", "path": "features/0_x/frame_0003.npy", "recovered": True, "frame": 3},
        {"section": "notes", "path": "notes/readme.txt", "recovered": True},
    ]
    assert rebuilt[2]["time"] == "2023-11-14T22:13:20+00:00"  # the file's modification time
    assert again.outputs() == rebuilt
    Store(tmp_path)  # repaired: no second warning (warnings are errors in this suite)
    # damaged again: the first copy is never overwritten
    (tmp_path / "manifest.json").write_text("[")
    with pytest.warns(OutputDamagedWarning, match=r"manifest\.damaged-1\.json"):
        assert len(Store(tmp_path).outputs()) == 4
    assert (tmp_path / "manifest.damaged.json").read_text() == damaged
    assert (tmp_path / "manifest.damaged-1.json").read_text() == "["


def test_manifest_that_is_not_a_list_is_repaired_at_the_next_write(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_text("g/a.txt", "a", section="g", meta={"epoch": 4})
    (tmp_path / "manifest.json").write_text('{"section": "g"}')
    with pytest.warns(OutputDamagedWarning, match=r"holds a JSON dict, not a list"):
        store.write_text("g/b.txt", "b", section="g")
    assert [(e["path"], e.get("recovered")) for e in json.loads((tmp_path / "manifest.json").read_text())] == [
        ("g/a.txt", True),
        ("g/b.txt", None),
    ]
    assert (tmp_path / "manifest.damaged.json").read_text() == '{"section": "g"}'


def test_truncated_run_json_is_moved_aside_and_restarted(tmp_path: Path) -> None:
    from torch import nn

    from BBDecoder import Master_analyzer

    Master_analyzer(nn.Linear(3, 2), tmp_path, verbose=False)
    whole = (tmp_path / "run.json").read_text()
    cut = whole[: len(whole) // 2]
    (tmp_path / "run.json").write_text(cut)
    with pytest.warns(OutputDamagedWarning, match=r"run\.json in .* moved to .*run\.damaged\.json"):
        Master_analyzer(nn.Linear(3, 2), tmp_path, verbose=False)
    assert (tmp_path / "run.damaged.json").read_text() == cut
    record = json.loads((tmp_path / "run.json").read_text())
    assert len(record["sessions"]) == 1 and record["model"] == "Linear"  # a new record was started
    Master_analyzer(nn.Linear(3, 2), tmp_path, verbose=False)  # no warning now
    assert len(json.loads((tmp_path / "run.json").read_text())["sessions"]) == 2


# --------------------------------------------------------- nothing outside save_path
def test_folder_swapped_for_a_link_between_calls_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    store = Store(root)
    store.write_text("g/a.txt", "1", section="g")
    os.rename(root / "g", root / "g_real")
    os.symlink(outside, root / "g")
    with pytest.raises(SavePathError, match="outside save_path"):
        store.write_text("g/b.txt", "2", section="g")
    os.unlink(root / "g")
    os.symlink(root / "g_real", root / "g")  # a link that stays inside is refused as well
    with pytest.raises(SavePathError, match=r"symbolic link .*/run/g'"):
        store.write_text("g/c.txt", "3", section="g")
    assert list(outside.iterdir()) == []
    assert [e["path"] for e in Store(root).outputs()] == ["g/a.txt"]


@pytest.mark.parametrize("external", [False, True])
def test_swap_between_the_check_and_the_write_lands_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    """The path is checked, then (an attacker) the folder is swapped for a link, then written."""
    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    store = Store(root)
    folder = store.subfolder(tmp_path / "named", "save_folder", default="g") if external else Path("g")
    store.write_text(folder / "a.txt", "1", section="g")
    real = (root / folder) if not external else folder
    moved = real.with_name(real.name + "_moved")
    checked = Store.resolve

    def resolve_then_swap(self: Store, relative: str | os.PathLike[str]) -> Path:
        path = checked(self, relative)  # the check passes: the folder is still real
        os.rename(real, moved)
        os.symlink(outside, real)
        return path

    monkeypatch.setattr(Store, "resolve", resolve_then_swap)
    for name in ("b.txt", "sub/c.txt"):
        with pytest.raises(SavePathError, match="symbolic link"):
            store.write_text(folder / name, "secret", section="g")
        os.unlink(real)  # undo the swap for the next try
        os.rename(moved, real)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in real.iterdir()) == ["a.txt"]
    assert [e["path"] for e in store.outputs()] == [store.relative(real / "a.txt")]


def test_manifest_swapped_for_a_link_is_not_written_through(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = Store(root)
    store.write_text("g/a.txt", "1", section="g")
    victim = tmp_path / "victim.json"
    victim.write_text("[]")
    os.unlink(root / "manifest.json")
    os.symlink(victim, root / "manifest.json")
    with pytest.warns(OutputDamagedWarning, match="symbolic link"):
        store.write_text("g/b.txt", "2", section="g")
    assert victim.read_text() == "[]"
    assert os.path.islink(root / "manifest.damaged.json")  # the link itself is kept aside
    assert [e["path"] for e in json.loads((root / "manifest.json").read_text())] == ["g/a.txt", "g/b.txt"]


def test_without_descriptor_calls_the_same_rules_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path-based fallback (Windows) keeps atomic, never-overwrite, no-link writes."""
    from BBDecoder.output import store as store_module

    monkeypatch.setattr(store_module, "_AT", False)
    store = Store(tmp_path / "run")
    first = store.write_text("g/a.txt", "one", section="g")
    second = store.write_text("g/a.txt", "two", section="g")
    store.append_csv("g/t.csv", ["x"], [(1,)], section="g")
    store.append_csv("g/t.csv", ["x"], [(2,)], section="g")
    assert (first.read_text(), second.name, second.read_text()) == ("one", "a-1.txt", "two")
    assert (tmp_path / "run/g/t.csv").read_text() == "x\n1\n2\n"
    named = store.subfolder(tmp_path / "named", "save_folder", default="g")
    store.write_text(named / "n.txt", "named", section="g")
    scratch = store.scratch_file(".mp4")
    scratch.write_bytes(b"video")
    store.adopt(scratch, named / "v.mp4", section="video")
    assert (tmp_path / "named/n.txt").read_text() == "named" and (tmp_path / "named/v.mp4").read_bytes() == b"video"
    assert [e["path"] for e in Store(tmp_path / "run").outputs()] == [
        "g/a.txt",
        "g/a-1.txt",
        "g/t.csv",
        "../named/n.txt",
        "../named/v.mp4",
    ]
    assert not scratch.exists()
    os.rename(tmp_path / "run/g", tmp_path / "run/g_real")
    os.symlink(tmp_path / "run/g_real", tmp_path / "run/g")
    with pytest.raises(SavePathError, match="symbolic link"):
        store.write_text("g/b.txt", "x")


def test_other_ranks_write_nothing_and_repair_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(tmp_path).write_text("g/a.txt", "a", section="g", meta={"epoch": 3})
    damaged = (tmp_path / "manifest.json").read_text().rstrip().rstrip("]") + ",]"
    (tmp_path / "manifest.json").write_text(damaged)
    from BBDecoder.core import distributed

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    other = Store(tmp_path)  # no warning: only rank 0 repairs (warnings are errors in this suite)
    assert [(e["path"], e["epoch"]) for e in other.outputs()] == [("g/a.txt", 3)]  # salvaged in memory
    assert other.write_text("g/b.txt", "b", section="g") is None
    assert other.append_csv("g/t.csv", ["x"], [(1,)], section="g") is None
    assert other.read_json("manifest.json") is None
    assert (tmp_path / "manifest.json").read_text() == damaged
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "g", "manifest.json"]
    Store(tmp_path / "never")
    assert not (tmp_path / "never").exists()
