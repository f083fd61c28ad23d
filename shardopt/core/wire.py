"""Tensors and plain values on the wire (``protos/shardopt/v1/tensor.proto``); never pickle.

- :func:`encode_value` / :func:`decode_value`: Python values (None, bool, int, float, str,
  list, tuple, dict, and tensors by reference) to and from ``Value`` messages.
- :func:`tensor_chunks`: a list of tensors as ``TensorChunk`` messages of at most
  :data:`CHUNK_BYTES`, little-endian, C order.
- :class:`TensorReceiver`: the other end. It checks every declared spec against the limits
  before allocating anything, then every chunk (order, offsets, sizes) as it arrives, and hands
  out the tensors only once all of them are complete.

Errors are :class:`WireError` (a ``ValueError``: malformed input) or :class:`LimitError`
(declared sizes over a limit); the gateway maps them to INVALID_ARGUMENT and RESOURCE_EXHAUSTED.

Talks to nothing: pure functions over torch and the generated messages.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import torch

from shardopt.core.param_groups import group_options
from shardopt.core.proto import pb, tensors_pb

CHUNK_BYTES = 1 << 20
"""Bytes per TensorChunk sent (1 MiB)."""
MAX_CHUNK_BYTES = 4 << 20
"""The largest TensorChunk accepted (4 MiB), well under gRPC's receive limit."""
MESSAGE_LIMIT = 8 << 20
"""gRPC message size limit both ways (server and client): twice the largest chunk."""
MAX_DIMS = 32
MAX_VALUE_DEPTH = 32

DTYPES: dict[int, torch.dtype] = {
    tensors_pb.FLOAT32: torch.float32,
    tensors_pb.FLOAT64: torch.float64,
    tensors_pb.FLOAT16: torch.float16,
    tensors_pb.BFLOAT16: torch.bfloat16,
    tensors_pb.COMPLEX64: torch.complex64,
    tensors_pb.COMPLEX128: torch.complex128,
    tensors_pb.INT64: torch.int64,
    tensors_pb.INT32: torch.int32,
    tensors_pb.INT16: torch.int16,
    tensors_pb.INT8: torch.int8,
    tensors_pb.UINT8: torch.uint8,
    tensors_pb.BOOL: torch.bool,
}
WIRE_DTYPES = {dtype: code for code, dtype in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
    raise ImportError("shardopt's wire format is little-endian; this machine is not")


class WireError(ValueError):
    """A malformed message or stream: wrong order, offsets, sizes, dtypes or structure."""


class LimitError(WireError):
    """Declared sizes beyond what the receiver accepts (refused before allocating)."""


# ----- specs --------------------------------------------------------------------------------


def spec_of(tensor: torch.Tensor, name: str = "") -> Any:
    """The TensorSpec of a tensor."""
    if tensor.dtype not in WIRE_DTYPES:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent")
    return tensors_pb.TensorSpec(
        name=name, dtype=WIRE_DTYPES[tensor.dtype], shape=list(tensor.shape)
    )


def checked_spec(spec: Any, what: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """A spec's dtype, shape and byte count, checked (no allocation happens here).

    Raises:
        WireError: an unknown dtype, negative sizes or too many dimensions.
    """
    if spec.dtype not in DTYPES:
        raise WireError(f"{what}: unknown dtype {spec.dtype}")
    if len(spec.shape) > MAX_DIMS or any(d < 0 for d in spec.shape):
        raise WireError(f"{what}: invalid shape {list(spec.shape)}")
    dtype = DTYPES[spec.dtype]
    shape = tuple(int(d) for d in spec.shape)
    return dtype, shape, math.prod(shape) * dtype.itemsize


# ----- tensors ------------------------------------------------------------------------------


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensor_chunks(tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """Every tensor's bytes as TensorChunks, in order (an empty tensor sends no chunk)."""
    for index, tensor in enumerate(tensors):
        data = _as_bytes(tensor)
        for offset in range(0, len(data), chunk_bytes):
            yield tensors_pb.TensorChunk(
                index=index, offset=offset, data=bytes(data[offset : offset + chunk_bytes])
            )


class TensorReceiver:
    """Assembles the tensors of one stream from their specs and chunks, checking everything.

    Args:
        specs: the declared TensorSpecs.
        max_bytes: the most bytes all of them together may declare.
        expected: optional ``(dtype, shape)`` per tensor that the specs must match.
        what: how messages name the tensors ("gradient", "parameter", "state tensor").
        names: how messages name each tensor (optional).
        into: preallocated contiguous CPU tensors to receive into, one per spec (its dtype and
            shape are then what the spec must declare), or None for a tensor to allocate when
            its first chunk arrives (then ``expected`` says what it must be, if anything); by
            default each is allocated. A stream that fails part-way leaves them partly written.
        spans: whether a chunk may run on past the end of its tensor into the next ones (a
            stream the sender cut as one run of bytes: see
            :func:`shardopt.core.chunk_codec.spanning_chunks`); its bytes still may not run
            past the last declared tensor.

    Raises:
        LimitError: the specs declare more than ``max_bytes``.
        WireError: a spec that is malformed or differs from ``expected``.
    """

    def __init__(
        self,
        specs: list[Any],
        max_bytes: int,
        expected: list[tuple[torch.dtype, tuple[int, ...]]] | None = None,
        what: str = "tensor",
        names: list[str] | None = None,
        into: list[torch.Tensor] | None = None,
        spans: bool = False,
    ) -> None:
        self._spans = spans
        if into is not None:
            if len(into) != len(specs):
                raise WireError(f"{len(specs)} {what}s declared, {len(into)} expected")
            given = [t for t in into if t is not None]
            if any(t.device.type != "cpu" or not t.is_contiguous() for t in given):
                raise ValueError("a receiver's tensors must be contiguous CPU tensors")
            given = [None if t is None else (t.dtype, tuple(t.shape)) for t in into]
            if expected is not None and any(g not in (None, e) for g, e in zip(given, expected)):
                raise ValueError("a receiver's tensors must be what it expects")
            if expected is None and None not in given:
                expected = given
        if expected is not None and len(specs) != len(expected):
            raise WireError(f"{len(specs)} {what}s declared, {len(expected)} expected")
        checked, total = [], 0
        for i, spec in enumerate(specs):
            label = f"{what} {i}" + (f" ({names[i]!r})" if names else "")
            dtype, shape, nbytes = checked_spec(spec, label)
            if expected is not None and (dtype, shape) != expected[i]:
                want_dtype, want_shape = expected[i]
                raise WireError(
                    f"{label}: declared {str(dtype).removeprefix('torch.')} {list(shape)}, "
                    f"expected {str(want_dtype).removeprefix('torch.')} {list(want_shape)}"
                )
            total += nbytes
            if total > max_bytes:
                raise LimitError(
                    f"the {what}s declared so far need {total} bytes, over this server's "
                    f"limit of {max_bytes} bytes"
                )
            checked.append((dtype, shape, nbytes))
        self._checked = checked
        self.declared = total
        """The bytes the specs declare (what :meth:`add` may allocate in all)."""
        self._what = what
        self._names = names
        self._tensors: list[torch.Tensor | None] = list(into) if into else [None] * len(checked)
        self._target: memoryview | None = None  # the current tensor's bytes
        self._index = 0
        self._offset = 0
        self.bytes_received = 0

    def _advance_past_empty(self) -> None:
        while self._index < len(self._checked) and self._checked[self._index][2] == 0:
            self._tensor(self._index)
            self._index += 1
            self._offset = 0

    def _tensor(self, index: int) -> torch.Tensor:
        if self._tensors[index] is None:
            dtype, shape, _ = self._checked[index]
            self._tensors[index] = torch.empty(shape, dtype=dtype)
        return self._tensors[index]

    def add(self, chunk: Any) -> None:
        """Takes the next chunk.

        Raises:
            WireError: a chunk out of order, at the wrong offset, too large, or past the end.
        """
        self._advance_past_empty()
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise WireError(f"a chunk of {len(chunk.data)} bytes (at most {MAX_CHUNK_BYTES})")
        if self._index >= len(self._checked):
            raise WireError(f"a chunk after every declared {self._what} was complete")
        if chunk.index != self._index or chunk.offset != self._offset:
            raise WireError(
                f"chunk out of order: got {self._what} {chunk.index} at offset {chunk.offset}, "
                f"expected {self._what} {self._index} at offset {self._offset}"
            )
        nbytes = self._checked[self._index][2]
        n = len(chunk.data)
        fits = self._offset + n <= nbytes or (
            self._spans and self.bytes_received + n <= self.declared
        )
        if not n or not fits:
            raise WireError(
                f"{self._what} {self._index}: {n} bytes at offset {self._offset} "
                f"do not fit its {nbytes} bytes"
                + (" or the declared tensors after it" if self._spans else "")
            )
        data, done = chunk.data, 0
        while done < n:  # more than once only for a chunk that spans tensors
            if done:
                self._advance_past_empty()
                nbytes = self._checked[self._index][2]
            if self._offset == 0:
                tensor = self._tensor(self._index)
                self._target = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            take = min(n - done, nbytes - self._offset)
            # a plain memcpy: torch's copy would wake its thread pool for every chunk, whose
            # spinning threads take the CPU from the threads receiving the next chunks
            piece = data if take == n else memoryview(data)[done : done + take]
            self._target[self._offset : self._offset + take] = piece
            self._offset += take
            self.bytes_received += take
            done += take
            if self._offset == nbytes:
                self._index += 1
                self._offset = 0
                self._target = None

    @property
    def complete(self) -> bool:
        """Whether every declared byte has arrived (a stream that goes on after its tensors reads
        chunks until then)."""
        self._advance_past_empty()
        return self._index >= len(self._checked)

    def receive(self, messages: Iterator[Any]) -> list[torch.Tensor]:
        """Takes chunk messages (``kind`` ``chunk``) from ``messages`` until every tensor is
        complete, and no more, then :meth:`finish`.

        Raises:
            WireError: a message that is not a chunk, or the messages end first.
        """
        while not self.complete:
            message = next(messages, None)
            if message is None:
                break
            kind = message.WhichOneof("kind")
            if kind != "chunk":
                raise WireError(f"expected a chunk of a {self._what}, got a {kind}")
            self.add(message.chunk)
        return self.finish()

    def finish(self) -> list[torch.Tensor]:
        """The tensors, once every byte of every one of them has arrived.

        Raises:
            WireError: the stream ended early.
        """
        self._advance_past_empty()
        if self._index < len(self._checked):
            raise WireError(
                f"the stream ended at {self._what} {self._index} offset {self._offset}, before "
                f"all {len(self._checked)} declared {self._what}s were complete"
            )
        return [t for t in self._tensors if t is not None]


# ----- values -------------------------------------------------------------------------------


def encode_value(value: Any, tensors: list[torch.Tensor] | None = None) -> Any:
    """A Python value as a ``Value``; tensors are appended to ``tensors`` and referenced.

    Raises:
        TypeError: a value of another type, or a tensor where ``tensors`` is None.
    """
    out = tensors_pb.Value()
    if value is None:
        out.none = True
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.float_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, torch.Tensor):
        if tensors is None:
            raise TypeError("tensors cannot be sent here (hyperparameters must be plain values)")
        out.tensor_index = len(tensors)
        tensors.append(value)
    elif isinstance(value, (list, tuple)):
        target = out.tuple_value if isinstance(value, tuple) else out.list_value
        target.SetInParent()
        for item in value:
            target.items.append(encode_value(item, tensors))
    elif isinstance(value, dict):
        out.map_value.SetInParent()
        for key, item in value.items():
            entry = out.map_value.entries.add()
            entry.key.CopyFrom(encode_value(key))
            entry.value.CopyFrom(encode_value(item, tensors))
    else:
        raise TypeError(f"values of type {type(value).__name__} cannot be sent")
    return out


def decode_value(value: Any, tensors: list[torch.Tensor] | None = None, depth: int = 0) -> Any:
    """The Python value of a ``Value`` (tensor references resolved from ``tensors``).

    Raises:
        WireError: an empty value, a reference to a missing tensor, or nesting too deep.
    """
    if depth > MAX_VALUE_DEPTH:
        raise WireError(f"values nested deeper than {MAX_VALUE_DEPTH}")
    kind = value.WhichOneof("kind")
    if kind is None:
        raise WireError("a value with no kind set")
    if kind == "none":
        return None
    if kind in ("bool_value", "int_value", "float_value", "string_value"):
        return getattr(value, kind)
    if kind == "tensor_index":
        if tensors is None or value.tensor_index >= len(tensors):
            raise WireError(f"a reference to tensor {value.tensor_index}, which was not declared")
        return tensors[value.tensor_index]
    if kind in ("list_value", "tuple_value"):
        items = [decode_value(v, tensors, depth + 1) for v in getattr(value, kind).items]
        return tuple(items) if kind == "tuple_value" else items
    result = {}
    for entry in value.map_value.entries:
        key = decode_value(entry.key, None, depth + 1)
        if isinstance(key, (list, dict)):
            raise WireError("dict keys must be plain values")
        result[key] = decode_value(entry.value, tensors, depth + 1)
    return result


def encode_options(options: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as a ``map<string, Value>`` (plain values only)."""
    return {str(k): encode_value(v) for k, v in options.items()}


def encode_groups(groups: list[dict[str, Any]], with_ids: bool = True) -> list[Any]:
    """Param groups as ``ParamGroup`` messages: their options and (``with_ids``) the global ids
    of their parameters, which are consecutive in ``param_groups`` order."""
    encoded, start = [], 0
    for group in groups:
        count = len(group["params"])
        ids = list(range(start, start + count)) if with_ids else []
        encoded.append(pb.ParamGroup(params=ids, options=encode_options(group_options(group))))
        start += count
    return encoded


def decode_options(options: Any) -> dict[str, Any]:
    return {k: decode_value(v) for k, v in options.items()}
