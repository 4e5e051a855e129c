"""Multi-domain fine-tuning of an MoE LM: DES-MoE and its baselines as one recipe of the trainer.

A step: pick the step's domain (every rank, equal shares) and its ``train.grad_accum``
micro-batches -> the method sets what may train (phase, domain's experts, lambda) ->
per micro-batch: forward, task + lambda*KD + aux loss -> (trainer: backward; step after
the last) -> the method consumes the routing (domain-expert counts of every micro-batch,
A/M refresh).  The trainer logs, evaluates, checkpoints (method state rides
in the checkpoint) and resumes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from desmoe import reshard
from desmoe.collectives import mean_over_ranks
from desmoe.config import bad
from desmoe.recipes.des_moe.base_model import build_model, check_vocab, load_base
from desmoe.recipes.des_moe.config import DESMoEExperiment
from desmoe.recipes.des_moe.dges import stats_token_domain
from desmoe.recipes.des_moe.domains import open_domains
from desmoe.recipes.des_moe.evaluate import downstream_eval, evaluate
from desmoe.recipes.des_moe.results import write_results
from desmoe.recipes.des_moe.streams import DomainStreams, domain_of_step, present_domains  # noqa: F401 (tests)
from desmoe.training.trainer import RESUMABLE_KEYS, Cadence, Recipe, Setup, Trainer


class DESMoERecipe(Recipe):
    """DES-MoE or a baseline (``desmoe.method``): the method object decides what trains and the loss."""

    resumable_keys = RESUMABLE_KEYS + ("evaluation.", "export.")  # what happens after the last step may change

    # Resumes at another world size (desmoe/reshard.py; tests/test_elastic.py): A/M and the method's state are
    # global (rank 0 saves the ranks' summed route counts), the streams keep the saved layout, and each label
    # weighs as in that layout (reshard.label_scales).  Not with expert copies: see ``inelastic``.
    @property
    def inelastic(self) -> str:
        if self.cfg.desmoe.dges.duplicate_shared:  # slot = ep_rank * (experts + spares) / ep_size + local
            return ("desmoe.dges.duplicate_shared: the expert copies live in spare slots whose ids, those of the "
                    "checkpoint's expert files and copy tables, depend on model.ep_size")
        return ""

    def cadence(self) -> Cadence:
        t = self.cfg.train
        return Cadence(t.log_every, t.eval_every, t.save_every)

    def setup(self, trainer: Trainer) -> Setup:
        from desmoe.recipes.des_moe.baselines import build_method, method_class

        cfg, t = self.cfg, self.cfg.train
        trainer.check_ep(cfg.model.ep_size)
        self.data = open_domains(cfg.data)
        if method_class(cfg.desmoe.method).warmup_per_domain and round(cfg.desmoe.schedule.t1 * t.steps) < len(self.data.domains):
            raise bad("desmoe.schedule.t1", f"a warm-up of at least one step per domain ({len(self.data.domains)} "
                      f"domains; t1 * train.steps = {round(cfg.desmoe.schedule.t1 * t.steps)})", cfg.desmoe.schedule.t1)
        model = build_model(cfg)
        check_vocab(model, self.data, cfg)
        self.method = build_method(cfg.desmoe, t.steps, len(self.data.domains), t.aux_loss_coef,
                                   seed=cfg.model.init_seed)
        self.name = self.method.name
        self.labels = {"train/domain": {-1: "mixed (token-level masks)", **dict(enumerate(self.data.domains))}}
        self.parts = self.method.prepare_model(model)
        return Setup(model, t.micro_batch, lr=t.lr, parts=self.parts, grad_accum=t.grad_accum)

    def on_engine(self, trainer):
        from desmoe.engine import refresh_master_weights

        # A method that writes expert weights (copies) must make ZeRO re-read those experts' fp32 master copy.
        self.method.on_weights_changed = lambda tags: refresh_master_weights(trainer.engine, tags)
        if self.cfg.desmoe.skip_frozen_grads:
            self.method.enable_gradient_skipping(trainer.engine.module, self.parts)

    def attach(self, trainer, state):
        from desmoe.distributed import is_rank0

        t = self.cfg.train
        if state:
            self.method.check_resume(state, trainer.start)
            self.method.load_state_dict(state)
        elif self.cfg.base.checkpoint:
            load_base(trainer.engine, self.cfg.base.checkpoint)
        self.method.attach(trainer.engine.module, trainer.trainability, self.data, trainer.rank, trainer.world,
                           t.micro_batch, t.seq_len)
        if is_rank0() and trainer.start == 0:  # a fresh run: results of an earlier run under this name are stale
            for stale in trainer.run_dir.glob("results.*"):
                stale.unlink()
        self.streams = DomainStreams(self.data, self.cfg, trainer.rank, trainer.world, trainer.start, trainer)

    def stages(self):
        return [self.cfg.train.steps] if self.method.trains else []  # vanilla: evaluation only

    def tokens_per_step(self):
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * t.seq_len * self.trainer.world

    def step(self, stage, step, micro):
        engine, n, accum = self.trainer.engine, len(self.data.domains), self.cfg.train.grad_accum
        if micro == 0:  # the step's batches first: what may train must cover every micro-batch's domains
            self.domain = -1 if self.streams.mixed else domain_of_step(step, n, self.cfg.train.seed)
            self.batches = [self.streams.next(self.domain) for _ in range(accum)]
            # the domain of each input position, per micro-batch
            self.token_domains = [b.token_domain[:, :-1].to(engine.device) for b in self.batches]
            # counted on the batches' host copies: on the device its bincount, selection and nonzero each waited
            present = (present_domains(torch.cat([b.token_domain[:, :-1] for b in self.batches]), n)
                       if self.streams.mixed else self.domain)
            self.logs = self.method.begin_step(step, present)  # phase, domain experts, lambda -> what may train
            self.method.sync_gradients()  # frozen parameters get no weight gradients computed
            counted = [int(b.loss_mask[:, 1:].sum()) for b in self.batches]  # instruction data: responses only
            self.scales = reshard.label_scales(self.trainer, counted)  # each label weighs as in the saved layout
            self.parts_ = {}
        else:
            self.method.observe(self.stats_domain)  # the previous micro-batch's routing, still in the blocks
        batch, token_domain = self.batches[micro], self.token_domains[micro]
        self.stats_domain = stats_token_domain(token_domain, batch.loss_mask,  # what A counts
                                               self.cfg.desmoe.routing_stats_tokens)
        self.method.task_scale = self.scales[micro]  # 1.0 unless micro-batches count unequal numbers of labels
        loss, parts = self.method.loss(batch.input_ids.to(engine.device), token_domain,
                                       batch.mask_for_loss(engine.device))  # instruction data: responses
        for key, value in parts.items():  # the step's means
            share = self.scales[micro] if key == "task_loss" else 1.0
            self.parts_[key] = self.parts_.get(key, 0.0) + value * share / accum
        return loss, parts["task_loss"]  # read back by the trainer with the step's losses, once per step

    def end_step(self, stage, step):
        self.refreshed = self.method.end_step(step, self.stats_domain)

    def log(self, done):
        values = {f"train/{k}": mean_over_ranks(v) for k, v in self.parts_.items()}
        values["train/loss"] = values["train/task_loss"]  # the next-token loss: pretraining's tag, one chart
        values.update({f"train/{k}": v for k, v in self.logs.items()})
        values.update({"train/domain": float(self.domain), "train/lr": self.trainer.engine.get_lr()[0]})
        return values

    def after_log(self, done):
        if self.refreshed:
            scalars, images = self.method.refresh_report(self.data.domains)
            for tag, image in images.items():
                self.trainer.monitor.heatmap(done, tag, **image)
            if scalars:
                self.trainer.monitor.scalars(done, scalars)

    def evaluate(self, done):
        tr = self.trainer
        return evaluate(tr.engine.module, self.data, self.cfg, tr.rank, tr.world, tr.engine.device)

    def state_dict(self):
        return self.method.state_dict()

    def finish(self, trainer):
        vanilla = not self.method.trains
        self.export(trainer)
        if vanilla:  # evaluation of the untrained base only
            trainer.monitor.scalars(0, self.evaluate(0))
        extra = downstream_eval(trainer.engine.module, self.data, self.cfg)
        if extra:
            trainer.monitor.scalars(0 if vanilla else self.cfg.train.steps, extra)

    def export(self, trainer):
        """The final checkpoint as an HF folder (``export.enabled``); vanilla and MoELM runs have nothing to add."""
        from desmoe.distributed import is_rank0

        ex = self.cfg.export
        skip = None if ex.enabled else "export.enabled is false"
        if skip is None and not self.method.trains:
            skip = f"vanilla trains nothing: the model is the base {self.cfg.base.hf or self.cfg.base.checkpoint}"
        elif skip is None and not self.cfg.base.hf:
            skip = "desmoe's own MoELM (base.hf unset) has no Hugging Face form"
        if skip is not None:
            if is_rank0() and ex.enabled:
                print(f"export: skipped ({skip})", flush=True)
            return
        trainer.export(self.export_dir())

    def export_dir(self):
        ex = self.cfg.export
        if ex.enabled and self.method.trains and self.cfg.base.hf:
            return Path(ex.dir) if ex.dir else self.trainer.run_dir / "export"
        return None

    def summary(self, trainer):
        from desmoe.distributed import is_rank0

        return write_results(trainer.run_dir, self.method.name, self.data.domains, trainer.train_seconds) \
            if is_rank0() else {}


def train_desmoe(cfg: DESMoEExperiment, ds_config_path: str) -> dict:
    return Trainer(DESMoERecipe(cfg), ds_config_path).run()


