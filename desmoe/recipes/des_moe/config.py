"""DES-MoE settings.  Paper values are the defaults; every ambiguous reading is a switch
(the choices and why are in docs/desmoe.md)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from desmoe.config import bad, check_as
from desmoe.export import ExportConfig
from desmoe.models.moe_lm import MoELMConfig
from desmoe.recipes.des_moe.domains import DomainDataConfig
from desmoe.recipes.lm.recipe import TrainConfig
from desmoe.training.trainer import RunConfig

AlrInit = Literal["residual", "mirror", "gelu_copy"]
Method = Literal["desmoe", "fft", "esft_token", "esft_gate", "lora", "vanilla"]  # vanilla: the base, untrained


@dataclass
class ALRConfig:
    enabled: bool = True  # false = ablation "w/o ALR": the pretrained linear router is trained instead
    # residual:  R_adapt = R_orig(h) + W2 GELU(W1 h + b1) + b2, W2 = b2 = 0 (exact at step 0; "augments")
    # mirror:    W1 = [I; -I; kaiming], W2 = [W_orig; -W_orig; 0] -- GELU(x) - GELU(-x) = x, so the MLP
    #            alone equals the pretrained router at step 0 ("replaces"; W2 copied from W_orig)
    # gelu_copy: W1 = [I; kaiming], W2 = [W_orig; 0]: the notes' option (b), only approximately equal
    init: AlrInit = "residual"
    hidden_mult: int = 4  # d -> hidden_mult*d -> E
    tau: float = 0.7
    tau_squared: bool = False  # multiply L_KD by tau^2 (Hinton); the paper shows no such factor
    lambda_end: float = 1.0  # lambda(alpha) = max(0, 1 - alpha/lambda_end); 1.0 = the paper's max(0, 1-alpha)

    def check(self) -> None:
        if self.hidden_mult < 1:
            raise bad("hidden_mult", "a positive integer", self.hidden_mult)
        if not self.tau > 0:
            raise bad("tau", "a number > 0", self.tau)
        if not 0 < self.lambda_end <= 1:
            raise bad("lambda_end", "a number in (0, 1]", self.lambda_end)


@dataclass
class DGESConfig:
    enabled: bool = True  # false = ablation "w/o DGES": every domain may update every expert
    phi: float = 0.6  # M[d, e] = A[d, e] >= phi * max_e' A[d, e']
    momentum: float = 0.9
    # "new": A_hat <- momentum * A_window + (1 - momentum) * A_hat  (Eq. 9 as printed)
    # "old": A_hat <- momentum * A_hat + (1 - momentum) * A_window  (conventional momentum)
    momentum_on: Literal["new", "old"] = "new"
    update_every: int = 50  # T_update, steps between refreshes after warm-up; 0 = never refresh
    # step:  every rank and micro-batch of a step comes from one domain (exact isolation, no overhead);
    # token: mixed batches, Eq. 8 -- routes (token i, expert e) with M[d_i, e] = 0 pass no gradient
    batching: Literal["step", "token"] = "step"
    # Experts claimed by >1 domain at the first M get per-domain copies in spare slots (duplication.py);
    # false: they are only counted (dges/shared_by_several).  spare_experts: slots per MoE layer, a
    # multiple of model.ep_size (same number on every EP rank).
    duplicate_shared: bool = False
    spare_experts: int = 0
    # without domain labels (evaluation, generation): run the original, or average the copies' outputs
    duplicate_inference: Literal["original", "average"] = "original"

    def check(self) -> None:
        if not 0 < self.phi <= 1:
            raise bad("phi", "a number in (0, 1]", self.phi)
        if not 0 <= self.momentum <= 1:
            raise bad("momentum", "a number in [0, 1]", self.momentum)
        if self.update_every < 0:
            raise bad("update_every", "an integer >= 0", self.update_every)
        if self.spare_experts < 0 or (self.duplicate_shared and self.spare_experts < 1):
            raise bad("spare_experts", "an integer >= 1 when duplicate_shared is true (else 0)", self.spare_experts)


@dataclass
class ScheduleConfig:
    t1: float = 0.2  # warm-up ends at t1 * T
    t2: float = 0.7  # stabilisation ends at t2 * T
    # eq11: warm-up trains ALR + backbone (Eq. 11);  fig1: warm-up trains router + all experts (Fig. 1)
    warmup: Literal["eq11", "fig1"] = "eq11"

    def check(self) -> None:
        if not 0 < self.t1 < self.t2 <= 1:
            raise bad("t1", f"0 < t1 < t2 <= 1 (t2={self.t2})", self.t1)


@dataclass
class BaselineConfig:
    esft_token_p: float = 0.2
    esft_gate_p: float = 0.1
    esft_profile_tokens: int = 131072  # routing-log size per domain (ESFT: 32 x 4096)
    esft_mixed: Literal["union", "mixture"] = "union"  # mixed regime: union of per-domain sets or one profile
    lora_rank: int = 8
    lora_alpha: float = 16.0  # scaling alpha / r = 2 (the paper's "scaling 2")
    # Attention projections (dense linears, never experts) by their last name: desmoe's MoELM and the HF
    # families (Mixtral/Qwen2-MoE/OLMoE q/k/v/o, DeepSeek-V2's low-rank q/kv); the ones a model has are used.
    lora_targets: list[str] = field(default_factory=lambda: [
        "qkv", "out", "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
        "kv_b_proj"])

    def check(self) -> None:
        for key in ("esft_token_p", "esft_gate_p"):
            if not 0 < getattr(self, key) <= 1:
                raise bad(key, "a number in (0, 1]", getattr(self, key))
        if self.lora_rank < 1:
            raise bad("lora_rank", "a positive integer", self.lora_rank)
        if self.esft_profile_tokens < 1:  # 0 or less profiled one batch anyway (baselines.py rounds up to one)
            raise bad("esft_profile_tokens", "a positive integer", self.esft_profile_tokens)
        if not self.lora_alpha > 0:  # 0 scales the adapters' output and gradients to zero: the LoRA arm never trains
            raise bad("lora_alpha", "a number > 0", self.lora_alpha)


@dataclass
class DESMoEConfig:
    method: Method = "desmoe"
    # Frozen parameters get requires_grad=False, so backward skips their weight gradients
    # (false: they are computed and discarded, as the MoE core does by default).
    skip_frozen_grads: bool = True
    # Which tokens DGES's domain-expert statistics (A, M) and ESFT's expert scores count when batches
    # carry loss masks (instruction data): "response" = the positions whose label is in the loss,
    # "all" = prompt tokens too (the ESFT code's profiling).  Text-only data: the same either way.
    routing_stats_tokens: Literal["response", "all"] = "response"
    alr: ALRConfig = field(default_factory=ALRConfig)
    dges: DGESConfig = field(default_factory=DGESConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


# The experiment: the method's sections above plus the model, data, training and run sections.
@dataclass
class BaseConfig:
    # An HF MoE checkpoint (e.g. the embedded base from launcher/pretrain.py): the model comes from it and
    # model.* only supplies ep_size.  Otherwise desmoe's MoELM from model.*, optionally loaded from
    # ``checkpoint`` (a desmoe checkpoint directory of the same shape).
    hf: Optional[str] = None
    checkpoint: Optional[str] = None
    # > 0: the auxiliary-loss-free balancing rule updates the routers' selection biases (DeepSeek-V3, GLM-4.5)
    # after every optimizer step: b += rate * sign(mean load - load).  0 keeps the checkpoint's biases.
    bias_update_rate: float = 0.0

    def check(self) -> None:
        if not (isinstance(self.bias_update_rate, (int, float)) and 0 <= self.bias_update_rate < 1):
            raise bad("bias_update_rate", "a number in [0, 1)", self.bias_update_rate)
        if self.bias_update_rate and not self.hf:
            raise bad("bias_update_rate", "0 unless base.hf names a model with selection biases",
                      self.bias_update_rate)


@dataclass
class EvalConfig:
    downstream: bool = True  # at the end, on prepared data: desmoe.evaluation.lm_tasks.evaluate_lm
    items_per_task: int = 200
    ppl_tokens: int = 20000
    max_len: int = 512  # tokens a task's prompt and answer may take (its context is cut from the left beyond)
    ppl_seq_len: int = 256  # the perplexity's windows

    def check(self) -> None:  # else refused only after the whole run, as eval.* (desmoe.evaluation.lm_tasks)
        for key in ("items_per_task", "ppl_tokens", "max_len", "ppl_seq_len"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive integer", getattr(self, key))
        from desmoe.evaluation.lm_tasks import LMEvalConfig

        longest = max(LMEvalConfig.math_max_new_tokens, LMEvalConfig.exact_max_new_tokens)
        if self.max_len <= longest:  # a prompt keeps max_len - the answer's new tokens
            raise bad("max_len", f"more than {longest} tokens (the longest generated answer)", self.max_len)


@dataclass
class DESMoEModelConfig(MoELMConfig):
    """``model.*``: desmoe's MoELM built from these keys, or with ``base.hf`` only ``ep_size`` (checked against
    the HF base's own expert count when it loads) and ``init_seed``.  So the architecture's checks run in
    :meth:`DESMoEExperiment.check`, which knows the base: here an HF base of 64 experts with ``ep_size=16`` was
    refused as "a divisor of num_experts=8" (the default of a key the HF base does not use)."""

    def check(self) -> None:
        if self.ep_size < 1:
            raise bad("ep_size", "a positive integer", self.ep_size)


@dataclass
class DESMoEExperiment:
    model: DESMoEModelConfig = field(default_factory=DESMoEModelConfig)
    data: DomainDataConfig = field(default_factory=DomainDataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    desmoe: DESMoEConfig = field(default_factory=DESMoEConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)  # the final model as an HF folder (desmoe.export)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="desmoe"))

    def check(self) -> None:
        if not self.base.hf:  # desmoe's own model: its whole architecture is checked
            check_as(self.model, MoELMConfig.check, "model")
        if not self.base.hf and self.train.seq_len > self.model.max_seq_len:
            raise bad("train.seq_len", f"at most model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)
        # the downstream tasks run on prepared data only (evaluate.downstream): else an IndexError in the
        # positions, after the whole run
        if not self.base.hf and self.evaluation.downstream and self.data.source != "stdlib":
            for key in ("max_len", "ppl_seq_len"):
                if getattr(self.evaluation, key) > self.model.max_seq_len:
                    raise bad(f"evaluation.{key}", f"at most model.max_seq_len={self.model.max_seq_len} (the "
                              f"model's positions; or evaluation.downstream=false)", getattr(self.evaluation, key))
        from desmoe.recipes.des_moe.baselines import method_class  # late: the methods import this module

        warmup = round(self.desmoe.schedule.t1 * self.train.steps)
        if method_class(self.desmoe.method).warmup_per_domain and warmup < max(1, len(self.data.domains)):
            raise bad("desmoe.schedule.t1", f"a warm-up of at least one step per domain ({len(self.data.domains)}; "
                      f"t1 * train.steps = {warmup})", self.desmoe.schedule.t1)
        if self.base.hf:  # the HF base brings its architecture: any other model.* key would be ignored silently
            default = MoELMConfig()
            for f in fields(MoELMConfig):
                if f.name not in ("ep_size", "init_seed") and getattr(self.model, f.name) != getattr(default, f.name):
                    raise bad(f"model.{f.name}", f"unset with base.hf (the model comes from {self.base.hf}; only "
                              f"model.ep_size and model.init_seed apply)", getattr(self.model, f.name))
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
