"""The gateway's pure pieces: what a session spec may set (:mod:`shardopt.gateway.admission`) and
the ledger of what each token holds (:mod:`shardopt.gateway.quotas`). No Ray, no server."""

from __future__ import annotations

import pytest
import torch

from shardopt.core.errors import QuotaExceededError
from shardopt.core.param_groups import group_options
from shardopt.gateway.admission import (
    OPTIMIZERS,
    check_group_update,
    check_hyperparameters,
    checkpoint_path,
    constructor_options,
    token_scope,
)
from shardopt.gateway.auth import principal_of, weak_token_reason
from shardopt.gateway.quotas import Ledger, Limits
from shardopt.gateway.sessions import Session

A, B = principal_of("token-a-0123456789abcdef"), principal_of("token-b-0123456789abcdef")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_served_optimizers_own_groups_pass_the_update_checks(name):
    """A remote proxy sends its groups' full options with every step: torch's defaults must
    pass the checks, and they are exactly the constructor's arguments (plus torch's extras)."""
    cls = OPTIMIZERS[name]
    opt = cls([torch.zeros(2, 2, requires_grad=True)])
    options = group_options(opt.param_groups[0])
    check_group_update(cls, options, "group 0")
    check_hyperparameters(cls, {k: v for k, v in options.items() if k in constructor_options(cls)})
    assert "params" not in constructor_options(cls) and "self" not in constructor_options(cls)


def test_hyperparameters_are_constructor_arguments_with_plain_values():
    with pytest.raises(ValueError, match=r"unknown hyperparameters 'actor_options', 'address'"):
        check_hyperparameters(torch.optim.SGD, {"lr": 0.1, "address": "x", "actor_options": {}})
    for bad in ({"lr": {"x": 1}}, {"lr": torch.tensor(0.1)}, {"lr": [[0.1]]}, {"lr": object()}):
        with pytest.raises(TypeError):
            check_hyperparameters(torch.optim.SGD, bad)
    with pytest.raises(ValueError, match="characters"):
        check_hyperparameters(torch.optim.Muon, {"adjust_lr_fn": "x" * 1000})
    assert check_hyperparameters(torch.optim.Adam, {"lr": 1, "betas": (0.5, 0.6)}) == {
        "lr": 1,
        "betas": (0.5, 0.6),
    }


def test_group_updates_get_torchs_own_errors():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        check_group_update(torch.optim.Adam, {"lr": -1.0}, "param group 0")
    with pytest.raises(ValueError, match="beta parameter"):
        check_group_update(torch.optim.Adam, {"betas": (2.0, 0.9)}, "param group 0")
    check_group_update(torch.optim.Adam, {"lr": 0.1, "initial_lr": 0.1}, "param group 0")


def test_checkpoint_paths_stay_in_the_tokens_directory(tmp_path):
    root = tmp_path.resolve()
    assert checkpoint_path(root, A, "run/step-1") == root / A[:16] / "run" / "step-1"
    for bad in ("", "/abs", "../up", "a/../../b", "a\\b"):
        with pytest.raises(ValueError, match="relative"):
            checkpoint_path(root, A, bad)
    (root / A[:16]).mkdir()
    (root / B[:16] / "theirs").mkdir(parents=True)
    (root / A[:16] / "link").symlink_to(root / B[:16] / "theirs")
    with pytest.raises(ValueError, match="leads out"):
        checkpoint_path(root, A, "link")
    assert token_scope("token-a-0123456789abcdef") == A[:16]


def test_weak_tokens():
    assert weak_token_reason("Jx4-3n_QvL0pW9zYb2Rk8s") is None
    for weak in (
        "replace-me-with-a-long-random-string",
        "<your token here>",
        "abcdefgh",
        "ab" * 20,
    ):
        assert weak_token_reason(weak) is not None


# ----- the ledger ---------------------------------------------------------------------------


def test_a_tokens_bytes_are_bounded_and_given_back():
    ledger = Ledger(Limits(max_token_bytes=100, max_total_bytes=150, max_buffered_bytes=150))
    ledger.open_session(A, 60)
    with pytest.raises(QuotaExceededError, match="token's quota"):
        ledger.hold(A, 41)
    held = ledger.hold(A, 40)
    assert ledger.usage(A) == {"sessions": 1, "resident": 60, "buffered": 40}
    ledger.open_session(B, 80)  # another token: its own quota, the gateway's bound
    with pytest.raises(QuotaExceededError, match="gateway's limit"):
        ledger.open_session(B, 20)
    held.release()
    held.release()  # once only
    ledger.close_session(A, 60)
    ledger.close_session(B, 80)
    assert ledger.usage() == {"sessions": 0, "resident": 0, "buffered": 0}
    assert ledger.usage(A) == {"sessions": 0, "resident": 0, "buffered": 0}


def test_buffered_bytes_are_bounded_per_session_and_in_all():
    limits = Limits(max_buffered_bytes=3 << 20, max_token_bytes=10 << 20, state_factor=4)
    ledger = Ledger(limits)
    budget = limits.upload_budget(1000)
    first = ledger.hold(A, budget, ("s1", 1000))
    with pytest.raises(QuotaExceededError, match="session's bound"):
        ledger.hold(A, 1, ("s1", 1000))
    second = ledger.hold(A, 1000, ("s2", 1000))  # another session of the same token
    with pytest.raises(QuotaExceededError, match="in flight"):
        ledger.hold(B, 2 << 20)
    first.release()
    second.release()
    assert ledger.usage() == {"sessions": 0, "resident": 0, "buffered": 0}


def test_sessions_per_token_are_bounded():
    ledger = Ledger(Limits(max_sessions_per_token=2, max_sessions=3))
    for _ in range(2):
        ledger.open_session(A, 1)
    with pytest.raises(QuotaExceededError, match="open sessions"):
        ledger.open_session(A, 1)
    ledger.open_session(B, 1)
    with pytest.raises(QuotaExceededError, match="limit of 3 sessions"):
        ledger.open_session(B, 1)
    assert ledger.usage()["sessions"] == 3


def test_transfer_buffers_are_bounded_in_all_and_claimed_by_one_call_at_a_time():
    """A session's transfer buffer is made on first claim while the gateway's bound allows
    (over it, calls do without one: never refused), serves one call at a time, and follows the
    session's parameters."""
    params = [torch.zeros(4), torch.zeros(2, 3, dtype=torch.float64)]
    nbytes = 4 * 4 + 6 * 8
    ledger = Ledger(Limits(max_transfer_bytes=nbytes + 2))

    def session(name):  # the claim logic needs no optimizer
        return Session(name, A, None, list(params), ["a", "b"], nbytes)

    first, second = session("first"), session("second")
    claim, tensors = first.claim_transfer(ledger)
    assert [(t.dtype, t.shape) for t in tensors] == [(p.dtype, p.shape) for p in params]
    assert ledger.transfer_bytes == nbytes
    assert first.claim_transfer(ledger) is None  # busy
    assert second.claim_transfer(ledger) is None  # over the gateway's bound
    first.release_transfer(object())  # not the claim: nothing happens
    assert first.claim_transfer(ledger) is None
    first.release_transfer(claim)
    again, same = first.claim_transfer(ledger)
    assert again is not claim and [t.data_ptr() for t in same] == [t.data_ptr() for t in tensors]
    first.release_transfer(again)
    first.params.append(torch.zeros(1))  # a param group added: a new buffer of the new shapes
    first.nbytes += 4
    assert first.claim_transfer(ledger) is None  # which no longer fits
    assert ledger.transfer_bytes == 0 and first.transfer is None
    _, tensors = second.claim_transfer(ledger)
    assert ledger.transfer_bytes == nbytes
    second.drop_transfer(ledger)
    assert ledger.transfer_bytes == 0


def test_serve_sets_the_transfer_bound_and_zero_turns_the_buffers_off():
    from shardopt.cli import _limits_of, build_parser

    parse = build_parser().parse_args
    assert _limits_of(parse(["serve", "--max-transfer-gib", "0.5"])).max_transfer_bytes == 1 << 29
    assert _limits_of(parse(["serve"])).max_transfer_bytes == Limits().max_transfer_bytes
    off = Ledger(_limits_of(parse(["serve", "--max-transfer-gib", "0"])))
    session = Session("s", A, None, [torch.zeros(2)], ["a"], 8)
    assert session.claim_transfer(off) is None and off.transfer_bytes == 0
