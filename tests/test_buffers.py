"""Unit tests of shardopt.core.buffers: flat layouts, leaf tensors bound into them, packed trees.

Pure torch/numpy; no Ray. Every check is exact (bytes in, the same bytes out).
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
from helpers import assert_same

from shardopt.core.buffers import (
    ALIGNMENT,
    FlatLayout,
    PackedTree,
    TensorSlot,
    pack_tree,
    readonly_tensor,
    to_numpy,
    unpack_tree,
)

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` whose values differ from element to element."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.arange(n) % 3 == 0).reshape(shape)
    if dtype.is_complex:
        real = torch.randn(n, dtype=torch.float64)
        return torch.complex(real, -real * 0.5).to(dtype).reshape(shape)
    if dtype.is_floating_point:
        return torch.randn(n, dtype=torch.float64).to(dtype).reshape(shape)
    return (torch.arange(n) * 37 % 101 - 50).to(dtype).reshape(shape)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ----- FlatLayout ---------------------------------------------------------------------------


def test_offsets_are_aligned_and_regions_do_not_overlap():
    specs = [
        ((3,), torch.float32),
        ((), torch.float64),
        ((5, 7), torch.bfloat16),
        ((1,), torch.bool),
    ]
    specs += [((0,), torch.float32), ((2, 3), torch.complex64), ((17,), torch.int8)]
    layout = FlatLayout.for_specs(specs)

    assert len(layout) == len(specs)
    assert layout.shapes == tuple(s for s, _ in specs)
    assert layout.dtypes == tuple(d for _, d in specs)
    assert all(o % ALIGNMENT == 0 for o in layout.offsets)
    assert layout.nbytes % ALIGNMENT == 0
    for i in range(len(layout)):
        end = layout.offsets[i] + layout.tensor_nbytes(i)
        limit = layout.offsets[i + 1] if i + 1 < len(layout) else layout.nbytes
        assert end <= limit
    assert layout.offsets[:3] == (0, 64, 128)
    assert layout.tensor_nbytes(2) == 5 * 7 * 2


def test_empty_layout_has_no_bytes():
    layout = FlatLayout.for_specs([])
    assert len(layout) == 0
    assert layout.nbytes == 0
    assert layout.empty().shape == (0,)
    assert layout.pack([]).numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_and_view_round_trip_every_dtype(dtype):
    tensors = [sample((3, 5), dtype), sample((), dtype), sample((0, 4), dtype), sample((7,), dtype)]
    layout = FlatLayout.for_tensors(tensors)
    flat = layout.pack(tensors)

    assert flat.dtype == torch.uint8 and flat.shape == (layout.nbytes,)
    for i, t in enumerate(tensors):
        view = layout.view(flat, i)
        assert_same(view, t, bitwise=True)
        if t.numel():
            assert shares_memory(view, flat)


def test_round_trip_through_numpy_and_readonly_tensor():
    tensors = [sample((4, 3), d) for d in DTYPES]
    layout = FlatLayout.for_tensors(tensors)
    array = to_numpy(layout.pack(tensors)).copy()
    array.setflags(write=False)  # as Ray's object store hands it out

    flat = readonly_tensor(array)
    assert flat.dtype == torch.uint8
    for i, t in enumerate(tensors):
        assert_same(layout.view(flat, i), t, bitwise=True)


def test_readonly_tensor_does_not_warn_and_shares_memory():
    array = np.arange(8, dtype=np.uint8)
    array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = readonly_tensor(array)
    assert tensor.data_ptr() == array.ctypes.data
    assert tensor.tolist() == list(range(8))


def test_to_numpy_shares_memory_with_the_buffer():
    flat = torch.zeros(64, dtype=torch.uint8)
    array = to_numpy(flat)
    flat[3] = 9
    assert array[3] == 9


def test_pack_accepts_non_contiguous_inputs():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = [
        base.t(),  # transposed
        base[:, ::3],  # strided columns
        base[1:4, 2:5],  # a window with an offset into its storage
        torch.tensor(2.5).expand(3, 4),  # zero strides
        torch.randn(4, 4, dtype=torch.complex64).conj(),  # lazy conjugate bit
    ]
    assert not any(t.is_contiguous() and t.storage_offset() == 0 for t in tensors[:4])
    layout = FlatLayout.for_tensors(tensors)
    flat = layout.pack(tensors)
    for i, t in enumerate(tensors):
        assert torch.equal(layout.view(flat, i), t.resolve_conj())
        assert layout.view(flat, i).is_contiguous()


def test_pack_none_leaves_bytes_and_writes_into_out():
    tensors = [torch.ones(3), torch.full((2,), 7.0)]
    layout = FlatLayout.for_tensors(tensors)
    out = torch.zeros(layout.nbytes, dtype=torch.uint8)
    result = layout.pack([None, tensors[1]], out=out)

    assert result is out
    assert torch.equal(layout.view(out, 0), torch.zeros(3))
    assert torch.equal(layout.view(out, 1), tensors[1])


def test_pack_detaches_tensors_that_require_grad():
    param = torch.nn.Parameter(torch.randn(5))
    layout = FlatLayout.for_tensors([param])
    flat = layout.pack([param])
    assert not flat.requires_grad
    assert torch.equal(layout.view(flat, 0), param.detach())


def test_extended_keeps_old_offsets_and_aligns_new_ones():
    old = FlatLayout.for_specs([((3,), torch.float32), ((5,), torch.bfloat16)])
    new = old.extended([((2, 2), torch.float64), ((), torch.bool), ((9,), torch.int8)])

    assert new.offsets[: len(old)] == old.offsets
    assert new.shapes[: len(old)] == old.shapes
    assert new.dtypes[: len(old)] == old.dtypes
    assert len(new) == 5
    assert new.offsets[2] == old.nbytes
    assert all(o % ALIGNMENT == 0 for o in new.offsets)
    assert new.nbytes % ALIGNMENT == 0 and new.nbytes >= new.offsets[-1] + 9

    # Extending by nothing is the same layout; extending an empty layout is for_specs.
    assert old.extended([]) == old
    specs = [((4,), torch.float16)]
    assert FlatLayout.for_specs([]).extended(specs) == FlatLayout.for_specs(specs)


def test_old_bytes_copied_into_an_extended_buffer_keep_their_values():
    tensors = [sample((3, 3), torch.float32), sample((5,), torch.int64)]
    old = FlatLayout.for_tensors(tensors)
    old_flat = old.pack(tensors)
    new = old.extended([((4,), torch.float64)])
    new_flat = new.empty()
    new_flat[: old.nbytes].copy_(old_flat)
    for i, t in enumerate(tensors):
        assert torch.equal(new.view(new_flat, i), t)


# ----- bind / rebind ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bind_gives_a_leaf_sharing_the_flat_storage(dtype):
    tensors = [sample((3,), torch.int8), sample((2, 3), dtype), sample((), dtype)]
    layout = FlatLayout.for_tensors(tensors)
    flat = layout.pack(tensors)

    for i in (1, 2):
        bound = layout.bind(flat, i)
        assert bound.is_leaf and bound._base is None  # a tensor of its own, not a view
        assert bound.dtype == dtype and bound.shape == tensors[i].shape
        assert bound.is_contiguous()
        assert shares_memory(bound, flat)
        assert bound.data_ptr() == flat.data_ptr() + layout.offsets[i]
        assert_same(bound, tensors[i], bitwise=True)

    # Writes go both ways.
    bound = layout.bind(flat, 1)
    layout.view(flat, 1).copy_(sample((2, 3), dtype).flip(-1))
    assert torch.equal(bound, layout.view(flat, 1))
    replacement = sample((2, 3), dtype).flip(0)
    bound.copy_(replacement)
    assert torch.equal(layout.view(flat, 1), replacement)


def test_bind_respects_the_storage_offset_of_the_flat_buffer():
    # ``view`` reads tensor i's bytes at flat.storage_offset() + offsets[i]; ``bind`` must bind
    # the same bytes, or a layout packed into the tail of a bigger buffer binds the wrong ones.
    layout = FlatLayout.for_specs([((4,), torch.float32)])
    big = torch.zeros(layout.nbytes + ALIGNMENT, dtype=torch.uint8)
    flat = big[ALIGNMENT:]
    layout.view(flat, 0).fill_(1.0)

    bound = layout.bind(flat, 0)
    assert torch.equal(bound, layout.view(flat, 0))
    assert bound.data_ptr() == layout.view(flat, 0).data_ptr()


def test_rebind_moves_a_tensor_into_a_bigger_buffer_keeping_its_identity():
    tensors = [sample((4,), torch.float32), sample((2, 2), torch.float64)]
    layout = FlatLayout.for_tensors(tensors)
    flat = layout.pack(tensors)
    bound = [layout.bind(flat, i) for i in range(len(layout))]
    ids = [id(t) for t in bound]
    state = {t: f"state of {i}" for i, t in enumerate(bound)}  # keyed by identity, as torch.optim

    bigger = layout.extended([((3,), torch.bfloat16), ((), torch.int64)])
    new_flat = bigger.empty()
    new_flat[: layout.nbytes].copy_(flat)
    moved = [bigger.rebind(t, new_flat, i) for i, t in enumerate(bound)]

    assert [id(t) for t in moved] == ids
    assert all(m is b for m, b in zip(moved, bound))
    assert [state[t] for t in bound] == ["state of 0", "state of 1"]
    for i, t in enumerate(bound):
        assert t.is_leaf
        assert shares_memory(t, new_flat) and not shares_memory(t, flat)
        assert torch.equal(t, tensors[i])
    flat.zero_()  # the old buffer no longer backs them
    assert torch.equal(bound[0], tensors[0])
    bound[1].fill_(3.0)
    assert torch.equal(bigger.view(new_flat, 1), torch.full((2, 2), 3.0, dtype=torch.float64))

    # The new slots bind too, without disturbing the moved ones.
    extra = bigger.bind(new_flat, 2)
    extra.fill_(1.5)
    assert torch.equal(bound[0], tensors[0])
    assert torch.equal(bigger.view(new_flat, 2), torch.full((3,), 1.5, dtype=torch.bfloat16))


def test_rebind_keeps_requires_grad_false_and_no_autograd_history():
    layout = FlatLayout.for_specs([((3,), torch.float32)])
    flat = layout.empty()
    t = layout.bind(flat, 0)
    assert not t.requires_grad and t.grad_fn is None


# ----- pack_tree / unpack_tree --------------------------------------------------------------


def optimizer_like_state() -> dict:
    return {
        0: {
            "step": torch.tensor(3.0),
            "exp_avg": torch.randn(4, 3),
            "exp_avg_sq": torch.rand(4, 3, dtype=torch.float64),
        },
        7: {
            "step": 12,
            "momentum_buffer": None,
            "sum": torch.randn(5, dtype=torch.bfloat16),
            "flags": torch.tensor([True, False, True]),
            "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "phase": torch.randn(2, dtype=torch.complex64),
            "empty": torch.empty(0, 5),
            "half": torch.randn(3, dtype=torch.float16),
        },
        "meta": {
            "lr_history": [0.1, 0.01, 1e-3],
            "betas": (0.9, 0.999),
            "name": "adam",
            "raw": b"\x00\x01",
            "nested": [{"a": torch.ones(2)}, (torch.zeros(1), 3, None), []],
            "flag": True,
            "ratio": float("inf"),
            "z": 1 + 2j,
        },
    }


def test_tree_round_trips_exactly():
    tree = optimizer_like_state()
    packed = pack_tree(tree)

    assert isinstance(packed, PackedTree)
    assert isinstance(packed.data, np.ndarray) and packed.data.dtype == np.uint8
    assert packed.data.shape == (packed.layout.nbytes,)
    assert len(packed.layout) == 11
    assert_same(unpack_tree(packed), tree, bitwise=True)


def test_tree_keeps_nan_and_negative_zero_bits():
    tree = {"x": torch.tensor([float("nan"), -0.0, float("-inf")]), "y": torch.tensor(-0.0)}
    result = unpack_tree(pack_tree(tree))
    assert_same(result["x"], tree["x"], bitwise=True)
    assert math.copysign(1.0, result["y"].item()) == -1.0


def test_unpacked_tensors_are_fresh_and_writable():
    tree = optimizer_like_state()
    snapshot = {k: v.clone() for k, v in tree[0].items()}
    packed = pack_tree(tree)
    data_before = packed.data.copy()

    first = unpack_tree(packed)
    second = unpack_tree(packed)
    buffer = readonly_tensor(packed.data)
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for key in ("exp_avg", "exp_avg_sq"):
        t = first[0][key]
        assert t.is_contiguous() and not t.requires_grad
        assert not (lo <= t.data_ptr() < hi)  # not a view into the packed buffer
        assert not shares_memory(t, second[0][key])
        assert not shares_memory(t, tree[0][key])
        t.add_(1.0)  # writable

    first[0]["step"].fill_(99.0)
    first[7]["flags"].logical_not_()
    first["meta"]["nested"][0]["a"].zero_()
    first["meta"]["lr_history"].append(5.0)

    assert np.array_equal(packed.data, data_before)
    for key, value in snapshot.items():
        assert torch.equal(tree[0][key], value)
    assert torch.equal(second[0]["step"], torch.tensor(3.0))
    assert torch.equal(second["meta"]["nested"][0]["a"], torch.ones(2))
    assert tree["meta"]["lr_history"] == [0.1, 0.01, 1e-3]
    assert second["meta"]["lr_history"] == [0.1, 0.01, 1e-3]


def test_pack_tree_snapshots_the_source():
    tree = {"buf": torch.zeros(3)}
    packed = pack_tree(tree)
    tree["buf"].fill_(5.0)
    assert torch.equal(unpack_tree(packed)["buf"], torch.zeros(3))


def test_tree_of_non_contiguous_and_grad_tensors():
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"t": base.t(), "s": base[:, 1::2], "p": torch.nn.Parameter(torch.ones(2))}
    result = unpack_tree(pack_tree(tree))
    assert torch.equal(result["t"], base.t())
    assert torch.equal(result["s"], base[:, 1::2])
    assert type(result["p"]) is torch.Tensor and not result["p"].requires_grad
    assert torch.equal(result["p"], torch.ones(2))


@pytest.mark.parametrize(
    "tree",
    [{}, [], (), None, 3, "s", torch.tensor(1.5), {"a": []}, [torch.empty(0), torch.ones(1)]],
    ids=repr,
)
def test_trivial_trees_round_trip(tree):
    assert_same(unpack_tree(pack_tree(tree)), tree, bitwise=True)


def test_tree_whose_tensors_are_all_empty_round_trips():
    # Adam's state for a zero-element parameter, with "step" kept as a plain number. Its buffer
    # has no bytes at all; numpy hands back a 0-byte array that torch sees with stride 0.
    tree = {3: {"step": 1, "exp_avg": torch.empty(0), "exp_avg_sq": torch.empty(2, 0)}}
    packed = pack_tree(tree)
    assert packed.layout.nbytes == 0
    assert_same(unpack_tree(packed), tree, bitwise=True)


def test_view_into_a_zero_byte_buffer_from_numpy():
    layout = FlatLayout.for_specs([((0,), torch.float32), ((0, 3), torch.float64)])
    flat = readonly_tensor(to_numpy(layout.empty()))
    assert layout.view(flat, 0).shape == (0,)
    assert layout.view(flat, 1).shape == (0, 3)


def test_unpack_to_a_device():
    result = unpack_tree(pack_tree({"a": torch.ones(2)}), device=torch.device("cpu"))
    assert result["a"].device.type == "cpu"


def test_packed_tree_is_picklable():
    tree = optimizer_like_state()
    packed = pickle.loads(pickle.dumps(pack_tree(tree)))
    assert_same(unpack_tree(packed), tree, bitwise=True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on sparse support
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_pack_tree_rejects_sparse_tensors(layout):
    dense = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    with pytest.raises(TypeError, match="sparse"):
        pack_tree({"state": {"grad_acc": sparse}})


class Opaque:
    pass


@pytest.mark.parametrize(
    "leaf",
    [Opaque(), {1, 2}, np.zeros(3), np.float32(1.0), object(), lambda: None],
    ids=["object", "set", "ndarray", "np.float32", "bare-object", "lambda"],
)
def test_pack_tree_rejects_arbitrary_objects(leaf):
    with pytest.raises(TypeError, match="optimizer state may hold only"):
        pack_tree({0: {"x": [torch.ones(1), leaf]}})


def test_pack_tree_rejects_named_tuples():
    Pair = namedtuple("Pair", "a b")
    with pytest.raises(TypeError, match="named tuples"):
        pack_tree({"p": Pair(torch.ones(1), 2)})
    with pytest.raises(TypeError):
        pack_tree([TensorSlot(0)])
