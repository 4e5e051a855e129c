"""Activation checkpointing (recompute), chosen by ``train.activation_checkpointing`` and applied in one
place: the trainer calls :func:`apply` on the recipe's model before the engine is built.

``layers``: every decoder layer (the entries of the outermost ``ModuleList`` that holds MoE blocks: the
embedded ``MoELM.layers``, an HF family's ``model.layers``, the blocks of a CLIP/BERT tower holding expert
groups) keeps only its input for backward and runs its forward again there, under torch's non-reentrant
``torch.utils.checkpoint`` (which restores the CPU RNG and the RNG of the device the layer's input lives
on, so gate noise and dropout draw the same numbers).  Of a stack, the layers before the first one with a
trainable parameter are left plain (:func:`trained_layers`): a frozen layer fed by frozen ones keeps
nothing for backward, so recomputing it would only cost time.

Exactness: the recomputed forward must neither record anything a second time nor see other state than the
forward did. Forward paths here record by *assigning* attributes (``MoEBlock.last_routing``, ``last_stats``,
``aux_loss``, ``pending_load``; an ALR router's ``kd_teacher``/``kd_student``) and read attributes callers
set for one forward and clear right after it (``weight_grad_mask``, ``route_slots``, ``slot_fanout``,
``allowed_experts``, an ALR's ``lam``; TRGE's ``GroupContext``, a parameterless module inside every adapted
block, for its group weights and accumulation noise). So the wrapper snapshots the plain attributes of every
module of the layer when the forward starts; the recompute runs with exactly that snapshot in place, and
afterwards every attribute is put back as it was before the recompute: whatever the recompute recorded is
dropped, the forward's record stands. Buffers changed in place by the recompute (none in the LM layers
today; a BatchNorm's running statistics would be) are copied back too. A KV cache passed to a layer would be
appended to twice: training runs without one (``use_cache`` off), and a layer handed one while recomputing
refuses in one line.

Not covered, so keep forward records as assignments on modules: a plain tensor attribute (not a buffer)
changed in place by a forward would not be undone (none in desmoe's forward paths), nor would the
attributes of a plain object a module refers to (why TRGE's ``GroupContext`` is a module; its
accumulation noise table is re-filled by the recompute with the same draw), and forward hooks on modules
*inside* a layer run again in the recompute (hooks on the layer itself do not; training registers none).
The model code knows nothing of this: no flag is read in ``desmoe.moe`` or the models.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from desmoe.config import bad
from desmoe.errors import ConfigError

KEY = "train.activation_checkpointing"
_MODULE_KEYS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (parameters, hooks, ...)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def stacks(model: nn.Module) -> list[nn.ModuleList]:
    """Every outermost ModuleList holding an MoE block: an LM's decoder layers, each adapted tower's blocks."""
    from desmoe.moe import MoEBlock

    found: list[nn.ModuleList] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, MoEBlock):
                continue  # its experts' ModuleList is not a stack of layers
            if isinstance(child, nn.ModuleList) and any(isinstance(m, MoEBlock) for m in child.modules()):
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The entries of every stack (dense layers of such a stack too)."""
    return [layer for stack in stacks(model) for layer in stack]


def trained_layers(model: nn.Module) -> list[nn.Module]:
    """The layers ``layers`` wraps: of each stack, those from the first one holding a trainable parameter on.
    The ones before it (a frozen CLIP tower's blocks below its first adapted block, a whole tower without
    groups) see no input and no parameter that needs a gradient, so autograd keeps nothing of them anyway;
    every later one keeps its activations, frozen or not, to carry the gradient down to the trainable one."""
    found = []
    for stack in stacks(model):
        trained = [any(p.requires_grad for p in layer.parameters()) for layer in stack]
        if any(trained):
            found.extend(list(stack)[trained.index(True):])
    return found


def _none(model: nn.Module) -> int:
    return 0


def _layers(model: nn.Module) -> int:
    layers = trained_layers(model)
    if not layers:
        raise ConfigError(f"key '{KEY}': 'layers' needs decoder layers holding MoE blocks and trainable "
                          f"parameters; {type(model).__name__} has none (use 'none')")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # a cache would be appended to by the forward and again by the recompute
    for layer in layers:
        checkpoint_module(layer)
    return len(layers)


# The registry: train.activation_checkpointing -> what it does to a model (returns the layers wrapped).
MODES: dict[str, Callable[[nn.Module], int]] = {"none": _none, "layers": _layers}


def check_mode(value: str, key: str = "activation_checkpointing") -> None:
    """For a config section's ``check``: the value must name a registered mode."""
    if value not in MODES:
        raise bad(key, "one of " + ", ".join(repr(m) for m in MODES), value)


def apply(model: nn.Module, mode: str) -> int:
    """Apply ``mode`` to ``model`` (before the engine is built); returns the number of layers recomputed."""
    check_mode(mode, KEY)
    return MODES[mode](model)


def checkpoint_module(module: nn.Module) -> None:
    """Make ``module``'s training forward keep only its inputs and recompute in backward (idempotent).
    The forward is replaced on the instance: parameter names and checkpoints stay as they were."""
    if getattr(module, "_desmoe_recompute", False):
        return
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)  # evaluation and generation: nothing to save for backward
        if any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
            raise ConfigError(f"key '{KEY}': a training forward was given a KV cache, which the recompute "
                              f"would extend a second time; train with use_cache=False or set it to 'none'")
        anchor = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        if anchor is None:
            return inner(*args, **kwargs)
        replay = _Replay(module)
        # The anchor (first tensor argument) goes first so torch stashes the RNG of its device: kwargs alone
        # (HF layers take hidden_states by name in some families) would leave a GPU's RNG unrestored.
        return checkpoint(_drop_anchor(inner), anchor, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), replay), **kwargs)

    module.forward = forward
    module._desmoe_recompute = True


def _drop_anchor(fn: Callable) -> Callable:
    return lambda _anchor, *args, **kwargs: fn(*args, **kwargs)


def _attributes(module: nn.Module) -> list[tuple[nn.Module, dict]]:
    return [(m, {k: v for k, v in vars(m).items() if k not in _MODULE_KEYS}) for m in module.modules()]


def _put(saved: list[tuple[nn.Module, dict]]) -> None:
    for m, attrs in saved:
        for k in [k for k in vars(m) if k not in _MODULE_KEYS and k not in attrs]:
            del m.__dict__[k]  # set only by the forward being undone
        m.__dict__.update(attrs)


class _Replay:
    """The recompute's context: the module state of the forward while it runs, the state before it after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.forward_state = _attributes(module)  # taken when the forward starts

    def __enter__(self) -> None:
        self.before = _attributes(self.module)
        self.buffers = [(b, b._version, b.detach().clone()) for b in self.module.buffers()]
        _put(self.forward_state)

    def __exit__(self, *exc: Any) -> None:
        # also on torch's early stop (an exception raised once every saved tensor is recomputed)
        _put(self.before)
        with torch.no_grad():
            for buf, version, copy in self.buffers:
                if buf._version != version:
                    buf.copy_(copy)
        self.before = self.buffers = None  # type: ignore[assignment]  (forward_state: a second backward replays it)
