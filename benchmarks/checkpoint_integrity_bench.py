"""What checking a checkpoint before unpickling it costs, against plain ``pickle.loads``.

On a synthetic DCP ``.metadata`` of ``--tensors`` entries (one data slice each) and its commit
record, in one run:
- the anchor: ``pickle.loads`` of ``.metadata`` (what DCP's own reader does, unchecked);
- the SHA-256 of ``.metadata`` (which names the commit record);
- building the commit record, unsigned and signed (HMAC-SHA256), and parsing it back;
- the allowlist unpickler (``shardopt.checkpoint.integrity``), with and without the checks of
  the result against the record.
Figures are the best of ``--repeats``, in ms and as a ratio to the anchor. The whole-checkpoint
view (save/load bandwidth with and without a key) is ``checkpoint_bench.py``.

    python benchmarks/checkpoint_integrity_bench.py [--tensors 30000] [--repeats 3]

Writes benchmarks/results/checkpoint_integrity_bench.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Callable

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from shardopt.checkpoint.integrity import Commit, _MetadataUnpickler, make_record

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, back_to_back, write_results

SLICE = 40_000
NAME = "__0_0123456789ab_0.distcp"


def synthetic(tensors: int) -> tuple[bytes, dict]:
    """A ``.metadata`` of ``tensors`` float32 [1000, 10] entries and the record's files."""
    entries, storage, planner, slices = {}, {}, {}, {}
    for i in range(tensors):
        key = f"state.{i}.exp_avg"
        entries[key] = dcp_metadata.TensorStorageMetadata(
            properties=dcp_metadata.TensorProperties(dtype=torch.float32),
            size=torch.Size([1000, 10]),
            chunks=[
                dcp_metadata.ChunkStorageMetadata(
                    offsets=torch.Size([0, 0]), sizes=torch.Size([1000, 10])
                )
            ],
        )
        storage[dcp_metadata.MetadataIndex(key, torch.Size([0, 0]), 0)] = _StorageInfo(
            NAME, i * SLICE, SLICE
        )
        planner[key] = ("state", str(i), "exp_avg")
        slices[f"{i * SLICE}+{SLICE}"] = hashlib.sha256(key.encode()).hexdigest()
    metadata = dcp_metadata.Metadata(
        state_dict_metadata=entries, planner_data=planner, storage_data=storage
    )
    return pickle.dumps(metadata), {NAME: {"size": tensors * SLICE, "slices": slices}}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls, in ms."""
    return min(back_to_back(fn, repeats)) * 1000


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--tensors", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, files = synthetic(args.tensors)
    key = b"benchmark-key-0123456789abcdef"
    signed = make_record(data, files, key)[1]

    def checked() -> None:
        Commit("/bench", data, files, None, None).metadata()

    cases = {
        "pickle.loads of .metadata (anchor)": lambda: pickle.loads(data),
        "sha256 of .metadata": lambda: hashlib.sha256(data).hexdigest(),
        "commit record, unsigned": lambda: make_record(data, files, None),
        "commit record, signed": lambda: make_record(data, files, key),
        "json.loads of the record": lambda: json.loads(signed),
        "allowlist unpickler": lambda: _MetadataUnpickler(io.BytesIO(data)).load(),
        "allowlist unpickler + checks": checked,
    }
    results = {name: best_ms(fn, args.repeats) for name, fn in cases.items()}
    anchor = results["pickle.loads of .metadata (anchor)"]
    print(
        f".metadata of {args.tensors:,} tensors: {len(data) / 1e6:.1f} MB, commit record "
        f"{len(signed) / 1e6:.1f} MB; best of {args.repeats}"
    )
    print(f"{'operation':<40}{'ms':>10}{'x anchor':>10}")
    for name, ms in results.items():
        print(f"{name:<40}{ms:>10.1f}{ms / anchor:>10.2f}")
    write_results(
        "checkpoint_integrity_bench",
        {"args": vars(args), "metadata_bytes": len(data), "ms": results},
    )


if __name__ == "__main__":
    main()
