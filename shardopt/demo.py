"""The training demo: a small MLP on scikit-learn's digits, trained with shardopt and with torch.

Owns the demo's data (``sklearn.datasets.load_digits``, bundled, no download), its model, one
training loop that both runs share, and the comparison :func:`run` returns. The same model, from
the same initial weights and over the same minibatches, is trained once with
``shardopt.AdamW(..., num_shards=N)`` and once with ``torch.optim.AdamW(fused=True)`` (the
kernel shardopt's AdamW shards run by default); the two must end with identical parameters.
Prints nothing: :func:`format_report` renders the result for the CLI, and a tqdm bar is shown
only when asked for.

Talks to: shardopt's public optimizer API (which starts or joins Ray), torch and scikit-learn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch
from torch import nn
from tqdm.auto import tqdm

import shardopt
from shardopt.client.runtime import ensure_ray

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 20
"""Epochs of the default demo: about 97% test accuracy in a few seconds of training."""

HIDDEN = 128
"""Width of the MLP's hidden layer (64 inputs -> HIDDEN -> 10 classes)."""


@dataclass(frozen=True)
class Digits:
    """The digits data set (8x8 images as 64 features in [0, 1]) split into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class TrainResult:
    """One training run: its final losses, test accuracy, and wall-clock seconds."""

    final_loss: float
    """Mean training loss over the last epoch."""
    test_loss: float
    test_accuracy: float
    setup_seconds: float
    """Constructing the optimizer (for shardopt: creating the shards on their hosts)."""
    train_seconds: float
    """The training loop: every forward, backward and optimizer step."""


def load_data(seed: int = 0, test_size: float = 0.25) -> Digits:
    """Loads scikit-learn's bundled digits and splits them (stratified, shuffled by ``seed``).

    Args:
        seed: the shuffle of the split.
        test_size: the share of the 1797 samples held out for testing.

    Returns:
        The split as float32 features scaled to [0, 1] and int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Digits(
        x_train=torch.tensor(x_train, dtype=torch.float32),
        y_train=torch.tensor(y_train, dtype=torch.int64),
        x_test=torch.tensor(x_test, dtype=torch.float32),
        y_test=torch.tensor(y_test, dtype=torch.int64),
    )


def make_model(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """The demo's MLP, 64 -> ``hidden`` -> 10, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Minibatches per epoch; the last one may be smaller."""
    return -(-num_samples // batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def train(
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    data: Digits,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
    label: str = "train",
) -> TrainResult:
    """Trains ``model`` in place with the optimizer ``make_optimizer`` builds, then tests it.

    The minibatch order depends only on ``seed``, so two calls with equal models, seeds and
    optimizers see exactly the same batches. An optimizer that has ``close()`` is closed at the
    end.

    Args:
        model: the model to train (modified in place).
        make_optimizer: builds the optimizer from the model's parameters.
        data: the train/test split.
        epochs: passes over the training set.
        batch_size: samples per minibatch.
        seed: the minibatch shuffle.
        progress: show a tqdm bar with the epoch and its mean loss so far.
        label: the bar's description.

    Returns:
        The run's losses, test accuracy and timings.
    """
    num_train = len(data.y_train)
    batches = steps_per_epoch(num_train, batch_size)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()

    start = time.perf_counter()
    optimizer = make_optimizer(list(model.parameters()))
    setup_seconds = time.perf_counter() - start
    try:
        start = time.perf_counter()
        with tqdm(
            total=epochs * batches, desc=label, unit="step", disable=not progress, leave=True
        ) as bar:
            for epoch in range(epochs):
                order = torch.randperm(num_train, generator=shuffle)
                loss_sum, seen = 0.0, 0
                for b in range(batches):
                    index = order[b * batch_size : (b + 1) * batch_size]
                    optimizer.zero_grad()
                    loss = nn.functional.cross_entropy(
                        model(data.x_train[index]), data.y_train[index]
                    )
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * len(index)
                    seen += len(index)
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}", refresh=False)
                final_loss = loss_sum / seen
                logger.debug("%s: epoch %d, mean loss %.4f", label, epoch + 1, final_loss)
        train_seconds = time.perf_counter() - start
    finally:
        close = getattr(optimizer, "close", None)
        if close is not None:
            close()
    test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
    return TrainResult(
        final_loss=final_loss,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        setup_seconds=setup_seconds,
        train_seconds=train_seconds,
    )


def max_abs_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute difference between corresponding parameters of two models."""
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def run(
    epochs: int = DEFAULT_EPOCHS,
    num_shards: int = 2,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains the digits MLP with ``shardopt.AdamW`` and with ``torch.optim.AdamW``; compares.

    The torch run asks for ``fused=True``: shardopt's AdamW shards run torch's fused kernel
    when the user sets neither ``fused`` nor ``foreach``, so this compares like with like.

    Both runs start from the same weights and see the same minibatches, so their parameters
    should end bit-identical. If this process has not initialised Ray, the shardopt run does so
    as ``shardopt.AdamW`` would (joining the cluster in reach, else starting an embedded local
    Ray) and shuts it down afterwards; a Ray the caller started is used and left running.

    Args:
        epochs: passes over the 1347 training samples.
        num_shards: shards of the shardopt run.
        batch_size: samples per minibatch.
        lr: AdamW's learning rate (both runs; other hyperparameters are torch's defaults).
        seed: model initialisation, train/test split and minibatch order.
        progress: show a tqdm bar for each run.

    Returns:
        A dict with the setup (``epochs``, ``steps``, ``num_shards``, ``batch_size``, ``lr``,
        ``seed``, ``train_samples``, ``test_samples``), ``ray_start_seconds`` (0.0 when the
        caller had initialised Ray), ``shardopt`` and ``torch`` (each a dict of the fields of
        :class:`TrainResult`), ``max_abs_param_diff`` and ``params_equal``.

    Raises:
        ValueError: ``epochs``, ``num_shards`` or ``batch_size`` is below 1.

    Example:
        >>> from shardopt.demo import run
        >>> result = run(epochs=1)
        >>> result["params_equal"], result["max_abs_param_diff"]
        (True, 0.0)
    """
    for name, value in (("epochs", epochs), ("num_shards", num_shards), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"Invalid {name}: {value} (must be >= 1)")
    data = load_data(seed)
    initial = make_model(seed)
    options = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "progress": progress}

    ray_started_here = not ray.is_initialized()
    start = time.perf_counter()
    if ray_started_here:
        ensure_ray()
    ray_start_seconds = time.perf_counter() - start
    try:
        sharded_model = deepcopy(initial)
        sharded = train(
            sharded_model,
            lambda params: shardopt.AdamW(params, lr=lr, num_shards=num_shards),
            data,
            label=f"shardopt.AdamW x{num_shards}",
            **options,
        )
    finally:
        if ray_started_here:
            ray.shutdown()

    torch_model = deepcopy(initial)
    reference = train(
        torch_model,
        lambda params: torch.optim.AdamW(params, lr=lr, fused=True),
        data,
        label="torch.optim.AdamW(fused=True)",
        **options,
    )
    return {
        "epochs": epochs,
        "steps": epochs * steps_per_epoch(len(data.y_train), batch_size),
        "num_shards": num_shards,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_samples": len(data.y_train),
        "test_samples": len(data.y_test),
        "ray_start_seconds": ray_start_seconds if ray_started_here else 0.0,
        "shardopt": asdict(sharded),
        "torch": asdict(reference),
        "max_abs_param_diff": max_abs_difference(sharded_model, torch_model),
        "params_equal": all(
            torch.equal(p, q) for p, q in zip(sharded_model.parameters(), torch_model.parameters())
        ),
    }


def format_report(result: dict[str, Any]) -> str:
    """Renders :func:`run`'s result as a small table for the terminal."""
    rows = [
        (f"shardopt.AdamW ({result['num_shards']} shards)", result["shardopt"]),
        ("torch.optim.AdamW(fused=True)", result["torch"]),
    ]
    width = max(len(name) for name, _ in rows)
    epochs = f"{result['epochs']} epoch" + ("s" if result["epochs"] != 1 else "")
    lines = [
        f"digits: {result['train_samples']} train / {result['test_samples']} test samples, "
        f"MLP 64-{HIDDEN}-10, {epochs} = {result['steps']} steps of batch "
        f"{result['batch_size']}, AdamW lr={result['lr']}, seed {result['seed']}",
        "",
        f"{'optimizer':<{width}}  {'test acc':>8}  {'train loss':>10}  {'test loss':>9}  "
        f"{'train time':>10}  {'setup':>7}",
    ]
    for name, r in rows:
        lines.append(
            f"{name:<{width}}  {r['test_accuracy']:>8.2%}  {r['final_loss']:>10.6f}  "
            f"{r['test_loss']:>9.6f}  {r['train_seconds']:>9.2f}s  {r['setup_seconds']:>6.2f}s"
        )
    verdict = "identical" if result["params_equal"] else "DIFFERENT"
    lines += [
        "",
        f"max |shardopt - torch| over all parameters: {result['max_abs_param_diff']} ({verdict})",
    ]
    if result["ray_start_seconds"]:
        lines.append(f"starting Ray took {result['ray_start_seconds']:.2f}s")
    lines.append(
        "train loss: mean over the last epoch; setup: building the optimizer "
        "(for shardopt, its shards on Ray actors)"
    )
    lines.append(
        "shardopt's AdamW shards run torch's fused kernel unless fused/foreach is set, "
        "so the torch run uses fused=True"
    )
    return "\n".join(lines)
