"""Flat byte buffers: how tensors cross the process boundary between the proxy and its shards.

Owns the packing of many tensors (any dtype, bfloat16 included) into one contiguous ``uint8``
buffer and the typed views back into it. Ray moves such a buffer as one numpy array through its
shared-memory object store (zero-copy reads on the same node), so no tensor is ever pickled.

- :class:`FlatLayout` places a fixed list of tensor shapes/dtypes at aligned offsets.
- :func:`pack_tree` / :func:`unpack_tree` carry a nested structure (an optimizer's per-parameter
  state: dicts, lists, tuples, numbers, strings and tensors) as a skeleton plus one flat buffer.

Talks to nothing: pure functions over torch and numpy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

ALIGNMENT = 64
"""Byte alignment of every tensor inside a flat buffer (a cache line; enough for any dtype)."""


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class FlatLayout:
    """Where each of a list of tensors lives inside one flat ``uint8`` buffer."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @classmethod
    def for_specs(cls, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> FlatLayout:
        """Lays out ``(shape, dtype)`` pairs one after another at aligned offsets."""
        offsets, cursor = [], 0
        for shape, dtype in specs:
            offsets.append(cursor)
            cursor = _align(cursor + math.prod(shape) * dtype.itemsize)
        return cls(
            shapes=tuple(tuple(s) for s, _ in specs),
            dtypes=tuple(d for _, d in specs),
            offsets=tuple(offsets),
            nbytes=cursor,
        )

    @classmethod
    def for_tensors(cls, tensors: list[torch.Tensor]) -> FlatLayout:
        return cls.for_specs([(tuple(t.shape), t.dtype) for t in tensors])

    def __len__(self) -> int:
        return len(self.shapes)

    def tensor_nbytes(self, i: int) -> int:
        return math.prod(self.shapes[i]) * self.dtypes[i].itemsize

    def extended(self, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> FlatLayout:
        """This layout with more tensors appended; existing offsets are unchanged."""
        tail = FlatLayout.for_specs(specs)
        base = self.nbytes
        return FlatLayout(
            shapes=self.shapes + tail.shapes,
            dtypes=self.dtypes + tail.dtypes,
            offsets=self.offsets + tuple(base + o for o in tail.offsets),
            nbytes=base + tail.nbytes,
        )

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """The typed view of tensor ``i`` inside ``flat`` (a 1-D uint8 tensor)."""
        nbytes = self.tensor_nbytes(i)
        if nbytes == 0:  # numpy hands out empty arrays with stride 0, which cannot be re-typed
            return torch.empty(self.shapes[i], dtype=self.dtypes[i], device=flat.device)
        start = self.offsets[i]
        return flat[start : start + nbytes].view(self.dtypes[i]).view(self.shapes[i])

    def empty(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)

    def pack(
        self, tensors: list[torch.Tensor | None], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copies ``tensors`` into a flat buffer (``None`` entries leave their bytes unwritten)."""
        flat = self.empty() if out is None else out
        for i, t in enumerate(tensors):
            if t is not None:
                self.view(flat, i).copy_(t.detach())
        return flat

    def bind(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """A new leaf tensor (not a view) whose storage is tensor ``i``'s bytes in ``flat``.

        Optimizers key their state by tensor identity; :meth:`rebind` later moves such a tensor
        into a bigger buffer without changing that identity.
        """
        return self.rebind(torch.empty(0, dtype=self.dtypes[i], device=flat.device), flat, i)

    def rebind(self, tensor: torch.Tensor, flat: torch.Tensor, i: int) -> torch.Tensor:
        itemsize = self.dtypes[i].itemsize
        shape = self.shapes[i]
        stride = torch.empty(shape, device="meta").stride()
        start = flat.storage_offset() + self.offsets[i]
        with torch.no_grad():
            tensor.set_(flat.untyped_storage(), start // itemsize, shape, stride)
        return tensor


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) numpy array from Ray's object store.

    The caller only reads it. Torch warns about non-writable arrays; that warning is about
    writes, which never happen here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def to_numpy(flat: torch.Tensor) -> np.ndarray:
    """The numpy array of a CPU uint8 buffer (shares memory; Ray copies it when sent)."""
    return flat.detach().cpu().numpy()


class TensorSlot(NamedTuple):
    """Stands in for the ``index``-th tensor of a packed tree."""

    index: int


class PackedTree(NamedTuple):
    """A nested structure whose tensors were moved into one flat buffer."""

    skeleton: Any
    layout: FlatLayout
    data: np.ndarray


def pack_tree(tree: Any, allocate: Callable[[int], torch.Tensor] | None = None) -> PackedTree:
    """Moves every tensor of ``tree`` into one flat buffer.

    ``allocate(nbytes)`` provides the uint8 buffer (default: a new CPU tensor).

    Raises:
        TypeError: for a sparse tensor or an object that is not a tensor, number, string,
            bytes, None or a dict/list/tuple of them (state dicts must survive
            ``torch.load(weights_only=True)``).
    """
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            if node.is_sparse or node.layout != torch.strided:
                raise TypeError("sparse tensors cannot be stored in optimizer state")
            tensors.append(node.detach())
            return TensorSlot(len(tensors) - 1)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, TensorSlot):
            raise TypeError("unexpected TensorSlot in optimizer state")
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            raise TypeError(f"named tuples are not allowed in optimizer state: {type(node)}")
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        if node is None or isinstance(node, (bool, int, float, complex, str, bytes)):
            return node
        raise TypeError(
            f"optimizer state may hold only tensors, numbers, strings and plain "
            f"dicts/lists/tuples of them, got {type(node).__name__}"
        )

    skeleton = walk(tree)
    layout = FlatLayout.for_tensors(tensors)
    flat = layout.pack(tensors, out=None if allocate is None else allocate(layout.nbytes))
    return PackedTree(skeleton, layout, to_numpy(flat))


def _with_tensors(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """A packed tree's structure with ``tensors[i]`` where its ``i``-th tensor goes."""

    def walk(node: Any) -> Any:
        if isinstance(node, TensorSlot):
            return tensors[node.index]
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(skeleton)


def empty_tree(skeleton: Any, layout: FlatLayout) -> tuple[Any, list[torch.Tensor]]:
    """The structure of a packed tree with new, unfilled CPU tensors where its tensors go.

    Returns:
        The tree, and its tensors in slot order (to be filled from wherever the bytes are).
    """
    tensors = [
        torch.empty(shape, dtype=dtype) for shape, dtype in zip(layout.shapes, layout.dtypes)
    ]
    return _with_tensors(skeleton, tensors), tensors


def unpack_tree(packed: PackedTree, device: torch.device | str = "cpu") -> Any:
    """Rebuilds the structure of :func:`pack_tree` with fresh, writable tensors on ``device``.

    ``packed.data`` is the numpy buffer, or a uint8 tensor (a mapped shared-memory file).
    """
    data = packed.data
    source = data if isinstance(data, torch.Tensor) else readonly_tensor(data)
    layout = packed.layout
    tensors = [layout.view(source, i).to(device=device, copy=True) for i in range(len(layout))]
    return _with_tensors(packed.skeleton, tensors)


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested structure (dicts, lists, tuples) in the order pickle meets
    them: dict order, depth first (the order ``torch.save`` numbers their storages)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in tensors_in(value)]
    return []
