"""A gateway killed and started again resumes its sessions (``shardopt serve --session-store``).

The gateways are real ``shardopt serve`` processes joined to the session's Ray, which outlives
them; they are killed with SIGKILL (nothing is handed over, no finalizer runs).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
import torch
from gateway_helpers import (
    OTHER_TOKEN,
    TOKEN,
    WARM_POOL,
    auth,
    code_of,
    drain,
    open_session,
    push,
    wait_for_line,
)
from group_workers import make_model as group_model
from group_workers import sync_reference
from helpers import (
    assert_same_params,
    assert_same_tensors,
    batch,
    loss_of,
    make_model,
    train_step,
)
from ray.experimental import internal_kv
from test_lbfgs import PROBLEMS, closure_for, make_params

import shardopt
from shardopt.actor.host import NAMESPACE
from shardopt.client.shard_group import list_groups, registry
from shardopt.client.shard_map import ShardMap
from shardopt.core.proto import pb, rpc
from shardopt.gateway import serve
from shardopt.gateway.admission import scope_of
from shardopt.gateway.auth import principal_of
from shardopt.gateway.resume import pieces_of
from shardopt.gateway.session_store import (
    _RELOADED,
    KV_NAMESPACE,
    SessionRecord,
    record_from_json,
    record_to_json,
    store_name,
)


def serve_command(tmp_path, store: str, port: int = 0, *flags: str) -> list[str]:
    """``shardopt serve`` with the session store ``store``, joined to this session's Ray."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
    return [
        sys.executable, "-m", "shardopt", "serve", "--port", str(port),
        "--token-file", str(tokens), "--session-store", store,
        "--ray-address", ray.get_runtime_context().gcs_address, *flags,
    ]  # fmt: skip


def start_gateway(tmp_path, store: str, port: int = 0, *flags: str) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        serve_command(tmp_path, store, port, *flags),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        address = wait_for_line(process, "serving on ").removeprefix("serving on ")
        return drain(process), address
    except BaseException:
        process.kill()
        raise


def records_of(store: str) -> list:
    actor = ray.get_actor(store_name(store), namespace=NAMESPACE)
    return [record for record, _ in ray.get(actor.records.remote())]


def gone(name: str, timeout: float = 30.0) -> bool:
    """Whether the named actor ends within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except (ValueError, ray.exceptions.RayActorError):
            return True
        time.sleep(0.5)
    return False


def test_a_gateway_killed_mid_training_resumes_for_its_token_only(tmp_path):
    """SIGKILL while the client steps; the same command starts again on the same port: the
    client pauses and its run ends bit-identical to torch's uninterrupted one (and so after a
    graceful stop and start). The restarted
    gateway counts the resumed session against the token's quota; another token can neither
    see nor use it; the record holds a hash of the token, never the token."""
    store = f"restart-{uuid.uuid4().hex[:8]}"
    flags = ("--max-sessions-per-token", "1")
    process, address = start_gateway(tmp_path, store, 0, *flags)
    port = int(address.rsplit(":", 1)[1])
    model = make_model(0)
    reference = copy.deepcopy(model)
    opt = shardopt.Adam(
        model.parameters(), lr=1e-2, address=address, token=TOKEN, num_shards=2,
        reconnect_timeout=120,
    )  # fmt: skip
    want_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
    killed, restarted = threading.Event(), []

    def kill_and_restart() -> None:
        killed.wait()
        process.send_signal(signal.SIGKILL)
        process.wait()
        restarted.append(start_gateway(tmp_path, store, port, *flags)[0])

    killer = threading.Thread(target=kill_and_restart)
    killer.start()
    try:
        pauses = []
        for i in range(6):
            if i == 3:
                killed.set()  # killed while this step pushes, steps or pulls
            start = time.monotonic()
            train_step(model, opt, seed=i)
            pauses.append(time.monotonic() - start)
            train_step(reference, want_opt, seed=i)
        killer.join()
        assert max(pauses) > 1.0  # the client waited for the new gateway
        # a graceful stop (SIGTERM) hands the session over to the next gateway, too
        restarted[0].send_signal(signal.SIGTERM)
        assert restarted[0].wait(timeout=60) == 0
        restarted.append(start_gateway(tmp_path, store, port, *flags)[0])
        for i in range(6, 8):
            train_step(model, opt, seed=i)
            train_step(reference, want_opt, seed=i)
        assert_same_params(model, reference)
        got, want = opt.state_dict(), want_opt.state_dict()
        assert_same_tensors(
            [v for s in got["state"].values() for v in s.values()],
            [v for s in want["state"].values() for v in s.values()],
        )
        (record,) = records_of(store)
        assert record.principal == principal_of(TOKEN)
        assert TOKEN not in repr(record)
        # names the gateway made, none a request chose
        assert all(name.startswith("host/") for name in record.hosts)
        assert record.session_id == opt.backend.session_id
        with grpc.insecure_channel(address) as channel:
            stub = rpc.OptimizerServiceStub(channel)
            ref = pb.SessionRef(session_id=opt.backend.session_id)
            # another token: not listed, not usable
            other = stub.ListSessions(pb.ListSessionsRequest(), metadata=auth(OTHER_TOKEN))
            assert not other.sessions
            denied = code_of(lambda: stub.GetParamGroups(ref, metadata=auth(OTHER_TOKEN)))
            assert denied == grpc.StatusCode.NOT_FOUND
            assert not stub.CloseSession(ref, metadata=auth(OTHER_TOKEN)).closed
            # the resumed session counts: the token holds its one session already
            refused = code_of(lambda: open_session(stub, [torch.zeros(2)]))
            assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
            mine = stub.ListSessions(pb.ListSessionsRequest(), metadata=auth(TOKEN))
            assert [s.session_id for s in mine.sessions] == [opt.backend.session_id]
        opt.close()
        assert records_of(store) == []
    finally:
        for p in [process, *restarted]:
            if p.poll() is None:
                p.kill()
    # no gateway, no session: the store kills its hosts and ends
    assert gone(store_name(store))


def eventually(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_idle_sessions_expire_across_restarts_and_without_a_gateway(tmp_path):
    """A restarted gateway expires a session from its last use before the restart; a gateway
    killed and never started again: its idle session's shards and hosts end after the idle
    timeout, a group member's rank leaves its group (which ends), and so does the store."""
    store = f"idle-{uuid.uuid4().hex[:8]}"
    process, address = start_gateway(tmp_path, store)  # idle timeout: an hour
    port = int(address.rsplit(":", 1)[1])
    processes = [process]
    try:
        kwargs = dict(address=address, token=TOKEN, num_shards=1, reconnect_timeout=60)
        model = torch.nn.Linear(3, 2)
        first = shardopt.SGD(model.parameters(), lr=0.1, **kwargs)
        process.send_signal(signal.SIGKILL)
        process.wait()
        # started again with a one-second idle timeout: the session was last used before
        flags = ("--session-idle-timeout", "1")
        process = start_gateway(tmp_path, store, port, *flags)[0]
        processes.append(process)
        assert eventually(lambda: records_of(store) == [])
        model(torch.ones(1, 3)).sum().backward()
        with pytest.raises(shardopt.OptimizerClosedError):
            first.step()
        kwargs["reconnect_timeout"] = 0
        second = shardopt.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, **kwargs)
        (record,) = records_of(store)
        name = f"idle-{uuid.uuid4().hex[:6]}"  # a group member: the registry holds its rank
        scoped = f"{scope_of(principal_of(TOKEN))}-{name}"
        member = dict(group=name, world_size=1, rank=0)
        third = shardopt.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, **member, **kwargs)
        process.send_signal(signal.SIGKILL)  # (within the idle timeout of its opening)
        process.wait()
        assert scoped in list_groups() and third.backend.session_id
        assert all(gone(name, 30) for name in record.hosts)
        assert gone(store_name(store))
        assert eventually(lambda: scoped not in list_groups())  # the store let its rank go
        with pytest.raises(shardopt.ShardUnavailableError):
            second.step()
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


def train_both(model, opt, reference, want, seeds) -> None:
    """The same train steps for shardopt's model and torch's."""
    for seed in seeds:
        train_step(model, opt, seed)
        train_step(reference, want, seed)


def test_a_gateway_that_cannot_listen_leaves_the_stores_sessions_alone(tmp_path):
    """A `shardopt serve` started on a port it cannot have (in use) exits (code 1, one line
    saying so) before it takes the session store over: the store keeps the session a stopped
    gateway handed over, the next gateway resumes it, and its client goes on as torch. (Before,
    the failed gateway resumed the session into itself, and its exit closed the session's
    shards: the client's run was lost.)"""
    from concurrent import futures

    store = f"unbound-{uuid.uuid4().hex[:8]}"
    process, address = start_gateway(tmp_path, store)
    port = int(address.rsplit(":", 1)[1])
    processes = [process]
    squatter = grpc.server(futures.ThreadPoolExecutor(1))
    taken = squatter.add_insecure_port("127.0.0.1:0")
    squatter.start()
    try:
        model, reference = make_model(0), make_model(0)
        opt = shardopt.Adam(
            model.parameters(), lr=1e-2, address=address, token=TOKEN, num_shards=2,
            reconnect_timeout=120,
        )  # fmt: skip
        want = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
        train_both(model, opt, reference, want, range(2))
        process.send_signal(signal.SIGTERM)  # graceful: hands its session over to the store
        assert process.wait(60) == 0
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        failed = subprocess.run(
            serve_command(tmp_path, store, taken), capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert f"shardopt serve: cannot listen on 127.0.0.1:{taken}" in failed.stdout
        assert len(records_of(store)) == 1
        process = start_gateway(tmp_path, store, port)[0]
        processes.append(process)
        train_both(model, opt, reference, want, range(2, 4))
        assert_same_params(model, reference)
        opt.close()
        assert records_of(store) == []
    finally:
        squatter.stop(0)
        for p in processes:
            if p.poll() is None:
                p.kill()


def hand_over_in_process(store: str, model, reference, before=None, after=None) -> None:
    """A remote Adam on 2 shards of an in-process gateway of session store ``store`` trains 2
    steps beside torch's; the gateway stops (handing its session over), another one serves the
    store in this process on its port, and 2 more steps follow: torch's numbers throughout.
    ``before(gateway)`` runs before the restart, ``after(gateway)`` after it."""
    first = serve("127.0.0.1", 0, tokens=[TOKEN], session_store=store, limits=WARM_POOL)
    running = [first]
    try:
        opt = shardopt.Adam(
            model.parameters(), lr=1e-2, address=f"127.0.0.1:{first.port}", token=TOKEN,
            num_shards=2, reconnect_timeout=60,
        )  # fmt: skip
        want = torch.optim.Adam(reference.parameters(), lr=1e-2, fused=True)
        train_both(model, opt, reference, want, range(2))
        if before is not None:
            before(first)
        running.remove(first)
        first.stop(1)  # hands its session over
        running.append(
            serve("127.0.0.1", first.port, tokens=[TOKEN], session_store=store, limits=WARM_POOL)
        )
        if after is not None:
            after(running[0])
        train_both(model, opt, reference, want, range(2, 4))
        assert_same_params(model, reference)
        opt.close()
    finally:
        for gateway in running:
            gateway.stop(1)


def test_an_in_process_gateway_puts_its_sessions_on_its_stores_hosts():
    """`serve()` in a process whose host pool already holds shard hosts of its own (an
    optimizer made and closed before): the gateway's sessions get hosts its session store
    started and knows, so they are recorded, and the next gateway (here, in this process)
    resumes them; the client goes on as torch. (Before, a session placed on the process's
    earlier hosts was silently not recorded: no restart could resume it.)"""
    earlier = shardopt.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, num_shards=2)
    earlier.close()  # its hosts stay in this process's pool, idle
    store = f"in-process-{uuid.uuid4().hex[:8]}"

    def recorded(gateway) -> None:
        assert len(records_of(store)) == 1

    def resumed(gateway) -> None:
        assert len(gateway.servicer.sessions.snapshot()) == 1

    hand_over_in_process(store, make_model(0), make_model(0), recorded, resumed)
    assert records_of(store) == []


def test_a_session_placed_by_another_plan_rule_resumes_where_its_shards_are(monkeypatch):
    """A session recorded by a gateway whose plan placed by bytes alone (shardopt before the
    per-tensor cost) resumes under today's rule: the resumed gateway maps each parameter to
    the pieces the record names, which the shards hold, not to where today's rule would put
    it (which for this model is elsewhere: it refused to resume before)."""
    from shardopt.core.plan import ShardPlan

    model = make_model(0)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    by_bytes = ShardPlan.empty(2).extended(sizes, tensor_cost=0).owners
    assert by_bytes != ShardPlan.empty(2).extended(sizes).owners
    placing = ShardPlan.extended
    monkeypatch.setattr(
        ShardPlan, "extended", lambda plan, sizes, tensor_cost=0: placing(plan, sizes, 0)
    )
    store = f"other-rule-{uuid.uuid4().hex[:8]}"

    def recorded_by_bytes(gateway) -> None:
        (record,) = records_of(store)
        assert tuple(ps[0][0] for ps in record.pieces) == by_bytes
        monkeypatch.undo()  # the next gateway places by today's rule

    def resumed_as_recorded(gateway) -> None:
        (session,) = gateway.servicer.sessions.snapshot()
        assert session.optimizer.plan.owners == by_bytes

    hand_over_in_process(store, model, make_model(0), recorded_by_bytes, resumed_as_recorded)


def _fail_next_step(host, key: str) -> None:
    """Run inside a shard host (``__ray_call__``): its shard ``key`` refuses its next step
    before applying anything (as a gateway killed before the request reached it)."""
    shard = host._shards[key]

    def refuse(request):
        del shard.step  # the class's own again
        raise RuntimeError("injected: this shard never saw the step")

    shard.step = refuse


def test_a_repeated_step_id_is_applied_once():
    """A Step whose answer was lost, sent again with its id (and its gradients pushed again),
    is applied by no shard twice: after a step that one shard applied and the other did not
    (as when the gateway dies between them), its repeat completes it; an id before the last
    one is refused. The same for a sync group's member (by version) and an async one's (by
    the push's id)."""
    gateway = serve(tokens=[TOKEN, OTHER_TOKEN])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = rpc.OptimizerServiceStub(channel)
            params = [torch.randn(4, 3), torch.randn(4, 3)]
            session = open_session(
                stub, params, optimizer="Adam", hyperparameters={"lr": 0.1}, num_shards=2
            )
            sid = session.session_id
            held = gateway.servicer.sessions.snapshot()[0]
            assert sorted(session.owners) == [0, 1]  # one parameter on each shard
            want = [p.clone().requires_grad_() for p in params]
            want_opt = torch.optim.Adam(want, lr=0.1, fused=True)
            grads = [[torch.randn(4, 3) for _ in params] for _ in range(3)]

            def step(step_id: int) -> None:
                push(stub, sid, grads[step_id])
                request = pb.StepRequest(session_id=sid, step_id=step_id)
                stub.Step(request, metadata=auth())

            def torch_step(step_id: int) -> None:
                for w, g in zip(want, grads[step_id]):
                    w.grad = g
                want_opt.step()

            step(0)
            torch_step(0)
            assert_same_tensors(held.params, want)
            step(0)  # the answer was lost: the same step again changes nothing
            assert_same_tensors(held.params, want)
            handle = held.optimizer.backend.handles[1]
            ray.get(handle.host.__ray_call__.remote(_fail_next_step, handle.key))
            with pytest.raises(grpc.RpcError):
                step(1)  # shard 0 applied step 1, shard 1 did not
            step(1)  # repeated: shard 1 applies it, shard 0 answers what it has
            torch_step(1)
            assert_same_tensors(held.params, want)
            step(2)
            torch_step(2)
            assert_same_tensors(held.params, want)
            assert code_of(lambda: step(0)) == grpc.StatusCode.INVALID_ARGUMENT
            assert_same_tensors(held.params, want)

            # a sync group's member: step i is its push for version i; repeated, it is answered
            # from the round its shard applied (not applied again, not refused)
            spec = pb.GroupOptions(name=f"r{uuid.uuid4().hex[:6]}", world_size=1, rank=0)
            sid = open_session(
                stub, params, optimizer="Adam", hyperparameters={"lr": 0.1}, num_shards=1,
                group=spec,
            ).session_id  # fmt: skip
            held = next(s for s in gateway.servicer.sessions.snapshot() if s.session_id == sid)
            want = [p.clone().requires_grad_() for p in params]
            want_opt = torch.optim.Adam(want, lr=0.1, fused=True)
            for step_id in (0, 1):
                step(step_id)
                torch_step(step_id)
                step(step_id)  # its answer was lost: sent again
                assert_same_tensors(held.params, want)
            assert held.optimizer.group.versions == [2]
            assert code_of(lambda: step(0)) == grpc.StatusCode.INVALID_ARGUMENT
            assert_same_tensors(held.params, want)

            # an async group's member: each push carries the step's id; a shard that applied
            # the rank's push with that id answers it again without applying it
            spec = pb.GroupOptions(name=f"a{uuid.uuid4().hex[:6]}", world_size=1, mode="async")
            sid = open_session(
                stub, params, optimizer="Adam", hyperparameters={"lr": 0.1}, num_shards=2,
                group=spec,
            ).session_id  # fmt: skip
            held = next(s for s in gateway.servicer.sessions.snapshot() if s.session_id == sid)
            assert sorted(held.optimizer.plan.owners) == [0, 1]
            want = [p.clone().requires_grad_() for p in params]
            want_opt = torch.optim.Adam(want, lr=0.1, fused=True)
            step(0)
            torch_step(0)
            step(0)  # its answer was lost: sent again
            assert_same_tensors(held.params, want)
            host = held.optimizer.backend.handles[1].host
            ray.get(host.__ray_call__.remote(_fail_next_group_push))
            with pytest.raises(grpc.RpcError):
                step(1)  # shard 0 applied it, shard 1 did not
            step(1)  # sent again: shard 1 applies it, shard 0 answers what it has
            torch_step(1)
            assert_same_tensors(held.params, want)
            step(2)
            torch_step(2)
            assert_same_tensors(held.params, want)
            assert held.optimizer.group.versions == [3, 3]
    finally:
        gateway.stop(0)


def _fail_next_group_push(host) -> None:
    """Run inside a group shard host (``__ray_call__``): its shard refuses its next step before
    applying anything."""
    shard = host._shard

    def refuse(*request):
        del shard.step  # the class's own again
        raise RuntimeError("injected: this shard never saw the push")

    shard.step = refuse


def test_a_record_is_json_data_that_round_trips():
    """Records are saved as JSON (never pickled): tuples stay tuples, floats keep their bits,
    and text that is not a record is refused."""
    record = SessionRecord(
        session_id="s", principal="p" * 64, optimizer="Adam",
        kwargs={"lr": 0.1 + 2e-17, "betas": (0.9, 0.999), "eps": float("inf"), "num_shards": 2,
                "default_dtype": torch.float64},
        groups=(((0, 1), {"lr": 0.1, "amsgrad": False, "nested": [1, {2: None}]}),),
        names=("a", "b"), specs=(("torch.float32", (2, 3)), ("torch.float64", ())), nbytes=32,
        hosts=("host/x",), keys=("k/0",), placed=(1,), pieces=(((0, 0, 2),), ((0, 0, 1),)),
        lbfgs={"state": {"t": {"tensor": "torch.float32", "value": 0.25}}, "machine": {}},
    )  # fmt: skip
    assert record_from_json(record_to_json(record)) == record
    for text in (
        '{"session_id": {"x": 1}}', '{"code": "os.system"}', "[1]",
        '{"kwargs": {"d": [["default_dtype", {"dtype": ["int64"]}]]}}',
    ):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            record_from_json(text)


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_param_groups_lbfgs_and_a_lost_store_survive_a_restart(tmp_path):
    """One gateway serves an Adam session that added a param group (two shards, placed in two
    placements), an LBFGS session and a second LBFGS session. The store's process is killed
    (SIGKILL): Ray restarts it and it reloads its records from the GCS's key-value store (JSON,
    no token). The gateway is killed during the second LBFGS session's step, after it asked for
    an evaluation: that step fails at once (never tried again) and the restarted gateway refuses
    the session's further steps. The other two, stepping while no gateway serves, pause and end
    bit-identical to torch's uninterrupted runs."""
    store = f"groups-{uuid.uuid4().hex[:8]}"
    process, address = start_gateway(tmp_path, store)
    port = int(address.rsplit(":", 1)[1])
    processes = [process]
    try:
        kwargs = dict(address=address, token=TOKEN, reconnect_timeout=120)
        model, reference = make_model(0), make_model(0)
        first = [list(m.parameters()) for m in (model[0], reference[0])]
        rest = [[p for m in list(net)[1:] for p in m.parameters()] for net in (model, reference)]
        adam = shardopt.Adam(first[0], lr=1e-2, num_shards=2, **kwargs)
        want_adam = torch.optim.Adam(first[1], lr=1e-2, fused=True)
        loss_fn, shapes = PROBLEMS["least_squares"]
        lbfgs_kwargs = dict(max_iter=4, history_size=3, line_search_fn="strong_wolfe")
        mine, theirs, cut = make_params(shapes), make_params(shapes), make_params(shapes, seed=1)
        lbfgs = shardopt.LBFGS(mine, num_shards=1, **lbfgs_kwargs, **kwargs)
        want_lbfgs = torch.optim.LBFGS(theirs, **lbfgs_kwargs)
        doomed = shardopt.LBFGS(cut, num_shards=1, **lbfgs_kwargs, **kwargs)

        def both_lbfgs() -> None:
            got = lbfgs.step(closure_for(loss_fn, mine, lbfgs, []))
            want = want_lbfgs.step(closure_for(loss_fn, theirs, want_lbfgs, []))
            assert_same_tensors([got, *mine], [want, *theirs])

        def both_adam(seed: int) -> None:
            train_step(model, adam, seed)
            train_step(reference, want_adam, seed)

        both_adam(0)
        adam.add_param_group({"params": rest[0], "lr": 5e-3})
        want_adam.add_param_group({"params": rest[1], "lr": 5e-3})
        for i in (1, 2):
            both_adam(i)
            both_lbfgs()
        doomed.step(closure_for(loss_fn, cut, doomed, []))

        # the store's process dies: Ray starts it again, and it reloads what it saved
        actor = ray.get_actor(store_name(store), namespace=NAMESPACE)
        pid = _pid(actor)
        os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: _pid(actor) != pid)
        # the gateway that beats on is its gateway again (a new one's claim would wait)
        gateway_of = lambda self: self._gateway  # noqa: E731
        assert eventually(lambda: ray.get(actor.__ray_call__.remote(gateway_of)) != _RELOADED)
        records = {r.session_id: r for r in records_of(store)}
        assert set(records) == {o.backend.session_id for o in (adam, lbfgs, doomed)}
        grown = records[adam.backend.session_id]
        assert grown.placed == (1, 1)
        at_once = ShardMap(2)  # placed as it grew: not the plan of all its parameters at once
        at_once.place([*first[0], *rest[0]], [0, 0, 1, 1, 1, 1], [False] * 6)
        assert grown.pieces != pieces_of(at_once)
        assert records[lbfgs.backend.session_id].lbfgs["state"]["n_iter"] > 0
        saved = internal_kv._internal_kv_list(store_name(store), namespace=KV_NAMESPACE)
        assert len(saved) >= 3  # the records, the hosts, maybe last use
        for key in saved:
            assert TOKEN.encode() not in internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)

        # the gateway dies during an LBFGS step, once it asked for an evaluation
        calls = []
        inner = closure_for(loss_fn, cut, doomed, calls)

        def killing_closure():
            if len(calls) == 1:  # the step's second evaluation: the shards moved
                process.send_signal(signal.SIGKILL)
                process.wait()
            return inner()

        with pytest.raises(shardopt.ShardUnavailableError) as failed:
            doomed.step(killing_closure)
        assert "not tried again" in "".join(getattr(failed.value, "__notes__", []))
        restarted: list = []
        starter = threading.Thread(
            target=lambda: restarted.append(start_gateway(tmp_path, store, port)[0])
        )
        starter.start()
        try:
            both_lbfgs()  # tried again while no gateway serves: it had begun nothing
            both_adam(3)
        finally:
            starter.join()
            processes.extend(restarted)
        both_adam(4)
        both_lbfgs()
        assert_same_params(model, reference)
        got, want = adam.state_dict(), want_adam.state_dict()
        assert [g["lr"] for g in got["param_groups"]] == [1e-2, 5e-3]
        assert_same_tensors(
            [v for s in got["state"].values() for v in s.values()],
            [v for s in want["state"].values() for v in s.values()],
        )
        with pytest.raises(shardopt.ShardoptError, match="restarted during LBFGS step"):
            doomed.step(closure_for(loss_fn, cut, doomed, []))
        for opt in (adam, lbfgs, doomed):
            opt.close()
        assert records_of(store) == []
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert gone(store_name(store))
    assert internal_kv._internal_kv_list(store_name(store), namespace=KV_NAMESPACE) == []


def test_a_sync_group_over_a_killed_gateway_finishes_bit_identical(tmp_path):
    """Two remote clients are ranks 0 and 1 of a sync group (2 shards) over one gateway with a
    session store. The gateway is SIGKILLed mid-training, once both shards counted rank 0's
    push of round 3 and wait for rank 1's (its Ray job ends: the registry keeps the store's
    members, so the group lives on), and started again: it attaches both ranks again, and each
    client's step, sent again with its step id, is answered once (the round is applied once,
    the push not refused as a second one). Both runs end bit-identical to an
    uninterrupted sync run computed without Ray, and to each other. After the restart another
    token naming the same group gets a group of its own, and this token cannot take a held
    rank; closing both sessions ends the group."""
    store = f"group-{uuid.uuid4().hex[:8]}"
    process, address = start_gateway(tmp_path, store)
    port = int(address.rsplit(":", 1)[1])
    processes = [process]
    name, steps, hyper = f"g{uuid.uuid4().hex[:6]}", 6, dict(lr=1e-2, weight_decay=0.01)
    scoped = f"{scope_of(principal_of(TOKEN))}-{name}"
    x, y = batch(0, 16)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    want_params, want_state = sync_reference(steps, halves, **hyper)
    models = [group_model(0), group_model(0)]
    kwargs = dict(
        address=address, token=TOKEN, group=name, world_size=2, num_shards=2, timeout=120,
        reconnect_timeout=120, **hyper,
    )  # fmt: skip
    opts = [shardopt.AdamW(models[r].parameters(), rank=r, **kwargs) for r in range(2)]
    restarted = threading.Event()
    hosts, _ = ray.get(registry().primary_hosts.remote(scoped))
    counted = lambda self: (self._version, sorted(self._round))  # noqa: E731 (on a host)

    def train(rank: int) -> list[float]:
        times = []
        for i in range(steps):
            if i == 3 and rank == 1:
                restarted.wait(180)  # rank 0's push of round 3 is counted, then the kill
            start = time.monotonic()
            models[rank].zero_grad()
            loss_of(models[rank], *halves[rank]).backward()
            opts[rank].step()
            times.append(time.monotonic() - start)
        return times

    try:
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(train, r) for r in range(2)]
            rounds = lambda: ray.get([h.__ray_call__.remote(counted) for h in hosts])  # noqa: E731
            assert eventually(lambda: rounds() == [(3, [0]), (3, [0])])
            process.send_signal(signal.SIGKILL)
            process.wait()
            processes.append(start_gateway(tmp_path, store, port)[0])
            group = list_groups()[scoped]  # the gateway's job ended: its held ranks stayed
            held = {r: h.rsplit("/", 1) for r, h in group["held"].items()}
            assert group["members"] == [0, 1] and held == {
                r: [store_name(store), o.backend.session_id] for r, o in enumerate(opts)
            }
            # another token's group of that name is its own; this token's ranks are taken
            with grpc.insecure_channel(address) as channel:
                stub = rpc.OptimizerServiceStub(channel)
                spec = pb.GroupOptions(name=name, world_size=1, rank=0, mode="sync")
                other = open_session(stub, [torch.ones(2)], OTHER_TOKEN, group=spec, num_shards=1)
                assert other.created_group
                ref = pb.SessionRef(session_id=other.session_id)
                assert stub.CloseSession(ref, metadata=auth(OTHER_TOKEN)).closed
            with pytest.raises(ValueError, match="rank 0 is already attached"):
                shardopt.AdamW(group_model(0).parameters(), rank=0, **kwargs)
            restarted.set()
            pauses = [max(r.result(timeout=300)) for r in runs]
        assert pauses[0] > 1.0  # the client waited for the new gateway
        assert list_groups()[scoped]["members"] == [0, 1]
        hosts, _ = ray.get(registry().primary_hosts.remote(scoped))
        assert ray.get([h.version.remote() for h in hosts]) == [steps, steps]  # once each
        for model in models:
            assert_same_tensors(list(model.parameters()), want_params)
        got = opts[1].state_dict()
        for p, st in want_state["state"].items():
            assert_same_tensors([got["state"][p][k] for k in st], list(st.values()))
        assert len(records_of(store)) == 2
        for opt in opts:
            opt.close()
        assert records_of(store) == []
        assert eventually(lambda: scoped not in list_groups())
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


def test_elastic_groups_are_refused_over_a_gateway():
    """A gateway takes no elastic group members at all: refused before anything is sent."""
    with pytest.raises(ValueError, match="elastic=True applies to shard groups in the Ray"):
        shardopt.AdamW(
            [torch.zeros(2, requires_grad=True)], group="g", elastic=True, address="127.0.0.1:9"
        )
