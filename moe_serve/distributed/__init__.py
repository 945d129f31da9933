"""Distributed serving: worker ranks (TP + EP) driven over ZeroMQ, tensors over torch.distributed.

Entry points: `executor.DistributedModel` (the engine's model when parallel.tp * ep > 1),
`worker` (a rank's process), `launcher.WorkerGroup` (start, watch, stop ranks). See docs/distributed.md.
"""
