"""Building the fused CPU kernels where that cannot work: the failure is one line that says why, the
build leaves no files behind, and training falls back to torch ops (a fresh machine without a working
C compiler, or one that refuses a flag, must still run)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import desmoe.kernels as kernels
from kernelcheck import need_compiler
from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """An empty build directory and a module that has not tried to load its library yet."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("DESMOE_FUSED_KERNELS", raising=False)
    monkeypatch.delenv("CC", raising=False)  # the machine's own compiler unless a test sets one
    for name, value in (("_tried", False), ("_lib", None), ("_rows", None), ("_loop", None)):
        monkeypatch.setattr(kernels, name, value)
    return tmp_path / "desmoe"


def test_a_refused_flag_fails_in_one_line_and_leaves_no_files(fresh_kernels):
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler on this machine")
    with pytest.raises(RuntimeError) as err:
        kernels.build(extra_flags=("-fno-such-option-desmoe",))
    msg = str(err.value)
    assert "\n" not in msg and "swiglu.c" in msg and "-fno-such-option-desmoe" in msg, msg
    assert list(fresh_kernels.iterdir()) == []  # no temporary .so or .o left by the failed build


def test_no_working_compiler_falls_back_to_torch_ops(fresh_kernels, monkeypatch):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' program to stand in for a broken compiler")
    monkeypatch.setenv("CC", false)
    with pytest.warns(UserWarning, match="fused CPU kernels unavailable") as record:
        assert kernels.swiglu_cpu() is None and kernels.rows_cpu() is None and kernels.expert_loop_cpu() is None
    msg = str(record[0].message)
    assert "\n" not in msg and f"'{false}' failed on swiglu.c" in msg, msg
    assert list(fresh_kernels.iterdir()) == []


def test_kernel_tests_skip_only_where_nothing_can_be_built(fresh_kernels, monkeypatch):
    """tests/kernelcheck.need: a machine without a working C compiler skips the kernels' tests (make test must
    pass there: training runs the torch ops); where the compiler works, a kernel that did not load fails."""
    from kernelcheck import need

    if kernels.compiler_problem() is None:
        with pytest.raises(pytest.fail.Exception, match="did not load"):
            need(None)
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' program to stand in for a broken compiler")
    monkeypatch.setenv("CC", false)
    assert f"'{false}' failed" in kernels.compiler_problem()
    with pytest.warns(UserWarning, match="unavailable"):
        kernel = kernels.swiglu_cpu()
    with pytest.raises(pytest.skip.Exception, match="cannot be built here"):
        need(kernel)


def test_cc_may_be_a_command_with_arguments(fresh_kernels, monkeypatch):
    """CC is a command line for make and sysconfig ('ccache gcc', 'gcc -m64'): the kernels build with it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", f"{cc} -Wno-unknown-pragmas")
    assert kernels.compiler_problem() is None
    assert kernels.build().exists()


def test_libmvec_is_linked_only_where_the_objects_call_it(fresh_kernels, monkeypatch, tmp_path):
    """A libc without glibc's vector math library (aarch64 before glibc 2.38, musl) has no -lmvec; objects that
    call no vector libm routine (there: the compiler emits none) must still link.  Stood in for here by the
    machine's compiler behind a script that refuses -lmvec, and objects built without vectorisation."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    wrapper = tmp_path / "cc-without-libmvec"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -lmvec ] && { echo "ld: cannot find -lmvec" >&2; '
                       f'exit 1; }}; done\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    lib = kernels.SwiGLUKernels(kernels.build(extra_flags=("-fno-tree-vectorize",)))
    h = torch.randn(3, 2 * 40)
    want = torch.nn.functional.silu(h[:, :40]) * h[:, 40:]
    assert_close(lib.fwd(h, None), want, terms=8)  # the kernel's expf and reciprocal: a few ulps


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_arm_and_power_name_the_host_cpu_with_mcpu(monkeypatch, machine):
    """-march=native is x86's spelling: clang before 15 refuses it on aarch64 and GCC has no -march on POWER,
    so there the kernels were never built (this x86 machine cannot run those compilers: the flags are checked;
    the x86 build itself is exercised by every kernel test)."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    flags = kernels._cflags()
    assert "-mcpu=native" in flags and "-march=native" not in flags and "-mprefer-vector-width=512" not in flags


def test_loading_the_library_keeps_denormals(fresh_kernels):
    """The library is compiled with -ffast-math but linked without it: linked with it, GCC and clang add
    crtfastmath.o, whose constructor sets flush-to-zero for the whole process when the library loads, and
    every torch op after it would flush denormal floats to 0 (checked in a fresh process: the mode is
    per thread and sticky)."""
    need_compiler()
    code = ("import torch, desmoe.kernels as k; x = torch.tensor([1e-38]); assert k.swiglu_cpu() is not None; "
            "y = torch.tensor([1e-39, 1.0]).view(1, 2); print(float((x * 1e-3)[0]), float(k.swiglu_cpu().fwd(y, None)))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_op, kernel = map(float, proc.stdout.split())
    assert torch_op > 0 and kernel > 0, proc.stdout  # 1e-41 and silu(1e-39) ~ 5e-40: denormals, not 0
