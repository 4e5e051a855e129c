"""The kernels' tests on a machine where no C library can be built (no compiler, or one that refuses
``-march=native``): they skip, naming why, since training then runs the torch ops (tested there too);
wherever a compiler builds an empty source with the kernels' flags, a missing kernel fails the test."""
from __future__ import annotations

import pytest

import desmoe.kernels as kernels


def need(kernel, what: str = "the fused CPU kernels"):
    if kernel is not None:
        return kernel
    problem = kernels.compiler_problem()
    if problem:
        pytest.skip(f"{what} cannot be built here ({problem}); the torch ops run instead")
    pytest.fail(f"{what} did not load although the C compiler builds with their flags here")


def need_compiler() -> None:
    problem = kernels.compiler_problem()
    if problem:
        pytest.skip(f"no C library can be built here ({problem})")
