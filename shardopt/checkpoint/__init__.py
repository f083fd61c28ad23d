"""Sharded checkpoints in torch.distributed.checkpoint (DCP) format, written by the shards.

- :mod:`~shardopt.checkpoint.storage`: where the bytes go (a local directory, fsspec's
  ``memory://``, an object store such as ``s3://``) and the DCP writer a shard uses there;
- :mod:`~shardopt.checkpoint.format`: the layout (one data file per shard, DCP's ``.metadata``),
  the shard's side of a save and of a load, and ``describe``/``export`` for the CLI;
- :mod:`~shardopt.checkpoint.integrity`: what a reader checks before anything is unpickled (the
  commit record with every file's SHA-256, its HMAC signature, an allowlist unpickler for
  ``.metadata``);
- :mod:`~shardopt.checkpoint.commit`: one save per location, the commit itself, and what it
  removes.

The client drives the protocol (:mod:`shardopt.client.checkpoints`). Ray-free: shards and
clients both import it; it imports only :mod:`shardopt.core`.
"""
