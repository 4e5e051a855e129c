"""desmoe's forced variants in ``bench/moe_block.py`` (and the step every variant runs): context managers that
switch one part of the block as trained to another implementation for the duration of a step, so each is
timed against the block itself in the same process and rounds."""
from __future__ import annotations

import contextlib
import os
import subprocess
import types
from pathlib import Path


@contextlib.contextmanager
def backend(name):
    """Force desmoe's grouped-experts backend (what ``auto`` would pick is the plain "desmoe" row)."""
    import desmoe.moe.grouped as grouped

    saved = grouped.grouped_mm_supported
    if name is not None:
        grouped.grouped_mm_supported = lambda x, experts: name == "grouped_mm"
    try:
        yield
    finally:
        grouped.grouped_mm_supported = saved


@contextlib.contextmanager
def torch_permutation():
    """The dispatch's gather and combine on torch ops (index_select, index_add_ into zeros) instead of the
    CPU row kernels, as whole-batch passes: the ``desmoe_torch_permute`` row, what ``desmoe.moe.permutation``
    gains on CPU (against ``desmoe_unfused_rows``)."""
    import desmoe.moe.permutation as permutation

    saved = permutation._kernels
    permutation._kernels = lambda t: None
    try:
        with unfused_rows():
            yield
    finally:
        permutation._kernels = saved


def grouped_at(rev: str):
    """``desmoe/moe/grouped.py`` as of git revision ``rev``, loaded as a module beside the current one (it
    imports today's ``desmoe.kernels``; a revision that needs another kernel API fails its warm-up and is
    reported, not fatal)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:desmoe/moe/grouped.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType(f"grouped_at_{rev}")
    exec(compile(src, f"{rev}:desmoe/moe/grouped.py", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def experts_from(module):
    """The block's grouped experts run through ``module``'s autograd functions (``--before``), with the
    dispatch's gather and combine fused into them if that revision can (``fuses_rows``)."""
    import desmoe.moe.dispatcher as dispatcher

    saved = dispatcher.grouped_swiglu, dispatcher.fuses_rows
    dispatcher.grouped_swiglu = module.grouped_swiglu
    dispatcher.fuses_rows = getattr(module, "fuses_rows", lambda x, experts: False)
    try:
        yield
    finally:
        dispatcher.grouped_swiglu, dispatcher.fuses_rows = saved


@contextlib.contextmanager
def unfused_rows():
    """The dispatch's gather and the combine as passes around the experts, their gathered rows kept for
    backward (the ``desmoe_unfused_rows`` row): what token mode changes (desmoe.moe.grouped; on CPU the loop
    gathers and combines one expert at a time, on CUDA grouped_mm re-gathers in backward instead of keeping)."""
    import desmoe.moe.dispatcher as dispatcher

    saved = dispatcher.fuses_rows
    dispatcher.fuses_rows = lambda x, experts: False
    try:
        yield
    finally:
        dispatcher.fuses_rows = saved


@contextlib.contextmanager
def python_loop():
    """The loop backend's experts as the Python loop over ``torch.mm`` and the C kernels (the
    ``desmoe_python_loop`` row), instead of ``desmoe.kernels.experts``' one C call each way with row tiles."""
    saved = os.environ.get("DESMOE_EXPERT_LOOP")
    os.environ["DESMOE_EXPERT_LOOP"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DESMOE_EXPERT_LOOP"]
        else:
            os.environ["DESMOE_EXPERT_LOOP"] = saved


# desmoe's forced variants (the plain "desmoe" row runs as trained): each a context around the step
FORCED = {"loop": lambda: backend("loop"), "grouped_mm": lambda: backend("grouped_mm"),
          "torch_permute": torch_permutation, "unfused_rows": unfused_rows, "python_loop": python_loop}


def step_fn(module, x, grad, context=contextlib.nullcontext):
    """One training step of ``module``, inside ``context()`` (a FORCED variant's, or none)."""
    def run():
        with context():
            module.zero_grad(set_to_none=True)  # as a training step does
            xi = x.detach().requires_grad_(True)
            out = module(xi.unsqueeze(0))
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad.unsqueeze(0))
    return run
