"""Every method's frozen set stays bit-identical and its trainable set moves, on 2 real ranks, with
gradient accumulation, weight decay (configs/zero2.json: 0.1), ZeRO-1/2, EP 1/2 and bf16: the baselines
(FFT, ESFT, LoRA, vanilla) and the DES-MoE variants test_desmoe_ranks.py does not run (Fig. 1 warm-up,
w/o DGES, w/o ALR, frozen gradients computed, token-level masks); and a save/resume in the middle of a
phase changes no parameter and no later step."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10  # DES-MoE: warm-up 1-2, stabilisation 3-7, consolidation 8-10
ACCUM = 2


def _expected(method, name, kind, b, g, step):
    """Whether the method's documentation says this parameter trains at ``step`` (0-based)."""
    from desmoe.recipes.des_moe import schedule

    if method.name == "fft":
        return True
    if method.name == "vanilla":
        return False
    if method.name == "lora":
        return "lora_" in name
    if method.name.startswith("esft"):
        return kind == "expert" and g in method.selected[b]
    phase = schedule.phase_at(step, STEPS, method.cfg.schedule)
    tset = schedule.trainable_set(phase, method.cfg.schedule, dges=method.cfg.dges.enabled)
    if kind == "router":
        return tset.router
    if kind == "backbone":
        return tset.backbone
    if tset.experts == "domain":
        return g in method._step_sets[b]
    return tset.experts == "all"


def build(name: str, overrides: tuple, ep_size: int, stage: int, init_seed: int = 0, bf16: bool = False):
    """(method, engine, batches[step][micro]) on this rank, as the recipe wires them."""
    import dataclasses

    import deepspeed.comm as dist

    from desmoe.config import load_config
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.models.moe_lm import MoELM
    from desmoe.recipes.des_moe.baselines import build_method
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, domain_of_step
    from test_desmoe_ranks import _data, _tiny_model_cfg

    rank, world = dist.get_rank(), dist.get_world_size()
    exp = load_config(DESMoEExperiment, None, [f"desmoe.method={name}", "desmoe.dges.update_every=3",
                                                "desmoe.baseline.esft_profile_tokens=512", *overrides])
    model = MoELM(dataclasses.replace(_tiny_model_cfg(ep_size), init_seed=init_seed))
    model.setup_expert_parallel()
    method = build_method(exp.desmoe, STEPS, 2, aux_coef=0.01)
    parts = method.prepare_model(model)
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=4, lr=1e-2,
                           grad_accum=ACCUM)
    ds["zero_optimization"] = dict(ds["zero_optimization"], stage=stage)
    ds["bf16"] = {"enabled": bf16}  # DeepSpeed's bf16 engine: bf16 weights, fp32 master copies (the GPU's path)
    engine, train = build_engine(model, ds, parts=parts)
    if exp.desmoe.skip_frozen_grads:
        method.enable_gradient_skipping(engine.module, parts)
    data = _data()
    method._attach = lambda: method.attach(engine.module, train, data, rank, world, 4, 32)
    streams = [data.batches("train", 4, 32, 0, rank, world, 0, domains=[d]) for d in data.domains]
    batches = [[next(streams[domain_of_step(step, 2, 0)]) for _ in range(ACCUM)] for step in range(STEPS)]
    return method, engine, batches


def run_steps(method, engine, batches, steps, moved: dict) -> None:
    """Steps ``steps``; asserts after each that every parameter the method froze is bit-identical."""
    from desmoe.recipes.des_moe.recipe import domain_of_step
    from test_desmoe_ranks import _snapshot

    alr = method.name == "desmoe" and method.cfg.alr.enabled
    for step in steps:
        domain = domain_of_step(step, 2, 0)
        method.begin_step(step, domain)
        method.sync_gradients()
        if hasattr(method, "dges"):  # the step's sets, before end_step refreshes the map
            method._step_sets = method.dges.expert_sets([domain])
        before = _snapshot(engine.module)
        for micro, batch in enumerate(batches[step]):
            if micro:
                method.observe(batches[step][micro - 1].token_domain[:, :-1])
            method.task_scale = 1.0 / ACCUM
            loss, _ = method.loss(batch.input_ids, batch.token_domain[:, :-1])
            engine.backward(loss)
            engine.step()
        method.end_step(step, batch.token_domain[:, :-1])
        after = _snapshot(engine.module)
        for pname, (kind, b, g, old) in before.items():
            if kind == "teacher" and not alr:  # no ALR: ".router.proj." is the (trainable) linear router
                kind = "router"
            if kind == "teacher":
                assert torch.equal(old, after[pname][3]), f"step {step + 1}: the ALR teacher {pname} moved"
                continue
            trains = _expected(method, pname, kind, b, g, step)
            changed = not torch.equal(old, after[pname][3])
            assert trains or not changed, f"{method.name} step {step + 1}: frozen {kind} {pname} moved"
            if trains:
                moved[pname] = moved.get(pname, False) or changed


def case(name: str, overrides: tuple, ep_size: int, stage: int, bf16: bool):
    method, engine, batches = build(name, overrides, ep_size, stage, bf16=bf16)
    method._attach()
    moved: dict[str, bool] = {}
    run_steps(method, engine, batches, range(STEPS), moved)
    never = sorted(n for n, m in moved.items() if not m)
    assert not never, f"{name}: trainable parameters that never moved: {never[:4]}"
    return sorted(moved)


def resume_case(name: str, overrides: tuple, ep_size: int, stage: int, ckpt: str, at: int):
    """Saved after step ``at`` (mid-phase), resumed into a model of other initial weights: every parameter
    is bit-identical after the load, the frozen sets hold after it, and the run ends where the run that
    was never interrupted ends, bit for bit."""
    from test_desmoe_ranks import _snapshot

    method, engine, batches = build(name, overrides, ep_size, stage)
    method._attach()
    run_steps(method, engine, batches, range(at), {})
    engine.save_checkpoint(ckpt, tag="mid", client_state={"method": method.state_dict()})
    saved = _snapshot(engine.module)
    run_steps(method, engine, batches, range(at, STEPS), {})
    final = _snapshot(engine.module)

    method2, engine2, _ = build(name, overrides, ep_size, stage, init_seed=1)
    fresh = _snapshot(engine2.module)
    assert any(not torch.equal(t, fresh[n][3]) for n, (*_, t) in saved.items()), "the load would prove nothing"
    _, client = engine2.load_checkpoint(ckpt, tag="mid")
    method2.load_state_dict(client["method"])
    method2._attach()
    loaded = _snapshot(engine2.module)
    for pname, (kind, b, g, t) in saved.items():
        assert torch.equal(t, loaded[pname][3]), f"{name}: {kind} {pname} differs after the load"
    run_steps(method2, engine2, batches, range(at, STEPS), {})
    for pname, (kind, b, g, t) in _snapshot(engine2.module).items():
        assert torch.equal(t, final[pname][3]), f"{name}: {kind} {pname} ends elsewhere after the resume"


METHODS = [("fft", ()), ("vanilla", ()), ("esft_token", ()), ("esft_gate", ()), ("lora", ()),
           ("desmoe", ("desmoe.schedule.warmup=fig1",)), ("desmoe", ("desmoe.dges.enabled=false",)),
           ("desmoe", ("desmoe.alr.enabled=false",)), ("desmoe", ("desmoe.skip_frozen_grads=false",)),
           ("desmoe", ("desmoe.dges.batching=token",))]
LAYOUTS = [(2, 2, False), (1, 1, False), (2, 1, True)]  # (EP size, ZeRO stage, bf16)
# vanilla never steps (the recipe only evaluates it); at EP=1 nothing of it computes a gradient
CASES = [(*m, *lay) for m in METHODS for lay in LAYOUTS if not (m[0] == "vanilla" and lay[0] == 1)]


@pytest.mark.parametrize("name,overrides,ep_size,stage,bf16", CASES)
def test_each_method_trains_exactly_its_set(ranks, name, overrides, ep_size, stage, bf16):
    r0, r1 = ranks.run(case, name, overrides, ep_size, stage, bf16)
    assert name == "vanilla" or r0 or r1, "nothing trained"


@pytest.mark.parametrize("name,overrides,ep_size,stage,at", [
    ("desmoe", (), 2, 2, 4), ("desmoe", (), 1, 1, 8), ("esft_token", (), 2, 2, 5), ("lora", (), 1, 2, 5),
    ("desmoe", ("desmoe.skip_frozen_grads=false",), 2, 1, 1)])
def test_a_resume_mid_phase_keeps_every_parameter(ranks, tmp_path, name, overrides, ep_size, stage, at):
    ranks.run(resume_case, name, overrides, ep_size, stage, str(tmp_path / "ckpt"), at)


def empty_domain_case(ep_size: int, overrides: tuple):
    from desmoe.recipes.des_moe.recipe import domain_of_step
    from test_desmoe_ranks import _snapshot

    method, engine, batches = build("desmoe", overrides, ep_size, 2)
    method._attach()
    run_steps(method, engine, batches, range(7), {})
    # a domain none of whose tokens were counted has an empty S_d (dges.py): its consolidation step trains nothing
    method.dmap.M[:, domain_of_step(7, 2, 0), :] = False
    before = _snapshot(engine.module)
    run_steps(method, engine, batches, range(7, 8), {})
    assert all(torch.equal(t, _snapshot(engine.module)[n][3]) for n, (*_, t) in before.items())


@pytest.mark.parametrize("ep_size,overrides", [(1, ()), (2, ()), (1, ("desmoe.skip_frozen_grads=false",))])
def test_a_step_that_trains_nothing_runs_and_moves_nothing(ranks, ep_size, overrides):
    """At EP=1 with frozen gradients skipped, such a step's loss had no graph and backward failed."""
    ranks.run(empty_domain_case, ep_size, overrides)
