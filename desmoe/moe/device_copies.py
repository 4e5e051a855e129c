"""Device copies of small host tables that every forward reads (slot maps, masks).

Why: ``t.to(cuda)`` of a pageable host tensor is a blocking copy, so a table kept on the host
and moved in each forward made every MoE layer wait for the GPU.  A copy is made once per
(table, device) and reused until the table is replaced or changed in place (``TensorMemo``).
Kept outside ``state_dict``: the keys and the saved tensors stay the host tables.
"""
from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor

from desmoe.moe.tensor_memo import TensorMemo


class DeviceCopies:
    def __init__(self) -> None:
        self._copies: dict[Hashable, TensorMemo] = {}

    def get(self, key: Hashable, t: Tensor, device: torch.device) -> Tensor:
        """``t.to(device)``, copied only when ``t`` is new, changed or wanted on another device."""
        hit = self._copies.get(key)
        if hit is not None and hit.fresh(t) and hit.value.device == device:
            return hit.value
        copy = t.to(device)
        entry = TensorMemo.of(t, copy)
        if entry is not None:  # an inference tensor (no version counter) is copied every time
            self._copies[key] = entry
        return copy
