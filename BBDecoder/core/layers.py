"""The layer table: IDs, dotted names, and resolution of user selectors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ..errors import BBDecoderTypeError, LayerSelectionError
from .distributed import user_class

Selector = Union[int, str, Sequence[int | str], None]
ROOT_NAME = "(model)"
ROOT_OWN_ID = -1
"""ID of the pseudo-layer holding the parameters the root module owns itself (not in any child)."""


@dataclass
class Layer:
    """One numbered layer of the wrapped model."""

    id: int
    name: str
    module: nn.Module = field(repr=False)
    depth: int

    @property
    def type(self) -> str:
        """The module's class name (the user's class, not FSDP2's ``FSDP<Name>`` subclass)."""
        return user_class(self.module).__name__

    @property
    def label(self) -> str:
        """``"3 layer1.0"``: how a layer is shown to people."""
        return f"{self.id} {self.name}"

    def parameter_count(self, trainable_only: bool = False) -> int | None:
        """Parameters of the layer (its children's included); ``None`` while a lazy one is uninitialised."""
        return count_parameters(self.module.parameters(), trainable_only=trainable_only)


def is_lazy(param: torch.Tensor) -> bool:
    """An ``nn.LazyLinear``-style parameter not yet materialised by a first forward pass."""
    return isinstance(param, nn.parameter.UninitializedParameter)


def count_parameters(params: Iterable[torch.Tensor], *, trainable_only: bool = False) -> int | None:
    """Elements of ``params`` (each tensor once); ``None`` when one of them is still lazy (size unknown)."""
    total, seen = 0, set()
    for param in params:
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        if is_lazy(param):
            return None
        total += param.numel()
    return total


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP/DataParallel/FSDP-wrapper/``torch.compile`` layers."""
    inner = model
    for _ in range(8):  # wrappers can nest: compile(DDP(model)) or DDP(compile(model))
        if hasattr(inner, "_orig_mod") and isinstance(inner._orig_mod, nn.Module):
            inner = inner._orig_mod
        elif isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = inner.module
        else:
            break
    return inner


def is_bias(name: str) -> bool:
    """A bias by name: ``bias``, ``*_bias`` or ``bias_*`` (the leaf of a dotted name)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


def owned_parameters(layers: Sequence[Layer], bias: bool) -> list[tuple[Layer, str, nn.Parameter]]:
    """``(layer, name relative to it, parameter)`` for each parameter, under its deepest selected layer."""
    owner: dict[int, tuple[int, int, Layer, str, nn.Parameter]] = {}
    for layer in sorted(layers, key=lambda item: -item.depth):
        for order, (name, param) in enumerate(layer.module.named_parameters()):
            if id(param) in owner or is_lazy(param) or param.numel() == 0 or (not bias and is_bias(name)):
                continue
            owner[id(param)] = (layer.id, order, layer, name, param)
    return [(layer, name, param) for _, _, layer, name, param in sorted(owner.values(), key=lambda e: e[:2])]


class LayerTable(Sequence[Layer]):
    """Layers of ``model`` down to ``depth``, numbered in pre-order.

    With ``depth=1`` the top-level children get IDs ``0..N-1`` in registration order;
    with ``depth=k`` every module down to depth ``k`` is numbered, parents before their
    children. A model without children is one layer, the model itself.
    """

    def __init__(self, model: nn.Module, depth: int = 1) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise BBDecoderTypeError(f"depth must be a positive int, got {depth!r}")
        if depth < 1:
            raise LayerSelectionError(f"depth must be at least 1, got depth={depth}")
        self.depth = depth
        layers: list[Layer] = []
        for name, module in model.named_modules():
            level = name.count(".") + 1 if name else 0
            if 1 <= level <= depth:
                layers.append(Layer(len(layers), name, module, level))
        if not layers:
            layers.append(Layer(0, ROOT_NAME, model, 0))
        self._layers = layers
        self._by_name = {layer.name: layer for layer in layers}
        owns = layers[0].module is not model and any(True for _ in model.parameters(recurse=False))
        #: the root's own parameters (a ViT's ``cls_token``, ``pos_embed``) as a pseudo-layer, or None
        self.root_own: Layer | None = Layer(ROOT_OWN_ID, ROOT_NAME, model, 0) if owns else None

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index: int) -> Layer:  # type: ignore[override]
        return self._layers[index]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def resolve(self, selector: Selector, argument: str = "layer_inds", *, default_all: bool = False) -> list[Layer]:
        """Layers selected by IDs, dotted names, or a list mixing both (duplicates dropped).

        Args:
            selector: an int ID (negative counts from the end), a dotted name, or a
                list/tuple of those; ``None`` selects every layer when ``default_all``.
            argument: the argument's name, used in error messages.
            default_all: whether ``None`` means "all layers".

        Raises:
            BBDecoderTypeError: a selector of the wrong type (bool, float, dict…).
            LayerSelectionError: an unknown name, an ID out of range, an empty list.
        """
        if selector is None:
            if default_all:
                return list(self._layers)
            raise LayerSelectionError(f"{argument}=None: select at least one layer by ID (0..{len(self) - 1}) or name")
        items: Sequence[Any]
        if isinstance(selector, (int, str)) and not isinstance(selector, bool):
            items = [selector]
        elif isinstance(selector, (list, tuple)):
            if not selector:
                raise LayerSelectionError(
                    f"{argument}=[]: select at least one layer by ID (0..{len(self) - 1}) or name"
                )
            items = selector
        else:
            raise BBDecoderTypeError(
                f"{argument} must be an int ID, a layer name, or a list of them; "
                f"got {type(selector).__name__} {selector!r}"
            )
        chosen: list[Layer] = []
        for item in items:
            layer = self.one(item, argument)
            if layer not in chosen:
                chosen.append(layer)
        return chosen

    def one(self, item: Any, argument: str = "layer") -> Layer:
        """The single layer named by an int ID or a dotted name."""
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise BBDecoderTypeError(f"{argument} must hold int IDs or str names; got {type(item).__name__} {item!r}")
        if isinstance(item, int):
            count = len(self._layers)
            if not -count <= item < count:
                raise LayerSelectionError(
                    f"{argument}: layer ID {item} is out of range; valid IDs are "
                    f"0..{count - 1} (or -{count}..-1 from the end)"
                )
            return self._layers[item]
        if item in self._by_name:
            return self._by_name[item]
        close = difflib.get_close_matches(item, self.names, n=3, cutoff=0.5)
        hint = (
            f"; did you mean {', '.join(map(repr, close))}?"
            if close
            else (f"; names at depth {self.depth} include {', '.join(map(repr, self.names[:5]))}")
        )
        raise LayerSelectionError(f"{argument}: no layer named {item!r}{hint}")


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): its full names}`` for every parameter registered under more than one name."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: found for key, found in names.items() if len(found) > 1}
