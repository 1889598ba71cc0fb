"""Torch modules and small training helpers (no federation logic)."""
