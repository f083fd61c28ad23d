"""Gradients uploaded to a session: a header's dense and sparse gradients, checked, received.

A ``PushGradientsHeader`` (or a ``ClosureStep``'s ``Evaluation``) names the parameters whose
gradients follow. Dense gradients must have their parameter's dtype and shape. A sparse one (a
COO tensor: ``nn.Embedding(sparse=True)``, SparseAdam's input) travels as two tensors, its
indices (int64, ``[sparse dims, nnz]``) and its values (``[nnz, *dense dims]``, the parameter's
dtype); every declared size is checked against the parameter before anything is allocated, and
every index against the parameter's size once it has arrived. Nothing is handed over unless all
of it arrived and checked out.

Talks to nothing: torch and the wire format (:mod:`shardopt.core.wire`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from shardopt.core import wire


class GradientUpload:
    """The gradients a header declares for ``params`` (a session's parameters).

    Args:
        header: a ``PushGradientsHeader`` or an ``Evaluation`` (dense only).
        params: the session's parameters.
        names: their names, for messages.
        dense_bytes: the most bytes dense gradients may declare (the parameters' bytes).
        sparse_bytes: the most bytes all the gradients may declare when some are sparse (a
            sparse gradient's indices and duplicates can outweigh its parameter).
        into: tensors shaped as ``params`` to receive dense gradients into (a session's
            transfer buffer), or None to allocate them as they arrive.
        spans: whether chunks may span tensors (a client that said its chunks do).

    Raises:
        ValueError: indices that are not increasing, name no declared parameter, or name a
            parameter both dense and sparse; a sparse spec that does not fit its parameter.
        LimitError: declared sizes over the bounds.
    """

    def __init__(
        self,
        header: Any,
        params: list[torch.Tensor],
        names: list[str],
        dense_bytes: int,
        sparse_bytes: int,
        into: list[torch.Tensor] | None = None,
        spans: bool = False,
    ) -> None:
        dense = list(header.params)
        sparse = list(getattr(header, "sparse_params", ()))
        for what, indices in (("gradient", dense), ("sparse gradient", sparse)):
            if indices != sorted(set(indices)) or any(i >= len(params) for i in indices):
                raise ValueError(f"{what} indices must be increasing and name declared parameters")
        if set(dense) & set(sparse):
            raise ValueError(f"parameters {sorted(set(dense) & set(sparse))} are dense and sparse")
        sparse_specs = list(getattr(header, "sparse_tensors", ()))
        if len(sparse_specs) != 2 * len(sparse):
            raise ValueError(
                f"{len(sparse)} sparse gradients need {2 * len(sparse)} tensor specs (indices "
                f"and values each), got {len(sparse_specs)}"
            )
        expected = [(params[i].dtype, tuple(params[i].shape)) for i in dense]
        labels = [names[i] for i in dense]
        for j, i in enumerate(sparse):
            expected.extend(
                self._sparse_expected(params[i], names[i], *sparse_specs[2 * j : 2 * j + 2])
            )
            labels.extend([f"{names[i]} (sparse indices)", f"{names[i]} (sparse values)"])
        self.dense = dense
        self.sparse = sparse
        self._params = params
        self._names = names
        self.receiver = wire.TensorReceiver(
            list(header.grads) + sparse_specs,
            sparse_bytes if sparse else dense_bytes,
            expected=expected,
            what="gradient",
            names=labels,
            into=None if into is None else [into[i] for i in dense] + [None] * len(sparse_specs),
            spans=spans,
        )

    @staticmethod
    def _sparse_expected(
        param: torch.Tensor, name: str, indices: Any, values: Any
    ) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """What a sparse gradient's two specs must declare (checked before any allocation)."""
        index_dtype, index_shape, _ = wire.checked_spec(indices, f"{name} (sparse indices)")
        if index_dtype != torch.int64 or len(index_shape) != 2:
            raise ValueError(f"{name}: sparse indices must be int64 [sparse dims, nnz]")
        sparse_dims, nnz = index_shape
        if not 1 <= sparse_dims <= param.dim():
            raise ValueError(
                f"{name}: {sparse_dims} sparse dims for a parameter of {param.dim()} dims"
            )
        values_shape = (nnz, *param.shape[sparse_dims:])
        return [(torch.int64, index_shape), (param.dtype, values_shape)]

    @property
    def declared(self) -> int:
        """The bytes the header declares (what receiving may allocate)."""
        return self.receiver.declared

    @property
    def bytes_received(self) -> int:
        return self.receiver.bytes_received

    def receive(self, messages: Iterator[Any]) -> dict[int, torch.Tensor]:
        """Receives the gradients' chunks (no more) and returns them by parameter index.

        Raises:
            WireError: chunks out of order, or the stream ends early.
            IndexError: a sparse index outside its parameter's size (nothing is returned).
        """
        tensors = self.receiver.receive(messages)
        grads = dict(zip(self.dense, tensors))
        rest = tensors[len(self.dense) :]
        for j, i in enumerate(self.sparse):
            indices, values = rest[2 * j], rest[2 * j + 1]
            param = self._params[i]
            sizes = torch.tensor(param.shape[: indices.shape[0]]).unsqueeze(1)
            if indices.numel() and (bool((indices < 0).any()) or bool((indices >= sizes).any())):
                raise IndexError(
                    f"{self._names[i]}: a sparse gradient index is outside the parameter's "
                    f"size {list(param.shape)}"
                )
            grads[i] = torch.sparse_coo_tensor(  # bounds checked just above
                indices, values, param.shape, check_invariants=False
            )
        return grads
