"""One place that derives every random generator.

Randomness in fedmdh is explicit: a generator is derived from ``(seed, round, institution,
purpose)`` so that every institution and every phase of every round has its own independent
stream, and a run is reproducible bit for bit from its seed whatever order the work happens in.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    """Return a 63-bit integer seed derived from ``seed`` and any labels.

    Parameters
    ----------
    seed:
        The run's seed.
    parts:
        Labels that name the stream, e.g. ``round``, ``institution``, ``"batches"``.
    """
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator for the stream named by ``(seed, *parts)``."""
    return np.random.default_rng(derive_seed(seed, *parts))
