"""The store: the one place that writes files, under ``save_path`` or a folder the user named.

Rules every write follows:

- **Atomic.** Data goes to a hidden temporary file in the target folder, is flushed to disk,
  then gets its final name (a hard link, or a rename for outputs redrawn in place). A failed
  write (disk full, permission denied) leaves no temporary file and nothing partial under
  a final name, and raises :class:`~BBDecoder.errors.OutputWriteError` naming the path.
- **Never overwrite.** A name that is taken gets a ``-1``, ``-2``… suffix, unless the
  caller asks to redraw in place.
- **Confined.** Writes go only under ``save_path`` or under a folder the user explicitly
  named (:meth:`Store.subfolder`). Each allowed root is opened once per write and every
  folder below it is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
  folder swapped for a symbolic link between the check and the write cannot lead a byte
  elsewhere: symbolic links inside an allowed root are refused. Names that come from
  layer names go through :func:`safe_name`.
- **Listed.** ``manifest.json`` lists every output with its section and metadata. Its
  read-modify-write holds an exclusive ``flock`` on the ``save_path`` folder, so several
  processes writing into one folder lose no entry; a file whose entry cannot be written is
  removed again. A damaged manifest is kept aside and rebuilt from the files on disk.
- Only rank 0 writes; other ranks get ``None`` back.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import secrets
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import distributed
from ..errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    OutputDamagedWarning,
    OutputWriteError,
    SavePathError,
)

try:  # POSIX: the manifest's read-modify-write is serialised across processes
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows: only the threads of one process are serialised
    _fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MANIFEST_NAME = "manifest.json"
RUN_NAME = "run.json"
SCRATCH_FOLDER = ".tmp"
LOCK_NAME = ".bbdecoder-lock.tmp"  # only where a folder cannot be locked itself (some network file systems)
_METADATA_FILES = frozenset({MANIFEST_NAME, RUN_NAME, "report.html"})  # top-level files that are not outputs
_DAMAGED = re.compile(r"^(?:manifest|run)\.damaged(?:-\d+)?\.json$")
# numbers a rebuilt manifest reads back from file names, so numbering continues (epoch_001_flow.png)
_NUMBERS = {
    "epoch": re.compile(r"epoch_0*(\d+)"),
    "call": re.compile(r"call0*(\d+)"),
    "frame": re.compile(r"frame_0*(\d+)"),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 80
_FILE_MODE = 0o644
_CHUNK = 1 << 20
_MAX_DEPTH = 64  # how deep a rebuild of the manifest walks

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under an output's name must not block a read
# Descriptor-relative calls (openat, mkdirat, linkat, renameat, unlinkat): every POSIX system we support.
_AT = bool(
    _O_NOFOLLOW
    and _O_DIRECTORY
    and {os.open, os.mkdir, os.link, os.rename, os.unlink, os.stat} <= os.supports_dir_fd
    and os.scandir in os.supports_fd
)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_UNLOCKABLE = frozenset({errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and call again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and call again",
    errno.EACCES: "permission denied: is the folder read-only?",
    errno.EPERM: "operation not permitted: is the folder read-only?",
    errno.EROFS: "the file system is mounted read-only",
}


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


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV text that reads back with the same number of fields per row.

    The csv module quotes a field holding a comma, a quote or ``\\n``, but not a lone
    ``\\r`` (with ``\\n`` line ends), which a reader then takes for a line break: a row with
    such a field is written with every field quoted.
    """
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    numbers = (int, float)
    for row in rows:
        values = list(row)
        hostile = False
        for value in values:
            if value is None or type(value) in numbers:
                continue  # neither holds a "\r"
            if "\r" in (value if isinstance(value, str) else str(value)):
                hostile = True
                break
        (quoted if hostile else plain).writerow(values)
    return buffer.getvalue()


class Store:
    """Output folder of one analyzer.

    Args:
        root: ``save_path``; created if missing.

    Raises:
        SavePathError: ``root`` is empty, exists and is not a folder, or cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        given = os.fspath(root)
        if isinstance(given, str) and not given.strip():
            raise SavePathError(
                f"save_path must name a folder, got save_path={given!r}; an empty path would silently mean the "
                "working directory: name the folder (e.g. save_path='runs/exp1', or '.' for the working directory)"
            )
        self.root = Path(root).expanduser().resolve()
        self.enabled = distributed.is_main_process()
        self._lock = threading.RLock()
        self._depth = 0  # how deeply this process holds the folder's lock (re-entrant within a thread)
        self._external: list[Path] = []  # folders the user named outside the root
        self._manifest: list[dict[str, Any]] = []
        self._stamp: tuple[int, ...] | None = None
        if self.root.exists() and not self.root.is_dir():
            raise SavePathError(f"save_path must be a folder, but {str(root)!r} is a file")
        if self.enabled:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SavePathError(f"save_path {str(root)!r} cannot be created: {error.strerror or error}") from error
        self._entries()  # a damaged manifest is reported (and rebuilt) now, not at the first write

    # ----------------------------------------------------------------- paths
    def resolve(self, relative: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relative``, read from the root.

        Args:
            relative: a path relative to the root, or an absolute path under the root or
                under a folder the user named (:meth:`subfolder`).

        Returns:
            The normalised absolute path (``..`` removed, links not followed).

        Raises:
            SavePathError: the path, or what a symbolic link on it points to, lies outside
                every allowed folder.
            OutputWriteError: a link on the way changed while it was being read.
        """
        candidate = Path(os.path.normpath(self.root / relative))
        try:
            physical = candidate.resolve()  # what the links on the way point to, now
        except OSError as error:  # a link changed while it was being read
            raise _write_error(candidate, error, "check the path of") from error
        if self._base(candidate) is None or self._base(physical) is None:
            raise SavePathError(
                f"refusing to write outside save_path: {str(relative)!r} (save_path is {str(self.root)!r})"
            )
        return candidate

    def folder(self, *parts: str) -> Path:
        """A folder under the root (parts already sanitised by the caller), created on rank 0."""
        path = self.resolve(Path(*parts)) if parts else self.root
        if self.enabled:
            base, below = self._place(path, allow_base=True)
            with self._opened(base, below, create=True):
                pass
        return path

    def relative(self, path: str | os.PathLike[str]) -> str:
        """How the manifest names ``path``: relative to the root, with forward slashes.

        A file in a folder the user named outside the root is named relative to the root
        too (``"../saves/epoch_001_flow.png"``), or absolutely when no relative path leads
        there (another drive on Windows).
        """
        candidate = Path(os.path.normpath(self.root / path))
        if candidate == self.root or self.root in candidate.parents:
            return candidate.relative_to(self.root).as_posix()
        try:
            return Path(os.path.relpath(candidate, self.root)).as_posix()
        except ValueError:
            return candidate.as_posix()

    def locate(self, entry: Any) -> Path | None:
        """The absolute path of a manifest entry's file (nothing is checked on disk).

        Args:
            entry: a manifest entry (a dict from :meth:`outputs`, or any object with a
                ``get(key)`` method such as a schema ``ManifestEntry``) or its ``path``.

        Returns:
            The path, or ``None`` when the entry's path leaves the root without the entry
            being marked ``"external": true`` (a hand-edited or tampered manifest).
        """
        if isinstance(entry, (str, os.PathLike)):
            text, external = os.fspath(entry), False
        else:
            text, external = str(entry.get("path") or ""), entry.get("external") is True
        candidate = Path(os.path.normpath(self.root / text))
        if external or self._inside_root(candidate):
            return candidate
        return None

    def subfolder(
        self,
        user_path: object,
        argument: str,
        *,
        default: str,
    ) -> Path:
        """The folder the user named for an analysis's outputs, as a path the ``write_*`` methods take.

        A relative ``user_path`` is read relative to the root (``"grads"`` is
        ``save_path/grads``), unless, read from the working directory, it already lies
        inside the root (``"runs/a/grads"`` with ``save_path="runs/a"``). A folder that
        lies outside the root (an absolute path, or a relative one such as ``"../saves"``
        that leaves the root, read from the working directory as in the original API) is
        honoured: it becomes an additional allowed folder, written with the same rules,
        and its files are listed in ``save_path``'s manifest (see :meth:`relative`).
        Nothing is created.

        Args:
            user_path: what the user passed (``None``: ``default``).
            argument: the argument's name, for error messages (``"save_folder"``).
            default: the folder used when ``user_path`` is ``None``.

        Returns:
            The folder relative to the root, or its absolute path when it lies outside.

        Raises:
            BBDecoderTypeError: ``user_path`` is not a str or ``os.PathLike``.
            SavePathError: ``user_path`` is empty, or names an existing file.
        """
        if user_path is None:
            return Path(default)
        if not isinstance(user_path, (str, os.PathLike)):
            raise BBDecoderTypeError(
                f"{argument} must be a str or os.PathLike folder, got {type(user_path).__name__} {user_path!r:.80}"
            )
        text = os.fspath(user_path)
        if isinstance(text, str) and not text.strip():
            raise SavePathError(
                f"{argument}={text!r} names no folder: give a folder name (read relative to save_path "
                f"{str(self.root)!r}), a path, or None for the default {default!r}"
            )
        given = Path(text).expanduser()
        try:
            from_cwd = given.resolve()  # absolute, or relative to the working directory
            candidate = from_cwd
            if not given.is_absolute() and not self._inside_root(from_cwd):
                from_root = (self.root / given).resolve()
                if self._inside_root(from_root):
                    candidate = from_root
        except OSError as error:
            raise SavePathError(f"{argument}={str(user_path)!r} cannot be resolved: {_cause(error)}") from error
        if candidate.exists() and not candidate.is_dir():
            raise SavePathError(f"{argument}={str(user_path)!r} is a file ({str(candidate)!r}), not a folder")
        if self._inside_root(candidate):
            return candidate.relative_to(self.root)
        with self._lock:
            if candidate not in self._external:
                self._external.append(candidate)
        return candidate

    def _inside_root(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _base(self, path: Path) -> Path | None:
        """The deepest allowed folder (the root, or one the user named) that holds ``path``."""
        bases = [b for b in (self.root, *self._external) if path == b or b in path.parents]
        return max(bases, key=lambda b: len(b.parts), default=None)

    def _place(self, target: Path, *, allow_base: bool = False) -> tuple[Path, tuple[str, ...]]:
        """The allowed folder holding ``target`` and the names below it."""
        target = Path(os.path.normpath(target))
        base = self._base(target)
        if base is None:
            raise SavePathError(f"refusing to write outside save_path: {str(target)!r}")
        parts = target.relative_to(base).parts
        if not parts and not allow_base:
            raise SavePathError(f"cannot write to {str(target)!r}: it is a folder, not a file name")
        return base, parts

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
        """Write ``data`` atomically and list it in the manifest.

        Args:
            relative: where, as for :meth:`resolve`.
            data: the file's content.
            section: the manifest section (``None``: the file is not listed, for metadata files).
            meta: more fields of the manifest entry.
            overwrite: replace the file in place instead of taking a free name: for metadata
                files and cumulative outputs redrawn in place (a trend figure), which keep the
                manifest entry of their first write.

        Returns:
            The final path (``None`` off rank 0).

        Raises:
            SavePathError: ``relative`` leads outside the allowed folders, or through a link.
            OutputWriteError: the file or its manifest entry could not be written (nothing
                partial is left, and a file without its entry is removed again).
        """
        if not self.enabled:
            return None
        target = self.resolve(relative)
        if section is None:
            return self._commit(target, data, overwrite=overwrite)
        with self._exclusive():
            existed = overwrite and self._exists(target)
            final = self._commit(target, data, overwrite=overwrite)
            self._record_or_discard(final, section, meta or {}, once=overwrite, discard=not existed)
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
        """Write a CSV table atomically (see :meth:`write_bytes`); every row reads back whole (:func:`csv_text`)."""
        return self.write_text(relative, csv_text([header, *rows]), **kwargs)

    def append_csv(
        self,
        relative: str | os.PathLike[str],
        header: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        section: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path | None:
        """Append rows to a cumulative CSV table, creating it with ``header`` on first use.

        The read-append-write holds the folder's lock, so rows of several processes
        appending to one table are all kept; the table is replaced atomically, so a reader,
        a full disk or a killed process never sees half a row. The manifest keeps the entry
        of the table's first write.

        Args:
            relative: where, as for :meth:`resolve`.
            header: the column names; an existing table must have the same.
            rows: the rows to append.
            section: the manifest section (``None``: not listed).
            meta: more fields of the manifest entry (of the first write only).

        Returns:
            The table's path (``None`` off rank 0).

        Raises:
            BBDecoderValueError: the existing table has another header.
            SavePathError: ``relative`` leads outside the allowed folders, or through a link.
            OutputWriteError: the table could not be written (it is left as it was).
        """
        if not self.enabled:
            return None
        target = self.resolve(relative)
        head, body = csv_text([header]), csv_text(rows)
        with self._exclusive():
            base, parts = self._place(target)
            with self._opened(base, parts[:-1], create=True) as folder:
                found = folder.read(parts[-1])
            old = b"" if found is None else found[0]
            if old.strip():
                columns = next(csv.reader(io.StringIO(old.decode("utf-8", errors="replace"))), [])
                if columns != [str(h) for h in header]:
                    raise BBDecoderValueError(
                        f"append_csv: {str(target)!r} has the columns {columns!r}, not header={list(header)!r}; "
                        "rows are appended only to a table with the same header"
                    )
                data = old + (b"" if old.endswith(b"\n") else b"\n") + body.encode("utf-8")
            else:
                data = (head + body).encode("utf-8")
            final = self._commit(target, data, overwrite=True)
            if section is not None:
                self._record_or_discard(final, section, meta or {}, once=True, discard=found is None)
        return final

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
        from ..plots import figure_bytes

        suffix = Path(relative).suffix.lstrip(".") or "png"
        return self.write_bytes(relative, figure_bytes(figure, suffix, dpi), **kwargs)

    def adopt(
        self,
        source: str | os.PathLike[str],
        relative: str | os.PathLike[str],
        *,
        section: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path | None:
        """Move a file produced by another library (a video) into place, atomically.

        ``source`` must lie inside the root (use :meth:`scratch_file`); it is consumed:
        moved into place (copied first when the target is on another file system), or
        removed when that fails.

        Returns:
            The final path (``None`` off rank 0).

        Raises:
            SavePathError: ``source`` is not inside the root, or ``relative`` leads outside
                the allowed folders.
            OutputWriteError: the file or its manifest entry could not be written.
        """
        if not self.enabled:
            return None
        source = Path(os.path.normpath(self.root / source))
        if not self._inside_root(source) or self._base(source) != self.root:
            raise SavePathError(f"adopt: source {str(source)!r} must lie inside save_path {str(self.root)!r}")
        try:
            target = self.resolve(relative)
            with self._exclusive():
                src_base, src_parts = self._place(source)
                base, parts = self._place(target)
                with (
                    self._opened(src_base, src_parts[:-1], create=False) as origin,
                    self._opened(base, parts[:-1], create=True) as folder,
                ):
                    name = self._move_into(origin, src_parts[-1], folder, parts[-1], target)
                    _quietly(origin.unlink, src_parts[-1])
                final = target.with_name(name)
                if section is not None:
                    self._record_or_discard(final, section, meta or {}, once=False, discard=True)
        finally:
            self._discard(source)
        return final

    def scratch_file(self, suffix: str) -> Path:
        """A fresh empty file in the hidden ``.tmp`` folder of the root, for :meth:`adopt`.

        Raises:
            BBDecoderValueError: ``suffix`` holds a path separator.
            OutputWriteError: the file could not be created.
        """
        if "/" in suffix or os.sep in suffix or "\x00" in suffix:
            raise BBDecoderValueError(f"scratch_file: suffix must be a file name ending, got suffix={suffix!r}")
        with self._opened(self.root, (SCRATCH_FOLDER,), create=True) as folder:
            while True:
                name = f"scratch-{secrets.token_hex(6)}{suffix}"
                try:
                    handle = folder.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
                except FileExistsError:
                    continue
                except OSError as error:
                    raise _write_error(folder.path / name, error) from error
                try:
                    _fchmod(handle)
                finally:
                    os.close(handle)
                return folder.path / name

    def read_json(self, relative: str | os.PathLike[str]) -> Any:
        """The JSON document at ``relative`` under the root, or ``None`` if absent or unreadable.

        A file that exists but is not valid JSON (a ``run.json`` cut short) is never
        silently replaced: on rank 0 it is moved aside under a new name
        (``run.damaged.json``, ``run.damaged-1.json``…) and an
        :class:`~BBDecoder.errors.OutputDamagedWarning` says where, so the caller can
        start a new one.
        """
        path = self.resolve(relative)
        base, parts = self._place(path)
        value, problem = self._read_json_at(base, parts)
        if problem is None or not self.enabled:
            return value
        with self._exclusive():
            value, problem = self._read_json_at(base, parts)  # another process may have set it aside already
            if problem is None:
                return value
            with self._opened(base, parts[:-1], create=False) as folder:
                copy = self._keep_aside(folder, parts[-1], move=True)
        _warn_damaged(
            f"{self.relative(path)} in {str(self.root)!r} could not be read ({problem}); it was moved to "
            f"{str(path.with_name(copy))!r} (never overwritten) and a new {parts[-1]} is started: what the old "
            "one recorded is only in that copy"
        )
        return None

    def _read_json_at(self, base: Path, parts: Sequence[str]) -> tuple[Any, str | None]:
        """``(document, None)``, ``(None, None)`` when absent or unreadable, ``(None, problem)`` when damaged."""
        try:
            found = self._read(base, parts)
        except SavePathError as error:  # a link or a FIFO planted under the name
            return None, str(error)
        except OSError:
            return None, None
        if found is None:
            return None, None
        try:
            return json.loads(found[0].decode("utf-8")), None
        except ValueError as error:
            return None, f"it is not valid JSON: {error}"

    # -------------------------------------------------------------- manifest
    def outputs(self, section: str | None = None) -> list[dict[str, Any]]:
        """Manifest entries (all, or of one section), oldest first, as on disk now."""
        return [dict(e) for e in self._entries() if section is None or e["section"] == section]

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
            for e in self._entries()
            if e["section"] == section and all(e.get(k) == v for k, v in where.items())
        ]
        return 1 + max((n for n in numbers if isinstance(n, int) and not isinstance(n, bool)), default=0)

    def _record(self, path: Path, section: str, meta: dict[str, Any], *, once: bool = False) -> None:
        """Append a manifest entry for ``path`` (with ``once``: unless it already has one), under the lock."""
        name = self.relative(path)
        entry: dict[str, Any] = {"section": section, "path": name, "time": now_iso(), **meta}
        if not self._inside_root(Path(os.path.normpath(path))):
            entry["external"] = True  # written into a folder the user named outside save_path
        with self._exclusive():
            entries = self._entries()  # as on disk: other processes on this folder may have added entries
            if once and any(e["path"] == name and not e.get("recovered") for e in entries):
                return
            # a manifest rebuilt meanwhile already lists this file, without its metadata: this entry replaces it
            self._write_manifest([*(e for e in entries if e["path"] != name or not e.get("recovered")), entry])

    def _record_or_discard(self, final: Path, section: str, meta: dict[str, Any], *, once: bool, discard: bool) -> None:
        """Record ``final``; if its entry cannot be written, remove the file again (with ``discard``)."""
        try:
            self._record(final, section, meta, once=once)
        except BaseException as error:
            if discard:
                self._discard(final)
            if isinstance(error, OSError):
                fate = "the file was removed again" if discard else "the file stays without an entry"
                raise OutputWriteError(
                    error.errno,
                    f"cannot list {self.relative(final)!r} in {str(self.root / MANIFEST_NAME)!r}: "
                    f"{_cause(error)}; {fate}, so the manifest never lists a missing file nor misses a written one",
                    str(self.root / MANIFEST_NAME),
                ) from error
            raise

    def _write_manifest(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps(entries, indent=1, default=_json_default) + "\n"
        self._commit(self.root / MANIFEST_NAME, text.encode(), overwrite=True)
        self._manifest, self._stamp = entries, _stamp_of(self.root / MANIFEST_NAME)

    def _entries(self) -> list[dict[str, Any]]:
        """The manifest's entries as on disk (cached while the file is unchanged).

        A damaged manifest is repaired on rank 0 (:meth:`_repair_manifest`); other ranks
        use what can be salvaged from it.
        """
        stamp = _stamp_of(self.root / MANIFEST_NAME)
        if stamp is not None and stamp == self._stamp:
            return self._manifest
        try:
            found = self._read(self.root, (MANIFEST_NAME,))
        except SavePathError as error:  # a link planted under the manifest's name
            found, problem = (b"", None), str(error)
        else:
            problem = None
        if found is None:
            self._manifest, self._stamp = [], None
            return self._manifest
        raw, stamp = found
        entries, parse_problem = _parse_manifest(raw)
        problem = problem or parse_problem
        if problem is not None:
            if not self.enabled:
                self._manifest, self._stamp = _salvage(raw), None
                return self._manifest
            return self._repair_manifest()
        self._manifest, self._stamp = entries, stamp
        return entries

    def _repair_manifest(self) -> list[dict[str, Any]]:
        """Keep a damaged manifest aside, rebuild it from the files on disk, and warn.

        Entries that can still be parsed out of the damaged text keep their metadata
        (when their file exists); every other file gets an entry with its section (its
        first folder), path, time, the numbers in its name and ``"recovered": true``.
        """
        with self._exclusive():
            try:
                found = self._read(self.root, (MANIFEST_NAME,))
            except SavePathError as error:
                found, problem = (b"", None), str(error)
            else:
                entries, problem = _parse_manifest(found[0]) if found is not None else ([], None)
            if problem is None:  # another process repaired it meanwhile
                self._manifest, self._stamp = entries, None if found is None else found[1]
                return entries
            raw = found[0] if found is not None else b""
            with self._opened(self.root, (), create=False) as root:
                copy = self._keep_aside(root, MANIFEST_NAME, move=False)
                try:
                    on_disk = _scan(root)
                except OSError as error:
                    raise _write_error(self.root, error, "list the files of") from error
            salvaged = _salvage(raw)
            entries, kept = self._rebuild(salvaged, on_disk)
            self._write_manifest(entries)
        _warn_damaged(
            f"{MANIFEST_NAME} in {str(self.root)!r} could not be read ({problem}); it was kept as {copy!r} "
            f"(never overwritten) and the manifest was rebuilt from the {len(entries)} files on disk: {kept} "
            f"entries kept their metadata (parsed out of the damaged file), {len(entries) - kept} are listed with "
            "only their section (first folder), path, time and the numbers in their names, marked "
            '"recovered": true: their other metadata (layer, kind, tag…) is lost'
        )
        return self._manifest

    def _rebuild(self, salvaged: list[dict[str, Any]], on_disk: dict[str, float]) -> tuple[list[dict[str, Any]], int]:
        entries: list[dict[str, Any]] = []
        listed: set[str] = set()
        for entry in salvaged:
            name = entry["path"]
            if name in listed:
                continue
            where = self.locate(entry)
            present = name in on_disk if not entry.get("external") else where is not None and where.is_file()
            if present:
                entries.append(entry)
                listed.add(name)
        kept = len(entries)
        for name, mtime in sorted(on_disk.items(), key=lambda item: (item[1], item[0])):
            if name in listed:
                continue
            folder, _, file_name = name.rpartition("/")
            entry = {
                "section": folder.split("/", 1)[0] if folder else "other",
                "path": name,
                "time": _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
                "recovered": True,
            }
            for key, pattern in _NUMBERS.items():
                match = pattern.search(file_name)
                if match:
                    entry[key] = int(match.group(1))
            entries.append(entry)
        return entries, kept

    # ------------------------------------------------------------ primitives
    def _commit(self, target: Path, data: bytes, *, overwrite: bool) -> Path:
        """Write ``data`` to a temporary file beside ``target``, flush it, then give it its name.

        Without ``overwrite`` the file is hard-linked to ``target`` or to the first free
        variant (``-1``, ``-2``…), so nothing is ever replaced; with it, it is renamed over
        ``target``. On any failure the temporary file is removed.

        Returns:
            The final path.

        Raises:
            SavePathError: a folder on the way is a symbolic link or a file.
            OutputWriteError: an operating-system error (disk full, permission denied).
        """
        base, parts = self._place(target)
        final = base.joinpath(*parts)
        with self._opened(base, parts[:-1], create=True) as folder:
            temp: str | None = self._stage(folder, parts[-1], (data,))
            try:
                if overwrite:
                    folder.replace(temp, folder, parts[-1])
                    temp = None
                    return final
                return final.with_name(self._link_unique(folder, temp, folder, parts[-1]))
            except OSError as error:
                raise _write_error(final, error) from error
            finally:
                if temp is not None:
                    _quietly(folder.unlink, temp)

    def _stage(self, folder: _Folder, name: str, chunks: Iterable[bytes]) -> str:
        """A new hidden temporary file in ``folder`` holding ``chunks``, flushed to disk; its name."""
        while True:
            temp = f".{name[:40]}.{secrets.token_hex(4)}.tmp"
            try:
                handle = folder.open_file(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
                break
            except FileExistsError:
                continue
            except OSError as error:
                raise _write_error(folder.path / name, error) from error
        try:
            try:
                for chunk in chunks:
                    _write_all(handle, chunk)
                _fchmod(handle)  # whatever the umask: outputs are ordinary readable files
                os.fsync(handle)
            finally:
                os.close(handle)
        except BaseException as error:
            _quietly(folder.unlink, temp)
            if isinstance(error, OSError):
                raise _write_error(folder.path / name, error) from error
            raise
        return temp

    @staticmethod
    def _link_unique(origin: _Folder, source: str, folder: _Folder, name: str) -> str:
        """Give ``source`` the name ``name`` in ``folder`` (or a free variant) without replacing anything."""
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, counter = name, 0
        while True:
            try:
                origin.link(source, folder, candidate)  # fails if the name is taken: never overwrites
                return candidate
            except FileExistsError:
                pass
            except OSError as error:  # a file system without hard links: check, then rename
                if error.errno not in _NO_HARD_LINKS:
                    raise
                if folder.lstat(candidate) is None:
                    origin.replace(source, folder, candidate)
                    return candidate
            counter += 1
            candidate = f"{stem}-{counter}{suffix}"

    def _move_into(self, origin: _Folder, source: str, folder: _Folder, name: str, target: Path) -> str:
        """Link ``source`` into ``folder`` under a free variant of ``name``; copy it across file systems."""
        try:
            return self._link_unique(origin, source, folder, name)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise _write_error(target, error) from error
        try:
            handle = origin.open_file(source, os.O_RDONLY | _O_NONBLOCK, 0)
        except OSError as error:
            raise _write_error(target, error) from error
        try:
            temp = self._stage(folder, name, iter(lambda: os.read(handle, _CHUNK), b""))
        finally:
            os.close(handle)
        try:
            return self._link_unique(folder, temp, folder, name)
        except OSError as error:
            raise _write_error(target, error) from error
        finally:
            _quietly(folder.unlink, temp)

    def _keep_aside(self, folder: _Folder, name: str, *, move: bool) -> str:
        """Give a damaged file a new free name (``<stem>.damaged<suffix>``), never overwriting; that name.

        With ``move`` the old name is removed; without it the caller replaces it.
        """
        stem, suffix = Path(name).stem, Path(name).suffix
        try:
            copy = self._link_unique(folder, name, folder, f"{stem}.damaged{suffix}")
            if move:
                _quietly(folder.unlink, name)
        except OSError as error:
            raise _write_error(folder.path / name, error) from error
        return copy

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold this folder's lock: threads of this process, and (``flock``) every other process."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self._opened(self.root, (), create=True) as root:
                extra = _lock(root)  # released when the descriptors close
                try:
                    self._depth = 1
                    yield
                finally:
                    self._depth = 0
                    if extra is not None:
                        os.close(extra)

    @contextlib.contextmanager
    def _opened(self, base: Path, parts: Sequence[str], *, create: bool) -> Iterator[_Folder]:
        """The folder ``base/parts…``, each part opened relative to its parent, never through a link."""
        folder = _Folder.open(base, create=create)
        try:
            for part in parts:
                child = folder.child(part, create=create)
                folder.close()
                folder = child
            yield folder
        finally:
            folder.close()

    def _read(self, base: Path, parts: Sequence[str]) -> tuple[bytes, tuple[int, ...]] | None:
        """The bytes of ``base/parts…`` and its stamp, or ``None`` if it (or a folder on the way) is absent."""
        try:
            with self._opened(base, parts[:-1], create=False) as folder:
                return folder.read(parts[-1])
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def _exists(self, target: Path) -> bool:
        """Whether ``target`` exists; ``True`` when that cannot be told (so it is never removed)."""
        base, parts = self._place(target)
        try:
            with self._opened(base, parts[:-1], create=False) as folder:
                return folder.lstat(parts[-1]) is not None
        except OSError as error:
            return error.errno not in (errno.ENOENT, errno.ENOTDIR)
        except SavePathError:
            return True

    def _discard(self, path: Path) -> None:
        """Remove ``path`` if it is there (a cleanup: errors are ignored)."""
        with contextlib.suppress(OSError, SavePathError):
            base, parts = self._place(path)
            with self._opened(base, parts[:-1], create=False) as folder:
                _quietly(folder.unlink, parts[-1])


class _Folder:
    """A folder opened once; every name below it is looked up relative to it, never through a link.

    With descriptor support (POSIX), ``fd`` is the folder's open descriptor: a folder
    renamed or swapped for a symbolic link after it was opened cannot redirect a write.
    Elsewhere (Windows) it falls back to paths, each name checked with ``lstat`` first; a
    small window between that check and the use remains there.
    """

    __slots__ = ("fd", "path")

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path, *, create: bool) -> _Folder:
        """Open an allowed folder (created with its parents when ``create``); its own name must not be a link."""
        if create and not os.path.lexists(path):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as error:
                raise _folder_error(path, error) from error
        if not _AT:
            _refuse_link(path)
            if not path.is_dir():
                raise _folder_error(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
            return cls(path, None)
        try:
            return cls(path, os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC))
        except OSError as error:
            raise _folder_error(path, error) from error

    def child(self, name: str, *, create: bool) -> _Folder:
        """The sub-folder ``name`` (created when ``create``), opened without following a link."""
        path = self.path / name
        if create:
            try:
                if self.fd is None:
                    _refuse_link(path)
                    os.mkdir(path)
                else:
                    os.mkdir(name, dir_fd=self.fd)
            except FileExistsError:
                pass
            except OSError as error:
                raise _folder_error(path, error) from error
        if self.fd is None:
            _refuse_link(path)
            if not path.is_dir():
                raise _folder_error(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
            return _Folder(path, None)
        try:
            return _Folder(path, os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.fd))
        except OSError as error:
            raise _folder_error(path, error) from error

    def open_file(self, name: str, flags: int, mode: int) -> int:
        """``os.open`` of ``name`` in this folder, never through a link."""
        flags |= _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
        if self.fd is None:
            _refuse_link(self.path / name)
            return os.open(self.path / name, flags, mode)
        return os.open(name, flags, mode, dir_fd=self.fd)

    def read(self, name: str) -> tuple[bytes, tuple[int, ...]] | None:
        """The bytes of the regular file ``name`` and its stamp, or ``None`` when it is absent.

        Raises:
            SavePathError: ``name`` is a link or not a regular file.
        """
        try:
            handle = self.open_file(name, os.O_RDONLY | _O_NONBLOCK, 0)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EMLINK):
                raise SavePathError(f"refusing to read {str(self.path / name)!r}: it is a symbolic link") from error
            raise _write_error(self.path / name, error, "read") from error
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode):
                raise SavePathError(f"refusing to read {str(self.path / name)!r}: it is not a regular file")
            chunks = list(iter(lambda: os.read(handle, _CHUNK), b""))
        except OSError as error:
            raise _write_error(self.path / name, error, "read") from error
        finally:
            os.close(handle)
        return b"".join(chunks), _stamp(info)

    def link(self, source: str, folder: _Folder, name: str) -> None:
        """Hard-link ``source`` (here) to ``name`` in ``folder``; fails if ``name`` is taken."""
        if self.fd is None or folder.fd is None:
            os.link(self.path / source, folder.path / name)
        else:
            os.link(source, name, src_dir_fd=self.fd, dst_dir_fd=folder.fd, follow_symlinks=False)

    def replace(self, source: str, folder: _Folder, name: str) -> None:
        """Rename ``source`` (here) over ``name`` in ``folder`` (a link there is replaced, not followed)."""
        if self.fd is None or folder.fd is None:
            os.replace(self.path / source, folder.path / name)
        else:
            os.replace(source, name, src_dir_fd=self.fd, dst_dir_fd=folder.fd)

    def unlink(self, name: str) -> None:
        """Remove ``name`` from this folder."""
        if self.fd is None:
            os.unlink(self.path / name)
        else:
            os.unlink(name, dir_fd=self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name``, or ``None`` when it is absent."""
        try:
            if self.fd is None:
                return os.lstat(self.path / name)
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def entries(self) -> list[tuple[str, bool, bool]]:
        """``(name, is a real folder, is a regular file)`` for each entry; links are neither."""
        with os.scandir(self.path if self.fd is None else self.fd) as scan:
            return [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in scan]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------ helpers
def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(handle, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fchmod(handle: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(handle, _FILE_MODE)


def _lock(root: _Folder) -> int | None:
    """Take an exclusive ``flock`` on the folder (or, where a folder cannot be locked, on a lock file in it).

    Returns:
        The lock file's descriptor to close afterwards, or ``None``.
    """
    if _fcntl is None or root.fd is None:
        return None
    try:
        _fcntl.flock(root.fd, _fcntl.LOCK_EX)
        return None
    except OSError as error:
        if error.errno not in _UNLOCKABLE:
            raise _write_error(root.path, error) from error
    try:
        handle = root.open_file(LOCK_NAME, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as error:
        raise _write_error(root.path / LOCK_NAME, error) from error
    try:
        _fcntl.flock(handle, _fcntl.LOCK_EX)
    except BaseException:
        os.close(handle)
        raise
    return handle


def _scan(root: _Folder) -> dict[str, float]:
    """Every output file under ``root`` (relative path → mtime): no hidden, temporary or metadata files, no links."""
    found: dict[str, float] = {}

    def walk(folder: _Folder, prefix: str, depth: int) -> None:
        for name, is_dir, is_file in sorted(folder.entries()):
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            if is_dir and depth < _MAX_DEPTH:
                child = folder.child(name, create=False)
                try:
                    walk(child, f"{prefix}{name}/", depth + 1)
                finally:
                    child.close()
            elif is_file and (prefix or (name not in _METADATA_FILES and not _DAMAGED.match(name))):
                info = folder.lstat(name)
                if info is not None:
                    found[prefix + name] = info.st_mtime

    walk(root, "", 0)
    return found


def _parse_manifest(raw: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The entries of a manifest's text, and what is wrong with it (``None``: nothing)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as error:
        return [], f"it is not valid JSON: {error}"
    if not isinstance(data, list):
        return [], f"it holds a JSON {type(data).__name__}, not a list of entries"
    return [e for e in data if _is_entry(e)], None


def _salvage(raw: bytes) -> list[dict[str, Any]]:
    """Every whole entry that can still be parsed out of a damaged manifest's text, in order."""
    text = raw.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    index = text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if _is_entry(value):
            found.append(value)
            index = text.find("{", end)
        else:
            index = text.find("{", index + 1)
    return found


def _is_entry(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("section"), str) and isinstance(value.get("path"), str)


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _stamp_of(path: Path) -> tuple[int, ...] | None:
    try:
        return _stamp(os.stat(path, follow_symlinks=False))
    except OSError:
        return None


def _refuse_link(path: Path) -> None:
    if os.path.islink(path):
        raise _folder_error(path, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))


def _folder_error(path: Path, error: OSError) -> Exception:
    """A clear error for a folder that cannot be opened or created."""
    if error.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.EEXIST):
        if os.path.islink(path):
            return SavePathError(
                f"refusing to follow the symbolic link {str(path)!r}: BBDecoder writes only into real folders "
                "under save_path or a folder you named (a link could lead anywhere)"
            )
        if os.path.lexists(path) and not os.path.isdir(path):
            return SavePathError(f"cannot write into {str(path)!r}: it is a file, not a folder")
    return _write_error(path, error)


def _cause(error: OSError) -> str:
    code = error.errno
    cause = error.strerror or str(error)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    hint = _HINTS.get(code, "") if isinstance(code, int) else ""
    return cause + (f" ({name})" if name else "") + (f": {hint}" if hint else "")


def _write_error(path: Path, error: OSError, verb: str = "write") -> OutputWriteError:
    """``error`` as an :class:`OutputWriteError` naming ``path`` and the cause."""
    if isinstance(error, OutputWriteError):
        return error
    return OutputWriteError(
        error.errno,
        f"cannot {verb} {str(path)!r}: {_cause(error)}; nothing partial was left under any output's name",
        str(path),
    )


def _quietly(action: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):
        action(*args)


def _warn_damaged(message: str) -> None:
    warnings.warn(message, OutputDamagedWarning, stacklevel=4)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
