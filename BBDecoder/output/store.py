"""The store: the one place that writes files under ``save_path``.

Every write is atomic (temporary file in the same folder, then a rename) and never
replaces an earlier output: a name that is taken gets a ``-1``, ``-2``… suffix. Every
path is resolved and checked to lie inside ``save_path``; names that come from layer
names go through :func:`safe_name`. Only rank 0 writes; other ranks get ``None`` back.
A manifest (``manifest.json``) lists every output with its section and metadata, so the
report, and a later process on the same folder, can find everything.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import distributed
from ..errors import BBDecoderTypeError, SavePathError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 80
_FILE_MODE = 0o644


def safe_name(name: str) -> str:
    """Turn any string (a layer name, a ModuleDict key) into a harmless file name part.

    Only ``[A-Za-z0-9._-]`` survive; runs of anything else become ``_``; leading dots are
    dropped (no hidden files, no ``..``); long names are cut and tagged with a short hash
    so two long names stay distinct.
    """
    cleaned = re.sub(r"^[._]+", "", _UNSAFE.sub("_", str(name))).rstrip("._") or "unnamed"
    if len(cleaned) > _MAX_NAME:
        digest = hashlib.sha1(str(name).encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: _MAX_NAME - 9]}-{digest}"
    return cleaned


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """Output folder of one analyzer.

    Args:
        root: ``save_path``; created if missing.

    Raises:
        SavePathError: ``root`` exists and is not a folder, or cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.enabled = distributed.is_main_process()
        self._lock = threading.Lock()
        if self.root.exists() and not self.root.is_dir():
            raise SavePathError(f"save_path must be a folder, but {str(root)!r} is a file")
        if self.enabled:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SavePathError(f"save_path {str(root)!r} cannot be created: {error.strerror or error}") from error
        self._manifest: list[dict[str, Any]] = self._load_manifest()

    # ----------------------------------------------------------------- paths
    def resolve(self, relative: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relative`` under the root; raises if it would escape."""
        candidate = (self.root / relative).resolve()
        if not self._inside(candidate):
            raise SavePathError(f"refusing to write outside save_path: {str(relative)!r}")
        return candidate

    def folder(self, *parts: str) -> Path:
        """A folder under the root (parts already sanitised by the caller), created."""
        path = self.resolve(Path(*parts)) if parts else self.root
        if self.enabled:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the root, with forward slashes."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def subfolder(
        self,
        user_path: object,
        argument: str,
        *,
        default: str,
    ) -> Path:
        """A folder the user named for an analysis's outputs, as a path relative to the root.

        Nothing is created. A relative ``user_path`` is read relative to the root, unless,
        read from the working directory, it already lies inside the root
        (``"runs/a/grads"`` with ``save_path="runs/a"``); an absolute one must lie inside
        the root (the root itself is allowed).

        Args:
            user_path: what the user passed (``None``: ``default``).
            argument: the argument's name, for error messages (``"save_folder"``).
            default: the folder used when ``user_path`` is ``None``.

        Returns:
            The folder relative to the root.

        Raises:
            BBDecoderTypeError: ``user_path`` is not a str or ``os.PathLike``.
            SavePathError: ``user_path`` lies outside the root.
        """
        if user_path is None:
            return Path(default)
        if not isinstance(user_path, (str, os.PathLike)):
            raise BBDecoderTypeError(
                f"{argument} must be a str or os.PathLike folder inside save_path, got "
                f"{type(user_path).__name__} {user_path!r:.80}"
            )
        given = Path(user_path).expanduser()
        candidate = given.resolve()  # absolute, or relative to the working directory
        if not given.is_absolute() and not self._inside(candidate):
            candidate = (self.root / given).resolve()
        if not self._inside(candidate):
            raise SavePathError(
                f"{argument}={str(user_path)!r} lies outside save_path {str(self.root)!r}; BBDecoder writes only "
                f"under save_path: give a folder name relative to it (e.g. {default + '_run2'!r}) or a path inside it"
            )
        return candidate.relative_to(self.root)

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    # ---------------------------------------------------------------- writing
    def write_bytes(
        self,
        relative: str | os.PathLike[str],
        data: bytes,
        *,
        section: str | None = None,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path | None:
        """Write ``data`` atomically; returns the final path (``None`` off rank 0).

        A taken name gets a numeric suffix unless ``overwrite``: for metadata files and
        cumulative outputs redrawn in place (a trend figure), which keep the manifest entry
        of their first write.
        """
        if not self.enabled:
            return None
        target = self.resolve(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            final = self._commit(target, data, overwrite=overwrite)
            if section is not None:
                self._record(final, section, meta or {}, once=overwrite)
        return final

    def write_text(self, relative: str | os.PathLike[str], text: str, **kwargs: Any) -> Path | None:
        """Write UTF-8 text atomically (see :meth:`write_bytes`)."""
        return self.write_bytes(relative, text.encode("utf-8"), **kwargs)

    def write_json(self, relative: str | os.PathLike[str], obj: Any, **kwargs: Any) -> Path | None:
        """Write ``obj`` as indented JSON atomically (see :meth:`write_bytes`)."""
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
        return self.write_text(relative, text + "\n", **kwargs)

    def write_csv(
        self,
        relative: str | os.PathLike[str],
        header: Sequence[str],
        rows: Iterable[Sequence[Any]],
        **kwargs: Any,
    ) -> Path | None:
        """Write a CSV table atomically (see :meth:`write_bytes`)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return self.write_text(relative, buffer.getvalue(), **kwargs)

    def write_npy(self, relative: str | os.PathLike[str], array: np.ndarray, **kwargs: Any) -> Path | None:
        """Write one array as ``.npy`` atomically (never pickled)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        return self.write_bytes(relative, buffer.getvalue(), **kwargs)

    def write_npz(self, relative: str | os.PathLike[str], arrays: dict[str, np.ndarray], **kwargs: Any) -> Path | None:
        """Write several arrays as a compressed ``.npz`` atomically."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        return self.write_bytes(relative, buffer.getvalue(), **kwargs)

    def save_figure(
        self,
        figure: Figure,
        relative: str | os.PathLike[str],
        *,
        dpi: int = 110,
        **kwargs: Any,
    ) -> Path | None:
        """Render a matplotlib Figure to the format named by the suffix, atomically."""
        suffix = Path(relative).suffix.lstrip(".") or "png"
        buffer = io.BytesIO()
        figure.savefig(buffer, format=suffix, dpi=dpi, bbox_inches="tight")
        return self.write_bytes(relative, buffer.getvalue(), **kwargs)

    def adopt(
        self,
        source: str | os.PathLike[str],
        relative: str | os.PathLike[str],
        *,
        section: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path | None:
        """Move a file produced by another library (a video) into place, atomically.

        ``source`` must lie inside the root (use :meth:`scratch_file`).
        """
        if not self.enabled:
            return None
        source = self.resolve(source)
        target = self.resolve(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            final = self._link_unique(source, target)
            os.unlink(source)
            if section is not None:
                self._record(final, section, meta or {})
        return final

    def scratch_file(self, suffix: str) -> Path:
        """A fresh hidden temporary file path inside the root, for :meth:`adopt`."""
        scratch = self.folder(".tmp")
        handle, name = tempfile.mkstemp(suffix=suffix, dir=scratch)
        os.close(handle)
        os.chmod(name, _FILE_MODE)
        return Path(name)

    def read_json(self, relative: str | os.PathLike[str]) -> Any:
        """The JSON document at ``relative`` under the root, or ``None`` if absent or unreadable."""
        path = self.resolve(relative)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # -------------------------------------------------------------- manifest
    def outputs(self, section: str | None = None) -> list[dict[str, Any]]:
        """Manifest entries (all, or of one section), oldest first."""
        return [dict(e) for e in self._manifest if section is None or e["section"] == section]

    def next_number(self, section: str, key: str = "call", **where: Any) -> int:
        """The number of the next call of an analysis, continuing earlier processes' numbering.

        Args:
            section: the manifest section.
            key: the meta key holding the number (``"call"``, ``"frame"``).
            **where: only entries whose meta has these values (``layer_name="fc"``).

        Returns:
            One more than the largest integer ``key`` among those entries; 1 when there is none.
        """
        numbers = [
            e.get(key)
            for e in self._manifest
            if e["section"] == section and all(e.get(k) == v for k, v in where.items())
        ]
        return 1 + max((n for n in numbers if isinstance(n, int) and not isinstance(n, bool)), default=0)

    def _record(self, path: Path, section: str, meta: dict[str, Any], *, once: bool = False) -> None:
        """Append a manifest entry for ``path`` (with ``once``: unless it already has one)."""
        entry = {"section": section, "path": self.relative(path), "time": now_iso(), **meta}
        self._manifest = self._load_manifest()  # another analyzer on this folder may have added entries
        if once and any(e["path"] == entry["path"] for e in self._manifest):
            return
        self._manifest.append(entry)
        text = json.dumps(self._manifest, indent=1, default=_json_default) + "\n"
        self._commit(self.root / MANIFEST_NAME, text.encode(), overwrite=True)

    def _load_manifest(self) -> list[dict[str, Any]]:
        entries = self.read_json(MANIFEST_NAME)
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, dict) and "section" in e and "path" in e]

    # ------------------------------------------------------------ primitives
    def _commit(self, target: Path, data: bytes, *, overwrite: bool) -> Path:
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temp_name, _FILE_MODE)  # mkstemp makes 0600; outputs are ordinary files
            if overwrite:
                os.replace(temp_name, target)
                return target
            return self._link_unique(Path(temp_name), target)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)

    @staticmethod
    def _link_unique(source: Path, target: Path) -> Path:
        """Give ``source`` the name ``target`` (or a free variant) without replacing anything."""
        stem, suffix = target.stem, target.suffix
        candidate, counter = target, 0
        while True:
            try:
                os.link(source, candidate)  # fails if the name is taken: never overwrites
                return candidate
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: check, then rename
                if not candidate.exists():
                    os.replace(source, candidate)
                    return candidate
            counter += 1
            candidate = target.with_name(f"{stem}-{counter}{suffix}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
