"""The service's streamed messages, encoded and decoded without protobuf's copies of tensor bytes.

Every stream of ``protos/shardopt/v1/optimizer.proto`` that carries tensors is made of messages
``oneof kind { <header> = 1; TensorChunk chunk = 2; ... }``. Protobuf's Python runtime copies a
chunk's bytes several times on each side (into the message, out of it as ``bytes``, into the
serialized string). This module writes and reads the chunk messages of those streams straight
from and into tensor memory, in protobuf's own wire format (other clients see ordinary
messages):

- :func:`encoded_chunks`: a list of tensors as serialized chunk messages, one copy of their
  bytes (from the tensor into the message);
- :func:`parser`: a deserializer that reads a chunk message as a :class:`ChunkMessage` whose
  ``chunk.data`` is a view into the received bytes (no copy), and leaves any other message
  (headers, or a chunk written in an unusual but valid form) to protobuf;
- :func:`spanning_chunks`: the same bytes cut as one run across tensors (as few messages as the
  bytes need), for a receiver that asked for them (:data:`SPANNING`);
- :func:`serialize`: the serializer of both sides, which passes pre-encoded bytes through;
- :func:`receive_parameters`: a PullParameters stream received into given tensors;
- :func:`copy_bytes`: a tensor copied into another by one plain memcpy (:func:`copy_fast`:
  that where the tensors allow it, torch's ``copy_`` else) (the gateway's
  snapshots for pulls).

:class:`shardopt.core.wire.TensorReceiver` then copies each view into its tensor: one copy on
the receiving side, where protobuf made four.

Talks to nothing: pure functions over bytes, torch and the generated messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from shardopt.core import wire
from shardopt.core.wire import CHUNK_BYTES

CHUNK_FIELD = 2
"""The field number of ``chunk`` in every streamed message of the service."""
_CHUNK_TAG = bytes([CHUNK_FIELD << 3 | 2])
_INDEX_TAG, _OFFSET_TAG, _DATA_TAG = b"\x08", b"\x10", b"\x1a"
_UINT32, _UINT64 = 1 << 32, 1 << 64


class ChunkView:
    """A ``TensorChunk`` whose ``data`` is a read-only view into the message it came in."""

    __slots__ = ("data", "index", "offset")

    def __init__(self, index: int, offset: int, data: memoryview) -> None:
        self.index = index
        self.offset = offset
        self.data = data


class ChunkMessage:
    """A streamed message whose ``kind`` is ``chunk``, read without copying its bytes."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: ChunkView) -> None:
        self.chunk = chunk

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's name
        return "chunk"


# ----- varints ------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """The varint at ``pos`` and the position after it; None if malformed or cut."""
    value, shift = 0, 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return None


# ----- encoding -----------------------------------------------------------------------------


def encode_chunk(index: int, offset: int, data: memoryview | bytes) -> bytes:
    """One serialized ``{chunk: {index, offset, data}}`` message (one copy of ``data``)."""
    return _encoded(index, offset, (data,), len(data))


def _encoded(index: int, offset: int, pieces: tuple | list, size: int) -> bytes:
    """A chunk message whose ``data`` is ``pieces`` one after the other (``size`` bytes)."""
    inner = bytearray()
    if index:
        inner += _INDEX_TAG + _varint(index)
    if offset:
        inner += _OFFSET_TAG + _varint(offset)
    inner += _DATA_TAG + _varint(size)
    head = _CHUNK_TAG + _varint(len(inner) + size) + bytes(inner)
    return b"".join((head, *pieces))


def _byte_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def copies_bytes(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether :func:`copy_bytes` can copy ``src`` into ``dst``: one dtype and shape, both
    contiguous on the CPU, and ``src`` no conjugate or negative view."""
    return (
        dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
        and dst.device.type == "cpu"
        and src.device.type == "cpu"
        and not src.is_conj()
        and not src.is_neg()
    )


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies ``src`` into ``dst`` as one plain memcpy. Torch's ``copy_`` hands large copies to
    its thread pool, whose threads wait for each other: on a busy machine that costs several
    times the copy. No autograd version counter sees this write (see
    ``torch.autograd.graph.increment_version`` for a user's tensor).

    Raises:
        ValueError: tensors :func:`copies_bytes` refuses.
    """
    if not copies_bytes(dst, src):
        raise ValueError("copy_bytes copies between contiguous CPU tensors of one dtype and shape")
    if dst.numel():
        memoryview(dst.detach().view(-1).view(torch.uint8).numpy())[:] = _byte_view(src)


def copy_fast(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Copies ``src`` into ``dst``: by :func:`copy_bytes` where :func:`copies_bytes` allows,
    else by torch's ``copy_``. Returns whether it was the memcpy, which no autograd version
    counter sees (``copy_`` bumps ``dst``'s)."""
    if copies_bytes(dst, src):
        copy_bytes(dst, src)
        return True
    dst.copy_(src)
    return False


def tensor_chunks(
    index: int, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Tensor ``index`` of a stream as serialized chunk messages, each encoded as it is asked
    for (so one chunk's bytes exist at a time)."""
    data = _byte_view(tensor)
    for offset in range(0, len(data), chunk_bytes):
        yield encode_chunk(index, offset, data[offset : offset + chunk_bytes])


def encoded_chunks(tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Every tensor's bytes as serialized chunk messages, in order (an empty tensor sends none).

    The same messages as ``{chunk: wire.tensor_chunks(tensors)}`` of any streamed message type.
    """
    for index, tensor in enumerate(tensors):
        yield from tensor_chunks(index, tensor, chunk_bytes)


def spanning_chunks(tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Every tensor's bytes as one run, cut into chunk messages of ``chunk_bytes`` (the last
    one shorter), each encoded as it is asked for.

    A chunk names the tensor and offset where its bytes start and may run on into the next
    tensors (empty ones are skipped), so a stream of many small tensors takes as many messages
    as its bytes need, not one per tensor at least. Only a receiver that accepts such chunks
    (``TensorReceiver(spans=True)``) reads them: a sender uses them where the receiver said it
    does (:data:`SPANNING`).
    """
    views = [(i, v) for i, v in ((i, _byte_view(t)) for i, t in enumerate(tensors)) if len(v)]
    pieces: list[memoryview] = []
    start: tuple[int, int] | None = None
    size = 0
    for index, view in views:
        pos = 0
        while pos < len(view):
            take = min(len(view) - pos, chunk_bytes - size)
            if start is None:
                start = (index, pos)
            pieces.append(view[pos : pos + take])
            size += take
            pos += take
            if size == chunk_bytes:
                yield _encoded(*start, pieces, size)
                pieces, start, size = [], None, 0
    if start is not None:
        yield _encoded(*start, pieces, size)


SPANNING = (("shardopt-chunks", "span"),)
"""Metadata that says "chunks may span tensors". A client sends it with ``PullParameters``
when it accepts such chunks in the answers: the gateway then sends :func:`spanning_chunks` and
the same metadata back (initial metadata: "my pushes take them too"); a client that heard it
sends it with ``PushGradients`` whose chunks span. Any other client sends and gets one tensor's
bytes per chunk."""


def asks_spanning(metadata: Any) -> bool:
    """Whether a call's metadata carries :data:`SPANNING`."""
    key, value = SPANNING[0]
    return any(k == key and v == value for k, v in metadata or ())


def answer_chunks(context: Any) -> Callable[[list[torch.Tensor]], Iterator[bytes]]:
    """How a server cuts the tensors of its answers to the call of ``context`` (a
    ``grpc.ServicerContext``, before its first answer): :func:`spanning_chunks` where the client
    asked for them, telling it so (:data:`SPANNING` as initial metadata), else
    :func:`encoded_chunks`."""
    if not asks_spanning(context.invocation_metadata()):
        return encoded_chunks
    context.send_initial_metadata(SPANNING)
    return spanning_chunks


def serialize(message: Any) -> bytes:
    """A message's bytes: pre-encoded chunks as they are, anything else by protobuf."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# ----- decoding -----------------------------------------------------------------------------


def receive_parameters(answers: Iterator[Any], into: list[torch.Tensor]) -> list[torch.Tensor]:
    """Receives a PullParameters stream (its header, then its chunks) into ``into``, whose
    dtypes and shapes the header must declare. Its chunks may span tensors (a client asks for
    them with :data:`SPANNING`; a gateway that does not know it sends one tensor's bytes per
    chunk, which are taken too).

    Raises:
        WireError: a header or chunks that do not match ``into`` (what was received may be
            partly written into ``into``).
    """
    first = next(answers)
    if first.WhichOneof("kind") != "header":
        raise wire.WireError("a PullParameters stream must start with its header")
    nbytes = sum(t.numel() * t.element_size() for t in into)
    specs = list(first.header.params)
    receiver = wire.TensorReceiver(specs, nbytes, what="parameter", into=into, spans=True)
    for answer in answers:
        receiver.add(answer.chunk)
    return receiver.finish()


def read_chunk(data: bytes) -> ChunkMessage | None:
    """``data`` as a chunk message without copying its bytes, or None where it is anything
    else: a header, a malformed message, or a chunk with unknown or repeated fields (which
    protobuf then reads, or refuses)."""
    view = memoryview(data)
    end = len(view)
    if end < 2 or view[0] != _CHUNK_TAG[0]:
        return None
    read = _read_varint(view, 1, end)
    if read is None or read[1] + read[0] != end:
        return None
    pos = read[1]
    index = offset = 0
    payload: memoryview | None = None
    seen = 0
    while pos < end:
        read = _read_varint(view, pos, end)
        if read is None:
            return None
        key, pos = read
        field, wire_type = key >> 3, key & 7
        bit = 1 << field if field < 4 else 0
        if not bit or seen & bit:
            return None
        seen |= bit
        if field == 3 and wire_type == 2:
            read = _read_varint(view, pos, end)
            if read is None or read[1] + read[0] > end:
                return None
            payload = view[read[1] : read[1] + read[0]]
            pos = read[1] + read[0]
        elif field in (1, 2) and wire_type == 0:
            read = _read_varint(view, pos, end)
            if read is None or read[0] >= (_UINT32 if field == 1 else _UINT64):
                return None
            if field == 1:
                index = read[0]
            else:
                offset = read[0]
            pos = read[1]
        else:
            return None
    return ChunkMessage(ChunkView(index, offset, payload if payload is not None else view[0:0]))


def parser(message_class: Any, on_error: Callable[[Exception], Any]) -> Callable[[bytes], Any]:
    """A deserializer for a streamed message type: chunks by :func:`read_chunk`, the rest by
    protobuf; what protobuf cannot parse becomes ``on_error(exception)``."""
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        fast = read_chunk(data)
        if fast is not None:
            return fast
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as err:
            return on_error(err)

    return parse


def carries_chunks(message_class: Any) -> bool:
    """Whether a message type is one of the service's streamed ones (``chunk = 2`` in a
    oneof ``kind``)."""
    descriptor = message_class.DESCRIPTOR
    field = descriptor.fields_by_number.get(CHUNK_FIELD)
    return (
        field is not None
        and field.name == "chunk"
        and field.containing_oneof is not None
        and field.containing_oneof.name == "kind"
    )


def stub(channel: Any) -> Any:
    """The service's stub on ``channel``, its streamed methods sending pre-encoded chunks and
    reading chunks without copies (the other methods as generated)."""
    from shardopt.core.proto import pb, rpc

    def refuse(err: Exception) -> Any:
        raise ValueError(f"malformed message from the gateway: {err}")

    service = pb.DESCRIPTOR.services_by_name["OptimizerService"]
    result = rpc.OptimizerServiceStub(channel)
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        if not (carries_chunks(request_class) or carries_chunks(response_class)):
            continue
        make = {
            (True, False): channel.stream_unary,
            (False, True): channel.unary_stream,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        callable_ = make(
            f"/{service.full_name}/{method.name}",
            request_serializer=serialize,
            response_deserializer=parser(response_class, refuse),
        )
        setattr(result, method.name, callable_)
    return result
