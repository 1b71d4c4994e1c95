"""Run a function in several gloo processes on the CPU, from a test."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], errors: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    # a collective that one rank never joins fails after this long instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise a rank's failure."""
    errors = tmp_path / "_errors"
    errors.mkdir(exist_ok=True)
    try:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, str(errors)), nprocs=world_size, join=True)
    except Exception as error:
        details = "\n".join(p.read_text() for p in sorted(errors.iterdir()))
        raise AssertionError(f"a distributed rank failed:\n{details}") from error
