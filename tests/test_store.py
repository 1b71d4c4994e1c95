"""The store: atomic writes, no overwrite, no escape from save_path, manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from BBDecoder.errors import SavePathError
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


@pytest.mark.parametrize("bad", ["../elsewhere", "a/../../b", "/tmp/elsewhere"])
def test_subfolder_outside_the_root_names_argument_and_value(tmp_path: Path, bad: str) -> None:
    store = Store(tmp_path / "run")
    with pytest.raises(SavePathError, match=rf"^save_folder='{bad}' lies outside save_path"):
        store.subfolder(bad, "save_folder", default="weights")
    with pytest.raises(SavePathError, match=rf"^path='{bad}' lies outside save_path"):
        store.subfolder(bad, "path", default="features")


def test_subfolder_rejects_non_paths(tmp_path: Path) -> None:
    from BBDecoder.errors import BBDecoderTypeError

    with pytest.raises(BBDecoderTypeError, match=r"^save_folder must be a str or os.PathLike folder.*got int 3"):
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
