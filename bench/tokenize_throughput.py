"""Tokenization throughput of the data pipeline (tokens/s), 1 worker vs N worker processes.

    python bench/tokenize_throughput.py --data data/demo [--workers 1 2] [--repeat 2] [--scale 8]

Encodes the train text of every domain of a prepared folder with its own
tokenizer, through the same ``encode_all`` the build uses (spawned worker pool,
batches of 64 documents).  The single-worker run in the same process is the
baseline; pool start-up is included in the multi-worker times, as in a build.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--scale", type=int, default=1, help="encode the corpus this many times over")
    p.add_argument("--json")
    args = p.parse_args()

    from data_prep.tokens import encode_all
    from desmoe.data import PreparedData

    data = PreparedData(args.data)
    texts = [t for d in data.domains for t in data.raw("train", d)["text"]] * args.scale
    tok = data.tokenizer
    rows = []
    for w in args.workers:
        best = None
        for _ in range(args.repeat):
            _, perf = encode_all(tok, texts, w)
            best = perf if best is None or perf["tokens_per_s"] > best["tokens_per_s"] else best
        rows.append(best)
    base = rows[0]["tokens_per_s"]
    print(f"{len(texts)} documents, {rows[0]['tokens']} tokens, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'workers':>8} {'seconds':>8} {'tokens/s':>10} {'vs 1 worker':>12}")
    for r in rows:
        print(f"{r['workers']:>8} {r['seconds']:>8.2f} {r['tokens_per_s']:>10,} {r['tokens_per_s'] / base:>11.2f}x")
    if args.json:
        from desmoe.checkpoint import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
