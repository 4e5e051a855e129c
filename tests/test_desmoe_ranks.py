"""DES-MoE on 2 real ranks, expert-parallel (EP=2), ZeRO-2, AdamW with weight decay:
every phase updates exactly its parameters (checked parameter by parameter, every
step), experts outside the domain's set stay bit-identical, A/M agree across ranks;
and the trainer runs end to end (metrics, TensorBoard, results, resume)."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10  # warm-up steps 1-2, stabilisation 3-7, consolidation 8-10


def _tiny_model_cfg(ep_size=2):
    from desmoe.models.moe_lm import MoELMConfig

    return MoELMConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, num_experts=4,
                       top_k=2, ffn_size=32, ep_size=ep_size)


def _data():
    from desmoe.recipes.des_moe.domains import DomainDataConfig, StdlibDomains

    return StdlibDomains(DomainDataConfig(domains=["email", "xml"], general=["json"], max_bytes_per_domain=40_000))


def _snapshot(model):
    """name -> (kind, block, global expert id, tensor) for every parameter this rank holds."""
    from desmoe.moe import moe_blocks

    out, expert_ids = {}, {}
    for b, block in enumerate(moe_blocks(model)):
        for local, g in enumerate(block.local_global_ids()):
            for p in block.local_experts[local].parameters():
                expert_ids[id(p)] = (b, g)
    for name, p in model.named_parameters():
        if id(p) in expert_ids:
            kind, (b, g) = "expert", expert_ids[id(p)]
        else:
            kind, b, g = ("teacher" if ".router.proj." in name else "router" if ".router." in name else "backbone"), -1, -1
        out[name] = (kind, b, g, p.detach().clone())
    return out


def _desmoe_engine(skip_grads: bool, ep_size: int, stage: int = 2, bf16: bool = False, clip: float = 1.0):
    """(DES-MoE of STEPS steps attached to a ZeRO-``stage`` engine, its data, this rank's stream of each domain).
    ``bf16``: DeepSpeed's bf16 engine (bf16 weights, fp32 master copies in the optimizer), as on a GPU; the CPU
    accelerator runs the same optimizer code."""
    import deepspeed.comm as dist

    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.recipes.des_moe.config import DESMoEConfig
    from desmoe.recipes.des_moe.method import DESMoE
    from desmoe.models.moe_lm import MoELM

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DESMoEConfig()
    cfg.dges.update_every = 3
    model = MoELM(_tiny_model_cfg(ep_size))
    model.setup_expert_parallel()
    method = DESMoE(cfg, STEPS, 2, aux_coef=0.01)
    parts = method.prepare_model(model)
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=4, lr=1e-2)
    ds["zero_optimization"] = dict(ds["zero_optimization"], stage=stage)
    ds["bf16"] = {"enabled": bf16}
    ds["gradient_clipping"] = clip
    engine, train = build_engine(model, ds, parts=parts)
    if skip_grads:
        method.enable_gradient_skipping(engine.module, parts)
    data = _data()
    method.attach(engine.module, train, data, rank, world, 4, 32)
    return method, engine, [data.batches("train", 4, 32, 0, rank, world, 0, domains=[d]) for d in data.domains]


def phases_case(skip_grads: bool, ep_size: int, stage: int = 2, bf16: bool = False):
    from desmoe.recipes.des_moe import schedule
    from desmoe.recipes.des_moe.recipe import domain_of_step

    method, engine, streams = _desmoe_engine(skip_grads, ep_size, stage, bf16)
    cfg = method.cfg
    moved_when_trainable: dict[str, bool] = {}
    log = []
    for step in range(STEPS):
        domain = domain_of_step(step, 2, 0)
        batch = next(streams[domain])
        method.begin_step(step, domain)
        method.sync_gradients()
        phase = schedule.phase_at(step, STEPS, cfg.schedule)
        tset = schedule.trainable_set(phase, cfg.schedule)
        sets = [method.dmap.experts_for(b, domain) for b in range(2)] if tset.experts == "domain" else None
        before = _snapshot(engine.module)
        loss, parts_ = method.loss(batch.input_ids)
        engine.backward(loss)
        engine.step()
        method.end_step(step, batch.token_domain[:, :-1])
        after = _snapshot(engine.module)
        for name, (kind, b, g, old) in before.items():
            trainable = {"teacher": False, "router": tset.router, "backbone": tset.backbone,
                         "expert": tset.experts == "all" or (tset.experts == "domain" and g in sets[b])}[kind]
            changed = not torch.equal(old, after[name][3])
            assert trainable or not changed, f"step {step + 1} ({phase.name}): frozen {kind} {name} moved"
            if trainable:
                moved_when_trainable[name] = moved_when_trainable.get(name, False) or changed
        log.append((phase.name, domain, sets, float(parts_["kd_loss"]), method.lam))
    never = [n for n, moved in moved_when_trainable.items() if not moved]
    assert not never, f"trainable parameters that never moved: {never}"
    kinds = {before[n][0] for n in moved_when_trainable}
    assert kinds == {"router", "backbone", "expert"}, kinds
    return {"M": method.dmap.M.tolist(), "A": method.dmap.A.tolist(), "log": log,
            "frozen_experts_seen": sum(1 for _, _, s, _, _ in log if s and any(len(x) < 4 for x in s))}


@pytest.mark.parametrize("skip_grads,ep_size,stage,bf16", [
    (True, 2, 2, False), (False, 2, 2, False), (True, 1, 2, False), (True, 2, 2, True), (False, 2, 1, True),
    (True, 1, 0, True)], ids=["ep2-frozen-grads-skipped", "ep2-frozen-grads-computed", "ep1-dp2-frozen-grads-skipped",
                              "ep2-zero2-bf16", "ep2-zero1-bf16-frozen-grads-computed", "ep1-zero0-bf16"])
def test_phases_train_exactly_their_sets(ranks, skip_grads, ep_size, stage, bf16):
    """bf16 (DeepSpeed's bf16 engine, fp32 master copies, the GPU's path): a frozen parameter's bf16 weight must
    stay bit-identical too, which it does only if its master copy does not move."""
    r0, r1 = ranks.run(phases_case, skip_grads, ep_size, stage, bf16)
    assert r0["M"] == r1["M"] and r0["A"] == r1["A"], "A and M must be all-reduced to the same value on every rank"
    assert [p for p, *_ in r0["log"]] == ["WARMUP"] * 2 + ["STABILIZE"] * 5 + ["CONSOLIDATE"] * 3
    assert r0["frozen_experts_seen"] > 0, "the domain sets never excluded an expert: isolation was not exercised"
    lambdas = [lam for *_, lam in r0["log"]]
    assert lambdas[0] == 1.0 and lambdas[-1] == 0.0 and lambdas[2] == 0.8


def warmup_norm_case(skip_grads: bool, ep_size: int, stage: int = 2, bf16: bool = False):
    """The gradient norm ZeRO-1/2 clip DES-MoE's first step by (the warm-up: router and backbone train); at
    stage 0 (which records no norm) the frozen parameters' gradients after that step's backward instead."""
    from desmoe.moe import moe_blocks
    from desmoe.moe.trainability import FROZEN_KEY

    # stage 0 with experts over ranks clips by a per-rank norm (refused): there the gradients only, unclipped
    method, engine, streams = _desmoe_engine(skip_grads, ep_size, stage, bf16, 0.0 if stage == 0 else 1.0)
    method.begin_step(0, 0)
    method.sync_gradients()
    loss, _ = method.loss(next(streams[0]).input_ids)
    engine.backward(loss)
    if stage == 0:
        # the module's own parameters (under bf16 the optimizer's groups hold fp32 copies, graded at step())
        frozen = [p for g in method.train.optimizer.param_groups if g.get(FROZEN_KEY) for p in g["params"]]
        experts = [p for b in moe_blocks(engine.module) for e in b.local_experts for p in e.parameters()]
        computed = [p.grad for p in experts if p.grad is not None]
        return len(frozen), len(experts), len(computed), max(float(g.abs().max()) for g in computed)
    engine.step()
    return float(engine.get_global_grad_norm())


def test_the_clipping_norm_is_that_of_the_trainable_groups(ranks):
    """The warm-up's frozen experts get gradients where they are computed anyway (EP=2; skipping off) and zeros
    where skipped (EP=1): the norm that gradient_clipping divides by must leave them out, or the update depends
    on model.ep_size (before: 1.416 at EP=2 vs 1.410 at EP=1, and elastic resumes in the warm-up drifted by 1e-5:
    test_elastic.py).  The same step's trainable gradients, summed in other orders: 100 fp32 epsilons.  ZeRO-1
    too; stage 0 clips module gradients: there a frozen group's computed gradients must be zeros."""
    from test_grad_accum import RTOL

    norms = {case: ranks.run(warmup_norm_case, *case)[0] for case in [(True, 2, 2), (False, 2, 2), (True, 1, 2),
                                                                       (True, 2, 1), (False, 1, 1)]}
    ref = norms[(True, 1, 2)]
    assert all(abs(n - ref) <= RTOL * ref for n in norms.values()), norms
    n_frozen, n_experts, n_computed, largest = ranks.run(warmup_norm_case, False, 1, 0)[0]
    assert n_frozen == n_experts > 0 and n_computed == n_frozen and largest == 0.0, (n_frozen, n_computed, largest)


def test_the_clipping_norm_is_that_of_the_trainable_groups_in_bf16(ranks):
    """The same under DeepSpeed's bf16 engine (bf16 weights and gradients, fp32 master copies: the GPU's
    path; the CPU accelerator runs the same optimizer code), ZeRO-2 and ZeRO-1.  Within one EP size the
    trainable gradients are the same bf16 values in every case (same kernels on the same rows; a sum over
    2 ranks does not depend on order), so the fp32 norms differ only by its own summation order: 100 fp32
    epsilons.  Without the hook, EP=1 with skipping off counted the frozen experts: 1.4176 against 1.4122
    (0.4 %, below bf16's own epsilon, so across EP sizes, where bf16 rounds other GEMM results, the
    comparison could not see it; the fp32 test above covers that).  EP=2 counts them with or without
    skipping, so there the check is stage 0 (bf16: DeepSpeed's unfused optimizer): the frozen experts'
    gradients the backward computed must be zeros."""
    from test_grad_accum import RTOL

    for ep, cases in ((1, [(True, 2), (False, 2), (True, 1), (False, 1)]), (2, [(True, 2), (False, 2), (True, 1)])):
        norms = {case: ranks.run(warmup_norm_case, case[0], ep, case[1], True)[0] for case in cases}
        ref = norms[(True, 2)]
        assert all(abs(n - ref) <= RTOL * ref for n in norms.values()), (ep, norms)
    for ep in (1, 2):
        n_frozen, n_experts, n_computed, largest = ranks.run(warmup_norm_case, False, ep, 0, True)[0]
        assert n_experts > 0 and n_computed == n_experts and largest == 0.0, (ep, n_experts, n_computed, largest)


def test_frozen_gradient_hooks_follow_the_last_optimizer_and_survive_a_checkpoint_load(tmp_path):
    """The hook reads the flag of the optimizer built last on the model (an engine built twice on one model
    must not also answer to the first one's flags), by group index (a state_dict load replaces the group
    dicts), and leaves the model picklable."""
    from desmoe.engine import _frozen_groups_give_no_gradient
    from desmoe.moe.trainability import FROZEN_KEY, FreezableAdamW

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    groups = lambda: [{"params": list(m.parameters())} for m in model]  # noqa: E731
    first, second = FreezableAdamW(groups(), lr=0.1), FreezableAdamW(groups(), lr=0.1)
    _frozen_groups_give_no_gradient(first)
    _frozen_groups_give_no_gradient(second)

    def grads():
        model.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        return [bool(p.grad.abs().sum() > 0) for p in model[0].parameters()]

    first.param_groups[0][FROZEN_KEY] = True
    assert grads() == [True, True]  # the first optimizer no longer counts
    second.param_groups[0][FROZEN_KEY] = True
    assert grads() == [False, False]
    second.load_state_dict(second.state_dict())  # new group dicts, flags loaded with them
    assert second.param_groups[0].get(FROZEN_KEY) and grads() == [False, False]
    second.param_groups[0][FROZEN_KEY] = False
    assert grads() == [True, True]
    torch.save(model, tmp_path / "model.pt")


def test_stage0_clipping_with_experts_over_ranks_is_refused_in_one_line():
    """DeepSpeed's stage 0 clips by the mean of per-rank norms: with experts spread over ranks that is not the
    model's norm, and the clip would depend on model.ep_size."""
    from desmoe.engine import _check_stage0_clipping
    from desmoe.errors import ConfigError
    from desmoe.models.moe_lm import MoELM

    model = MoELM(_tiny_model_cfg(2))
    with pytest.raises(ConfigError, match=r"^key 'zero_optimization.stage': 0 with gradient_clipping=1.0 and "
                                          r"model.ep_size=2 clips by a per-rank norm .*model.ep_size 1$"):
        _check_stage0_clipping(model, {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0})
    for cfg in ({"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}, {"zero_optimization": {"stage": 2},
                                                                               "gradient_clipping": 1.0}):
        _check_stage0_clipping(model, cfg)
    _check_stage0_clipping(MoELM(_tiny_model_cfg(1)), {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0})


def trainer_case(run_dir: str, steps: int, method: str, extra: tuple = (), ds_config: str = "configs/zero2.json"):
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, train_desmoe

    m = _tiny_model_cfg()
    shape = ("hidden_size", "num_layers", "num_heads", "max_seq_len", "num_experts", "ffn_size")
    if any(e.startswith("base.hf=") for e in extra):
        shape = ()  # an HF base brings its own architecture (model.* keys other than ep_size are refused)
    cfg = load_config(DESMoEExperiment, None, [
        f"model.{k}={v}" for k, v in vars(m).items() if k in shape + ("ep_size",)] + [
        "data.domains=[email, xml]", "data.general=[json]", "data.max_bytes_per_domain=40000",
        f"train.steps={steps}", "train.micro_batch=4", "train.seq_len=32", "train.log_every=2", "train.eval_every=5",
        "train.eval_batches=1", "train.save_every=5", "train.lr=0.01", f"desmoe.method={method}",
        "desmoe.dges.update_every=3", f"run.dir={run_dir}", f"run.name={method}", *extra])
    return train_desmoe(cfg, str(ROOT / ds_config))


def refused_case(*args):
    from desmoe.errors import UserError

    try:
        trainer_case(*args)
    except UserError as err:  # every rank must refuse: none may be left waiting at a collective
        return str(err)


def test_trainer_end_to_end_and_exact_resume_ep2(ranks, tmp_path):
    full = ranks.run(trainer_case, str(tmp_path), 10, "desmoe")[0]
    run = tmp_path / "desmoe"
    (run / "checkpoints" / "latest").write_text("step00000005")  # as if the job had died after step 5
    resumed = ranks.run(trainer_case, str(tmp_path), 10, "desmoe")[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/task_loss" in r] == [2, 4, 6, 8, 10]
    logged = set().union(*rows)
    for key in ("train/kd_loss", "train/lambda", "train/phase", "train/aux_loss", "train/frozen_share",
                "val/loss/email", "val/loss/general", "dges/experts_per_domain", "train/loss"):
        assert key in logged, key
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "results.json").read_text())["method"] == "desmoe"
    assert (run / "results.csv").is_file() and (run / "loss.png").stat().st_size > 0
    for key in ("email", "xml", "general"):  # data, routing statistics and optimizer resume exactly
        assert resumed[key] == full[key], (key, resumed[key], full[key])
    # a longer train.steps moves T1 = 0.2 T from 2 to 4, behind the resumed step 5: the warm-up would re-open
    (run / "checkpoints" / "latest").write_text("step00000005")
    longer = ranks.run(refused_case, str(tmp_path), 20, "desmoe")
    assert all(r and "key 'train.steps': expected a value that keeps the phase boundaries reached by the resumed "
               "step 5 (T1=2, T2=7; this gives T1=4, T2=14)" in r for r in longer), longer


def test_trainer_resumes_exactly_in_bf16(ranks, tmp_path):
    """DeepSpeed's bf16 engine (the GPU's path; the CPU accelerator runs the same optimizer and checkpoint
    code): a run resumed from its step-5 checkpoint ends where the uninterrupted run ends, bit for bit, in its
    validation losses and routing statistics (the fp32 master copies and AdamW's moments are restored, not
    re-derived from the bf16 weights, which would lose the low bits every step has added)."""
    cfg = json.loads((ROOT / "configs/zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    (tmp_path / "zero2_bf16.json").write_text(json.dumps(cfg))
    ds = str(tmp_path / "zero2_bf16.json")
    full = ranks.run(trainer_case, str(tmp_path), 10, "desmoe", (), ds)[0]
    run = tmp_path / "desmoe"
    assert json.loads((run / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    (run / "checkpoints" / "latest").write_text("step00000005")
    resumed = ranks.run(trainer_case, str(tmp_path), 10, "desmoe", (), ds)[0]
    for key in ("email", "xml", "general"):
        assert resumed[key] == full[key], (key, resumed[key], full[key])
