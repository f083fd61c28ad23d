"""The actor side: what runs inside Ray actors.

A :class:`~shardopt.actor.shard.Shard` (a plain class: master parameters and a real torch
optimizer), the :class:`~shardopt.actor.host.ShardHost` actor that holds shards of the optimizers
of one process, and the actors of shard groups (their registry and their shard hosts). Imports
:mod:`shardopt.core` and :mod:`shardopt.checkpoint`, never the client side.
"""
