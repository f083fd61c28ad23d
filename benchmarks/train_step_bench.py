"""Whole training steps (forward, backward, optimizer step) with torch.optim and with shardopt.

A small transformer language model (token embedding, encoder layers, output projection) on
random tokens; one training step = zero_grad, forward, loss, backward, step. Configurations are
interleaved round-robin in one run and timed by median after warm-up:

- local ``torch.optim.AdamW`` with ``foreach=True`` and with ``fused=True``;
- ``shardopt.AdamW`` with 2 shards (shared memory, fused kernels on the shards);
- the same with ``overlap=True`` (gradients copied to the shards during backward);
- the same with ``overlap=True, share_params=True`` (no parameter copy back).

    python benchmarks/train_step_bench.py [--d-model 512] [--layers 4] [--repeats 9]

Prints a table of medians and ratios to local foreach, writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

import shardopt

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, write_results


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=8, dim_feedforward=4 * d_model, batch_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


CONFIGS = {
    "torch foreach": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
    "torch fused": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
    "shardopt x2": lambda p: shardopt.AdamW(p, lr=1e-4, num_shards=2),
    "shardopt x2 overlap": lambda p: shardopt.AdamW(p, lr=1e-4, num_shards=2, overlap=True),
    "shardopt x2 overlap+share": lambda p: shardopt.AdamW(
        p, lr=1e-4, num_shards=2, overlap=True, share_params=True
    ),
}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = TinyLM(args.vocab, args.d_model, args.layers)
    num_params = sum(p.numel() for p in base.parameters())
    runs = {}
    for name, make in CONFIGS.items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        for _ in range(args.warmup + args.repeats)
    ]
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    losses: dict[str, float] = {}
    for i, tokens in enumerate(batches):
        for name, (model, opt) in runs.items():
            start = time.perf_counter()
            opt.zero_grad()
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)
            )
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                samples[name].append(elapsed)
            losses[name] = loss.item()
    medians = {name: statistics.median(v) for name, v in samples.items()}
    anchor = medians["torch foreach"]
    print(
        f"TinyLM: {num_params / 1e6:.1f}M params, batch {args.batch}x{args.seq}, "
        f"{args.repeats} timed steps (median), {torch.get_num_threads()} client threads"
    )
    print(f"{'config':<28}{'ms/step':>10}{'x foreach':>11}{'x fused':>9}{'last loss':>11}")
    for name, med in medians.items():
        print(
            f"{name:<28}{med * 1e3:>10.1f}{med / anchor:>11.2f}"
            f"{med / medians['torch fused']:>9.2f}{losses[name]:>11.4f}"
        )
    for _, opt in runs.values():
        if isinstance(opt, shardopt.ShardedOptimizer):
            opt.close()
    write_results(
        "train_step",
        {
            "args": vars(args),
            "num_params": num_params,
            "samples_s": samples,
            "median_s": medians,
            "last_loss": losses,
        },
    )


if __name__ == "__main__":
    main()
