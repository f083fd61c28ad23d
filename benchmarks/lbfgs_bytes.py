"""Bytes between proxy and shards per sharded-LBFGS iteration, against a gathering baseline.

shardopt.LBFGS keeps every flat vector (direction, gradient, the s/y history) in slices on the
shards and moves only scalars plus one gradient push and one parameter pull per closure call.
The baseline is the naive sharded version: the same state on the shards, but every global
reduction (dot product, norm, max) gathers its operand vectors to the client and reduces there.
Both run the same problem in the same process; the script checks they reach the same parameters.

    python benchmarks/lbfgs_bytes.py [--params 1000000] [--shards 2] [--history 10]

Prints a table and writes benchmarks/results/lbfgs_bytes.json.
"""

from __future__ import annotations

import time

import torch

import shardopt
from shardopt.client.vector_machine import VectorMachine

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, write_results


class GatheringVectorMachine(VectorMachine):
    """The naive baseline: each reduction pulls whole operand vectors to the client."""

    def reduce(self, kind, *names):
        for name in names:
            self.queue(("read", name))
        results = self.flush()
        vectors = [
            torch.cat([torch.from_numpy(r[-len(names) + k].copy()) for r in results])
            for k in range(len(names))
        ]
        if kind == "dot":
            return vectors[0].dot(vectors[1])
        if kind == "absmax":
            return vectors[0].abs().max()
        return vectors[0].abs().sum()


def make_problem(num_params: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [num_params // 2, num_params // 4, num_params - num_params // 2 - num_params // 4]
    target = [torch.randn(n, generator=gen) for n in sizes]
    scale = [torch.rand(n, generator=gen) + 0.5 for n in sizes]

    def loss_fn(params):
        return sum(
            ((s * (p - t)) ** 2).sum() + 0.1 * (p**4).sum()
            for p, t, s in zip(params, target, scale)
        )

    return sizes, loss_fn


def run(machine_cls, args, sizes, loss_fn):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = shardopt.LBFGS(
        params,
        history_size=args.history,
        max_iter=args.max_iter,
        line_search_fn="strong_wolfe",
        num_shards=args.shards,
    )
    backend = opt.backend
    backend._machine = machine_cls([backend.handles[s] for s in backend.machine.shards])
    evals = []

    def closure():
        evals.append(1)
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    start = time.perf_counter()
    for _ in range(args.steps):
        opt.step(closure)
    elapsed = time.perf_counter() - start
    iterations = opt.state_dict()["state"][0]["n_iter"]
    m = backend.machine
    result = {
        "iterations": iterations,
        "closure_calls": len(evals),
        "bytes_to_shards": m.bytes_sent,
        "bytes_from_shards": m.bytes_received,
        "bytes_per_iteration": (m.bytes_sent + m.bytes_received) / iterations,
        "round_trips": m.round_trips,
        "seconds": elapsed,
        "final_loss": float(loss_fn(params).detach()),
    }
    final = [p.detach().clone() for p in params]
    opt.close()
    return result, final


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    sizes, loss_fn = make_problem(args.params)
    sharded, p1 = run(VectorMachine, args, sizes, loss_fn)
    naive, p2 = run(GatheringVectorMachine, args, sizes, loss_fn)
    max_diff = max((a - b).abs().max().item() for a, b in zip(p1, p2))
    param_bytes = 4 * args.params
    print(
        f"sharded LBFGS, {args.params:,} float32 params, {args.shards} shards, "
        f"history {args.history}, strong-Wolfe, {sharded['iterations']} iterations"
    )
    print(f"{'variant':<22}{'MB/iter':>10}{'x params':>10}{'ratio':>8}{'round trips':>13}{'s':>8}")
    for name, r in (("shardopt (slices)", sharded), ("naive (gather)", naive)):
        print(
            f"{name:<22}{r['bytes_per_iteration'] / 1e6:>10.1f}"
            f"{r['bytes_per_iteration'] / param_bytes:>10.2f}"
            f"{r['bytes_per_iteration'] / sharded['bytes_per_iteration']:>8.2f}"
            f"{r['round_trips']:>13}{r['seconds']:>8.2f}"
        )
    print(
        f"same closure calls: {sharded['closure_calls'] == naive['closure_calls']}, "
        f"max |param difference|: {max_diff:.2e}"
    )
    write_results(
        "lbfgs_bytes",
        {"args": vars(args), "sharded": sharded, "naive": naive, "max_param_diff": max_diff},
    )


if __name__ == "__main__":
    main()
