"""The lock (constraints.txt) that `make setup` installs with: every pin inside pyproject.toml's ranges,
no torch (the Makefile picks the build per machine), one pin per package, and the venv the suite runs
in is the locked stack (a stale lock would make a fresh clone install other versions than were tested)."""
import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not name==version"
            assert canonicalize_name(name) not in out, f"constraints.txt: {name} pinned twice"
            out[canonicalize_name(name)] = version
    return out


def test_lock_pins_inside_the_ranges_and_leaves_torch_to_the_makefile():
    locked = pins()
    assert "torch" not in locked and not any(n.startswith("nvidia-") for n in locked)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in deps["dependencies"] + deps["optional-dependencies"]["test"]]
    outside = [f"{r.name}=={locked[canonicalize_name(r.name)]} vs {r.specifier}" for r in reqs
               if canonicalize_name(r.name) in locked
               and not r.specifier.contains(locked[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"constraints.txt outside pyproject.toml's ranges (make lock): {outside}"
    missing = [r.name for r in reqs if r.name != "torch" and canonicalize_name(r.name) not in locked]
    assert not missing, f"constraints.txt lacks {missing} (make lock)"


def test_the_suite_runs_on_the_locked_stack():
    differ = []
    for name, version in pins().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            continue  # a platform-specific pin this machine does not need
        if have != version:
            differ.append(f"{name} {have} != {version}")
    assert not differ, f"the venv differs from constraints.txt (make setup, or make lock after an upgrade): {differ}"
