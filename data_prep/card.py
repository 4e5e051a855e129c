"""What a prepared folder says about itself: ``meta.json`` and the data card (a markdown summary)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_prep.evalsets import write_eval_sets
from desmoe.data.prepared import FORMAT, RECORD_ENCODING, SPLITS


def write_card(path: Path, meta: dict) -> None:
    c, ev = meta["counts"], meta["eval"]
    lines = [
        f"# Data card: profile `{meta['profile']}`",
        "",
        f"Seed {meta['seed']}. Tokenizer: {meta['tokenizer']['kind']}, vocabulary {meta['tokenizer']['vocab_size']} "
        f"(sha256 `{meta['tokenizer']['sha256'][:16]}…`). Train budget per domain: "
        f"{meta['budget_tokens_per_domain']:,} tokens ({_budget_note(meta)}).",
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


def _budget_note(meta: dict) -> str:
    """What the budget means for this folder: "equal for every domain" was printed also with equalize off (a
    domain with less text than the budget, a user's small one, gets less)."""
    if (meta.get("config") or {}).get("equalize", True):
        return "equal for every domain"
    return "a cap per domain: equalize is off, so a domain with less text has fewer tokens (see the table)"


def write_meta(builder, root: Path, selected, parts, tok, budget: int) -> dict:
    """``meta.json`` (what the folder holds and how it was made; what ``desmoe.data.prepared`` reads) and the
    data card, for the folder ``root`` that ``builder`` (data_prep.build.Builder) has just written."""
    cfg = builder.cfg
    counts = {n: {s: {"documents": len(selected[(n, s)]),
                      "tokens": sum(len(t) + 1 for _, t in selected[(n, s)])} for s in SPLITS}
              for n in cfg.domains}
    counts[cfg.heldout] = {"test": {"documents": len(selected[(cfg.heldout, "test")]),
                                    "tokens": sum(len(t) + 1 for _, t in selected[(cfg.heldout, "test")])}}
    sources = {}
    for (n, s), rows in selected.items():
        for d, _ in rows:
            sources.setdefault(n, {}).setdefault(d.source, d.licence)
    meta = {
        "format": FORMAT, "profile": cfg.profile, "seed": cfg.seed,
        "domains": list(cfg.domains), "heldout": cfg.heldout, "splits": list(SPLITS),
        "budget_tokens_per_domain": budget,
        "tokenizer": {"kind": tok.kind, "path": str(tok.path.relative_to(root)), "vocab_size": tok.vocab_size,
                      "sha256": tok.fingerprint(), "eos_id": tok.eos_id},
        "counts": counts, "sources": sources, "loss_masks": builder.masked,
        "packages": {n: builder.package(n) for n in builder.used_sources},
        "dropped": builder.stats["dropped"], "available_train_tokens": builder.stats["available_train_tokens"],
        "eval": write_eval_sets(root, cfg, selected, parts, builder.ctx, builder.render),
        "card": "DATA_CARD.md", "instruct": {"domains": cfg.instruct.domains, "template": builder.render.name},
        "config": _recorded(cfg),
    }
    if builder.masked:  # only folders with records: the others stay byte-identical to earlier builds
        meta["record_encoding"] = RECORD_ENCODING
    if tok.prefix:  # only tokenizers with one (desmoe.data.prepared refuses a folder built without it)
        meta["tokenizer"]["prefix"] = list(tok.prefix)
    meta["eval"]["sizes"] = {"math_qa": sum(1 for _ in open(root / meta["eval"]["math"])),
                             "mcq": {d: sum(1 for _ in open(root / p)) for d, p in meta["eval"]["mcq"].items()},
                             "exact": {d: sum(1 for _ in open(root / p))
                                       for d, p in meta["eval"].get("exact", {}).items()}}
    write_card(root / "DATA_CARD.md", meta)
    (root / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _recorded(cfg) -> dict:
    """The config as recorded in meta.json: without ``workers``, which cannot change the output."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}
