"""What an exported folder holds: the family's own model, or the family's model with desmoe's MoE blocks.

``plain_state`` maps a trained model onto the family's names (``hf_moe.hf_names``, the mapping every
desmoe export uses); ``custom_model`` writes the shipped modeling code (``export_modeling.py``) for the
family and returns its classes, config and state.  LoRA adapters are merged first (``merge_lora``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import Tensor

from desmoe.errors import UserError
from desmoe.models.hf_arch import MoEArch
from desmoe.models.hf_moe import hf_names

MODELING_FILE = "modeling_desmoe.py"


def merge_lora(dense: dict[str, Tensor], scaling: float, where: str) -> dict[str, Tensor]:
    """peft's layers ``x.base_layer.{weight,bias}`` + ``x.lora_A.<a>.weight`` [r, in] + ``x.lora_B.<a>.weight``
    [out, r] -> ``x.{weight,bias}`` with W + scaling * B A (in fp32, then the weight's dtype)."""
    out: dict[str, Tensor] = {}
    adapters = {}
    for key, t in dense.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, rest = key.split(".lora_A." if ".lora_A." in key else ".lora_B.", 1)
            adapters.setdefault(module, {})["A" if ".lora_A." in key else "B"] = (rest, t)
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = t
        elif "lora_" in key:
            raise UserError(f"{where}: LoRA key '{key}' is not an A/B weight of peft's LoRA (cannot merge it)")
        else:
            out[key] = t
    for module, ab in adapters.items():
        if set(ab) != {"A", "B"} or ab["A"][0] != ab["B"][0] or ab["A"][0].count(".") != 1:
            raise UserError(f"{where}: LoRA module '{module}' does not have exactly one adapter's A and B")
        base = out.get(f"{module}.weight")
        if base is None:
            raise UserError(f"{where}: LoRA module '{module}' has no base_layer.weight")
        delta = ab["B"][1].float() @ ab["A"][1].float()
        out[f"{module}.weight"] = (base.float() + scaling * delta).to(base.dtype)
    return out


def merge_lora_exactly(dense: dict[str, Tensor], experts: dict[int, dict[str, Tensor]], scaling: float,
                       where: str) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]], bool]:
    """:func:`merge_lora`, in fp32 when the weights are 16-bit: bf16 holds W + s BA only to half a step of W,
    so every update smaller than that (most of a LoRA run's, whose B starts at zero) was rounded away and the
    export was the base.  In fp32 the merged weight is what trained; the whole model goes to fp32 so that
    it loads as one dtype.  Returns (dense, experts, whether it was widened)."""
    wide = lambda d: {k: v.float() if v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
    widen = any(t.is_floating_point() and t.element_size() < 4 for t in dense.values())
    if widen:
        dense, experts = wide(dense), {i: wide(s) for i, s in experts.items()}
    return merge_lora(dense, scaling, where), experts, widen


def logical_experts(stacked: dict[str, Tensor], slot_of_expert: list[int]) -> dict[str, Tensor]:
    """Physical slots -> the E logical experts (each one's original slot)."""
    idx = torch.tensor(slot_of_expert)
    return {name: t.index_select(0, idx) for name, t in stacked.items()}


def plain_state(arch: MoEArch, dense: dict[str, Tensor], experts: dict[int, dict[str, Tensor]],
                slot_of_expert: dict[int, list[int]]) -> dict[str, Tensor]:
    logical = {i: logical_experts(s, slot_of_expert[i]) for i, s in experts.items()}
    return hf_names(arch, dense, logical)


def router_spec(arch: MoEArch, hf_cfg, num_experts: int) -> dict:
    """The family's routing rule as desmoe runs it (the same LinearRouter arguments as ``load_hf_moe``)."""
    from desmoe.moe import LinearRouter

    r = LinearRouter(1, num_experts, bias=arch.router_bias, **arch.router(hf_cfg))
    if r.noise != "none":
        raise UserError(f"router noise '{r.noise}' is training-only; the export has none")
    return dict(num_experts=num_experts, k=r.k, score_func=r.score_func, normalize_topk=bool(r.normalize_topk),
                scaling=float(r.scaling), num_groups=r.num_groups, topk_groups=r.topk_groups,
                group_score=r.group_score, selection_bias=r.selection_bias is not None, router_bias=arch.router_bias)


def expert_spec(arch: MoEArch, hf_cfg) -> dict:
    from desmoe.moe import ClampedSwiGLUExpert, SwiGLUExpert

    e = arch.expert(hf_cfg)
    if isinstance(e, ClampedSwiGLUExpert):
        return dict(kind="clamped_swiglu", ffn=e.ffn_size, bias=True, alpha=float(e.alpha), limit=float(e.limit))
    if isinstance(e, SwiGLUExpert):
        return dict(kind="swiglu", ffn=e.ffn_size, bias=False)
    raise UserError(f"experts of type {type(e).__name__} have no exported form")


def modeling_source(model_type: str) -> str:
    """``export_modeling.py`` with its family import line naming ``model_type``'s classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from desmoe.models import export_modeling

    text = Path(export_modeling.__file__).read_text()
    line = next(x for x in text.splitlines() if x.endswith(export_modeling.FAMILY_LINE))
    new = (f"from transformers import {CONFIG_MAPPING_NAMES[model_type]} as FamilyConfig, "
           f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]} as FamilyForCausalLM  {export_modeling.FAMILY_LINE}")
    return text.replace(line, new, 1)


def load_modeling(source: str):
    """Import the shipped module from its text (the exporter builds the folder with the very code it ships)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="desmoe-modeling-") as tmp:
        path = Path(tmp) / MODELING_FILE
        path.write_text(source)
        name = f"desmoe_export_modeling_{abs(hash(source))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def custom_state(arch: MoEArch, dense: dict[str, Tensor], experts: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Training names -> the shipped model's: routers keep theirs (``mlp.router.*``), the shared expert and
    its gate take the family's names, routed experts become ``mlp.slots.*`` [slots, ...]."""
    state = {}
    for key, t in dense.items():
        for i in experts:
            p = f"model.layers.{i}.mlp."
            if arch.shared and key.startswith(p + "shared."):
                key = p + arch.shared + "." + key[len(p + "shared."):]
            elif arch.shared_gate and key == p + "shared_gate.weight":
                key = p + arch.shared_gate + ".weight"
        state[key] = t
    names = {"gate_up.weight": "gate_up", "down.weight": "down", "gate_up.bias": "gate_up_bias",
             "down.bias": "down_bias"}
    for i, stacked in experts.items():
        for name, t in stacked.items():
            state[f"model.layers.{i}.mlp.slots.{names[name]}"] = t
    return state


def custom_config(module, hf_cfg, spec: dict):
    cfg_dict = {k: v for k, v in hf_cfg.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    cfg = module.DesmoeMoEConfig(**cfg_dict)
    cfg.output_router_logits = False  # the blocks record no router logits for transformers' aux loss
    cfg.desmoe_moe = spec
    cfg.architectures = ["DesmoeMoEForCausalLM"]
    cfg.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.DesmoeMoEConfig",
                    "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.DesmoeMoEForCausalLM"}
    return cfg
