"""shardopt.core.wire: values and chunked tensors, and the receiver's checks (no gRPC here)."""

from __future__ import annotations

import pytest
import torch

from shardopt.client.gateway_session import assign
from shardopt.core import chunk_codec, wire
from shardopt.core.proto import tensors_pb

ALL_DTYPES = list(wire.WIRE_DTYPES)


def roundtrip(tensors, chunk_bytes=wire.CHUNK_BYTES, max_bytes=1 << 30):
    receiver = wire.TensorReceiver([wire.spec_of(t) for t in tensors], max_bytes)
    for chunk in wire.tensor_chunks(tensors, chunk_bytes):
        receiver.add(chunk)
    return receiver.finish()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_roundtrips_bit_exactly(dtype):
    source = torch.randn(5, 7, dtype=torch.float64) * 100
    tensor = (source > 0) if dtype == torch.bool else source.to(dtype)
    (back,) = roundtrip([tensor], chunk_bytes=16)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_empty_scalar_and_non_contiguous_tensors():
    tensors = [torch.zeros(0, 3), torch.tensor(2.5), torch.arange(12.0).reshape(3, 4).t()]
    back = roundtrip(tensors, chunk_bytes=5)
    for got, want in zip(back, tensors):
        assert torch.equal(got, want)


def test_values_roundtrip_with_types_kept():
    tensors: list[torch.Tensor] = []
    value = {
        "state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2)}, 7: {}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "amsgrad": False,
                          "params": [0, 7], "name": "head", "big": 2**62}],
    }  # fmt: skip
    encoded = wire.encode_value(value, tensors)
    decoded = wire.decode_value(tensors_pb.Value.FromString(encoded.SerializeToString()), tensors)
    assert decoded["param_groups"] == value["param_groups"]
    assert isinstance(decoded["param_groups"][0]["betas"], tuple)
    assert list(decoded["state"]) == [0, 7]
    assert torch.equal(decoded["state"][0]["buf"], torch.ones(2))


def test_unsupported_values_are_refused():
    with pytest.raises(TypeError, match="plain values"):
        wire.encode_value(torch.ones(1))
    with pytest.raises(TypeError, match="object"):
        wire.encode_value(object())
    with pytest.raises(wire.WireError, match="not declared"):
        wire.decode_value(tensors_pb.Value(tensor_index=3), [])
    with pytest.raises(wire.WireError, match="no kind"):
        wire.decode_value(tensors_pb.Value())


def test_limits_are_checked_before_anything_is_allocated():
    huge = tensors_pb.TensorSpec(dtype=tensors_pb.FLOAT64, shape=[1 << 40, 1 << 10])
    with pytest.raises(wire.LimitError, match="limit"):
        wire.TensorReceiver([huge], 1 << 30)
    for bad in (
        tensors_pb.TensorSpec(dtype=0, shape=[2]),
        tensors_pb.TensorSpec(dtype=tensors_pb.FLOAT32, shape=[-1]),
        tensors_pb.TensorSpec(dtype=tensors_pb.FLOAT32, shape=[1] * 40),
    ):
        with pytest.raises(wire.WireError):
            wire.TensorReceiver([bad], 1 << 30)


def test_chunks_must_come_in_order_and_fill_exactly():
    specs = [wire.spec_of(torch.zeros(4)), wire.spec_of(torch.zeros(2))]
    receiver = wire.TensorReceiver(specs, 1 << 20)
    with pytest.raises(wire.WireError, match="out of order"):
        receiver.add(tensors_pb.TensorChunk(index=1, offset=0, data=b"\0" * 8))
    receiver.add(tensors_pb.TensorChunk(index=0, offset=0, data=b"\0" * 8))
    with pytest.raises(wire.WireError, match="out of order"):
        receiver.add(tensors_pb.TensorChunk(index=0, offset=4, data=b"\0" * 8))
    with pytest.raises(wire.WireError, match="do not fit"):
        receiver.add(tensors_pb.TensorChunk(index=0, offset=8, data=b"\0" * 12))
    with pytest.raises(wire.WireError, match="ended"):
        receiver.finish()
    receiver.add(tensors_pb.TensorChunk(index=0, offset=8, data=b"\0" * 8))
    receiver.add(tensors_pb.TensorChunk(index=1, offset=0, data=b"\0" * 8))
    with pytest.raises(wire.WireError, match="after every"):
        receiver.add(tensors_pb.TensorChunk(index=2, offset=0, data=b"\0"))
    assert [t.numel() for t in receiver.finish()] == [4, 2]


def test_expected_specs_must_match():
    expected = [(torch.float32, (2, 3))]
    with pytest.raises(wire.WireError, match=r"declared float64 \[2, 3\], expected float32"):
        wire.TensorReceiver([wire.spec_of(torch.zeros(2, 3, dtype=torch.float64))], 1 << 20,
                            expected=expected)  # fmt: skip
    with pytest.raises(wire.WireError, match="2 tensors declared, 1 expected"):
        wire.TensorReceiver([wire.spec_of(torch.zeros(2, 3))] * 2, 1 << 20, expected=expected)


# ----- the chunk codec: protobuf's wire format without protobuf's copies ----------------------


def test_encoded_chunks_are_protobufs_messages_and_read_back_without_copies():
    from shardopt.core import chunk_codec
    from shardopt.core.proto import pb

    tensors = [torch.arange(10.0), torch.zeros(0), torch.tensor(7, dtype=torch.int64)]
    encoded = list(chunk_codec.encoded_chunks(tensors, chunk_bytes=16))
    plain = [pb.PushGradientsRequest(chunk=c) for c in wire.tensor_chunks(tensors, 16)]
    assert [pb.PushGradientsRequest.FromString(e) for e in encoded] == plain
    for data, message in zip(encoded, plain):
        fast = chunk_codec.read_chunk(data)
        assert fast.WhichOneof("kind") == "chunk"
        assert (fast.chunk.index, fast.chunk.offset) == (message.chunk.index, message.chunk.offset)
        assert bytes(fast.chunk.data) == message.chunk.data
        assert fast.chunk.data.obj is data  # a view into the received bytes
    receiver = wire.TensorReceiver([wire.spec_of(t) for t in tensors], 1 << 20)
    for data in encoded:
        receiver.add(chunk_codec.read_chunk(data).chunk)
    for got, want in zip(receiver.finish(), tensors):
        assert torch.equal(got, want)


def test_spanning_chunks_take_as_many_messages_as_the_bytes_need():
    """A stream cut as one run of bytes: each chunk starts where the last ended, in whichever
    tensor that is (empty ones skipped), and runs on into the next ones; only a receiver that
    accepts spanning chunks takes them, and never past the last declared tensor."""
    from shardopt.core.proto import pb

    tensors = [torch.arange(5.0), torch.zeros(0), torch.ones(2, dtype=torch.float64),
               torch.tensor(7, dtype=torch.int32), torch.arange(9.0)]  # fmt: skip
    total = sum(t.numel() * t.element_size() for t in tensors)  # 20 + 16 + 4 + 36 bytes
    specs = [wire.spec_of(t) for t in tensors]
    for chunk_bytes in (1, 8, 12, 36, total, 1 << 20):
        encoded = list(chunk_codec.spanning_chunks(tensors, chunk_bytes))
        assert len(encoded) == -(-total // chunk_bytes)
        receiver = wire.TensorReceiver(specs, total, spans=True)
        for data in encoded:
            fast = chunk_codec.read_chunk(data)
            plain = pb.PullParametersReply.FromString(data).chunk  # protobuf reads the same
            assert (fast.chunk.index, fast.chunk.offset, bytes(fast.chunk.data)) == (
                plain.index, plain.offset, plain.data,
            )  # fmt: skip
            receiver.add(fast.chunk)
        assert all(torch.equal(a, b) for a, b in zip(receiver.finish(), tensors))
    first, second = [
        chunk_codec.read_chunk(d).chunk for d in chunk_codec.spanning_chunks(tensors, 24)
    ][:2]
    assert (first.index, first.offset, second.index, second.offset) == (0, 0, 2, 4)
    with pytest.raises(wire.WireError, match="do not fit its 20 bytes$"):  # not without spans
        wire.TensorReceiver(specs, total).add(first)
    receiver = wire.TensorReceiver(specs[:2], 20, spans=True)  # past the last tensor
    with pytest.raises(wire.WireError, match="or the declared tensors after it"):
        receiver.add(first)
    receiver = wire.TensorReceiver(specs, total, spans=True)
    with pytest.raises(wire.WireError, match="out of order"):
        receiver.add(second)
    assert chunk_codec.asks_spanning([("authorization", "x"), *chunk_codec.SPANNING])
    assert not chunk_codec.asks_spanning([("shardopt-chunks", "other")])
    assert list(chunk_codec.spanning_chunks([torch.zeros(0)])) == []


def test_unusual_or_malformed_messages_go_to_protobuf():
    """Valid encodings the fast path does not take (repeated or unknown fields, headers) parse as
    protobuf parses them; truncated ones are refused as protobuf refuses them."""
    from google.protobuf.message import DecodeError

    from shardopt.core import chunk_codec
    from shardopt.core.proto import pb

    parse = chunk_codec.parser(pb.PushGradientsRequest, lambda err: ("malformed", err))
    header = pb.PushGradientsRequest(header=pb.PushGradientsHeader(session_id="s", params=[1]))
    first = pb.PushGradientsRequest(chunk=tensors_pb.TensorChunk(index=1, data=b"ab"))
    twice = first.SerializeToString() + b"\x12\x02\x10\x03"  # a second chunk: offset 3
    for data in (header.SerializeToString(), twice, b"\x12\x04\x08\x01\x28\x05"):
        assert chunk_codec.read_chunk(data) is None
        assert parse(data) == pb.PushGradientsRequest.FromString(data)
    for data in (b"\x12\x05\x1a\x09abc", b"\x12", b"\x12\xff\xff", b"\x0a\x05ab"):
        assert chunk_codec.read_chunk(data) is None
        with pytest.raises(DecodeError):
            pb.PushGradientsRequest.FromString(data)
        assert parse(data)[0] == "malformed"


def test_receiving_into_given_tensors():
    source = [torch.randn(3, 4), torch.arange(5, dtype=torch.int32)]
    into = [torch.empty(3, 4), torch.empty(5, dtype=torch.int32)]
    receiver = wire.TensorReceiver([wire.spec_of(t) for t in source], 1 << 20, into=into)
    for chunk in wire.tensor_chunks(source, 7):
        receiver.add(chunk)
    assert all(a is b for a, b in zip(receiver.finish(), into))
    assert all(torch.equal(a, b) for a, b in zip(into, source))
    with pytest.raises(wire.WireError, match="expected float32"):
        wire.TensorReceiver([wire.spec_of(torch.zeros(3, 4, dtype=torch.float64))], 1 << 20,
                            into=into[:1])  # fmt: skip


def test_receiving_into_some_given_tensors_allocates_the_others():
    source = [torch.randn(3, 4), torch.arange(5, dtype=torch.int32), torch.ones(2)]
    given = torch.empty(5, dtype=torch.int32)
    specs = [wire.spec_of(t) for t in source]
    receiver = wire.TensorReceiver(specs, 1 << 20, into=[None, given, None])
    for chunk in wire.tensor_chunks(source, 7):
        receiver.add(chunk)
    got = receiver.finish()
    assert got[1] is given and all(torch.equal(a, b) for a, b in zip(got, source))
    expected = [(t.dtype, tuple(t.shape)) for t in source]
    with pytest.raises(ValueError, match="what it expects"):
        wire.TensorReceiver(specs, 1 << 20, expected=expected, into=[None, torch.empty(5), None])
    with pytest.raises(wire.WireError, match="3 tensors declared, 2 expected"):
        wire.TensorReceiver(specs, 1 << 20, into=[None, given])


def test_copy_bytes_is_a_plain_copy_where_the_tensors_allow_it():
    src = torch.randn(4, 3).to(torch.bfloat16)
    dst = torch.empty(4, 3, dtype=torch.bfloat16)
    chunk_codec.copy_bytes(dst, src)
    assert torch.equal(dst, src)
    for bad in (torch.empty(3, 4, dtype=torch.bfloat16), torch.empty(4, 3)):
        assert not chunk_codec.copies_bytes(bad, src)
        with pytest.raises(ValueError, match="contiguous CPU tensors"):
            chunk_codec.copy_bytes(bad, src)
    assert not chunk_codec.copies_bytes(torch.empty(3, 4).t(), torch.empty(4, 3))
    assert not chunk_codec.copies_bytes(torch.empty(2, dtype=torch.cfloat),
                                        torch.ones(2, dtype=torch.cfloat).conj())  # fmt: skip
    # a user's parameter: the write is one autograd sees, as copy_'s
    param = torch.nn.Parameter(torch.zeros(3))
    version = param._version
    with torch.no_grad():  # as the client pulls
        assign(param, torch.arange(3.0))
        assert torch.equal(param.detach(), torch.arange(3.0)) and param._version > version
        assign(param, torch.arange(6.0)[::2])  # strided: torch's copy
    assert torch.equal(param.detach(), torch.tensor([0.0, 2.0, 4.0]))
