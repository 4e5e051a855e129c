"""Device copies of small host tables that every forward reads (slot maps, masks).

Why: ``t.to(cuda)`` of a pageable host tensor is a blocking copy, so a table kept on the host
and moved in each forward made every MoE layer wait for the GPU.  A copy is made once per
(table, device) and reused until the table is replaced or changed in place (its version counter).
Kept outside ``state_dict``: the keys and the saved tensors stay the host tables.
"""
from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor


class DeviceCopies:
    def __init__(self) -> None:
        self._copies: dict[Hashable, tuple[Tensor, int, Tensor]] = {}

    def get(self, key: Hashable, t: Tensor, device: torch.device) -> Tensor:
        """``t.to(device)``, copied only when ``t`` is new, changed or wanted on another device."""
        hit = self._copies.get(key)
        # holding ``t`` in the entry keeps its id from being reused by a new table
        if hit is not None and hit[0] is t and hit[1] == t._version and hit[2].device == device:
            return hit[2]
        copy = t.to(device)
        self._copies[key] = (t, t._version, copy)
        return copy
