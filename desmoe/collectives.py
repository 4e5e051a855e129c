"""The reductions methods and trainers need, on any tensor device and any backend.

Why one module: NCCL reduces only accelerator tensors, gloo both, and a process
group created with a device->backend map (``cpu:gloo,cuda:nccl``, see
:func:`desmoe.distributed.init_distributed`) picks the backend from the tensor.
Statistics live on the CPU (routing counts, accuracies, flags), so a hand-written
``all_reduce`` of a CPU tensor works on gloo tests and fails on an NCCL job; the
LM path had that bug and fixed it in its own copy, TRGE kept it.  Every reduction
goes through :func:`all_reduce_`, which reduces in place when the group's backend
serves the tensor's device and otherwise reduces a copy on this rank's device and
writes it back: the caller never moves tensors.

Single process (no process group, or a group of one): every function is the identity.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

Number = Union[int, float, bool]
_OPS = ("sum", "max", "min")


def is_distributed(group=None) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1


def world_size(group=None) -> int:
    return _dist().get_world_size(group=group) if is_distributed(group) else 1


def serves(device: torch.device, group=None) -> bool:
    """Whether ``group``'s backend(s) reduce tensors on ``device`` in place."""
    import torch.distributed as dist

    return config_serves(dist.get_backend_config(group), device.type)


def config_serves(config: str, device_type: str) -> bool:
    """``config`` as torch writes it: "cpu:gloo,cuda:nccl", or a bare backend name ("nccl")."""
    import torch.distributed as dist

    if ":" in config:
        return any(item.split(":")[0].strip() == device_type for item in config.lower().split(","))
    return device_type in dist.Backend.backend_capability.get(config.lower(), [])


def all_reduce_(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """Reduce ``t`` over ``group`` in place (sum, max or min) and return it; any device, any backend."""
    if op not in _OPS:
        raise ValueError(f"op='{op}': expected one of {', '.join(_OPS)}")
    if not is_distributed(group):
        return t
    dist = _dist()
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    if serves(t.device, group) and t.is_contiguous() and t.dtype != torch.bool:
        dist.all_reduce(t, op=reduce_op, group=group)
        return t
    from desmoe.distributed import device

    # bool: no backend sums bools; a 0/1 integer sum or max gives the same truth value.
    work = t.to(device(), dtype=torch.int32 if t.dtype == torch.bool else t.dtype, copy=True).contiguous()
    dist.all_reduce(work, op=reduce_op, group=group)
    with torch.no_grad():
        t.copy_(work.to(t.device, dtype=t.dtype))
    return t


def reduced(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """A reduced copy of ``t`` (``t`` itself unchanged)."""
    return all_reduce_(t.detach().clone(), op, group)


def reduce_number(x: Union[Number, Tensor], op: str = "sum", group=None) -> float:
    """A python number or one-element tensor reduced over ``group``: sum, max or min."""
    t = x.detach().reshape(1).clone() if isinstance(x, Tensor) else torch.tensor([float(x)], dtype=torch.float64)
    return float(all_reduce_(t, op, group).item())


def mean_over_ranks(x: Union[Number, Tensor], group=None) -> float:
    """The mean of a per-rank scalar: float32 sum over ranks, divided on the host (the numbers
    the trainers always logged; a float64 sum would change their last bits)."""
    t = x.detach().float().reshape(1).clone() if isinstance(x, Tensor) else torch.tensor([float(x)])
    return all_reduce_(t, "sum", group).item() / world_size(group)


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank (one agreed decision)."""
    return reduce_number(1.0 if flag else 0.0, "max", group) > 0


def all_ranks(flag: bool, group=None) -> bool:
    return reduce_number(1.0 if flag else 0.0, "min", group) > 0


def on_rank0(fn: Callable[[], Any], poll_s: float = 20.0, group=None) -> tuple[Any, Optional[BaseException]]:
    """Run ``fn`` on rank 0 while the other ranks wait, for as long as it takes.  A plain barrier would
    fail the waiting ranks once ``fn`` outlasts the process group's timeout (an export of a large model);
    here rank 0 runs ``fn`` in a thread and every ``poll_s`` all ranks agree on one "done" flag, each
    exchange far inside the timeout.  ``fn`` must not use collectives itself.  Returns ``(result, error)``
    on rank 0 and ``(None, None)`` elsewhere; whether it failed is for the caller to agree on (``any_rank``)."""
    import threading

    box: dict = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller
            box["error"] = err

    if not is_distributed(group):
        work()
        return box.get("result"), box.get("error")
    if _dist().get_rank(group) == 0:
        # A new thread starts on cuda:0, not on this rank's device: fn would allocate on (and sync with)
        # another rank's GPU wherever this rank's local rank is not 0.  Hand it the caller's device.
        caller_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def on_callers_device() -> None:
            if caller_device is not None:
                torch.cuda.set_device(caller_device)
            work()

        thread = threading.Thread(target=on_callers_device, name="desmoe-on-rank0", daemon=True)
        thread.start()
        while True:
            thread.join(poll_s)
            if any_rank(not thread.is_alive(), group):
                return box.get("result"), box.get("error")
    while not any_rank(False, group):
        pass
    return None, None


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled; torch picks the device for the group)."""
    if not is_distributed(group):
        return [obj]
    out: list[Optional[Any]] = [None] * world_size(group)
    _dist().all_gather_object(out, obj, group=group)
    return out


def _dist():
    import torch.distributed as dist

    return dist
