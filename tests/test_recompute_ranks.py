"""Activation checkpointing on 2 real ranks (gloo, EP=2, ZeRO-2, the trainer end to end): a run with
``train.activation_checkpointing=layers`` equals the same run with ``none`` bit for bit -- losses, global
gradient norms, every parameter at the end, the routes per expert of every step, the selection-bias loads
gathered between updates, DES-MoE's domain-expert counts, A and M.

Why bit for bit holds on CPU: the recompute runs the same ops on the same inputs with the same RNG state
(torch restores it), the backward graph is the forward's own (non-reentrant checkpoint only re-creates the
tensors it saved), and CPU kernels at one thread per rank are deterministic; recompute changes when a
layer's forward runs, not its arithmetic.  What the recompute records (desmoe/recompute.py) is dropped;
with that guard broken (``_Replay`` a no-op) all four cases fail: LM, pretraining and FFT on the
selection-bias loads (doubled), DES-MoE already inside torch's recompute check (the expert-copy slots,
cleared after the forward, were gone when the layer ran again).  Checked by hand; test_recompute_unit.py
keeps a broken-guard case.  The same holds in bf16 (DeepSpeed's bf16 engine, the GPU's optimizer path):
DES-MoE and pretraining run once more that way, and both fail with the guard broken.  On GPUs scatter/index_add atomics can make even two plain runs differ in the
last bits: there a tolerance would be needed, here none is."""
import json
from pathlib import Path

import torch

from test_desmoe_ranks import _tiny_model_cfg

ROOT = Path(__file__).resolve().parents[1]


def _probe(recipe_cls):
    """``recipe_cls`` recording what every step produced, read after the run."""
    import desmoe.training.trainer as trainer_mod
    from desmoe.moe import global_tokens_per_expert, moe_blocks

    class Probe(recipe_cls):
        seen: dict = {"loss": [], "grad_norm": [], "tokens": [], "load": [], "dmap": []}

        def setup(self, trainer):
            setup = super().setup(trainer)
            for block in moe_blocks(setup.model):  # gate noise and selection-bias balancing switched on
                r = block.router
                r.noise, r.noise_eps = "gaussian", 0.3
                r.register_buffer("selection_bias", torch.zeros(r.num_experts))
                r.bias_update_rate = 0.01
            inner = trainer_mod.update_selection_biases

            def update(model, group=None):  # the loads the forward recorded, before the step uses them
                self.seen["load"].append([b.pending_load.clone() for b in moe_blocks(model)])
                return inner(model, group)

            trainer_mod.update_selection_biases = update
            # the noise draws from the global RNG, which the pool's ranks carry from run to run (an HF model's
            # set-up, unlike MoELM's, seeds nothing): the same start for both modes
            torch.manual_seed(1000 + trainer.rank)
            self._restore = lambda: setattr(trainer_mod, "update_selection_biases", inner)
            return setup

        def end_step(self, stage, step):
            super().end_step(stage, step)
            self.seen["steps"] = step + 1
            engine = self.trainer.engine
            parts = getattr(self, "parts_", None)  # DES-MoE: task, aux and distillation losses; LM: the NLL
            self.seen["loss"].append({k: float(v) for k, v in parts.items()} if parts else float(self.lm))
            self.seen["grad_norm"].append(float(engine.get_global_grad_norm()))
            self.seen["tokens"].append(global_tokens_per_expert(engine.module))
            method = getattr(self, "method", None)
            dmap = getattr(method, "dmap", None)
            if dmap is not None:
                self.seen["dmap"].append((dmap.window.clone(), None if dmap.A is None else dmap.A.clone(),
                                          None if dmap.M is None else dmap.M.clone()))

        def finish(self, trainer):
            super().finish(trainer)
            self._restore()
            self.seen["params"] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
            self.seen["buffers"] = {n: b.clone() for n, b in trainer.engine.module.named_buffers()}
            from desmoe.recompute import decoder_layers

            self.seen["wrapped"] = sum(getattr(m, "_desmoe_recompute", False)
                                       for m in decoder_layers(trainer.engine.module))

    Probe.seen = {"loss": [], "grad_norm": [], "tokens": [], "load": [], "dmap": []}
    return Probe


def lm_case(run_dir: str, mode: str) -> dict:
    from desmoe.config import load_config
    from desmoe.recipes.lm.recipe import LMExperiment, SmokeRecipe
    from desmoe.training.trainer import Trainer

    m = _tiny_model_cfg()
    cfg = load_config(LMExperiment, None, [
        *(f"model.{k}={getattr(m, k)}" for k in ("hidden_size", "num_layers", "num_heads", "max_seq_len",
                                                  "num_experts", "ffn_size", "ep_size")),
        "data.max_bytes=200000", "train.steps=4", "train.micro_batch=4", "train.grad_accum=2", "train.seq_len=32",
        "train.lr=0.01", "train.log_every=2", "train.eval_every=4", "train.eval_batches=1", "train.save_every=100",
        f"train.activation_checkpointing={mode}", f"run.dir={run_dir}", f"run.name={mode}", "run.resume=false"])
    probe = _probe(SmokeRecipe)
    Trainer(probe(cfg), str(ROOT / "configs/zero2.json")).run()
    return probe.seen


def pretrain_case(run_dir: str, mode: str, ds: str = "configs/zero2.json") -> dict:
    """Pretraining: an HF family (DeepSeek-V2 layout: a dense first layer, shared expert) on the core."""
    from desmoe.config import load_config
    from desmoe.recipes.lm.pretrain import PretrainExperiment, PretrainRecipe
    from desmoe.training.trainer import Trainer

    cfg = load_config(PretrainExperiment, ROOT / "configs/pretrain_base.yaml", [
        "data.source=stdlib_bytes", "train.steps=3", "train.save_every=100", "train.eval_every=100",
        "train.log_every=1", "train.eval_tokens=500", "train.warmup_steps=1", "train.grad_accum=2",
        "train.lr=0.005", "train.seq_len=32", "train.micro_batch=4", "model.hidden_size=32", "model.num_layers=3",
        "model.num_experts=4", "model.expert_ffn=32", "model.shared_ffn=32", "model.dense_ffn=64",
        f"train.activation_checkpointing={mode}", f"run.dir={run_dir}", f"run.name=pretrain-{mode}",
        "run.resume=false", f"output.dir={run_dir}/base-{mode}"])
    probe = _probe(PretrainRecipe)
    Trainer(probe(cfg), str(ROOT / ds)).run()
    return probe.seen


def desmoe_case(run_dir: str, mode: str, method: str, ds: str = "configs/zero2.json") -> dict:
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, DESMoERecipe
    from desmoe.training.trainer import Trainer

    m = _tiny_model_cfg()
    # mixed batches (token route masks) with expert copies: masks and slots set before each forward and cleared
    # right after it, which the recompute must still see; ALR distillation on, DGES statistics refreshed
    extra = ["desmoe.dges.batching=token", "desmoe.schedule.t1=0.34", "desmoe.dges.duplicate_shared=true",
             "desmoe.dges.spare_experts=2", "desmoe.dges.phi=0.1", "desmoe.dges.update_every=2"] \
        if method == "desmoe" else []
    cfg = load_config(DESMoEExperiment, None, [
        *(f"model.{k}={getattr(m, k)}" for k in ("hidden_size", "num_layers", "num_heads", "max_seq_len",
                                                  "num_experts", "ffn_size", "ep_size")),
        "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
        "train.steps=6", "train.micro_batch=4", "train.seq_len=32", "train.log_every=3", "train.eval_every=100",
        "train.eval_batches=1", "train.save_every=100", "train.lr=0.01", f"desmoe.method={method}",
        f"train.activation_checkpointing={mode}", f"run.dir={run_dir}", f"run.name={method}-{mode}",
        "run.resume=false", "evaluation.downstream=false", *extra])
    probe = _probe(DESMoERecipe)
    Trainer(probe(cfg), str(ROOT / ds)).run()
    return probe.seen


def _same(a, b, where: str) -> None:
    """Bit for bit, through lists, tuples and dicts of tensors and floats."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _compare(ranks, case, tmp_path, *args, layers: int = 2) -> None:
    off = ranks.run(case, str(tmp_path), "none", *args)
    on = ranks.run(case, str(tmp_path), "layers", *args)
    for rank, (a, b) in enumerate(zip(off, on)):
        assert (a.pop("wrapped"), b.pop("wrapped")) == (0, layers)  # the trainer applied it, to every layer
        assert len(a["loss"]) == len(a["grad_norm"]) == len(a["load"]) == a["steps"]
        assert bool(a["dmap"]) == (args[:1] == ("desmoe",))  # DES-MoE's counts, A and M compared where they exist
        assert not a["dmap"] or a["dmap"][-1][2] is not None  # M refreshed within the run
        assert all(g > 0 for g in a["grad_norm"])
        _same(a, b, f"rank {rank}")


def test_lm_recompute_exact_ep2(ranks, tmp_path):
    _compare(ranks, lm_case, tmp_path)


def test_pretrain_hf_recompute_exact_ep2(ranks, tmp_path):
    _compare(ranks, pretrain_case, tmp_path, layers=3)


def test_desmoe_recompute_exact_ep2(ranks, tmp_path):
    _compare(ranks, desmoe_case, tmp_path, "desmoe")


def test_fft_recompute_exact_ep2(ranks, tmp_path):
    _compare(ranks, desmoe_case, tmp_path, "fft")


def _bf16_config(tmp_path) -> str:
    """configs/zero2.json with bf16 on: DeepSpeed's bf16 engine, the GPU's path (on a CPU "auto" is fp32)."""
    cfg = json.loads((ROOT / "configs/zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    path = tmp_path / "zero2_bf16.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_desmoe_recompute_exact_ep2_bf16(ranks, tmp_path):
    """In bf16 the recompute must run the same ops on the same bf16 inputs: bit for bit again."""
    _compare(ranks, desmoe_case, tmp_path, "desmoe", _bf16_config(tmp_path))
    assert json.loads((tmp_path / "desmoe-layers" / "deepspeed.json").read_text())["bf16"]["enabled"] is True


def test_pretrain_hf_recompute_exact_ep2_bf16(ranks, tmp_path):
    _compare(ranks, pretrain_case, tmp_path, _bf16_config(tmp_path), layers=3)
    assert json.loads((tmp_path / "pretrain-layers" / "deepspeed.json").read_text())["bf16"]["enabled"] is True
