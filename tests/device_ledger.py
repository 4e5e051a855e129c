"""DeviceLedger: CUDA's placement rules replayed on a CPU run (which tensors would live on the accelerator).

A CPU run cannot mix devices, so a path that fed host-side data (a batch, tokenizer output, weights built
without ``device=``) to the engine, or set device results against host tensors, passes every CPU test and
fails at the first step on a GPU.  The ledger, a TorchFunctionMode, tracks as "device" tensors: the model's
parameters and buffers (``mark``), the result of every ``.to(device)`` / ``.cuda()`` and of every factory
given ``device=``, and everything computed from those; anything else is host-side.  An op that would fail
on CUDA is recorded in ``found``: a device tensor with a host tensor of one or more dimensions (a host
0-dim tensor is a scalar CUDA accepts, but not among the tensors ``cat``/``stack`` join), an in-place op
writing device values into a host tensor, a host tensor indexed by device indices, and ``.numpy()`` of a
device tensor.  (``.to("cpu")`` counts as a move here: the
CPU is the engine's device.)  ``reads`` counts ``.item()`` calls per tensor; ``host_reads`` counts every
read-back of a device tensor to the host (``.item()``, ``.tolist()``, ``bool``/``int``/``float``, ``.cpu()``,
``.numpy()``: each waits for the GPU) by the desmoe line that made it.
"""
import traceback
from collections import Counter
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_COPIES = {torch.Tensor.copy_, torch.Tensor.__setitem__}  # copy across devices: allowed (a transfer)
_READS = {torch.Tensor.numpy}
_JOINS = {torch.cat, torch.stack, torch.hstack, torch.vstack, torch.concat, torch.concatenate}
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class DeviceLedger(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.device = WeakIdKeyDictionary()  # tensors that would be on the accelerator
        self.found: list[str] = []
        self.reads = WeakIdKeyDictionary()  # .item() calls per tensor
        self.host_reads: Counter = Counter()  # read-backs of device tensors, by "desmoe file:line"

    def mark(self, module) -> None:
        for t in [*module.parameters(), *module.buffers()]:
            self.device[t] = True

    def _on(self, t) -> bool:
        return t in self.device

    @staticmethod
    def _where(via: bool = False) -> str:
        """The innermost desmoe line on the stack; with ``via``, also the library line under it that ran the op
        (e.g. inside transformers' modeling code called from desmoe)."""
        stack = [f for f in traceback.extract_stack() if "/tests/" not in f.filename and "/torch/" not in f.filename]
        here = [f for f in stack if "desmoe" in f.filename]
        where = f"desmoe{here[-1].filename.rsplit('desmoe', 1)[-1]}:{here[-1].lineno}" if here else "?"
        if via and here and stack[-1] is not here[-1]:
            where += f" via {stack[-1].filename.rsplit('site-packages/', 1)[-1]}:{stack[-1].lineno}"
        return where

    def _flag(self, func, why: str) -> None:
        self.found.append(f"{getattr(func, '__name__', func)} at {self._where()}: {why}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu and out is args[0]:  # on the CPU a no-op; on CUDA a host copy
            out = out.clone()
        if func in _MOVES and out is args[0] and not self._on(args[0]) and not isinstance(out, torch.nn.Parameter):
            # on the CPU a no-op that returns the host tensor itself; on CUDA a device copy, the host tensor
            # staying on the host (marking it would hide its later use with device tensors).  A parameter keeps
            # its identity: Module.to swaps its .data, so the parameter itself is on the device.
            out = out.clone()
        if func is torch.Tensor.item:
            self.reads[args[0]] = self.reads.get(args[0], 0) + 1
        if getattr(func, "__name__", "") in _HOST_READS and args and isinstance(args[0], torch.Tensor) \
                and self._on(args[0]):
            self.host_reads[self._where(via=True)] += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [self._on(t) for t in tensors]
        if func in _MOVES:
            moved = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
            to_device = moved or (tensors and on[0])
        elif func is torch.Tensor.cpu:
            to_device = False
        elif func in _READS:
            if on and on[0]:
                self._flag(func, "a device tensor read as a numpy array")
            to_device = False
        elif func in _COPIES:
            self_on = bool(on) and on[0]
            index = tree_flatten(args[1])[0] if func is torch.Tensor.__setitem__ and len(args) > 1 else []
            if not self_on and any(isinstance(i, torch.Tensor) and self._on(i) for i in index):
                self._flag(func, "a host tensor indexed by device indices")
            to_device = False  # in place: the target keeps its device
        else:
            if any(on):
                # a host 0-dim tensor is a scalar CUDA accepts, except among the tensors cat/stack join
                joins = func in _JOINS
                host = [t for t, o in zip(tensors, on) if not o and (t.dim() > 0 or joins)]
                inplace = getattr(func, "__name__", "").endswith("_") and not getattr(func, "__name__", "").endswith("__") \
                    or getattr(func, "__name__", "") in ("__iadd__", "__isub__", "__imul__", "__itruediv__")
                if func is torch.Tensor.__getitem__ and not on[0]:
                    self._flag(func, "a host tensor indexed by device indices")
                elif func is torch.Tensor.__getitem__:
                    pass  # a device tensor indexed by host indices: allowed
                elif inplace and not on[0]:
                    self._flag(func, "device values written into a host tensor")
                elif host:
                    self._flag(func, f"device and host tensors mixed (host shapes {[tuple(h.shape) for h in host]})")
            to_device = any(on) or ("device" in kwargs and kwargs["device"] is not None)
            if func is torch.Tensor.__getitem__:
                to_device = bool(on) and on[0]
        if to_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out
