"""The client side: the proxy users hold and the backends that reach its shards.

:class:`~shardopt.client.optimizer.ShardedOptimizer` keeps torch.optim's semantics and hands
tensors to one :class:`~shardopt.client.backend.Backend`, chosen once: Ray shards of this process
(:mod:`~shardopt.client.local`), a shard-group membership (:mod:`~shardopt.client.shard_group`)
or a gateway session over gRPC (:mod:`~shardopt.client.gateway_session`).
"""
