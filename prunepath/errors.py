"""Errors a user can fix, shared across the package."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or made for another model."""
