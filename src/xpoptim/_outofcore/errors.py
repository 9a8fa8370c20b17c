"""The out-of-core errors, shared by every engine."""

from __future__ import annotations


class StoreError(ValueError):
    """The store is not a complete xpoptim out-of-core store this version can use, or it
    cannot take this step (nothing was changed)."""


class ConcurrentWriterError(StoreError):
    """Another writer holds the store (directory engine) or committed first (Icechunk).

    Nothing of the refused step was committed; the store holds the other writer's steps.
    """
