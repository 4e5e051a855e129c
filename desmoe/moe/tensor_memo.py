"""A value derived from a tensor, reused while that tensor is unchanged.

Why: some values derived from a small tensor cost a wait for the GPU each time they are made (a device copy
of a host table, a count read back from device weights), while the tensor itself rarely changes.  Unchanged
means the same object (the entry holds it, so its id cannot be reused by a new tensor while the entry lives)
at the same version (the counter every in-place change bumps).  An inference tensor has no version counter,
so nothing derived from it is reused.  An entry is immutable: a holder replaces it, never edits it.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from torch import Tensor


class TensorMemo(NamedTuple):
    source: Tensor
    version: int
    value: Any

    @staticmethod
    def of(source: Tensor, value: Any) -> Optional[TensorMemo]:
        """The entry for ``value`` derived from ``source`` as it is now; None for an inference tensor."""
        return None if source.is_inference() else TensorMemo(source, source._version, value)

    def fresh(self, source: Tensor) -> bool:
        """Whether ``value`` was derived from ``source`` as it is now (the identity test first: an inference
        tensor is never an entry's source, and reading its version would raise)."""
        return self.source is source and self.version == source._version
