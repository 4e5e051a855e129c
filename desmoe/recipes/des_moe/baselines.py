"""Baselines under the same data, budget and trainer: FFT, ESFT-Token/Gate, LoRA.

Single-domain vs mixed is a data choice (``data.domains`` with one or several
names); the method is the same object.  Frozen means frozen in the optimizer
(bit-identical), as for DES-MoE.
"""
from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from desmoe.errors import UserError
from desmoe.recipes.des_moe import esft
from desmoe.recipes.des_moe.config import Method as MethodName
from desmoe.recipes.des_moe.dges import counted_positions
from desmoe.recipes.des_moe.method import DESMoE, Method
from desmoe.moe import moe_blocks


class FFT(Method):
    """Full fine-tuning: every parameter, the pretrained linear router included."""

    name = "fft"

    def attach(self, model, train, data, rank, world, micro_batch, seq_len):
        super().attach(model, train, data, rank, world, micro_batch, seq_len)
        train.set_everything(True)


class ESFT(Method):
    """Expert-Specialized Fine-Tuning: only the experts relevant to the data train."""

    def __init__(self, kind: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind  # "token" or "gate"
        self.name = f"esft_{kind}"
        self.p = self.cfg.baseline.esft_token_p if kind == "token" else self.cfg.baseline.esft_gate_p
        self.selected: list[list[int]] | None = None

    @torch.no_grad()
    def _profile(self, model, data, domains, rank, world, micro_batch, seq_len) -> esft.RoutingProfile:
        blocks = moe_blocks(model)
        profile = esft.RoutingProfile(len(blocks), blocks[0].num_experts)
        steps = max(1, self.cfg.baseline.esft_profile_tokens // (world * micro_batch * seq_len))
        was_training = model.training
        model.eval()
        stream = data.batches("train", micro_batch, seq_len, self.seed + 5934875, rank, world, 0, domains=domains,
                              homogeneous=True)
        for _ in range(steps):
            batch = next(stream)
            model(batch.input_ids[:, :-1].to(next(model.parameters()).device))
            profile.record_model(model, counted_positions(batch.loss_mask, self.cfg.routing_stats_tokens))
        model.train(was_training)
        profile.all_reduce()
        return profile

    def attach(self, model, train, data, rank, world, micro_batch, seq_len):
        super().attach(model, train, data, rank, world, micro_batch, seq_len)
        if self.selected is None:  # a resumed run keeps the selection made on the base model
            groups = [[d] for d in data.domains] if self.cfg.baseline.esft_mixed == "union" else [list(data.domains)]
            per_group = [esft.select_experts(self._profile(model, data, g, rank, world, micro_batch, seq_len),
                                             self.kind, self.p) for g in groups]
            self.selected = [sorted(set().union(*(sel[layer] for sel in per_group)))
                             for layer in range(len(per_group[0]))]
        train.set_everything(False)
        for b, experts in enumerate(self.selected):
            train.set_experts(b, experts)

    def state_dict(self):
        return {"esft_selected": self.selected}

    def load_state_dict(self, state):
        self.selected = state.get("esft_selected")


class LoRA(Method):
    """LoRA adapters (peft) on the dense linear layers named in ``baseline.lora_targets``; all else frozen.

    Routed experts get no adapters: their weights are used by the fused expert
    kernel directly, and adapter parameters added after DeepSpeed wraps the
    experts would not be marked expert-parallel."""

    name = "lora"

    def prepare_model(self, model: nn.Module):
        from peft import LoraConfig, inject_adapter_in_model

        b = self.cfg.baseline
        expert_modules = {id(m) for blk in moe_blocks(model) for m in blk.local_experts.modules()}
        targets = sorted({name for name, m in model.named_modules()
                          if isinstance(m, nn.Linear) and id(m) not in expert_modules
                          and name.rsplit(".", 1)[-1] in b.lora_targets})
        if not targets:
            from desmoe.config import bad

            raise bad("desmoe.baseline.lora_targets", "names of dense nn.Linear modules of the model", b.lora_targets)
        inject_adapter_in_model(LoraConfig(r=b.lora_rank, lora_alpha=b.lora_alpha, target_modules=targets,
                                           lora_dropout=0.0), model)
        for p in model.parameters():  # the optimizer layout stays that of the other methods; Trainability freezes
            p.requires_grad_(True)
        return {"lora": lambda n: "lora_" in n}

    def attach(self, model, train, data, rank, world, micro_batch, seq_len):
        super().attach(model, train, data, rank, world, micro_batch, seq_len)
        train.set_everything(False)
        train.set_part("lora", True)


class Vanilla(Method):
    """The pretrained base, evaluated without training (the reference for forgetting)."""

    name = "vanilla"
    trains = False  # the run is its evaluation only

    def attach(self, model, train, data, rank, world, micro_batch, seq_len):
        super().attach(model, train, data, rank, world, micro_batch, seq_len)
        train.set_everything(False)


class ESFTToken(ESFT):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__("token", *args, **kwargs)


class ESFTGate(ESFT):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__("gate", *args, **kwargs)


# ``desmoe.method`` -> the class; the names are those of config.Method (the error below lists them).
METHODS_BY_NAME: dict[str, type[Method]] = {"desmoe": DESMoE, "fft": FFT, "vanilla": Vanilla,
                                            "esft_token": ESFTToken, "esft_gate": ESFTGate, "lora": LoRA}


def method_class(name: str) -> type[Method]:
    if name not in METHODS_BY_NAME:
        raise UserError(f"desmoe.method '{name}': expected one of {', '.join(get_args(MethodName))}")
    return METHODS_BY_NAME[name]


def build_method(cfg, total_steps: int, num_domains: int, aux_coef: float, seed: int = 0) -> Method:
    return method_class(cfg.method)(cfg, total_steps, num_domains, aux_coef, seed)
