"""fedmdh: federated regression for materials science under multi-dimensional heterogeneity."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
