"""The demo and the command line: shardopt.AdamW and torch.optim.AdamW train the demo's MLP to
identical parameters, and ``shardopt`` parses, documents and runs its subcommands.

Runs on the shared local Ray of ``conftest.py``.
"""

from __future__ import annotations

import pytest

from shardopt import cli, demo


@pytest.mark.parametrize("num_shards", [1, 2])
def test_demo_matches_torch(num_shards):
    result = demo.run(epochs=1, num_shards=num_shards)

    assert result["params_equal"]
    assert result["max_abs_param_diff"] == 0.0
    sharded, reference = result["shardopt"], result["torch"]
    assert sharded["test_accuracy"] == reference["test_accuracy"]
    assert sharded["final_loss"] == reference["final_loss"]
    assert sharded["test_loss"] == reference["test_loss"]
    assert sharded["test_accuracy"] > 0.5  # one epoch already learns a lot
    assert result["num_shards"] == num_shards
    assert result["steps"] == demo.steps_per_epoch(result["train_samples"], 32) == 43
    assert result["train_samples"] + result["test_samples"] == 1797
    assert result["ray_start_seconds"] == 0.0  # the session's Ray was used, not a new one


def test_demo_is_deterministic():
    first = demo.run(epochs=1, batch_size=64, seed=3)
    second = demo.run(epochs=1, batch_size=64, seed=3)
    assert first["shardopt"]["final_loss"] == second["shardopt"]["final_loss"]
    assert first["shardopt"]["test_accuracy"] == second["shardopt"]["test_accuracy"]


@pytest.mark.parametrize("name, value", [("epochs", 0), ("num_shards", 0), ("batch_size", 0)])
def test_demo_rejects_invalid_settings(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}: 0"):
        demo.run(**{name: value})


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["demo", "serve", "health", "ckpt", "COMMAND --help"]),
        (["demo", "--help"], ["--epochs", "--shards", "digits", "torch.optim.AdamW"]),
        (["serve", "--help"], ["--token-file", "--tls-cert", "--ray-address", "NOT_SERVING"]),
        (["health", "--help"], ["SERVING", "--timeout"]),
        (["ckpt", "--help"], ["inspect", "export"]),
    ],
)
def test_cli_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


@pytest.mark.parametrize(
    "argv", [[], ["demo", "--epochs", "0"], ["demo", "--shards", "two"], ["nope"]]
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: shardopt" in capsys.readouterr().err


def test_cli_demo_runs(capsys):
    assert cli.main(["demo", "--epochs", "1", "--shards", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "shardopt.AdamW (3 shards)" in out
    assert "torch.optim.AdamW" in out
    assert "0.0 (identical)" in out
