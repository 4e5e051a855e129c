"""A desmoe DeepSpeed checkpoint read back in one process, whatever world and EP size wrote it.

DeepSpeed writes a model with MoE layers as one ``mp_rank_00_model_states.pt`` (the module's state
without the routed experts, plus the client state) and one
``layer_<L>_expert_<g>_mp_rank_00_model_states.pt`` per (MoE layer L, global expert g), where each EP
rank names its local expert ``j`` by ``g = ep_rank * num_local + j`` (``desmoe.moe.layout``).  So the
files already carry global ids and the whole model is the union of them: nothing here depends on how
many ranks wrote them.  ``zero_to_fp32`` cannot read this layout (it expects the ZeRO optimizer shards
of a model without per-expert files), hence this reader.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from desmoe import checkpoint, integrity
from desmoe.errors import UserError

MAIN = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
EXPERT_KEY = re.compile(r"(model\.layers\.(\d+)\.mlp)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)")


@dataclass
class TrainedWeights:
    dense: dict[str, Tensor]  # the module's state without routed experts (training names)
    experts: dict[int, dict[str, Tensor]]  # decoder layer -> {expert parameter: [slots, ...]} by global id
    client: dict  # the checkpoint's client state (the method's state rides here)
    tag_dir: Path


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load of damaged bytes raises almost anything (KeyError, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{path}: not a readable checkpoint file ({type(err).__name__}: {first})") from None


def read_checkpoint(ckpt_dir: str | Path, tag: Optional[str] = None, hashes: bool = True) -> TrainedWeights:
    """The newest (or ``tag``) checkpoint of ``ckpt_dir``: dense weights, every expert, client state.
    ``hashes``: check every file's sha256 against the tag's manifest (sizes are always checked)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir}: no checkpoint to export (no 'latest' tag; did the run save a step?)")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        found = ", ".join(t for _, t in checkpoint.tags(ckpt_dir)) or "none"
        raise UserError(f"{tag_dir}: no such checkpoint tag (tags: {found})")
    integrity.verify(tag_dir, "checkpoint", hashes=hashes)  # a flipped byte must not become an exported weight
    if not (tag_dir / MAIN).is_file():
        raise UserError(f"{tag_dir / MAIN}: missing (not a desmoe/DeepSpeed checkpoint tag)")
    main = _load(tag_dir / MAIN)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise UserError(f"{tag_dir / MAIN}: has no 'module' state (not a DeepSpeed model-states file)")
    ds = main.get("ds_config") if isinstance(main.get("ds_config"), dict) else {}
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:  # the module state then holds placeholders; the weights live in the optimizer shards
        raise UserError(f"{tag_dir}: written under ZeRO stage 3, whose model-states file holds no weights "
                        f"(export reads ZeRO-0/1/2 checkpoints)")
    files: dict[int, dict[int, Path]] = {}
    for p in tag_dir.iterdir():
        m = EXPERT_FILE.fullmatch(p.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    experts: dict[int, dict[str, Tensor]] = {}
    for moe_layer in range(len(files)):
        if moe_layer not in files:
            raise UserError(f"{tag_dir}: no expert files of MoE layer {moe_layer} (layer_{moe_layer}_expert_*)")
        ids = files[moe_layer]
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        if missing:
            raise UserError(f"{tag_dir / f'layer_{moe_layer}_expert_{missing[0]}_mp_rank_00_model_states.pt'}: "
                            f"missing ({len(missing)} expert file(s) of MoE layer {moe_layer} absent)")
        layer, stacked = _read_layer(moe_layer, [ids[g] for g in range(len(ids))])
        if layer in experts:
            raise UserError(f"{tag_dir}: two MoE layer numbers hold the experts of decoder layer {layer}")
        experts[layer] = stacked
    client = {k: v for k, v in main.items() if k != "module"}
    return TrainedWeights(dict(main["module"]), experts, client, tag_dir)


def _read_layer(moe_layer: int, paths: list[Path]) -> tuple[int, dict[str, Tensor]]:
    """One MoE layer's experts in global-id order: (decoder layer, {parameter: [n, ...]})."""
    layer, per_name = None, {}
    for g, path in enumerate(paths):
        state = _load(path)
        names = {}
        for key, t in state.items():
            m = EXPERT_KEY.fullmatch(key)
            if not m or int(m.group(3)) != g or (layer is not None and int(m.group(2)) != layer):
                raise UserError(f"{path}: key '{key}' is not expert {g} of one decoder layer's MoE block")
            layer = int(m.group(2))
            names[m.group(4)] = t
        if per_name and set(names) != set(per_name):
            raise UserError(f"{path}: parameters {sorted(names)} differ from expert 0's {sorted(per_name)}")
        for name, t in names.items():
            per_name.setdefault(name, []).append(t)
    if layer is None:
        raise UserError(f"{paths[0].parent}: the expert files of MoE layer {moe_layer} hold no tensors")
    return layer, {name: torch.stack(ts) for name, ts in per_name.items()}
