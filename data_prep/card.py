"""The data card: a markdown summary written next to the data."""
from __future__ import annotations

from pathlib import Path


def write_card(path: Path, meta: dict) -> None:
    c, ev = meta["counts"], meta["eval"]
    lines = [
        f"# Data card: profile `{meta['profile']}`",
        "",
        f"Seed {meta['seed']}. Tokenizer: {meta['tokenizer']['kind']}, vocabulary {meta['tokenizer']['vocab_size']} "
        f"(sha256 `{meta['tokenizer']['sha256'][:16]}…`). Train budget per domain: "
        f"{meta['budget_tokens_per_domain']:,} tokens (equal for every domain).",
        "",
        "## Domains",
        "",
        "| domain | id | train docs | train tokens | val docs | val tokens | test docs | test tokens | sources | licences |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(meta["domains"]):
        src = meta["sources"].get(d, {})
        row = [d, str(i)] + [f"{c[d][s][k]:,}" for s in ("train", "val", "test") for k in ("documents", "tokens")]
        row += ["; ".join(sorted(src)), "; ".join(sorted(set(src.values())))]
        lines.append("| " + " | ".join(row) + " |")
    h = meta["heldout"]
    src = meta["sources"].get(h, {})
    lines += [
        "",
        f"Held-out general set `{h}` (never trained on; for forgetting): {c[h]['test']['documents']:,} documents, "
        f"{c[h]['test']['tokens']:,} tokens; sources: {'; '.join(sorted(src))} ({'; '.join(sorted(set(src.values())))}).",
        "",
        "Removed before splitting: " + ", ".join(f"{v:,} {k}" for k, v in meta["dropped"].items())
        + " (exact duplicates, near duplicates, near duplicates of held-out text).",
        "",
        "## Evaluation sets",
        "",
        "| task | items | scoring |",
        "|---|---|---|",
        f"| math Q/A | {ev['sizes']['math_qa']:,} | exact match — {ev['notes']['math']} |",
    ]
    for d in ev["mcq"]:
        lines.append(f"| {d} multiple choice | {ev['sizes']['mcq'][d]:,} | log-likelihood of each choice — "
                     f"{ev['notes']['mcq']} |")
    for d in ev.get("exact", {}):
        lines.append(f"| {d} exact match | {ev['sizes']['exact'][d]:,} | {ev['notes']['exact']}; best constant "
                     f"answer {ev['exact_chance'][d]:.3f} |")
    inst = meta.get("instruct", {})
    if inst.get("domains"):
        lines += ["", "Instruction form (prompt -> short answer, loss on the answer): "
                  + ", ".join(f"{d} ({m})" for d, m in inst["domains"].items()) + f"; template {inst['template']}."]
    lines += ["", "Per-domain perplexity: the `test` split of every domain; forgetting: the held-out set.", "",
              "## Packages", "", "| source | kind | package | version | sha256 | licence |", "|---|---|---|---|---|---|"]
    for name, p in sorted(meta["packages"].items()):
        used = p.get("used_version", p["version"])
        version = p["version"] if used == p["version"] else f"{used} (pinned {p['version']}: {p['content']} files)"
        lines.append(f"| {name} | {p['kind']} | {p['package']} | {version} | `{p['sha256'][:16]}…` | "
                     f"{p['licence']} |")
    drifted = {n: p["drift"] for n, p in sorted(meta["packages"].items()) if "drift" in p}
    if drifted:
        lines += ["", "## Drift from the pinned sources", "",
                  "These Debian sources were superseded and their files differ from the recorded ones; "
                  "the data differ from a build with the pinned versions accordingly.", ""]
        for n, d in drifted.items():
            files = ", ".join(d["changed"] + d["added"] + d["removed"])
            lines.append(f"- **{n}**: {d['summary']}, accepted because: {d['accepted_because']}. Files: {files}")
    path.write_text("\n".join(lines) + "\n")
