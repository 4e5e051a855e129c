"""Multi-domain fine-tuning of an MoE LM: DES-MoE and its baselines as one recipe of the trainer.

A step: pick the step's domain (every rank, equal shares) -> the method sets what
may train (phase, domain's experts, lambda) -> forward, task + lambda*KD + aux loss
-> (trainer: backward/step) -> the method consumes the routing (domain-expert
counts, A/M refresh).  The trainer logs, evaluates, checkpoints (method state rides
in the checkpoint) and resumes.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from desmoe import checkpoint
from desmoe.collectives import all_reduce_, mean_over_ranks
from desmoe.config import bad
from desmoe.errors import UserError
from desmoe.methods.desmoe.config import DESMoEConfig
from desmoe.methods.desmoe.domains import DomainDataConfig, open_domains
from desmoe.models.moe_lm import MoELM, MoELMConfig
from desmoe.monitor import ascii_curve, plot_curves, read_metrics
from desmoe.training.lm import TrainConfig
from desmoe.objective import next_token_loss
from desmoe.training.trainer import Cadence, Recipe, RunConfig, Setup, Trainer


@dataclass
class BaseConfig:
    # An HF MoE checkpoint (e.g. the embedded base from launcher/pretrain.py): the model comes from it and
    # model.* only supplies ep_size.  Otherwise desmoe's MoELM from model.*, optionally loaded from
    # ``checkpoint`` (a desmoe checkpoint directory of the same shape).
    hf: Optional[str] = None
    checkpoint: Optional[str] = None


@dataclass
class EvalConfig:
    downstream: bool = True  # at the end, on prepared data: desmoe.evaluation.lm_tasks.evaluate_lm
    items_per_task: int = 200
    ppl_tokens: int = 20000


@dataclass
class DESMoEExperiment:
    model: MoELMConfig = field(default_factory=MoELMConfig)
    data: DomainDataConfig = field(default_factory=DomainDataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    desmoe: DESMoEConfig = field(default_factory=DESMoEConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="desmoe"))

    def check(self) -> None:
        if not self.base.hf and self.train.seq_len > self.model.max_seq_len:
            raise bad("train.seq_len", f"at most model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)
        warmup = round(self.desmoe.schedule.t1 * self.train.steps)
        if self.desmoe.method == "desmoe" and warmup < max(1, len(self.data.domains)):
            raise bad("desmoe.schedule.t1", f"a warm-up of at least one step per domain ({len(self.data.domains)}; "
                      f"t1 * train.steps = {warmup})", self.desmoe.schedule.t1)
        if self.base.hf and self.base.checkpoint:
            raise bad("base.checkpoint", "null when base.hf is set (one source of pretrained weights)",
                      self.base.checkpoint)
        dges = self.desmoe.dges
        if dges.duplicate_shared and dges.spare_experts % self.model.ep_size:
            raise bad("desmoe.dges.spare_experts", f"a multiple of model.ep_size={self.model.ep_size}",
                      dges.spare_experts)
        if dges.duplicate_shared and self.base.checkpoint:  # spare slots renumber the experts' checkpoint files
            raise bad("desmoe.dges.duplicate_shared", "false with base.checkpoint (use base.hf)", True)
        if self.desmoe.dges.batching not in ("step", "token"):
            raise bad("desmoe.dges.batching", "'step' (one domain per step) or 'token' (mixed batches, Eq. 8)",
                      self.desmoe.dges.batching)


def domain_of_step(step: int, num_domains: int, seed: int) -> int:
    """Equal shares: each block of ``num_domains`` steps visits every domain once, in a seeded order."""
    cycle, pos = divmod(step, num_domains)
    order = torch.randperm(num_domains, generator=torch.Generator().manual_seed(seed * 7919 + cycle))
    return int(order[pos])


class DomainStreams:
    """One batch iterator per domain, positioned for a (resumed) start step; with
    ``dges.batching: token`` one stream of mixed batches instead (domain -1)."""

    def __init__(self, data, cfg: DESMoEExperiment, rank: int, world: int, start: int) -> None:
        n, t = len(data.domains), cfg.train
        self.mixed = cfg.desmoe.dges.batching == "token"
        if self.mixed:
            self.streams = [data.batches("train", t.micro_batch, t.seq_len, t.seed, rank, world, start,
                                         domains=data.domains, homogeneous=False)]
            return
        done = [0] * n
        for s in range(start):
            done[domain_of_step(s, n, t.seed)] += 1
        self.streams = [data.batches("train", t.micro_batch, t.seq_len, t.seed, rank, world, done[d],
                                     domains=[name], homogeneous=True) for d, name in enumerate(data.domains)]

    def next(self, domain: int):
        return next(self.streams[0 if self.mixed else domain])


def present_domains(token_domain: torch.Tensor, num_domains: int) -> list[int]:
    """Domains with a token on any rank (every rank must freeze the same experts)."""
    dom = token_domain.reshape(-1)
    seen = all_reduce_(torch.bincount(dom[dom >= 0], minlength=num_domains).clamp(max=1))
    return torch.nonzero(seen).flatten().tolist()


@torch.no_grad()
def evaluate(model, data, cfg: DESMoEExperiment, rank: int, world: int, device) -> dict[str, float]:
    """Held-out next-token loss per domain, their mean, and on the general (untrained) set."""
    model.eval()
    out = {}
    names = [*data.domains, *(["general"] if getattr(data, "general", None) else [])]
    for name in names:
        pick = data.general if name == "general" else [name]
        stream = data.batches("val", cfg.train.micro_batch, cfg.train.seq_len, cfg.train.seed + 7, rank, world, 0,
                              domains=pick, homogeneous=False)
        losses = [next_token_loss(model, next(stream).input_ids.to(device)) for _ in range(cfg.train.eval_batches)]
        out[f"val/{name}"] = mean_over_ranks(torch.stack(losses).mean())
    model.train()
    out["val/domain_mean"] = sum(out[f"val/{d}"] for d in data.domains) / len(data.domains)
    return out


def build_model(cfg: DESMoEExperiment):
    """The pretrained MoE to adapt: an HF checkpoint on desmoe's EP blocks, or desmoe's MoELM."""
    if cfg.base.hf:
        from desmoe.models.hf_moe import load_hf_moe

        model = load_hf_moe(cfg.base.hf, ep_size=cfg.model.ep_size)
        model.config.use_cache = False
        return model
    model = MoELM(cfg.model)
    model.setup_expert_parallel()
    return model


def downstream_eval(model, data, cfg: DESMoEExperiment) -> dict[str, float]:
    """Exact-answer / MCQ tasks and perplexities of the prepared data (every rank must call it).

    The data's "general" domain (what the embedded base was pretrained on) is always evaluated, also
    when it is not a fine-tuning domain: its test perplexity and MCQ accuracy are the general-ability
    probe in-distribution for the base (``ppl/general``, ``mcq/general``), next to the never-trained
    held-out text (``ppl/general_heldout``).  ``downstream/mean`` averages the fine-tuning domains only."""
    if not cfg.evaluation.downstream or not hasattr(data, "data"):
        return {}
    from desmoe.distributed import is_rank0
    from desmoe.evaluation.lm_tasks import LMEvalConfig, evaluate_lm

    ev = LMEvalConfig(items_per_task=cfg.evaluation.items_per_task, ppl_tokens=cfg.evaluation.ppl_tokens)
    probe = [d for d in ("general",) if d in data.data.domains and d not in data.domains]
    was_training = model.training
    model.eval()
    out = evaluate_lm(model, data.data, ev, domains=[*data.domains, *probe], progress=is_rank0())
    model.train(was_training)
    mcq = [out[f"mcq/{d}"] for d in data.domains if f"mcq/{d}" in out]
    if mcq:
        out["downstream/mean"] = sum(mcq) / len(mcq)
    return {f"eval/{k}": v for k, v in out.items()}


def load_base(engine, path: str) -> None:
    """Pretrained weights only (optimizer starts fresh); parameters the base lacks (the ALR) keep their init."""
    from desmoe.methods.desmoe.alr import alr_routers

    tag = checkpoint.latest_tag(path)
    if tag is None:
        raise UserError(f"base.checkpoint='{path}': no 'latest' checkpoint there")
    # DeepSpeed restores parameters with requires_grad=False from the checkpoint's own list of frozen
    # parameters, which a base trained without the ALR lacks; the module weights load either way.
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        loaded, _ = engine.load_checkpoint(path, tag=tag, load_module_only=True, load_module_strict=False,
                                           load_optimizer_states=False, load_lr_scheduler_states=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if loaded is None:
        raise UserError(f"base.checkpoint='{path}': not a loadable DeepSpeed checkpoint")
    _load_wrapped_dense(engine.module, Path(path) / tag)
    for router in alr_routers(engine.module):
        router.reinit_from_teacher()  # the step-0 identity must hold for the loaded router
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        # ZeRO's fp32 master copy (which every step copies back, frozen groups included) must hold
        # the weights written into the module above.
        engine.optimizer.refresh_fp32_params()


def _load_wrapped_dense(model, tag_dir: Path) -> bool:
    """Dense weights of layers a method wrapped (peft's LoRA moves ``x.weight`` to ``x.base_layer.weight``),
    which the name-keyed load above skipped; anything else missing from the base is an error."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        return False
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    state = model.state_dict()
    missing, copied = [], False
    for key, value in state.items():
        if key in saved or "deepspeed_experts" in key or ".mlp_in." in key or ".mlp_out." in key or "lora_" in key:
            continue
        source = key.replace(".base_layer.", ".")
        if source in saved:
            with torch.no_grad():
                value.copy_(saved[source])
            copied = True
        else:
            missing.append(key)
    if missing:
        raise UserError(f"{tag_dir}: the base checkpoint has no '{missing[0]}' ({len(missing)} missing; "
                        f"same model.* as the base?)")
    return copied


class DESMoERecipe(Recipe):
    """DES-MoE or a baseline (``desmoe.method``): the method object decides what trains and the loss."""

    def cadence(self) -> Cadence:
        t = self.cfg.train
        return Cadence(t.log_every, t.eval_every, t.save_every)

    def setup(self, trainer: Trainer) -> Setup:
        from desmoe.methods.desmoe.baselines import build_method

        cfg, t = self.cfg, self.cfg.train
        trainer.check_ep(cfg.model.ep_size)
        self.data = open_domains(cfg.data)
        if cfg.desmoe.method == "desmoe" and round(cfg.desmoe.schedule.t1 * t.steps) < len(self.data.domains):
            raise bad("desmoe.schedule.t1", f"a warm-up of at least one step per domain ({len(self.data.domains)} "
                      f"domains; t1 * train.steps = {round(cfg.desmoe.schedule.t1 * t.steps)})", cfg.desmoe.schedule.t1)
        model = build_model(cfg)
        self.method = build_method(cfg.desmoe, t.steps, len(self.data.domains), t.aux_loss_coef,
                                   seed=cfg.model.init_seed)
        self.name = self.method.name
        self.parts = self.method.prepare_model(model)
        return Setup(model, t.micro_batch, lr=t.lr, parts=self.parts)

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
            self.method.load_state_dict(state)
        elif self.cfg.base.checkpoint:
            load_base(trainer.engine, self.cfg.base.checkpoint)
        self.method.attach(trainer.engine.module, trainer.trainability, self.data, trainer.rank, trainer.world,
                           t.micro_batch, t.seq_len)
        if is_rank0() and trainer.start == 0:  # a fresh run: results of an earlier run under this name are stale
            for stale in trainer.run_dir.glob("results.*"):
                stale.unlink()
        self.streams = DomainStreams(self.data, self.cfg, trainer.rank, trainer.world, trainer.start)

    def stages(self):
        return [] if self.method.name == "vanilla" else [self.cfg.train.steps]  # vanilla: evaluation only

    def tokens_per_step(self):
        return self.cfg.train.micro_batch * self.cfg.train.seq_len * self.trainer.world

    def step(self, stage, step):
        engine, n = self.trainer.engine, len(self.data.domains)
        self.domain = -1 if self.streams.mixed else domain_of_step(step, n, self.cfg.train.seed)
        batch = self.streams.next(self.domain)
        self.token_domain = batch.token_domain[:, :-1].to(engine.device)  # domain of each input position
        present = present_domains(self.token_domain, n) if self.streams.mixed else self.domain
        self.logs = self.method.begin_step(step, present)  # phase, domain experts, lambda -> what may train
        self.method.sync_gradients()  # frozen parameters get no weight gradients computed
        loss, self.parts_ = self.method.loss(batch.input_ids.to(engine.device), self.token_domain)
        return loss, self.parts_["task_loss"].item()

    def end_step(self, stage, step):
        self.refreshed = self.method.end_step(step, self.token_domain)

    def log(self, done):
        values = {f"train/{k}": mean_over_ranks(v) for k, v in self.parts_.items()}
        values.update({f"train/{k}": v for k, v in self.logs.items()})
        values.update({"train/domain": float(self.domain), "train/lr": self.trainer.engine.get_lr()[0]})
        return values

    def after_log(self, done):
        if self.refreshed:
            scalars, images = self.method.refresh_report(self.data.domains)
            for tag, (matrix, xlabel, ylabel) in images.items():
                self.trainer.monitor.heatmap(done, tag, matrix, xlabel=xlabel, ylabel=ylabel)
            if scalars:
                self.trainer.monitor.scalars(done, scalars)

    def evaluate(self, done):
        tr = self.trainer
        return evaluate(tr.engine.module, self.data, self.cfg, tr.rank, tr.world, tr.engine.device)

    def state_dict(self):
        return self.method.state_dict()

    def finish(self, trainer):
        vanilla = self.method.name == "vanilla"
        if vanilla:  # evaluation of the untrained base only
            trainer.monitor.scalars(0, self.evaluate(0))
        extra = downstream_eval(trainer.engine.module, self.data, self.cfg)
        if extra:
            trainer.monitor.scalars(0 if vanilla else self.cfg.train.steps, extra)

    def summary(self, trainer):
        from desmoe.distributed import is_rank0

        return write_results(trainer.run_dir, self.method.name, self.data.domains, trainer.train_seconds) \
            if is_rank0() else {}


def train_desmoe(cfg: DESMoEExperiment, ds_config_path: str) -> dict:
    return Trainer(DESMoERecipe(cfg), ds_config_path).run()


def write_results(run_dir: Path, method: str, domains: list[str], seconds: float) -> dict:
    """results.json / results.csv / results.md and loss plots in the run directory."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "val/domain_mean" in r]
    final = evals[-1] if evals else {}
    downstream = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}  # the last value of each
    result = {"method": method, "train_seconds": round(seconds, 2),
              **{k.split("/", 1)[1]: round(v, 4) for k, v in final.items() if k.startswith("val/")},
              **{k.split("/", 1)[1]: round(v, 4) for k, v in downstream.items()}}
    checkpoint.write_text_atomic(run_dir / "results.json", json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result))
    writer.writeheader()
    writer.writerow(result)
    checkpoint.write_text_atomic(run_dir / "results.csv", buf.getvalue())
    checkpoint.write_text_atomic(run_dir / "results.md", results_table([result]))
    train = [(r["step"], r["train/task_loss"]) for r in rows if "train/task_loss" in r]
    if train:
        val = {k.split("/", 1)[1]: [(r["step"], r[k]) for r in evals] for k in final if k.startswith("val/")}
        plot_curves(run_dir / "loss.png", {"train (task)": train, **val}, ylabel="next-byte NLL (nats)")
        print(ascii_curve(train, label=f"{method} task loss"), flush=True)
    print(results_table([result]), flush=True)
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tensorboard'})", flush=True)
    return result


def results_table(results: list[dict]) -> str:
    """Markdown table: one row per method, held-out loss per domain (lower is better)."""
    keys = [k for k in results[0] if k not in ("method",)]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["method"] + " | " + " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys) + " |"
              for r in results]
    return "\n".join(lines) + "\n"
