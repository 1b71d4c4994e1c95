"""Small helpers about the user's model and its inputs and outputs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BBDecoderTypeError, BBDecoderValueError
from . import checks
from .distributed import reshard_fsdp
from .tree import CallSpec, TensorSpec, tensors


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
    found = next(tensors(output), None)
    if found is None:
        raise BBDecoderTypeError(f"the layer's output holds no tensor (got {type(output).__name__})")
    return found


def input_spec(input_size: Sequence[Any], dtype: torch.dtype = torch.float32) -> CallSpec:
    """The call of ``input_size`` (a shape, or a list of shapes for several positional inputs)."""
    several = bool(input_size) and all(isinstance(s, (list, tuple, torch.Size)) for s in input_size)
    shapes = input_size if several else [input_size]
    return CallSpec(tuple(TensorSpec(tuple(map(int, s)), dtype) for s in shapes), {})


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

    shapes = None
    if is_shape(input_size):
        shapes = [[int(d) for d in input_size]]
    elif isinstance(input_size, (list, tuple)) and input_size and all(is_shape(s) for s in input_size):
        shapes = [[int(d) for d in s] for s in input_size]
    if shapes is not None:
        elements = sum(math.prod(s) for s in shapes)
        if elements > checks.LIMITS["input_elements"]:
            raise BBDecoderValueError(
                f"input_size={input_size!r} asks for {elements:,} elements of zeros (over "
                f"{checks.LIMITS['input_elements']:,}); give the shape of one small batch, e.g. [1, 3, 224, 224]"
            )
        return shapes[0] if is_shape(input_size) else shapes
    raise BBDecoderValueError(
        f"input_size must be a shape such as [1, 3, 32, 32] (positive ints) or a list of shapes; got {input_size!r}"
    )
