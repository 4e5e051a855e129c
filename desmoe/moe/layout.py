"""Where experts live: global expert id <-> (EP rank, local id), and named groups.

This is the single definition of the mapping.  It follows DeepSpeed's own
convention (``global = ep_rank * num_local + local``), which is also how its
checkpoint files name experts, so a checkpoint written at one ``ep_size``
reloads at another.

Named groups are sets of global expert ids with a meaning to the caller (say,
the experts of one task or of one domain).  The core only stores and validates
them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExpertLayout:
    num_experts: int
    ep_size: int = 1
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(
                f"ep_size {self.ep_size} must divide the number of experts {self.num_experts}"
            )

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    def owner(self, global_id: int) -> tuple[int, int]:
        """(EP rank, local id) holding ``global_id``."""
        self._check(global_id)
        return divmod(global_id, self.num_local)

    def global_id(self, ep_rank: int, local_id: int) -> int:
        if not (0 <= ep_rank < self.ep_size and 0 <= local_id < self.num_local):
            raise ValueError(f"no expert at ep_rank={ep_rank}, local_id={local_id}")
        return ep_rank * self.num_local + local_id

    def local_global_ids(self, ep_rank: int) -> range:
        return range(ep_rank * self.num_local, (ep_rank + 1) * self.num_local)

    # -- named groups ------------------------------------------------------------------
    def define_group(self, name: str, expert_ids: list[int] | tuple[int, ...] | range) -> None:
        ids = tuple(sorted(set(int(e) for e in expert_ids)))
        for e in ids:
            self._check(e)
        self.groups[name] = ids

    def group(self, name: str) -> tuple[int, ...]:
        if name not in self.groups:
            known = ", ".join(sorted(self.groups)) or "none"
            raise KeyError(f"no expert group '{name}' (defined: {known})")
        return self.groups[name]

    def groups_of(self, global_id: int) -> list[str]:
        return [name for name, ids in self.groups.items() if global_id in ids]

    def contiguous_groups(self, prefix: str, num_groups: int) -> list[str]:
        """Split the experts into ``num_groups`` equal consecutive groups named prefix0.."""
        if self.num_experts % num_groups:
            raise ValueError(f"{num_groups} groups do not divide {self.num_experts} experts")
        size = self.num_experts // num_groups
        names = [f"{prefix}{g}" for g in range(num_groups)]
        for g, name in enumerate(names):
            self.define_group(name, range(g * size, (g + 1) * size))
        return names

    def _check(self, global_id: int) -> None:
        if not 0 <= global_id < self.num_experts:
            raise ValueError(f"expert id {global_id} out of range [0, {self.num_experts})")
