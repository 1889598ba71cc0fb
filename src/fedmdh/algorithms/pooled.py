"""Pooled reference (NOT federated): all training rows in one place.

Each row keeps only its own institution's features (the others are 0 after standardisation), so
the model has exactly the information the federation has, without the federation's constraints.
The simulator merges the institutions into one and gives it the federation's budget: per round,
``local_steps x number of institutions`` minibatch steps, the same number of rows processed as a
federated round.
"""

from __future__ import annotations

from fedmdh.algorithms.local import Local


class Pooled(Local):
    """Centralised training on the union of the institutions' rows (a reference)."""

    name = "pooled"
    secure_reveals = "all rows: it is the non-federated reference"
    federated = False
    centralized = True
