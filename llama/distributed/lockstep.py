"""Driving a tensor-parallel model from one rank: the server's case.

Under tensor parallelism every rank must run every forward, with the same inputs, in the same order
(each holds part of each matrix, and the collectives pair up). A script that runs the same code on
every rank (generate.py, perplexity.py) gets that for free. A server does not: requests arrive on
rank 0. So rank 0 wraps its model in a Leader, which first broadcasts each call (forward,
setup_cache, clear_cache) with its arguments, then runs it; every other rank sits in follow(),
receiving and running the same calls, until the Leader says stop.

    if rank == 0:
        model = Leader(model); engine = Engine(model, tokenizer); ... serve ...; model.stop()
    else:
        follow(model)
"""

from __future__ import annotations

import torch.distributed as dist

COMMANDS = ("forward", "setup_cache", "clear_cache", "stop")


class Leader:
    """Rank 0's handle on its part of a tensor-parallel model: the model's interface (attributes are
    the model's), with every call mirrored on the other ranks. Not thread-safe: one caller (the
    engine's thread) at a time."""

    def __init__(self, model, group=None, src: int = 0):
        self.model, self.group, self.src = model, group, src

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def _send(self, command: str, *args, **kwargs) -> None:
        dist.broadcast_object_list([(command, args, kwargs)], src=self.src, group=self.group)

    def __call__(self, *args, **kwargs):
        self._send("forward", *args, **kwargs)
        return self.model(*args, **kwargs)

    def setup_cache(self, *args, **kwargs) -> None:
        self._send("setup_cache", *args, **kwargs)
        self.model.setup_cache(*args, **kwargs)

    def clear_cache(self) -> None:
        self._send("clear_cache")
        self.model.clear_cache()

    def stop(self) -> None:
        """Release the followers (their follow() returns)."""
        self._send("stop")


def follow(model, group=None, src: int = 0) -> int:
    """Run the calls the Leader on rank `src` broadcasts, until it sends stop; returns how many ran."""
    count = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        command, args, kwargs = box[0]
        if command not in COMMANDS:
            raise RuntimeError(f"unknown lockstep command {command!r}")
        if command == "stop":
            return count
        getattr(model, "__call__" if command == "forward" else command)(*args, **kwargs)
        count += 1
