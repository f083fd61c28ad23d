"""What issue #19 added to the gateway, on a real gateway on 127.0.0.1: LBFGS (ClosureStep) and
sparse gradients step for step against torch, shard_status, background checkpoint saves,
ListSessions and operators' tokens, the metrics endpoint; and the bad inputs of each new call,
which change nothing.
"""

from __future__ import annotations

import copy
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from gateway_helpers import (
    OTHER_TOKEN,
    TOKEN,
    auth,
    close_session,
    code_of,
    guarded_victim,
    open_session,
    pull,
    push,
    step,
)
from helpers import assert_same_params, assert_same_state_dict, assert_same_tensors
from prometheus_client.parser import text_string_to_metric_families
from test_lbfgs import PROBLEMS, assert_close_state, closure_for, make_params

import shardopt
from shardopt.core import chunk_codec, wire
from shardopt.core.errors import ERROR_TYPE_KEY
from shardopt.core.proto import pb
from shardopt.gateway import Limits, serve
from shardopt.gateway.admission import token_scope
from shardopt.gateway.saves import MAX_SAVES

OPERATOR = "operator-token-0123456789abcdef"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = serve(
        "127.0.0.1", 0, tokens=[TOKEN, OTHER_TOKEN], operator_tokens=[OPERATOR],
        checkpoint_dir=str(tmp_path_factory.mktemp("ops-ckpt")), metrics_port=0,
        limits=Limits(max_session_bytes=64 << 20, idle_shard_hosts=4, max_lbfgs_history=20),
    )  # fmt: skip
    yield gw
    gw.stop(1)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The samples of ``/metrics`` by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ----- LBFGS over gRPC --------------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_over_grpc_matches_torch_step_by_step(address, line_search_fn):
    """One shard: bit-identical to torch, closure calls included; two: to rounding."""
    loss_fn, shapes = PROBLEMS["least_squares"]
    for num_shards, tol in ((1, 0.0), (2, 1e-8)):
        mine, theirs = make_params(shapes), make_params(shapes)
        kwargs = dict(max_iter=5, history_size=4, line_search_fn=line_search_fn)
        opt = shardopt.LBFGS(mine, num_shards=num_shards, address=address, token=TOKEN, **kwargs)
        ref = torch.optim.LBFGS(theirs, **kwargs)
        calls, ref_calls = [], []
        for _ in range(3):
            loss = opt.step(closure_for(loss_fn, mine, opt, calls))
            ref_loss = ref.step(closure_for(loss_fn, theirs, ref, ref_calls))
            assert len(calls) == len(ref_calls)
            torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
            assert_same_tensors(mine, theirs, tol)
        assert_close_state(opt.state_dict(), ref.state_dict(), max(tol, 1e-6))
        opt.close()


def test_lbfgs_state_moves_between_torch_and_the_gateway(address):
    loss_fn, shapes = PROBLEMS["rosenbrock"]
    kwargs = dict(max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    theirs, mine = make_params(shapes), make_params(shapes)
    ref = torch.optim.LBFGS(theirs, **kwargs)
    ref.step(closure_for(loss_fn, theirs, ref, []))
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            a.copy_(b)
    opt = shardopt.LBFGS(mine, num_shards=2, address=address, token=TOKEN, **kwargs)
    opt.load_state_dict(ref.state_dict())  # torch's state continues on the gateway's shards
    for _ in range(2):
        opt.step(closure_for(loss_fn, mine, opt, []))
        ref.step(closure_for(loss_fn, theirs, ref, []))
    assert_same_tensors(mine, theirs, 1e-8)
    assert_close_state(opt.state_dict(), ref.state_dict(), 1e-6)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    opt.close()


def test_lbfgs_options_are_bounded(stub):
    params = [torch.zeros(3, dtype=torch.float64)]
    for hyper, code in (
        ({"history_size": 21}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"line_search_fn": "backtracking", "history_size": 5}, INVALID),
        ({"history_size": 5.5}, INVALID),  # torch trims at len == history_size: never
        ({"history_size": 0}, INVALID),
        ({"history_size": -1}, INVALID),
        ({"history_size": True}, INVALID),
    ):
        assert code_of(lambda h=hyper: open_session(stub, params, optimizer="LBFGS",
                                                    hyperparameters=h)) == code  # fmt: skip


def test_lbfgs_history_cannot_outgrow_the_bound_by_updates_or_loads(address):
    """The bound on LBFGS's history held at opening only: a tenant could raise ``history_size``
    past it with an update (accepted, then the history grew past the quota, two vectors of the
    session's size per iteration), or make torch's trim never fire (a float, a shrink below the
    history it holds, a loaded history longer than its group's ``history_size``). Each is
    refused now before anything changes, and the session goes on as torch's."""
    loss_fn, shapes = PROBLEMS["rosenbrock"]
    kwargs = dict(max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    mine, theirs = make_params(shapes), make_params(shapes)
    opt = shardopt.LBFGS(mine, num_shards=2, address=address, token=TOKEN, **kwargs)
    ref = torch.optim.LBFGS(theirs, **kwargs)
    try:
        opt.step(closure_for(loss_fn, mine, opt, []))
        ref.step(closure_for(loss_fn, theirs, ref, []))
        before = opt.state_dict()
        for size, error in ((21, shardopt.QuotaExceededError), (20.5, ValueError),
                            (2, ValueError), (0, ValueError)):  # fmt: skip
            opt.param_groups[0]["history_size"] = size
            with pytest.raises(error, match="history_size"):
                opt.step(closure_for(loss_fn, mine, opt, []))
            opt.param_groups[0]["history_size"] = 3
            assert_same_state_dict(opt.state_dict(), before)
        longer = torch.optim.LBFGS(make_params(shapes), **{**kwargs, "history_size": 5})
        for _ in range(3):
            longer.step(closure_for(loss_fn, longer.param_groups[0]["params"], longer, []))
        saved = longer.state_dict()
        assert len(saved["state"][0]["old_dirs"]) > 3
        saved["param_groups"][0]["history_size"] = 3
        with pytest.raises(ValueError, match="history of .* entries; its group's history_size"):
            opt.load_state_dict(saved)
        uneven = copy.deepcopy(ref.state_dict())  # torch hands out its own state dicts
        uneven["state"][0]["ro"] = uneven["state"][0]["ro"][:-1]
        with pytest.raises(ValueError, match="unequal lengths"):
            opt.load_state_dict(uneven)
        assert_same_state_dict(opt.state_dict(), before)
        for _ in range(2):
            opt.step(closure_for(loss_fn, mine, opt, []))
            ref.step(closure_for(loss_fn, theirs, ref, []))
        assert_same_tensors(mine, theirs, 1e-8)
        assert_close_state(opt.state_dict(), ref.state_dict(), 1e-6)
    finally:
        opt.close()


def test_closure_step_streams_that_break_the_protocol_change_nothing(stub):
    """A ClosureStep whose evaluation is missing, malformed or of the wrong shapes fails before
    any shard is asked: the session is as it was."""
    with guarded_victim(stub) as victim:
        start = pb.ClosureStepRequest(start=pb.StepRequest(session_id=victim.session_id))
        bad_specs = [wire.spec_of(torch.ones(3, 3)), wire.spec_of(torch.ones(4))]
        for tail in (
            [],  # the client goes away before evaluating
            [pb.ClosureStepRequest(start=pb.StepRequest(session_id=victim.session_id))],
            [pb.ClosureStepRequest(evaluation=pb.Evaluation(loss=1.0, params=[0, 1],
                                                            grads=bad_specs))],
            [pb.ClosureStepRequest(evaluation=pb.Evaluation(loss=1.0, params=[1, 0]))],
        ):  # fmt: skip
            answers = stub.ClosureStep(iter([start, *tail]), metadata=auth(TOKEN))
            assert code_of(lambda a=answers: list(a)) == INVALID
        other = stub.ClosureStep(iter([start]), metadata=auth(OTHER_TOKEN))
        assert code_of(lambda: list(other)) == grpc.StatusCode.NOT_FOUND


# ----- sparse gradients -------------------------------------------------------------------------


def embedding_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(12, 3, sparse=True), torch.nn.Linear(3, 1)


@pytest.mark.parametrize(
    ("cls", "hyper", "both"),
    [(torch.optim.SparseAdam, {"lr": 0.05}, False), (torch.optim.SGD, {"lr": 0.1}, True)],
)
def test_sparse_gradients_over_grpc_match_torch(address, cls, hyper, both):
    """SparseAdam on an embedding (sparse only), SGD on an embedding and a linear layer.

    No index repeats within a step: shardopt coalesces sparse gradients (on the Ray path too),
    and torch's SGD adds an uncoalesced gradient's duplicates one by one, which rounds
    differently (by an ulp)."""
    mine, theirs = embedding_model(), embedding_model()

    def params(model):
        return list(model[0].parameters()) + (list(model[1].parameters()) if both else [])

    opt = shardopt.ShardedOptimizer(
        params(mine), cls, num_shards=2, address=address, token=TOKEN, **hyper
    )
    ref = cls(params(theirs), **hyper)
    for seed in range(4):
        ids = torch.randperm(12, generator=torch.Generator().manual_seed(seed))[:10].view(5, 2)
        for (embedding, linear), o in ((mine, opt), (theirs, ref)):
            o.zero_grad()
            linear(embedding(ids)).sum().backward()
            o.step()
        assert_same_params(mine[0], theirs[0])
        assert_same_params(mine[1], theirs[1])
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    opt.close()


def sparse_header(session_id, indices, values, param=0):
    return pb.PushGradientsHeader(
        session_id=session_id, sparse_params=[param],
        sparse_tensors=[wire.spec_of(indices), wire.spec_of(values)],
    )  # fmt: skip


def test_bad_sparse_gradients_are_refused_and_change_nothing(stub):
    """Indices out of the parameter's range, negative, of the wrong dtype or shape, values of
    the wrong shape, a parameter both dense and sparse: INVALID_ARGUMENT, nothing staged."""
    with guarded_victim(stub) as victim:  # its parameter 0 is 2 x 3
        sid = victim.session_id
        good_values = torch.ones(2, 3)
        cases = [
            (torch.tensor([[0, 2]]), good_values),  # row 2 of 2
            (torch.tensor([[0, -1]]), good_values),
            (torch.tensor([[0, 1]], dtype=torch.int32), good_values),
            (torch.tensor([[0, 1], [0, 0], [1, 1]]), torch.ones(2)),  # 3 sparse dims of 2
            (torch.tensor([[0, 1]]), torch.ones(2, 4)),
        ]
        for indices, values in cases:
            header = sparse_header(sid, indices, values)
            messages = [pb.PushGradientsRequest(header=header)] + [
                pb.PushGradientsRequest(chunk=c) for c in wire.tensor_chunks([indices, values])
            ]
            assert code_of(
                lambda m=messages: stub.PushGradients(iter(m), metadata=auth(TOKEN))
            ) == (INVALID)
            assert code_of(lambda: step(stub, sid)) == grpc.StatusCode.FAILED_PRECONDITION
        both = sparse_header(sid, torch.tensor([[0]]), torch.ones(1, 3))
        both.params.append(0)
        both.grads.append(wire.spec_of(torch.ones(2, 3)))
        only_header = [pb.PushGradientsRequest(header=both)]
        assert code_of(lambda: stub.PushGradients(iter(only_header), metadata=auth(TOKEN))) == (
            INVALID
        )


# ----- shard status, background saves -----------------------------------------------------------


def test_shard_status_and_background_checkpoints_over_grpc(address, tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = shardopt.AdamW(model.parameters(), lr=0.01, num_shards=2, address=address, token=TOKEN)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    status = opt.shard_status()
    assert [s.shard_index for s in status] == [0, 1]
    assert sum(s.num_params for s in status) == 2
    assert sum(s.param_bytes for s in status) >= 4 * 15
    assert {s.last_step_id for s in status} == {1}
    assert sorted(i for s in status for i in s.state_ids) == [0, 1]
    saved = opt.state_dict()
    handle = opt.save_checkpoint("background/one", blocking=False)
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # training goes on; the checkpoint holds the state as of the save
    handle.wait()
    assert handle.done()
    twin = torch.nn.Linear(4, 3)
    other = shardopt.AdamW(twin.parameters(), lr=0.01, address=address, token=TOKEN)
    other.load_checkpoint("background/one")
    assert_same_state_dict(other.state_dict(), saved)
    other.close()
    opt.close()


def test_background_saves_are_bounded_and_waits_checked(stub, gateway):
    sid = open_session(stub, [torch.ones(3)]).session_id
    try:
        push(stub, sid, [torch.ones(3)])
        step(stub, sid)

        def save(path):
            request = pb.CheckpointRequest(session_id=sid, path=path, background=True)
            return stub.SaveCheckpoint(request, metadata=auth(TOKEN))

        ids = [save(f"bounded/{i}").save_id for i in range(MAX_SAVES)]
        assert code_of(lambda: save("bounded/extra")) == grpc.StatusCode.RESOURCE_EXHAUSTED

        def wait(save_id, timeout=0.0, token=TOKEN):
            request = pb.WaitCheckpointRequest(
                session_id=sid, save_id=save_id, timeout_seconds=timeout
            )
            return stub.WaitCheckpoint(request, metadata=auth(token))

        assert code_of(lambda: wait(ids[0], 61.0)) == INVALID
        assert code_of(lambda: wait("no-such-save")) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: wait(ids[0], token=OTHER_TOKEN)) == grpc.StatusCode.NOT_FOUND
        for save_id in ids:
            assert wait(save_id, 30.0).done
        assert code_of(lambda: wait(ids[0])) == grpc.StatusCode.NOT_FOUND  # committed, forgotten
        root = gateway.servicer.checkpoint_dir / token_scope(TOKEN) / "bounded"
        assert sorted(p.name for p in root.iterdir()) == ["0", "1"]
        save("bounded/at-close")  # committed when the session closes
    finally:
        close_session(stub, sid)
    assert (root / "at-close" / ".metadata").exists()


# ----- who sees which sessions ------------------------------------------------------------------


def test_list_sessions_is_scoped_to_the_token_and_operators_see_all(stub):
    mine = open_session(stub, [torch.ones(3)], num_shards=2).session_id
    theirs = open_session(stub, [torch.ones(2)], token=OTHER_TOKEN).session_id
    try:
        push(stub, mine, [torch.ones(3)])
        step(stub, mine)
        listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=auth(TOKEN)).sessions
        assert [s.session_id for s in listed] == [mine]
        (info,) = listed
        assert (info.scope, info.optimizer, info.steps, info.num_params) == (
            token_scope(TOKEN),
            "SGD",
            1,
            1,
        )
        assert [s.shard for s in info.shards] == [0, 1]
        assert all(s.node_id and s.device == "cpu" for s in info.shards)
        assert max(s.last_step for s in info.shards) == 0
        every = pb.ListSessionsRequest(all_tenants=True)
        assert code_of(lambda: stub.ListSessions(every, metadata=auth(TOKEN))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        seen = stub.ListSessions(every, metadata=auth(OPERATOR)).sessions
        scopes = {s.session_id: s.scope for s in seen}
        assert scopes[mine] == token_scope(TOKEN) and scopes[theirs] == token_scope(OTHER_TOKEN)
        # an operator's token reads; it opens, steps and closes nothing
        assert code_of(lambda: open_session(stub, [torch.ones(1)], token=OPERATOR)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert code_of(lambda: close_session(stub, theirs, token=OPERATOR)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert code_of(lambda: stub.ListSessions(every, metadata=auth("x" * 20))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        close_session(stub, mine)
        close_session(stub, theirs, token=OTHER_TOKEN)


# ----- transfer buffers -------------------------------------------------------------------------


def test_pushes_land_straight_in_the_shards_gradient_buffers(gateway, stub):
    """A push receives each gradient straight into its shard's gradient buffer where one shard
    holds the parameter whole (so the step's packing copies nothing), and a parameter split
    across shards into the session's one transfer buffer, reused from step to step, counted,
    and given back at close (a session without split parameters never makes one). A pull while
    gradients are staged sends the parameters, not the gradients, and every step is torch's."""
    params = [torch.randn(64, 8), torch.randn(7)]  # 2 shards: the first split, the second whole
    ref = [p.clone().requires_grad_() for p in params]
    hyper = {"lr": 0.1, "momentum": 0.9}
    twin = torch.optim.SGD(ref, **hyper)
    ledger = gateway.servicer.ledger
    before = ledger.transfer_bytes
    session_id = open_session(stub, params, hyperparameters=hyper, num_shards=2).session_id
    try:
        (session,) = [s for s in gateway.servicer.sessions.snapshot() if s.session_id == session_id]
        backend = session.optimizer.backend
        assert backend.shard_map.is_split(0) and not backend.shard_map.is_split(1)
        assert backend.grad_slot(0) is None
        staged_at = []
        for k in range(3):
            grads = [torch.full_like(p, k + 1.0) for p in params]
            push(stub, session_id, grads)
            staged = [p.grad.data_ptr() for p in session.params]
            assert staged == [session.transfer[0].data_ptr(), backend.grad_slot(1).data_ptr()]
            assert_same_tensors(pull(stub, session_id), ref)
            step(stub, session_id)
            for r, g in zip(ref, grads):
                r.grad = g
            twin.step()
            assert_same_tensors(pull(stub, session_id), ref)
            staged_at.append(staged)
        assert staged_at[0] == staged_at[1] == staged_at[2]  # the same memory every step
        assert ledger.transfer_bytes == before + session.nbytes
        # a client that accepts chunks spanning tensors gets both parameters in one message,
        # and is told that pushes take them too (only with the metadata that says they span)
        request = pb.PullParametersRequest(session_id=session_id)
        call = stub.PullParameters(request, metadata=auth(TOKEN) + chunk_codec.SPANNING)
        answers = list(call)
        assert len(answers) == 2  # the header and one chunk (2,076 bytes)
        assert chunk_codec.asks_spanning(call.initial_metadata())
        header = pb.PushGradientsHeader(session_id=session_id, params=[0, 1],
                                        grads=[wire.spec_of(p) for p in params])  # fmt: skip

        def spanning():
            yield pb.PushGradientsRequest(header=header)
            for data in chunk_codec.spanning_chunks([torch.ones_like(p) for p in params]):
                yield pb.PushGradientsRequest.FromString(data)

        with pytest.raises(grpc.RpcError) as refused:
            stub.PushGradients(spanning(), metadata=auth(TOKEN))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        spans = auth(TOKEN) + chunk_codec.SPANNING
        assert stub.PushGradients(spanning(), metadata=spans).bytes == 4 * (512 + 7)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in session.params)
        assert_same_tensors(
            chunk_codec.receive_parameters(iter(answers), [torch.empty_like(p) for p in params]),
            ref,
        )
        whole = open_session(stub, params, hyperparameters=hyper, num_shards=1).session_id
        try:
            (one,) = [s for s in gateway.servicer.sessions.snapshot() if s.session_id == whole]
            for _ in range(2):
                push(stub, whole, [torch.ones_like(p) for p in params])
                slots = [one.optimizer.backend.grad_slot(i).data_ptr() for i in range(2)]
                assert [p.grad.data_ptr() for p in one.params] == slots
                step(stub, whole)
            assert one.transfer is None and ledger.transfer_bytes == before + session.nbytes
        finally:
            close_session(stub, whole)
    finally:
        close_session(stub, session_id)
    assert ledger.transfer_bytes == before


def test_no_step_runs_while_a_push_streams_into_the_shards_buffers(gateway, stub):
    """A push streams into the shards' gradient buffers, which a step packs into: while one
    streams, Step and ClosureStep of its session are refused (FAILED_PRECONDITION, nothing
    changed) and a second push receives into memory of its own; the last push to end is what
    the next step uses, with torch's numbers."""
    params = [torch.randn(4, 3), torch.randn(5)]
    ref = [p.clone().requires_grad_() for p in params]
    twin = torch.optim.SGD(ref, lr=0.1)
    session_id = open_session(stub, params, num_shards=1).session_id
    release = threading.Event()
    slow_grads = [torch.full_like(p, 2.0) for p in params]
    header = pb.PushGradientsHeader(session_id=session_id, params=[0, 1],
                                    grads=[wire.spec_of(g) for g in slow_grads])  # fmt: skip

    def slow():  # the first gradient, then a wait, then the second
        chunks = list(wire.tensor_chunks(slow_grads))
        yield pb.PushGradientsRequest(header=header)
        yield pb.PushGradientsRequest(chunk=chunks[0])
        release.wait(30)
        for chunk in chunks[1:]:
            yield pb.PushGradientsRequest(chunk=chunk)

    try:
        (session,) = [s for s in gateway.servicer.sessions.snapshot() if s.session_id == session_id]
        streaming = stub.PushGradients.future(slow(), metadata=auth(TOKEN))
        deadline = time.monotonic() + 10
        while session.transfer_user is None:  # the slow push holds the buffers
            assert time.monotonic() < deadline, "the slow push never claimed the buffers"
            time.sleep(0.01)
        push(stub, session_id, [torch.ones_like(p) for p in params])  # memory of its own
        assert session.grads_ready and session.staged_transfer is None
        for call in (
            lambda: step(stub, session_id),
            lambda: list(stub.ClosureStep(iter([pb.ClosureStepRequest(
                start=pb.StepRequest(session_id=session_id))]), metadata=auth(TOKEN))),
        ):  # fmt: skip
            assert code_of(call) == grpc.StatusCode.FAILED_PRECONDITION
        assert session.grads_ready  # the staged push is still there
        assert_same_tensors(pull(stub, session_id), params)
        release.set()
        assert streaming.result(timeout=30).bytes == 4 * (12 + 5)
        step(stub, session_id)  # the slow push ended last: its gradients
        for r, g in zip(ref, slow_grads):
            r.grad = g
        twin.step()
        assert_same_tensors(pull(stub, session_id), ref)
    finally:
        release.set()
        close_session(stub, session_id)


def test_a_pull_that_a_step_overtakes_is_refused_whole_and_the_client_pulls_again(
    gateway, address, stub
):
    """A pull streams the parameters without the session's lock; a step that runs while it
    streams makes the rest of it ABORTED (PullConflictError), never a mix of two states, and
    the Python client pulls again."""
    param = torch.randn(8 << 20)  # 32 MiB: more than gRPC sends ahead of a reader that waits
    session_id = open_session(stub, [param], num_shards=1).session_id
    try:
        request = pb.PullParametersRequest(session_id=session_id)
        answers = stub.PullParameters(request, metadata=auth(TOKEN))
        assert next(answers).WhichOneof("kind") == "header"
        assert next(answers).chunk.offset == 0
        push(stub, session_id, [torch.ones_like(param)])
        step(stub, session_id)  # while the pull waits for its reader
        with pytest.raises(grpc.RpcError) as caught:
            for _ in answers:
                pass
        assert caught.value.code() == grpc.StatusCode.ABORTED
        metadata = dict(caught.value.trailing_metadata())
        assert metadata[ERROR_TYPE_KEY] == "PullConflictError"
        assert_same_tensors(pull(stub, session_id), [param - 0.1])  # whole, after the step
    finally:
        close_session(stub, session_id)

    # the client pulls again: its first pull is overtaken by a step of the same session
    param = torch.zeros(8 << 20)
    opt = shardopt.SGD([param], lr=0.5, address=address, token=TOKEN)
    backend = opt.backend
    assert backend._push_spans  # the gateway said (at open) its pushes take spanning chunks
    real, tries = backend._stub.PullParameters, []

    def overtaken(request, metadata):  # the real stream; a real step between its chunks
        answers = real(request, metadata=metadata)
        header, chunk = next(answers), next(answers)
        if not tries:
            push(stub, backend.session_id, [torch.ones_like(param)])
            step(stub, backend.session_id)
        tries.append(request.session_id)
        yield header
        yield chunk
        yield from answers

    try:
        backend._stub.PullParameters = overtaken
        backend.pull_params()
        assert len(tries) == 2
        assert torch.equal(param, torch.full_like(param, -0.5))  # the state after the step
    finally:
        backend._stub.PullParameters = real
        opt.close()


# ----- metrics ----------------------------------------------------------------------------------


def test_metrics_endpoint_counts_remote_steps_calls_and_refusals(gateway, address, stub):
    before = scrape(gateway.metrics_port)
    model = torch.nn.Linear(3, 2)
    opt = shardopt.SGD(model.parameters(), lr=0.1, address=address, token=TOKEN)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    assert code_of(lambda: stub.ListSessions(pb.ListSessionsRequest(),
                                             metadata=auth("y" * 20)))  # fmt: skip
    huge = pb.SessionSpec(optimizer="SGD", params=[wire.spec_of(torch.ones(1))], num_shards=999)
    opening = iter([pb.OpenSessionRequest(spec=huge)])
    assert code_of(lambda: stub.OpenSession(opening, metadata=auth(TOKEN))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    during = scrape(gateway.metrics_port)
    opt.close()
    after = scrape(gateway.metrics_port)

    def grew(name, **labels):
        return sample(during, name, **labels) - sample(before, name, **labels)

    assert grew("shardopt_step_seconds_count", optimizer="SGD", backend="local") == 3
    assert grew("shardopt_gateway_rpc_seconds_count", method="Step", code="OK") == 3
    assert grew("shardopt_gateway_rpc_seconds_count", method="PullParameters", code="OK") >= 3
    assert grew("shardopt_gateway_rpc_seconds_count", method="ListSessions",
                code="UNAUTHENTICATED") == 1  # fmt: skip
    assert grew("shardopt_gateway_quota_refusals_total", scope=token_scope(TOKEN),
                method="OpenSession") == 1  # fmt: skip
    assert grew("shardopt_gateway_bytes_total", method="PushGradients", direction="in") > 3 * 32
    assert grew("shardopt_gateway_bytes_total", method="PullParameters", direction="out") > 3 * 32
    assert grew("shardopt_events_total", event="session_opened") == 1
    scope = token_scope(TOKEN)
    assert sample(during, "shardopt_gateway_sessions", scope=scope) >= 1
    assert sample(after, "shardopt_gateway_sessions", scope=scope) == (
        sample(during, "shardopt_gateway_sessions", scope=scope) - 1
    )
    assert sample(during, "shardopt_gateway_bytes_held", scope=scope, kind="resident") >= 32
    assert sample(during, "process_resident_memory_bytes") > 0
    names = {name for name, _ in during}
    assert not any(TOKEN in str(key) for key in during)  # no token is ever a label
    assert all(n.startswith(("shardopt_", "process_", "python_")) for n in names)


def test_metrics_port_of_a_stopped_gateway_is_closed():
    gw = serve("127.0.0.1", 0, tokens=[TOKEN], metrics_port=0)
    port = gw.metrics_port
    assert sample(scrape(port), "shardopt_gateway_sessions", scope=token_scope(TOKEN)) == 0
    gw.stop(0)
    time.sleep(0.1)
    with pytest.raises(OSError):
        scrape(port)
