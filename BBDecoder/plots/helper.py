"""Figures drawn two at a time: this process and one helper process share a batch of PNGs.

Matplotlib draws in Python, one figure at a time, holding the interpreter: threads do not
help. A batch of figures (``visualize_weight_hist`` draws two per layer) is shared with one
helper process instead, started on first use and kept for later batches. The helper is a
fresh interpreter running this module, not a ``multiprocessing`` child: nothing of the
user's script is imported there again, and it loads neither torch nor the rest of
BBDecoder, only the plotting modules (its start costs under a second, while this process
draws alone).

A job is ``(draw, args)``: ``draw`` a module-level function that returns a figure, ``args``
plain data. This process takes jobs from the front of the batch, the helper from the back;
a PNG is the same whoever draws it (same matplotlib, and this process's rcParams are sent
along). A job that fails in the helper is drawn here again, so its error is raised here; a
helper that dies is dropped and its jobs are drawn here; one still busy when this process
runs out of jobs is not waited for longer than a figure takes. ``BBDECODER_FIGURE_HELPER=0``
in the environment turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from . import figure_bytes

Job = tuple[Callable[..., Any], tuple[Any, ...]]

MIN_JOBS = 4
"""Smallest batch shared with the helper (a smaller one is drawn here: sending it costs about what it saves)."""
SWITCH = "BBDECODER_FIGURE_HELPER"
"""Environment variable: ``0`` draws every figure in this process."""

_BOOT = """
import importlib.util, os, pickle, sys, types
incoming, outgoing = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # whatever is printed goes where stderr goes, not into the replies
sys.path[:] = pickle.load(incoming)
spec = importlib.util.find_spec("BBDecoder")
package = types.ModuleType("BBDecoder")  # the package without its __init__: no torch, no analyzer
package.__path__, package.__file__, package.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
sys.modules["BBDecoder"] = package
from BBDecoder.plots.helper import serve
serve(incoming, outgoing)
"""


def png_bytes(draw: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The PNG of the figure ``draw(*args)``, as ``Store.save_figure`` writes it."""
    return figure_bytes(draw(*args))


def draw_pngs(jobs: Sequence[Job]) -> list[bytes | Exception]:
    """The PNG of each job, in order; a job that raised gives its exception (to raise where its file goes)."""
    helper = _shared_helper() if len(jobs) >= MIN_JOBS else None
    shared = helper.share(jobs) if helper is not None else None
    return shared if shared is not None else [_attempt(job) for job in jobs]


def _attempt(job: Job) -> bytes | Exception:
    try:
        return png_bytes(*job)
    except Exception as error:  # handed to the caller, raised where the file would go
        return error


# ------------------------------------------------------------------ this process
_helper: _Helper | None = None
_failed = False
_lock = threading.Lock()


def _shared_helper() -> _Helper | None:
    """The helper of this process, started on first use; ``None`` where it is off, cannot run or died."""
    global _helper, _failed
    if _failed or os.environ.get(SWITCH, "1").strip() == "0" or _cores() < 2 or not _is_python(sys.executable):
        return None
    with _lock:
        if _helper is not None and _helper.owner != os.getpid():
            _helper = None  # a forked copy of this process: the pipes are the parent's
        if _helper is None:
            try:
                _helper = _Helper()
            except Exception:  # no interpreter to start: drawn here from now on
                _failed = True
                return None
            atexit.register(_helper.stop)
        return _helper if _helper.alive else None


def _is_python(executable: str) -> bool:
    """Whether ``executable`` is a Python interpreter (a frozen or embedding app's own program is not)."""
    name = os.path.basename(executable or "").lower()
    return not getattr(sys, "frozen", False) and name.startswith(("python", "pypy"))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Helper:
    """One helper process and the protocol with it: pickled messages over its stdin and stdout.

    The helper answers each message in turn: first ``("ready", path of its BBDecoder.plots)``,
    then a ``("png", bytes)`` or ``("error", text)`` per job. One reader thread per batch
    sends it jobs and reads the answers; nothing else talks to it meanwhile.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, SWITCH: "0"},  # whatever runs there starts no helper of its own
            start_new_session=True,  # Ctrl-C in a terminal or a notebook is this process's, not the helper's
        )
        self.owner = os.getpid()
        self.alive = True
        self.ready = False
        self.drawn = 0
        """Figures the helper has drawn (tests and benchmarks read it)."""
        self._reader: threading.Thread | None = None
        self._rc: dict[str, Any] | None = None
        self._busy = threading.Lock()
        assert self.process.stdin is not None and self.process.stdout is not None
        self._out: BinaryIO = self.process.stdin
        self._in: BinaryIO = self.process.stdout
        try:  # '' and relative entries mean this process's folder, not the helper's
            self._send([os.path.abspath(entry) for entry in sys.path])
        except Exception:
            self.stop()
            raise

    def share(self, jobs: Sequence[Job]) -> list[bytes | Exception] | None:
        """Draw ``jobs`` here and in the helper; ``None`` when the helper cannot take part."""
        if not self._busy.acquire(blocking=False):
            return None  # another thread is sharing a batch: this one draws its own
        try:
            return self._share(jobs)
        finally:
            self._busy.release()

    def _share(self, jobs: Sequence[Job]) -> list[bytes | Exception] | None:
        if self._reader is not None and self._reader.is_alive():
            if not self.ready:
                self.stop()  # a whole batch went by without it starting: it will not
            else:
                self._reader.join(timeout=10.0)  # its answer to a job drawn here meanwhile
                if self._reader.is_alive():
                    self.stop()
        if not self.alive or self.process.poll() is not None:
            self.alive = False
            return None
        try:
            self._send_rc()
        except Exception:  # settings that cannot be sent (a local class in them): drawn here
            return None
        results: list[bytes | Exception | None] = [None] * len(jobs)
        done = [False] * len(jobs)
        queue = deque(range(len(jobs)))
        here_only: set[int] = set()  # jobs that cannot be sent
        flight: list[int | None] = [None]  # the job the helper draws now
        turn = threading.Condition()

        def feed() -> None:
            if not self.ready and not self._handshake():
                with turn:
                    turn.notify_all()
                return
            while True:
                with turn:
                    candidates = [i for i in queue if i not in here_only and not done[i]]
                    if not candidates or not self.alive:
                        return
                    index = candidates[-1]
                    queue.remove(index)
                    flight[0] = index
                try:
                    message = pickle.dumps(jobs[index], protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:  # not plain data: drawn here
                    with turn:
                        flight[0] = None
                        here_only.add(index)
                        queue.appendleft(index)
                        turn.notify_all()
                    continue
                try:
                    self._send(("job", message))
                    kind, payload = pickle.load(self._in)
                except Exception:  # the helper died or answered nonsense: drop it
                    kind, payload = "dead", None
                with turn:
                    flight[0] = None
                    if kind == "png" and not done[index]:
                        results[index], done[index] = payload, True
                        self.drawn += 1
                    elif not done[index]:
                        queue.appendleft(index)  # failed there: drawn here, where its error is raised
                    if kind == "dead":
                        self.alive = False
                    turn.notify_all()
                if kind == "dead":
                    self.stop()
                    return

        self._reader = threading.Thread(target=feed, name="BBDecoder figure helper", daemon=True)
        self._reader.start()
        spent: list[float] = []
        try:
            while True:
                with turn:
                    if queue:
                        index = queue.popleft()
                    else:
                        busy = flight[0]
                        if busy is None or done[busy]:
                            break
                        # the helper draws the last one: wait about as long as a figure takes here, then draw it too
                        turn.wait(timeout=statistics.median(spent) if spent else 0.5)
                        busy = flight[0]
                        if busy is None or done[busy]:
                            continue
                        index = busy
                if done[index]:
                    continue
                began = time.perf_counter()
                result = _attempt(jobs[index])
                spent.append(time.perf_counter() - began)
                with turn:
                    if not done[index]:
                        results[index], done[index] = result, True
        finally:
            with turn:  # interrupted (Ctrl-C): the helper gets nothing more of this batch
                queue.clear()
        return [result if result is not None else RuntimeError("figure not drawn") for result in results]

    def _handshake(self) -> bool:
        """Read the helper's first answer; it must run this very BBDecoder."""
        try:
            kind, where = pickle.load(self._in)
        except Exception:
            kind, where = "dead", None
        if kind != "ready" or where != os.path.dirname(os.path.abspath(__file__)):
            self.alive = False
            self.stop()
            return False
        self.ready = True
        return True

    def modules(self) -> list[str]:
        """The modules the helper has imported (to check it holds no torch)."""
        with self._busy:
            if self._reader is not None:
                self._reader.join(timeout=10.0)
            if not self.ready and not self._handshake():
                return []
            self._send(("modules", None))
            _, payload = pickle.load(self._in)
            return list(payload)

    def stop(self) -> None:
        """End the helper: its stdin closed, killed if it does not exit within a second or is busy."""
        self.alive = False
        reader = self._reader
        if reader is not None and reader.is_alive() and reader is not threading.current_thread():
            self.process.kill()  # the reader may be blocked writing to it: closing the pipe would wait for it
        with contextlib.suppress(Exception):
            self._out.close()
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(Exception):
            self._in.close()

    def _send(self, message: Any) -> None:
        pickle.dump(message, self._out, protocol=pickle.HIGHEST_PROTOCOL)
        self._out.flush()

    def _send_rc(self) -> None:
        import matplotlib as mpl

        # the stored values (reading rcParams["backend"] would resolve it: import pyplot and a GUI toolkit)
        rc = {key: value for key, value in dict.items(mpl.rcParams) if key != "backend"}
        if rc != self._rc:
            self._send(("rc", rc))
            self._rc = rc


# ------------------------------------------------------------------ the helper
def serve(incoming: BinaryIO, outgoing: BinaryIO) -> None:
    """The helper's loop: say where it runs from, then apply rcParams, draw jobs, answer; until stdin closes."""
    import warnings

    import matplotlib as mpl

    pickle.dump(("ready", os.path.dirname(os.path.abspath(__file__))), outgoing, protocol=pickle.HIGHEST_PROTOCOL)
    outgoing.flush()
    while True:
        try:
            kind, payload = pickle.load(incoming)
        except EOFError:
            return
        if kind == "rc":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for key, value in payload.items():
                    with contextlib.suppress(Exception):  # a setting it cannot take: it keeps its own
                        mpl.rcParams[key] = value
            continue
        if kind == "modules":
            reply: tuple[str, Any] = ("modules", sorted(sys.modules))
        else:
            try:
                reply = ("png", png_bytes(*pickle.loads(payload)))
            except Exception as error:  # drawn again by the parent, which raises it
                reply = ("error", repr(error))
        pickle.dump(reply, outgoing, protocol=pickle.HIGHEST_PROTOCOL)
        outgoing.flush()
