"""The thread count every runtime and every peer trains, aggregates and predicts with (the same float sums)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def training_threads() -> int:
    """Torch and BLAS threads for training and aggregation: ``$FEDMDH_TORCH_THREADS``, default 1.

    The networks are small; intra-op threads cost more in synchronisation than they save, and
    they collapse when another process competes for the cores (measured: a 40-round FedMDH run
    took 2.6 s with one thread and 9.2 s with two on an idle 2-core machine). numpy's BLAS
    (OpenBLAS) threads the same way: on the shared 2-core machine a 64 x 64 ``eigh`` (GFAM's
    anchor, every round) took 49 ms with its two default threads and 0.4 ms with one, which made
    a 50-round FedMDH run on a 200-column federation 73 s instead of 4.2 s. The thread count also
    changes the order of float sums in some kernels, so every runtime and every peer uses the
    same count to get the same bits.
    """
    try:
        return max(1, int(os.environ.get("FEDMDH_TORCH_THREADS", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def training_thread_count() -> Iterator[None]:
    """Torch and numpy's BLAS set to :func:`training_threads` inside the block (the caller's counts
    restored after)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    n = training_threads()
    torch.set_num_threads(n)
    blas = threadpool_limits(limits=n, user_api="blas")
    try:
        yield
    finally:
        blas.restore_original_limits()
        torch.set_num_threads(before)


def use_training_threads() -> None:
    """Torch and numpy's BLAS set to :func:`training_threads` for the rest of the process (a node or
    a coordinator process, which does nothing else)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(training_threads())
    threadpool_limits(limits=training_threads(), user_api="blas")
