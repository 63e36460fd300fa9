"""Running 2-process gloo DDP workers from a test without risking a CI run that never ends."""

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank, world, port):
    """In a worker: one intra-op thread (two processes share the cores) and the gloo group."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )


def leave():
    # Both ranks leave together: rank 0 hosts the TCP store, and a rank still tearing down after
    # it exited was seen to wait forever.
    dist.barrier()
    dist.destroy_process_group()


def spawn_or_fail(fn, out_dir, nprocs=2, limit_s=240.0):
    """mp.spawn of fn(rank, nprocs, port, out_dir), but a worker that hangs (a lost peer, a
    teardown race) fails the test instead of blocking pytest forever; a worker that raises
    re-raises here as with join=True."""
    ctx = mp.spawn(fn, args=(nprocs, _free_port(), out_dir), nprocs=nprocs, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"DDP workers did not finish within {limit_s:.0f} s")
