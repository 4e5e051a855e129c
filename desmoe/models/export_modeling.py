"""desmoe's MoE blocks for a fine-tuned HF MoE that no longer fits its family's class.

``python -m desmoe.export`` writes this file into an exported folder as ``modeling_desmoe.py`` (the
family import line below rewritten for the base's family) and registers it in ``config.json`` under
``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)

builds the family's own model (attention, norms, dense layers, embeddings untouched) with every sparse
MoE block replaced by :class:`DesmoeMoEBlock`: the router DES-MoE trained (the ALR's MLP, with its frozen
pretrained router as the residual teacher when it has one) and the routed experts as physical *slots*
(expert copies made by DGES duplication included).  Everything it needs is in ``config.desmoe_moe``.
The config's ``model_type`` is ``desmoe_moe``, so loading without ``trust_remote_code`` fails loudly
instead of building the family's class with the wrong router.

Self-contained on purpose (torch and transformers only): the folder must load without desmoe.
It reproduces desmoe's inference forward (``desmoe.moe.Router`` / ``MoEBlock`` in eval mode, no
domain labels); docs/export.md describes the form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig as FamilyConfig, MixtralForCausalLM as FamilyForCausalLM  # desmoe-export: family

FAMILY_LINE = "# desmoe-export: family"  # the exporter rewrites the import line ending with this marker


class DesmoeMoEConfig(FamilyConfig):
    model_type = "desmoe_moe"


class DesmoeRouter(nn.Module):
    """Logits (linear, or ALR: [teacher +] W2 GELU(W1 h + b1) + b2) in fp32 -> scores over all experts ->
    top-k on the scores (+ selection bias, optionally group-limited) -> weights = the chosen scores,
    optionally renormalised, times ``scaling``."""

    def __init__(self, spec: dict, hidden: int) -> None:
        super().__init__()
        self.spec = spec
        n = spec["num_experts"]
        self.proj = nn.Linear(hidden, n, bias=spec["router_bias"])
        if spec["alr"] is not None:
            self.mlp_in = nn.Linear(hidden, spec["alr"]["hidden"])
            self.mlp_out = nn.Linear(spec["alr"]["hidden"], n)
        if spec["selection_bias"]:
            self.register_buffer("selection_bias", torch.zeros(n))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        def f(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:  # fp32, as desmoe's routers compute
            return F.linear(h, layer.weight.float(), None if layer.bias is None else layer.bias.float())

        x = x.float()
        teacher = f(self.proj, x)
        alr = self.spec["alr"]
        if alr is None:
            return teacher
        z = f(self.mlp_out, F.gelu(f(self.mlp_in, x)))
        return teacher + z if alr["residual"] else z

    def forward(self, x: torch.Tensor):
        s = self.spec
        logits = self.logits(x)
        scores = logits.softmax(-1) if s["score_func"] == "softmax" else logits.sigmoid()
        selection = scores
        if s["selection_bias"]:
            selection = selection + self.selection_bias.float()
        if s["num_groups"] > 1:
            grouped = selection.view(selection.shape[0], s["num_groups"], -1)
            group = grouped.amax(-1) if s["group_score"] == "max" else grouped.topk(2, dim=-1).values.sum(-1)
            best = group.topk(s["topk_groups"], dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            selection = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(selection)
        ids = selection.topk(s["k"], dim=-1).indices
        weights = scores.gather(1, ids)
        if s["normalize_topk"]:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        if s["scaling"] != 1.0:
            weights = weights * s["scaling"]
        return ids, weights


class DesmoeSlots(nn.Module):
    """The routed experts as [slots, ...] tensors, desmoe's layout: ``gate_up`` [P, 2f, d] (gate rows
    first), ``down`` [P, d, f], biases for GPT-OSS's clamped experts."""

    def __init__(self, spec: dict, hidden: int) -> None:
        super().__init__()
        e, p, f = spec["expert"], spec["num_slots"], spec["expert"]["ffn"]
        self.kind, self.alpha, self.limit = e["kind"], e.get("alpha"), e.get("limit")
        self.gate_up = nn.Parameter(torch.empty(p, 2 * f, hidden))
        self.down = nn.Parameter(torch.empty(p, hidden, f))
        if e["bias"]:
            self.gate_up_bias = nn.Parameter(torch.empty(p, 2 * f))
            self.down_bias = nn.Parameter(torch.empty(p, hidden))
        else:
            self.gate_up_bias = self.down_bias = None

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        bias = lambda b: None if b is None else b[slot]  # noqa: E731
        gate, up = F.linear(x, self.gate_up[slot], bias(self.gate_up_bias)).chunk(2, dim=-1)
        if self.kind == "swiglu":
            h = F.silu(gate) * up
        else:  # clamped SwiGLU (GPT-OSS)
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            h = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        return F.linear(h, self.down[slot], bias(self.down_bias))


class DesmoeMoEBlock(nn.Module):
    """Router -> each route (token, expert e, weight w) runs on e's slot, or with ``fanout`` on every slot
    of e's row with weight w / (its slots) -> fp32 sum -> + the family's shared expert(s), if any."""

    def __init__(self, spec: dict, layer: int, hidden: int, family_block: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.router = DesmoeRouter(spec, hidden)
        self.slots = DesmoeSlots(spec, hidden)
        self.slot_of_expert = spec["slot_of_expert"][str(layer)]
        self.fanout = (spec.get("fanout") or {}).get(str(layer))
        if spec["shared"]:  # the family's own module, under its own name
            setattr(self, spec["shared"], getattr(family_block, spec["shared"]))
        if spec["shared_gate"]:
            setattr(self, spec["shared_gate"], getattr(family_block, spec["shared_gate"]))

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = self.router(x)
        table = self.fanout if self.fanout is not None else [[s] for s in self.slot_of_expert]
        rows = torch.tensor(table, device=x.device)[ids]  # [S, k, R], -1 = padding
        valid = rows >= 0
        share = (weights.unsqueeze(-1) * valid / valid.sum(-1, keepdim=True).clamp_min(1)).reshape(x.shape[0], -1)
        slots = rows.reshape(x.shape[0], -1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for slot in torch.unique(slots[slots >= 0]).tolist():
            token, route = torch.nonzero(slots == slot, as_tuple=True)
            y = self.slots(x.index_select(0, token), slot).float() * share[token, route].unsqueeze(1)
            out.index_add_(0, token, y)
        out = out.to(x.dtype)
        if self.spec["shared"]:
            shared = getattr(self, self.spec["shared"])(x)
            if self.spec["shared_gate"]:
                shared = torch.sigmoid(getattr(self, self.spec["shared_gate"])(x)) * shared
            out = out + shared
        out = out.reshape(shape)
        return (out, weights) if self.spec["returns_tuple"] else out


class DesmoeMoEForCausalLM(FamilyForCausalLM):
    config_class = DesmoeMoEConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        spec = config.desmoe_moe
        for i in spec["moe_layers"]:
            layer = self.model.layers[i]
            layer.mlp = DesmoeMoEBlock(spec, i, config.hidden_size, layer.mlp)
