"""``ClosureStep``: a session's step that asks its client to evaluate the closure (LBFGS).

torch's LBFGS evaluates the loss and gradient again and again within one step (its line search
and iterations). Over gRPC the closure stays on the client and the algorithm on the gateway: the
session's optimizer (:class:`shardopt.LBFGS`, its vectors on the shards) runs ``step(closure)``
in a worker thread, where ``closure`` sends the client an ``evaluate`` request (with the
parameters' new values whenever the step has moved them since the client last had them) and
waits for the client's ``evaluation``: the loss and the gradients, checked as ``PushGradients``
checks them (:class:`~shardopt.gateway.gradients.GradientUpload`). The call's own thread sends
what the worker asks for, so the optimizer's state and the algorithm are exactly those of an
in-cluster ``shardopt.LBFGS``: state dicts and checkpoints of the session need nothing else.
Any other optimizer may be stepped this way too (its closure is evaluated once).

The client paces the step: each wait for its answer is a wait for the client, bounded by the
gateway's stream timeouts; a client that goes away ends the step with the error its closure
raised, as a closure that raises ends torch's step.

Talks to: the session's optimizer (in a worker thread); the client over the call's stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from shardopt.core import chunk_codec, wire
from shardopt.core.proto import pb
from shardopt.gateway.gradients import GradientUpload
from shardopt.gateway.quotas import Hold, Ledger, Limits
from shardopt.gateway.sessions import Session

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0
"""How long a cancelled call waits for its worker to notice (it reads the cancelled stream)."""


class ClosureStep:
    """One ``ClosureStep`` call on ``session`` (call with the session's lock held).

    Args:
        session: the session stepped.
        requests: the call's messages after ``start``.
        ledger, limits: what the client's uploads are counted against.
        after_step: run in the worker after the step, given the first evaluation's loss;
            returns the ``done`` reply's ``StepReply``.
        before_first: run in the worker before the client is first asked for an evaluation
            (nothing of the step has reached a shard yet).
    """

    def __init__(
        self,
        session: Session,
        requests: Iterator[Any],
        ledger: Ledger,
        limits: Limits,
        after_step: Callable[[float | None], Any],
        before_first: Callable[[], None] | None = None,
    ) -> None:
        self._session = session
        self._requests = requests
        self._ledger = ledger
        self._limits = limits
        self._after_step = after_step
        self._before_first = before_first
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._sent_versions = [p._version for p in session.params]  # what the client holds
        self._held: Hold | None = None
        self._first_loss: float | None = None
        self.evaluations = 0

    def replies(self) -> Iterator[Any]:
        """The call's answers; the step runs meanwhile in a worker thread."""
        worker = threading.Thread(target=self._run, name="shardopt-closure-step", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = self._out.get()
                if kind == "message":
                    yield value
                elif kind == "chunks":
                    yield from value
                elif kind == "done":
                    yield pb.ClosureStepReply(done=value)
                    return
                else:
                    raise value
        finally:
            worker.join(JOIN_TIMEOUT_S)
            if worker.is_alive():  # pragma: no cover - a shard call that does not return
                logger.error(
                    "a ClosureStep worker of session %s did not end", self._session.session_id
                )

    def _run(self) -> None:
        try:
            self._session.optimizer.step(self._closure)
            self._out.put(("done", self._after_step(self._first_loss)))
        except BaseException as exc:  # the call's thread raises it (its status)
            self._out.put(("error", exc))
        finally:
            self._release()

    def _release(self) -> None:
        session = self._session
        for p in session.params:
            p.grad = None
        if self._held is not None:
            self._held.release()
            self._held = None

    @torch.no_grad()
    def _closure(self) -> torch.Tensor:
        session = self._session
        if self.evaluations == 0 and self._before_first is not None:
            self._before_first()
            self._before_first = None
        params = session.params
        versions = [p._version for p in params]
        if versions != self._sent_versions:  # the step moved them: the client needs them
            specs = [wire.spec_of(p, n) for p, n in zip(params, session.names)]
            self._out.put(
                ("message", pb.ClosureStepReply(evaluate=pb.EvaluateRequest(params=specs)))
            )
            # encoded as the call's thread sends them; the step waits here for the client's
            # answer meanwhile, so the parameters cannot change under it
            self._out.put(("chunks", chunk_codec.encoded_chunks(list(params))))
            self._sent_versions = versions
        else:
            self._out.put(("message", pb.ClosureStepReply(evaluate=pb.EvaluateRequest())))
        message = next(self._requests, None)
        if message is None or message.WhichOneof("kind") != "evaluation":
            got = "the end of the stream" if message is None else f"a {message.WhichOneof('kind')}"
            raise wire.WireError(f"expected the closure's evaluation, got {got}")
        evaluation = message.evaluation
        upload = GradientUpload(
            evaluation, params, session.names, session.nbytes,
            self._limits.upload_budget(session.nbytes),
        )  # fmt: skip
        self._release()
        self._held = self._ledger.hold(
            session.principal, upload.declared, (session.session_id, session.nbytes)
        )
        grads = upload.receive(self._requests)
        for i, grad in grads.items():
            params[i].grad = grad
        self.evaluations += 1
        if self._first_loss is None:
            self._first_loss = evaluation.loss
        return torch.tensor(evaluation.loss, dtype=torch.float64)
