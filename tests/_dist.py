"""Running DDP workers from a test without risking a CI run that never ends."""
import time

import pytest
import torch.multiprocessing as mp


def spawn_or_fail(fn, args, nprocs=2, limit_s=240.0):
    """mp.spawn, but a worker that hangs (a lost peer, a teardown race) fails the test instead of
    blocking pytest forever; a worker that raises re-raises here as with join=True."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"DDP workers did not finish within {limit_s:.0f} s")
