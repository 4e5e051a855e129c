"""A finished run as a Hugging Face model folder others can load.

    python -m desmoe.export RUN_DIR OUT [--tag stepNNNNNNNN]

Reads the run's ``config.yaml`` and its newest (or the given) checkpoint tag offline, in one process,
whatever world and EP size trained it (``desmoe.models.export_reader``), merges LoRA adapters, and
writes ``OUT`` atomically and sealed (``desmoe-manifest.json``):

* the family's own model (``from_pretrained`` as usual) when the trained model still is one: FFT,
  ESFT, LoRA (merged), DES-MoE without the ALR, pretraining;
* otherwise (the ALR's MLP router, or DGES expert copies averaged at inference) the family's model with
  desmoe's MoE blocks, whose code ships in the folder (``modeling_desmoe.py``, ``auto_map`` in
  config.json): ``from_pretrained(OUT, trust_remote_code=True, local_files_only=True)``.

Runs export at their end by default (``export.enabled``, into ``<run_dir>/export``; pretraining into
``output.dir``), through this same function.  docs/export.md describes both forms.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from desmoe.errors import UserError, run_cli

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INFO = "desmoe-export.json"  # where the folder came from: run, tag, method, form


@dataclass
class ExportConfig:
    enabled: bool = True  # export the final model at the end of the run
    dir: Optional[str] = None  # default: <run_dir>/export


@dataclass
class RunModel:
    """What the exporter needs to know of a run's model beyond its checkpoint."""

    base: Path  # the HF folder the run's model was built from (family, config, tokenizer)
    method: str
    ep_size: int  # of the training run: physical expert slots are numbered per EP rank
    spare_per_layer: int = 0  # DGES duplication's spare slots per MoE layer
    duplicate_inference: str = "original"
    lora_scaling: Optional[float] = None
    alr_residual: bool = True


def _desmoe_run(run_dir: Path, path: Path) -> RunModel:
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    cfg = load_config(DESMoEExperiment, path)
    if not cfg.base.hf:
        raise UserError(f"{path}: base.hf is unset: desmoe's own MoELM has no Hugging Face family to export to")
    d, b = cfg.desmoe, cfg.desmoe.baseline
    dup = d.method == "desmoe" and d.dges.enabled and d.dges.duplicate_shared
    return RunModel(Path(cfg.base.hf), d.method, cfg.model.ep_size, d.dges.spare_experts if dup else 0,
                    d.dges.duplicate_inference, b.lora_alpha / b.lora_rank if d.method == "lora" else None,
                    d.alr.init == "residual")


def _pretrain_run(run_dir: Path, path: Path) -> RunModel:
    from desmoe.config import load_config
    from desmoe.recipes.lm.pretrain import PretrainExperiment

    cfg = load_config(PretrainExperiment, path)
    base = Path(cfg.init.path) if cfg.init.kind == "checkpoint" else run_dir / "init"
    return RunModel(base, "pretrain", cfg.model.ep_size)


# A run's recipe, recognised by a config section only it has -> how to read its model.
RECIPES = {"desmoe": _desmoe_run, "output": _pretrain_run}


def run_model(run_dir: Path) -> RunModel:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path}: not valid YAML") from None
    for section, read in RECIPES.items():
        if isinstance(data, dict) and section in data:
            return read(run_dir, path)
    raise UserError(f"{path}: not a run of a recipe desmoe.export knows (DES-MoE and its baselines, pretraining)")


def export_run(run_dir: str | Path, out: str | Path, tag: Optional[str] = None,
               extra_files: Optional[dict[str, str | Path]] = None, verify_hashes: bool = True) -> dict:
    """Write the HF folder of ``run_dir``'s checkpoint ``tag`` (default: newest) at ``out``; one process.
    ``extra_files`` {name in the folder: file to copy}; ``verify_hashes``: sha256 of every checkpoint file
    (the end-of-run export skips it: the run sealed the tag moments ago, sizes are still checked).
    Returns what was written (also in ``desmoe-export.json``)."""
    from desmoe.models import export_forms as forms
    from desmoe.models.export_reader import read_checkpoint
    from desmoe.models.hf_arch import arch_for
    from desmoe.models.hf_io import checkpoint_config

    run_dir, out = Path(run_dir), Path(out)
    check_destination(run_dir, out)
    rm = run_model(run_dir)
    hf_cfg = checkpoint_config(rm.base)
    arch = arch_for(hf_cfg, str(rm.base / "config.json"))
    if rm.method == "vanilla":
        raise UserError(f"{run_dir}: a vanilla run trains nothing; its model is the base {rm.base}")
    weights = read_checkpoint(run_dir / "checkpoints", tag, hashes=verify_hashes)
    where = str(weights.tag_dir)
    num_experts = arch.num_experts(hf_cfg)
    moe_layers = [i for i in range(hf_cfg.num_hidden_layers) if arch.is_moe_layer(hf_cfg, i)]
    if sorted(weights.experts) != moe_layers:
        raise UserError(f"{where}: experts of decoder layers {sorted(weights.experts)}, but the base {rm.base} has "
                        f"MoE layers {moe_layers} (checkpoint of another model?)")
    slots = num_experts + rm.spare_per_layer
    for i, stacked in weights.experts.items():
        n = next(iter(stacked.values())).shape[0]
        if n != slots:
            raise UserError(f"{where}: layer {i} has {n} expert files, the run's model has {slots} expert slots")
    dense, experts, widened = weights.dense, weights.experts, False
    if rm.lora_scaling is not None:
        dense, experts, widened = forms.merge_lora_exactly(dense, experts, rm.lora_scaling, where)
    elif any("lora_" in k for k in dense):
        raise UserError(f"{where}: LoRA weights in a '{rm.method}' run (checkpoint of another method?)")
    # slots follow DeepSpeed's numbering (ep_rank * local + j) with the spares at the end of each rank's
    # local experts (desmoe.moe.slots.add_spare_slots): logical expert e keeps its rank and local index
    local, local_slots = num_experts // rm.ep_size, slots // rm.ep_size
    slot_of_expert = [(e // local) * local_slots + e % local for e in range(num_experts)]
    fanout = _fanout(weights.client, slot_of_expert, moe_layers) if rm.duplicate_inference == "average" else None
    files = {name: rm.base / name for name in TOKENIZER_FILES if (rm.base / name).is_file()}
    files.update(extra_files or {})
    info = {"run_dir": str(run_dir), "tag": weights.tag_dir.name, "method": rm.method, "base": str(rm.base)}
    if widened:
        info["dtype"] = "float32 (LoRA merged into 16-bit weights would round its updates away)"
    info["form"] = write_model(hf_cfg, dense, experts, out, slot_of_expert, fanout, rm.alr_residual, files,
                               {INFO: lambda form: json.dumps(dict(info, form=form), indent=1) + "\n"}, where)
    return info


def check_destination(run_dir: Path, out: Path) -> None:
    """``out`` is replaced whole once the new folder is complete: refuse a folder whose loss is not an old
    export's (the run itself or a folder holding it, the current folder, someone's own model or files)."""
    from desmoe.integrity import MANIFEST

    where = out.resolve()
    if where == run_dir.resolve() or where in run_dir.resolve().parents:
        raise UserError(f"{out}: is the run directory {run_dir} or holds it; the export replaces its folder whole, "
                        f"which would delete the run; choose a new folder")
    if where == Path.cwd().resolve():
        raise UserError(f"{out}: is the current folder, which the export would replace whole; name a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, expected the model folder to write")
    if out.is_dir() and any(out.iterdir()) and not ((out / INFO).is_file() or (out / MANIFEST).is_file()):
        raise UserError(f"{out}: exists and is not a folder desmoe wrote (no {INFO} or {MANIFEST}); the export "
                        f"would replace it whole: choose a new folder or remove it first")


def write_model(hf_cfg, dense: dict, experts: dict, out: Path, slot_of_expert: list[int],
                fanout: Optional[dict[int, list]] = None, alr_residual: bool = True, files: Optional[dict] = None,
                texts: Optional[dict] = None, where: str = "model") -> str:
    """Write a trained model at ``out`` in the form it fits; returns the form (the family's model_type or
    ``desmoe_moe``).  ``dense``: its state in training names without routed experts; ``experts``
    {decoder layer: {expert parameter: [slots, ...]}}; ``texts`` {file: callable(form) -> text}."""
    import torch

    from desmoe.models import export_forms as forms
    from desmoe.models.hf_arch import arch_for
    from desmoe.models.hf_moe import write_hf_folder

    arch = arch_for(hf_cfg, where)
    moe_layers = sorted(experts)
    alr = [i for i in moe_layers if f"model.layers.{i}.mlp.router.mlp_in.weight" in dense]
    form = "desmoe_moe" if (alr or fanout) else hf_cfg.model_type
    texts = {name: make(form) for name, make in (texts or {}).items()}
    if form != "desmoe_moe":
        state = forms.plain_state(arch, dense, experts, {i: slot_of_expert for i in moe_layers})
        _write(write_hf_folder, hf_cfg, state, out, files, None, texts)
        return form
    if alr and alr != moe_layers:
        raise UserError(f"{where}: an ALR on MoE layers {alr} only, not on all of {moe_layers}")
    hidden = dense[f"model.layers.{alr[0]}.mlp.router.mlp_in.weight"].shape[0] if alr else 0
    slots = next(iter(experts[moe_layers[0]].values())).shape[0]
    spec = dict(forms.router_spec(arch, hf_cfg, len(slot_of_expert)), expert=forms.expert_spec(arch, hf_cfg),
                alr={"hidden": hidden, "residual": alr_residual} if alr else None, num_slots=slots,
                moe_layers=moe_layers, slot_of_expert={str(i): slot_of_expert for i in moe_layers},
                fanout={str(i): rows for i, rows in fanout.items()} if fanout else None,
                shared=arch.shared, shared_gate=arch.shared_gate, returns_tuple=arch.returns_tuple)
    source = forms.modeling_source(hf_cfg.model_type)
    module = forms.load_modeling(source)
    texts[forms.MODELING_FILE] = source
    with torch.no_grad():
        _write(write_hf_folder, forms.custom_config(module, hf_cfg, spec), forms.custom_state(arch, dense, experts),
               out, files, module.DesmoeMoEForCausalLM, texts)
    return form


def _fanout(client: dict, slot_of_expert: list[int], moe_layers: list[int]) -> Optional[dict[int, list]]:
    """DGES copies averaged at inference: per layer, every slot of each logical expert (None: no copies)."""
    import torch

    from desmoe.recipes.des_moe.duplication import ExpertCopies

    copies = client.get("copies")
    if not copies or not copies.get("made"):
        return None
    view = ExpertCopies.__new__(ExpertCopies)  # the training code's own fan-out rule, on the saved tables
    view.tables = copies["tables"]
    view.originals = [torch.tensor(slot_of_expert)] * len(moe_layers)
    if all(torch.equal(t, o.expand_as(t)) for t, o in zip(view.tables, view.originals)):
        return None
    return {i: view.fanout(b).tolist() for b, i in enumerate(moe_layers)}


def _write(write, cfg, state, out, files, model_class, texts) -> None:
    try:
        write(cfg, state, out, extra_files=files, model_class=model_class, texts=texts)
    except RuntimeError as err:  # load_state_dict: a key the model does not have, or a shape
        first = (str(err).strip().splitlines() or [""])[0][:200]
        detail = " ".join(x.strip() for x in str(err).splitlines()[1:3] if x.strip())[:300]
        raise UserError(f"{out}: the checkpoint does not fit the base's model ({first} {detail})") from None


@run_cli
def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m desmoe.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a desmoe run directory (config.yaml + checkpoints/)")
    parser.add_argument("out", help="the model folder to write (replaced atomically)")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00000150 (default: the newest)")
    args = parser.parse_args()
    info = export_run(args.run_dir, args.out, args.tag)
    print(f"exported {args.run_dir} ({info['method']}, {info['tag']}) to {args.out} as "
          f"{'desmoe_moe (trust_remote_code=True)' if info['form'] == 'desmoe_moe' else info['form']}", flush=True)


if __name__ == "__main__":
    main()
