"""What a fine-tuning method does around the trainer's step, and DES-MoE itself.

A method prepares the model before the engine exists (install the ALR, LoRA ...),
then, every step: ``begin_step`` sets what the optimizer may update, ``loss``
computes the objective, ``end_step`` consumes the step's routing.  The trainer
(desmoe/recipes/des_moe/recipe.py, a recipe of desmoe/training/trainer.py) is the same for DES-MoE and every baseline.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from desmoe.recipes.des_moe import schedule
from desmoe.recipes.des_moe.alr import install_alr, is_router_param, lambda_at, model_kd_loss, set_lambda
from desmoe.recipes.des_moe.config import DESMoEConfig
from desmoe.recipes.des_moe.dges import DGES
from desmoe.moe import moe_blocks, total_aux_loss
from desmoe.moe.trainability import FROZEN_KEY, PART_KEY, Trainability
from desmoe.objective import next_token_loss


task_loss = next_token_loss  # Eq. 3: the next-token NLL every LM recipe uses


class GradientSkipper:
    """Sets ``requires_grad`` from the optimizer's frozen flags, so backward computes no weight
    gradients for frozen parameters (DeepSpeed >= 0.18's ZeRO-2 counts the parameters each
    backward uses and fills the rest with zeros; FreezableAdamW still leaves them untouched).
    Parameters created frozen (the ALR's teacher) stay frozen.

    Experts of expert-parallel blocks keep computing gradients: ranks hold different
    experts, and a rank whose experts and inputs all needed no gradient would skip the
    all-to-all of the backward that the other ranks wait in."""

    def __init__(self, model: nn.Module, parts: Mapping[str, Callable[[str], bool]]) -> None:
        ids = {id(p): (b, g) for b, blk in enumerate(moe_blocks(model)) if blk.ep_size == 1
               for local, g in enumerate(blk.local_global_ids()) for p in blk.local_experts[local].parameters()}
        ep_experts = {id(p) for blk in moe_blocks(model) if blk.ep_size > 1 for p in blk.local_experts.parameters()}
        self.ep_params = [p for blk in moe_blocks(model) if blk.ep_size > 1 for p in blk.local_experts.parameters()
                          if p.requires_grad]  # always computing gradients: the loss keeps a graph
        self.entries = []  # (param, ("expert", block, id) | ("part", name))
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in ep_experts:
                continue
            if id(p) in ids:
                self.entries.append((p, ("expert", *ids[id(p)])))
            else:
                self.entries.append((p, ("part", next((k for k, f in parts.items() if f(name)), "other"))))

    def sync(self, train: Trainability) -> None:
        groups = train.optimizer.param_groups
        part_frozen = {g[PART_KEY]: g.get(FROZEN_KEY, False) for g in groups if PART_KEY in g}
        trainable = {b: train.trainable_experts(b) for b in {key[1] for _, key in self.entries if key[0] == "expert"}}
        flags = [key[2] in trainable[key[1]] if key[0] == "expert" else not part_frozen[key[1]]
                 for _, key in self.entries]
        # A step that trains nothing here (a consolidation step of a domain with an empty S_d, EP=1) would
        # leave the loss without a graph, and backward fails: compute and discard the gradients instead
        # (the frozen groups stay bit-identical whatever their gradients).
        keep_graph = not any(flags) and not any(p.requires_grad for p in self.ep_params)
        for (p, _), flag in zip(self.entries, flags):
            p.requires_grad_(flag or keep_graph)


class Method:
    name = "method"
    # this micro-batch's share of the step's counted labels x grad_accum (set by the recipe): the task loss of
    # a step that accumulates is the mean over all its counted labels, as one micro-batch of them all would be
    task_scale = 1.0
    trains = True  # False: the run evaluates the base only (no training stage)
    warmup_per_domain = False  # True: the schedule's warm-up must visit every domain at least once

    def __init__(self, cfg: DESMoEConfig, total_steps: int, num_domains: int, aux_coef: float, seed: int = 0) -> None:
        self.cfg, self.total_steps, self.num_domains, self.aux_coef, self.seed = cfg, total_steps, num_domains, aux_coef, seed
        self.train: Optional[Trainability] = None
        self.model: Optional[nn.Module] = None
        # set by the trainer: called with the (block, expert slot) pairs whose weights the method wrote
        self.on_weights_changed: Optional[Callable[[list], None]] = None
        self.skipper: Optional[GradientSkipper] = None  # enable_gradient_skipping

    def prepare_model(self, model: nn.Module) -> Mapping[str, Callable[[str], bool]]:
        """Change the model before the engine is built; return the named dense parts to freeze separately."""
        return {schedule.ROUTER_PART: is_router_param}

    def enable_gradient_skipping(self, model: nn.Module, parts: Mapping[str, Callable[[str], bool]]) -> None:
        """Call after the engine is built when ``cfg.skip_frozen_grads``; ``sync`` then follows every change."""
        self.skipper = GradientSkipper(model, parts)

    def sync_gradients(self) -> None:
        if self.skipper is not None:
            self.skipper.sync(self.train)

    def attach(self, model: nn.Module, train: Trainability, data, rank: int, world: int, micro_batch: int,
               seq_len: int) -> None:
        self.model, self.train = model, train

    def begin_step(self, step: int, domain: Union[int, Sequence[int]]) -> dict[str, float]:
        """``domain``: the step's domain, or with mixed batches the domains present on any rank."""
        return {}

    def loss(self, input_ids: Tensor, token_domain: Optional[Tensor] = None,
             loss_mask: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        task = task_loss(self.model, input_ids, loss_mask)
        aux = total_aux_loss(self.model)
        return self.task_scale * task + self.aux_coef * aux, {"task_loss": task.detach(), "aux_loss": aux.detach()}

    def observe(self, token_domain: Tensor) -> None:
        """After the forward of a micro-batch other than the step's last (gradient accumulation): count what
        ``end_step`` counts of the last."""

    def end_step(self, step: int, token_domain: Tensor) -> bool:
        """Returns True when expert-domain statistics were refreshed (for logging)."""
        return False

    def refresh_report(self, domains: Sequence[str]) -> tuple[dict[str, float], dict[str, tuple]]:
        """After ``end_step`` returned True: (scalars, {tag: Monitor.heatmap keyword arguments}) to monitor."""
        return {}, {}

    def state_dict(self) -> dict:
        return {}

    def check_resume(self, state: dict, start: int) -> None:
        """Before ``load_state_dict``: refuse (one line) a resume at step ``start`` this config cannot continue."""

    def load_state_dict(self, state: dict) -> None:
        pass


class DESMoE(Method):
    """ALR (alr.py) + DGES (dges.py) + the three-phase schedule (schedule.py), composed."""

    name = "desmoe"
    warmup_per_domain = True  # phase 1 (ALR warm-up) starts the domain-expert counts of every domain
    mask_routes = False  # this step: token-level route masks (dges.batching=token in a DGES phase)
    lam = 0.0  # this step's ALR distillation weight

    def prepare_model(self, model):
        if self.cfg.alr.enabled:
            install_alr(model, self.cfg.alr, seed=self.seed)
        self.t1, self.t2 = schedule.boundaries(self.total_steps, self.cfg.schedule)
        self.dges = DGES(moe_blocks(model), self.num_domains, self.cfg.dges, self.t1)
        self.dmap, self.copies = self.dges.map, self.dges.copies  # the same objects, by their short names
        return super().prepare_model(model)

    def begin_step(self, step, domain):
        phase = schedule.phase_at(step, self.total_steps, self.cfg.schedule)
        tset = schedule.trainable_set(phase, self.cfg.schedule, dges=self.cfg.dges.enabled)
        n = len(moe_blocks(self.model))
        present = [domain] if isinstance(domain, int) else list(domain)
        sets = self.dges.expert_sets(present) if tset.experts == "domain" else None
        self.mask_routes = tset.experts == "domain" and self.cfg.dges.batching == "token"
        schedule.apply(self.train, tset, n, sets)
        if tset.experts == "all":
            self.dges.restrict_to_used(self.train)
        alr_trains = self.cfg.alr.enabled and tset.router
        self.lam = lambda_at(step / self.total_steps, self.cfg.alr.lambda_end) if alr_trains else 0.0
        set_lambda(self.model, self.lam)
        self.phase = phase
        return {"phase": float(phase), "lambda": self.lam, "frozen_share": self.train.frozen_fraction()}

    def loss(self, input_ids, token_domain=None, loss_mask=None):
        blocks = moe_blocks(self.model)
        self.dges.install(blocks, None if token_domain is None else token_domain.to(input_ids.device),
                          self.mask_routes)
        try:
            task = task_loss(self.model, input_ids, loss_mask)
        finally:
            for block in blocks:  # the mask lives on in the autograd graph until backward
                block.weight_grad_mask = block.route_slots = None
        aux = total_aux_loss(self.model)
        kd = model_kd_loss(self.model, self.cfg.alr) if self.lam > 0 else torch.zeros((), device=task.device)
        total = self.task_scale * task + self.aux_coef * aux + self.lam * kd  # the ALR mixes (1 - lambda) in
        return total, {"task_loss": task.detach(), "aux_loss": aux.detach(), "kd_loss": kd.detach()}

    def observe(self, token_domain):
        self.dges.record(self.model, token_domain)

    def end_step(self, step, token_domain):
        return self.dges.end_step(self.model, step, token_domain, self.on_weights_changed)

    def refresh_report(self, domains):
        return self.dges.report(domains)

    def state_dict(self):
        return {**self.dges.state_dict(), "boundaries": [self.t1, self.t2]}

    def check_resume(self, state, start):
        if "boundaries" in state:  # absent in checkpoints written before session 16
            schedule.check_resumed_boundaries(state["boundaries"], self.total_steps, self.cfg.schedule, start)

    def load_state_dict(self, state):
        self.dges.load_state_dict(state)
