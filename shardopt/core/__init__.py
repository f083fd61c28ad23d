"""The Ray-free core: what crosses a process boundary and how it is laid out.

Flat buffers and value trees (:mod:`~shardopt.core.buffers`), the typed records of a step
(:mod:`~shardopt.core.records`), the sharding plan, param-group options, the wire format of the
gRPC gateway, shared-memory files, GradScaler's contract and torch's step checks, and the error
types. Imports torch (and protobuf for the wire format), never Ray or the other layers.
"""
