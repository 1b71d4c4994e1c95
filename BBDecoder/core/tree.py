"""Walks over the nested structures models take and return (tuples, lists, dicts of tensors).

Every nested-input or nested-output walk in BBDecoder goes through :func:`tree_map` or
:func:`tensors`, so a namedtuple, a dict subclass (a tokenizer's ``BatchEncoding``) or a
list of images for a detector is handled the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def tree_map(fn: Callable[[torch.Tensor], Any], data: Any) -> Any:
    """``data`` with every tensor ``t`` replaced by ``fn(t)``; other leaves kept as they are.

    Containers keep their type where it can be rebuilt: namedtuples field by field, dict
    subclasses through their constructor (falling back to ``dict``), lists and tuples.
    """
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        items = {k: tree_map(fn, v) for k, v in data.items()}
        try:
            return type(data)(items)  # type: ignore[call-arg]
        except Exception:  # a mapping type whose constructor takes something else
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a namedtuple
        return type(data)(*(tree_map(fn, v) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(tree_map(fn, v) for v in data)
    return data


def tensors(data: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``data``, depth first, in order."""
    if isinstance(data, torch.Tensor):
        yield data
    elif isinstance(data, Mapping):
        for value in data.values():
            yield from tensors(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from tensors(value)


def detach(data: Any) -> Any:
    """``data`` with every tensor detached."""
    return tree_map(torch.Tensor.detach, data)


def to_device(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor moved to ``device``."""
    return tree_map(lambda t: t.to(device), data)


def shape_of(data: Any) -> Any:
    """Shapes in ``data``: ``[1, 64, 8, 8]`` for a tensor, a list or dict of them otherwise."""
    if isinstance(data, torch.Tensor):
        return list(data.shape)
    if isinstance(data, Mapping):
        return {str(k): shape_of(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [shape_of(v) for v in data]
    return []


# ------------------------------------------------------------------- input specs
@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one input tensor, kept instead of its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def zeros(self, device: torch.device, *, ones: bool = False) -> torch.Tensor:
        """A tensor of this spec: zeros (valid token IDs, blank images), or ones (an all-visible mask)."""
        make = torch.ones if ones else torch.zeros
        return make(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class CallSpec:
    """How the model was called, without the data: positional and keyword inputs as specs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> CallSpec:
        """The spec of a real call: tensors become :class:`TensorSpec`, small plain values are kept."""
        return cls(_spec(tuple(args)), {str(k): _spec(v) for k, v in kwargs.items()})

    def materialize(self, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of zeros on ``device``; inputs named like a mask are ones."""
        args = tuple(_materialize(a, device, "") for a in self.args)
        return args, {k: _materialize(v, device, k) for k, v in self.kwargs.items()}

    def describe(self) -> Any:
        """JSON-ready form: shapes and dtypes."""
        return {"args": [_describe(a) for a in self.args], "kwargs": {k: _describe(v) for k, v in self.kwargs.items()}}


_PLAIN = (bool, int, float, str, type(None))


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, Mapping):
        return {str(k): _spec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value) if not hasattr(value, "_fields") else tuple(map(_spec, value))
    return value if isinstance(value, _PLAIN) else None


def _materialize(value: Any, device: torch.device, name: str) -> Any:
    if isinstance(value, TensorSpec):
        return value.zeros(device, ones="mask" in name.lower())
    if isinstance(value, Mapping):
        return {k: _materialize(v, device, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, device, name) for v in value)
    return value


def _describe(value: Any) -> Any:
    if isinstance(value, TensorSpec):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, Mapping):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return value


def as_call(data: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An analysis input as the model's ``(args, kwargs)``.

    A tensor is the one positional input; a tuple holds the positional inputs; a mapping
    (``{"input_ids": ..., "attention_mask": ...}``, a tokenizer's output) holds keyword
    inputs; a list is one positional input (a detector's list of images).
    """
    if isinstance(data, Mapping):
        return (), dict(data)
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(data), {}
    return (data,), {}


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """The leading dimension of the first tensor among the inputs (``None`` when there is none)."""
    for tensor in tensors((args, dict(kwargs))):
        return int(tensor.shape[0]) if tensor.ndim else None
    return None
