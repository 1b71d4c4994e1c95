"""Hook registration: the one place where hook handles live.

Analyses open a :meth:`HookRegistry.session`; every hook registered through it is
removed when the ``with`` block ends, whatever happens inside it. Nothing is hooked in
the steady state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSession:
    """Hooks registered for the duration of one analysis call."""

    def __init__(self, registry: HookRegistry) -> None:
        self._registry = registry
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """``module.register_forward_hook(hook, **kwargs)``, removed with the session."""
        return self._keep(module.register_forward_hook(hook, **kwargs))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook, **kwargs)``, removed with the session."""
        return self._keep(module.register_forward_pre_hook(hook, **kwargs))

    def tensor(self, tensor: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> RemovableHandle:
        """``tensor.register_hook(hook)``, removed with the session."""
        return self._keep(tensor.register_hook(hook))

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook of this session (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


class HookRegistry:
    """Owns every hook handle of one analyzer."""

    def __init__(self) -> None:
        self._open: list[HookSession] = []

    @contextlib.contextmanager
    def session(self) -> Iterator[HookSession]:
        """A block whose hooks are all removed on exit, even on error."""
        hooks = HookSession(self)
        self._open.append(hooks)
        try:
            yield hooks
        finally:
            hooks.remove()
            self._open.remove(hooks)

    @property
    def active(self) -> int:
        """Number of hooks currently registered through this registry."""
        return sum(len(s._handles) for s in self._open)

    def remove_all(self) -> None:
        """Remove every hook still registered (``Master_analyzer.close``)."""
        for hooks in self._open:
            hooks.remove()


def count_module_hooks(model: nn.Module) -> int:
    """Hooks of every kind on ``model`` and its submodules (for tests and checks)."""
    total = 0
    for module in model.modules():
        for attribute in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(module, attribute, {}) or {})
    return total
