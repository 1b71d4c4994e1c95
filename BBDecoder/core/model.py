"""Small helpers about the user's model and its inputs and outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BBDecoderTypeError, BBDecoderValueError
from .distributed import reshard_fsdp


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards.

    An FSDP2 model is also resharded on exit: a forward pass can leave unsharded
    parameters registered in its modules (the root's are kept until a backward pass),
    which would change what ``model.parameters()`` returns to the user.
    """
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
        reshard_fsdp(model)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype for exact sums on ``device``: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple/list/dict to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return type(data)({k: to_device(v, device) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device) for v in data)
    return data


def first_tensor(output: Any, key: Any = None, *, argument: str = "output_key") -> torch.Tensor:
    """The tensor an analysis looks at: ``output[key]`` if given, else the first tensor found."""
    if key is not None:
        try:
            output = output[key]
        except (KeyError, IndexError, TypeError) as error:
            raise BBDecoderValueError(f"{argument}={key!r} does not select an item of the layer's output") from error
        if not isinstance(output, torch.Tensor):
            raise BBDecoderTypeError(f"{argument}={key!r} selects a {type(output).__name__}, not a tensor")
        return output
    if isinstance(output, torch.Tensor):
        return output
    values: Sequence[Any] = (
        list(output.values()) if isinstance(output, Mapping) else (output if isinstance(output, (list, tuple)) else [])
    )
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        with contextlib.suppress(BBDecoderTypeError):
            return first_tensor(value)
    raise BBDecoderTypeError(f"the layer's output holds no tensor (got {type(output).__name__})")


def dummy_input(input_size: Sequence[Any], device: torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Zeros of ``input_size`` (a shape, or a list of shapes for several inputs)."""
    if input_size and all(isinstance(s, (list, tuple, torch.Size)) for s in input_size):
        return tuple(torch.zeros(*map(int, s), device=device) for s in input_size)
    return torch.zeros(*map(int, input_size), device=device)


def validate_input_size(input_size: Any) -> list[Any] | None:
    """Check ``input_size``: ``None``, a shape, or a list of shapes of positive ints."""
    if input_size is None:
        return None

    def is_shape(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple, torch.Size))
            and len(value) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
        )

    if is_shape(input_size):
        return [int(d) for d in input_size]
    if isinstance(input_size, (list, tuple)) and input_size and all(is_shape(s) for s in input_size):
        return [[int(d) for d in s] for s in input_size]
    raise BBDecoderValueError(
        f"input_size must be a shape such as [1, 3, 32, 32] (positive ints) or a list of shapes; got {input_size!r}"
    )


def shape_of(output: Any) -> list[Any]:
    """Shapes in an output: ``[1, 64, 8, 8]`` for a tensor, a list or dict of them otherwise."""
    if isinstance(output, torch.Tensor):
        return list(output.shape)
    if isinstance(output, Mapping):
        return {str(k): shape_of(v) for k, v in output.items()}  # type: ignore[return-value]
    if isinstance(output, (list, tuple)):
        return [shape_of(v) for v in output]
    return []
