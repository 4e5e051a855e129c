"""Building the fused CPU kernels' library (see the package docstring): flags, build key, compiler."""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

SOURCES = tuple(Path(__file__).with_name(n) for n in ("swiglu.c", "rows.c", "experts.c"))  # one library
HEADERS = (Path(__file__).with_name("bf16.h"),)


def _cflags() -> list[str]:
    # GCC's default for AVX-512 targets prefers 256-bit vectors; the 512-bit loop (and the 16-wide
    # vector expf) made the activation 14-28 % faster on the AVX-512 box (docs/performance.md).
    x86 = platform.machine() in ("x86_64", "AMD64")
    # On Arm and POWER the host CPU is -mcpu=native: clang before 15 refuses -march=native on aarch64 (Ubuntu
    # 22.04's clang 14) and GCC has no -march on POWER; GCC on aarch64 takes either.
    arm = platform.machine() in ("aarch64", "arm64") or platform.machine().startswith("ppc64")
    return ["-O3", "-mcpu=native" if arm else "-march=native"] + (["-mprefer-vector-width=512"] if x86 else []) \
        + ["-ffast-math"]


def _cpu_key(extra_flags: tuple[str, ...] = ()) -> str:
    flags = platform.machine() + " ".join(_cflags() + list(extra_flags))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode() + b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "torch_extensions")
    return Path(root) / "desmoe"


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the library if needed; atomic, so concurrent ranks never load a partial file.  ``extra_flags``
    (a separate library): e.g. ``-mno-avx512f``, so the tests also check the loops other CPUs run."""
    target = _build_dir() / f"libdesmoe_kernels_{_cpu_key(extra_flags)}.so"
    if target.exists():
        return target
    cc = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    # -ffast-math at compile time only: linking with it would switch the whole process
    # to flush-to-zero.
    objects = [f"{tmp}.{i}.o" for i in range(len(SOURCES))]
    try:
        for source, obj in zip(SOURCES, objects):
            _compile([*cc, *_cflags(), *extra_flags, "-fPIC", "-c", str(source), "-o", obj], source.name)
        # glibc's vector math library only where the compiler called it (GCC's vectorised expf on x86): a libc
        # without one (glibc before 2.38 on aarch64, musl) has no -lmvec to link, and the objects need none
        mvec = ["-lmvec"] if any(b"_ZGV" in Path(obj).read_bytes() for obj in objects) else []
        _compile([*cc, "-shared", *objects, "-o", tmp, *mvec, "-lm"], "the link")
        os.replace(tmp, target)
    finally:  # a failed build (every rank, every process retries it) must not leave its files behind
        for leftover in (*objects, tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


def _compiler() -> list[str]:
    # CC is a command, as make and Python's sysconfig read it: 'ccache gcc' or 'gcc -m64' are common values
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("gcc") or shutil.which("cc") or ""]
    if not cc[0]:
        raise RuntimeError("no C compiler found (gcc or cc on PATH, or CC)")
    return cc


def compiler_problem() -> Optional[str]:
    """Why no library can be built on this machine at all, or None: no compiler, or one that refuses the
    kernels' flags on an empty source (e.g. a compiler without ``-march=native`` for this CPU).  The tests
    skip the kernels' own checks for this reason only; any other build failure is a defect."""
    try:
        cc = _compiler()
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp, "probe.c")
            src.write_text("int desmoe_probe(void) { return 0; }\n")
            _compile([*cc, *_cflags(), "-fPIC", "-c", str(src), "-o", str(src.with_suffix(".o"))], "an empty source")
    except RuntimeError as err:
        return str(err)
    return None


def _compile(argv: list[str], what: str) -> None:
    """Run one compiler step; a failure says, on one line, which compiler, which step and its first error
    (the exception's default text is the whole command line and no reason)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace")  # any locale's messages
    except OSError as err:
        raise RuntimeError(f"C compiler '{argv[0]}' could not run ({err.strerror})") from None
    if proc.returncode:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
        raise RuntimeError(f"C compiler '{argv[0]}' failed on {what} (exit {proc.returncode}): {first}")
