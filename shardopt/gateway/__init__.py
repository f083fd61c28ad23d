"""The gRPC gateway: shardopt for clients outside the Ray cluster (``shardopt serve``).

- :mod:`~shardopt.gateway.server`: :func:`serve` wires the servicer with health checking,
  reflection, token auth, call limits, TLS and message-size limits; :class:`Gateway` stops it;
- :mod:`~shardopt.gateway.servicer`: the service's methods, each session a
  :class:`~shardopt.client.optimizer.ShardedOptimizer` in the gateway process;
- :mod:`~shardopt.gateway.sessions`: sessions by token, idle expiry;
- :mod:`~shardopt.gateway.session_store` and :mod:`~shardopt.gateway.resume`: sessions that
  outlive the gateway process (``--session-store``), resumed by a restarted gateway;
- :mod:`~shardopt.gateway.admission`: what a client may ask for (hyperparameters, groups,
  checkpoint paths), checked before anything is built;
- :mod:`~shardopt.gateway.quotas` and :mod:`~shardopt.gateway.call_limits`: what one token may
  hold and how long a stream may wait;
- :mod:`~shardopt.gateway.auth`: bearer tokens.

The wire format is :mod:`shardopt.core.wire`; the Python client is
:mod:`shardopt.client.gateway_session`. See ``SECURITY.md`` for the trust model.
"""

from shardopt.gateway.quotas import Limits
from shardopt.gateway.server import Gateway, serve
from shardopt.gateway.servicer import OptimizerGateway

__all__ = ["Gateway", "Limits", "OptimizerGateway", "serve"]
