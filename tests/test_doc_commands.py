"""The commands the docs tell users to run still name what exists: scripts, config files, `make` targets, the
`--flags` each script's argparse accepts, and dotted `key=value` overrides that the config they target accepts.

Keys, flags and files were renamed over many sessions while README.md, docs/*.md, the Makefile, the Slurm
headers, the configs' comments and the scripts' own docstrings kept the old spellings; a copied command then stopped on its first
argument.  Nothing runs here: configs are loaded with the overrides through desmoe's own loader (every key and
value check), flags are read from the scripts' source (their add_argument calls), in a few seconds."""
import ast
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache

import pytest

from jobs import ROOT

# The launchers that read an experiment config (desmoe.cli.parse_launcher_args): config class, default YAML.
# A launcher added without an entry here fails test_every_config_launcher_is_mapped.
CONFIG_LAUNCHERS = {
    "launcher/desmoe.py": ("desmoe.recipes.des_moe.recipe", "DESMoEExperiment", None),
    "launcher/desmoe_study.py": ("desmoe.recipes.des_moe.recipe", "DESMoEExperiment", None),
    "launcher/pretrain.py": ("desmoe.recipes.lm.pretrain", "PretrainExperiment", None),
    "launcher/smoke.py": ("desmoe.recipes.lm.recipe", "LMExperiment", None),
    "launcher/trge.py": ("desmoe.recipes.trge.recipe", "TRGEExperiment", "configs/trge_offline.yaml"),
    "launcher/realbase_study.py": ("desmoe.recipes.des_moe.study", "RealbaseStudy", "configs/realbase_study.yaml"),
    "desmoe/recipes/trge/id_study.py": ("desmoe.recipes.trge.recipe", "TRGEExperiment", "configs/trge_offline.yaml"),
}
SCRIPT = re.compile(r"^(launcher|bench)/\w+\.py$")
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*=")
PLACEHOLDER = re.compile(r"<|\.\.\.|^key(\.path)?=")  # `user_data=<folder>`, `key=value ...` stand for the user's own
SHELL_END = {"||", "&&", "|", ";", ">", "2>&1"}  # `>` ends it too: its target is no argument


@dataclass
class Command:
    where: str
    text: str


def _fenced_and_inline(where: str, text: str):
    """Markdown: lines of fenced blocks (continuations joined, `X="..."` then `$X` expanded), 4-space indented
    lines, and inline code spans (which may wrap over lines)."""
    prose, env, block, fenced = [], {}, [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced:
            block.append(line.strip())
        elif line.startswith("    "):  # an indented code block, or a nested list item's prose
            block.append(line.strip())
            prose.append(line)
        else:
            prose.append(line)
            block.append("")  # ends a continued command
    for line in "\n".join(block).replace("\\\n", " ").splitlines():
        if m := re.match(r'^([A-Z]+)="(.*)"$', line):
            env[m.group(1)] = m.group(2)
        yield Command(where, re.sub(r"^\$([A-Z]+)\b", lambda m: env.get(m.group(1), m.group(0)), line))
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        yield Command(where, " ".join(span.split()))


def _makefile(text: str):
    """Comment lines, and recipes with each `$(VAR)` replaced by its `VAR ?= default` (undefined: empty)."""
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(.*)$", text, re.M))
    defaults["BIN"] = ".venv/bin"
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("#"):
            yield Command("Makefile", line.lstrip("# "))
            yield from (Command("Makefile", span) for span in re.findall(r"`([^`]+)`", line))
        elif line.startswith("\t"):
            yield Command("Makefile", re.sub(r"\$\((\w+)\)", lambda m: defaults.get(m.group(1), ""), line))


def documented_commands() -> list[Command]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out += _fenced_and_inline(path.name, path.read_text())
    out += _makefile((ROOT / "Makefile").read_text())
    for path in sorted((ROOT / "slurm").glob("*.sh")):
        out += [Command(path.name, line.lstrip("# ")) for line in path.read_text().splitlines() if line.startswith("#")]
    for path in sorted((ROOT / "configs").glob("*.yaml")):  # comment lines and trailing comments
        out += [Command(path.name, line.split("#", 1)[1].strip()) for line in path.read_text().splitlines()
                if "#" in line]
    for folder in ("launcher", "bench", "data_prep", "desmoe"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            out += [Command(str(path.relative_to(ROOT)), line.strip())
                    for line in doc.splitlines() if line.startswith("  ")]  # the indented usage lines
    return out


def segments(text: str) -> list[list[str]]:
    """The words of each command in a line (split at `&&`, `||`, `;`, `|`, before a comment); `[...]` optional
    parts and reST's ``literal`` marks dropped around words."""
    text = re.split(r"\s#\s|\s#$", text)[0]
    try:
        words = shlex.split(text)
    except ValueError:
        return []
    out = [[]]
    for word in words:
        if word in SHELL_END:
            out.append([])
            continue
        if not re.search(r"=\[|\[\w*\]", word):  # `"data.domains=[math]"` is a value; `[--flag` is optional syntax
            word = word.strip("[]`")
        if word:
            out[-1].append(word)
    return [seg for seg in out if seg]


def script_of(words: list[str]):
    """The repository script a command runs and its arguments (`python -m mod` counts when mod is here)."""
    for i, word in enumerate(words):
        if SCRIPT.match(word):
            return word, words[i + 1:]
        if word == "-m" and i + 1 < len(words):
            module = ROOT / (words[i + 1].replace(".", "/") + ".py")
            if module.is_file():
                return str(module.relative_to(ROOT)), words[i + 2:]
    return None, None


@lru_cache(maxsize=None)
def accepted_flags(script: str) -> frozenset:
    """Option strings of every add_argument call in the script (and the shared launcher ones it uses)."""
    sources = [ROOT / script]
    if "parse_launcher_args" in sources[0].read_text():
        sources.append(ROOT / "desmoe/cli.py")
    flags = {"-h", "--help"}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
            elif isinstance(node, ast.For):
                flags |= _looped_flags(node)
    return frozenset(flags)


def _looped_flags(loop: ast.For) -> set:
    """`for name, default in (("hidden", 256), ...): p.add_argument(f"--{name}", ...)` (the benches' size flags):
    the f-string filled with each literal first element of the loop's tuple."""
    names = []
    for elt in getattr(loop.iter, "elts", []):
        first = elt.elts[0] if isinstance(elt, ast.Tuple) else elt
        names += [first.value] if isinstance(first, ast.Constant) else []
    out = set()
    for call in ast.walk(loop):
        if getattr(getattr(call, "func", None), "attr", "") == "add_argument" and call.args \
                and isinstance(call.args[0], ast.JoinedStr):
            parts = call.args[0].values
            out |= {"".join(p.value if isinstance(p, ast.Constant) else str(n) for p in parts) for n in names}
    return out


def split_arguments(script: str, args: list[str]):
    """(flags, overrides, value of --config or --profile): `--a.b v` and `a.b=v` are overrides of a config-reading
    script; every other `--x` is a flag."""
    flags, overrides, config = [], [], None
    reads_config = script in CONFIG_LAUNCHERS or script == "data_prep/build.py"
    i = 0
    while i < len(args):
        word = args[i]
        if word.startswith("--") and "." in word.split("=")[0] and reads_config:
            overrides.append(word[2:] if "=" in word else f"{word[2:]}={args[i + 1] if i + 1 < len(args) else ''}")
            i += 1
        elif word.startswith("-") and not re.match(r"^-\d", word):
            flags.append(word.split("=")[0])
            if word in ("--config", "--profile") and i + 1 < len(args) and not PLACEHOLDER.search(args[i + 1]):
                config = args[i + 1]
        elif OVERRIDE.match(word) and reads_config and not re.match(r"^key(\.path)?=", word):
            # `tokenizer.hf_path=<SmolLM2 folder>`: the key is checked, with a stand-in value
            overrides.append(word.split("=")[0] + "=placeholder" if PLACEHOLDER.search(word) else word)
        i += 1
    return flags, overrides, config


def load_target(script: str, config, overrides: list[str]):
    """Load the config the command targets with its overrides, as the script would (raises ConfigError)."""
    from desmoe.config import load_config

    if script == "data_prep/build.py":
        from data_prep.config import PROFILES, load_profile

        profile = config or "demo"
        if profile.endswith(".yaml") and not (ROOT / profile).is_file():
            profile = "demo"  # the user's own profile file (`--profile my.yaml`): its overrides against a built-in
        return load_profile(profile if (PROFILES / f"{profile}.yaml").is_file() else str(ROOT / profile), overrides)
    module, name, default = CONFIG_LAUNCHERS[script]
    cls = getattr(__import__(module, fromlist=[name]), name)
    path = config or default
    return load_config(cls, ROOT / path if path else None, overrides)


def checked_commands():
    seen = set()
    for cmd in documented_commands():
        for words in segments(cmd.text):
            script, args = script_of(words)
            if script is None or (script, tuple(args)) in seen:
                continue
            seen.add((script, tuple(args)))
            yield pytest.param(cmd, script, args, id=f"{cmd.where}:{script} {' '.join(args)}"[:150])


def test_the_extraction_finds_the_documented_commands():
    """A guard on the scanner itself: the README's launcher lines and a bench line of the docs are found."""
    found = {(script, " ".join(args)) for _, script, args in (p.values for p in checked_commands())}
    assert ("launcher/desmoe.py", "--deepspeed configs/zero2.json --config configs/desmoe_demo.yaml") in found
    assert ("launcher/desmoe_study.py", "--config configs/desmoe_demo.yaml --methods desmoe,fft") in found
    assert ("bench/desmoe_step.py", "--rounds 10 --compute-frozen-grads") in found
    assert len(found) > 100


@pytest.mark.parametrize("cmd,script,args", list(checked_commands()))
def test_documented_command_names_flags_and_keys_that_exist(cmd, script, args):
    assert (ROOT / script).is_file(), f"{cmd.where}: {script} does not exist"
    flags, overrides, config = split_arguments(script, args)
    unknown = [f for f in flags if f not in accepted_flags(script)]
    assert not unknown, f"{cmd.where}: `{cmd.text}`: {script} has no {unknown}"
    if script in CONFIG_LAUNCHERS or script == "data_prep/build.py":
        load_target(script, config, overrides)


def test_named_files_and_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    missing = []
    for cmd in documented_commands():
        for words in segments(cmd.text):
            for word in words:  # a file named bare or as a value (`STUDY_CONFIG=configs/x.yaml`)
                path = word.split("=")[-1]
                if re.fullmatch(r"(configs|slurm|launcher|bench|tests)/[\w./-]+\.(py|sh|yaml|json)", path):
                    missing += [] if (ROOT / path).is_file() else [f"{cmd.where}: {path}"]
            target = next((w.rstrip(":") for w in words[1:] if "=" not in w), "") if words[0] == "make" else ""
            missing += [f"{cmd.where}: make {target}"] if target and target not in targets else []
    assert not missing, missing


def test_every_config_launcher_is_mapped():
    readers = {f"launcher/{p.name}" for p in (ROOT / "launcher").glob("*.py") if "parse_launcher_args" in p.read_text()}
    assert readers <= set(CONFIG_LAUNCHERS), readers - set(CONFIG_LAUNCHERS)
