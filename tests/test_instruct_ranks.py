"""The must-show of issue #16 item 1, on 2 real ranks (EP=2, ZeRO-2 AdamW with weight decay):
instruction batches of the real pipeline, trained through the DES-MoE recipe's loss call
(``method.loss(input_ids, token_domain, loss_mask)``), where prompt tokens provably contribute no
gradient.  Only the *labels* change between runs (the model reads the original inputs through
``FixedInputs``): replacing every prompt label leaves the gradients and the weights after two
optimizer steps bit-identical; replacing a single response label changes them."""
from pathlib import Path

import torch
from torch import nn

from instructfix import instruct_data  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


class FixedInputs(nn.Module):
    """Feeds the model the original inputs whatever labels the loss is given."""

    def __init__(self, inner: nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.inputs = inner, inputs

    def forward(self, x):
        assert x.shape == self.inputs.shape
        return self.inner(self.inputs)


def _model(vocab):
    from desmoe.models.moe_lm import MoELM, MoELMConfig
    from desmoe.recipes.des_moe.baselines import FFT
    from desmoe.recipes.des_moe.config import DESMoEConfig

    torch.manual_seed(0)
    model = MoELM(MoELMConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32,
                              num_experts=4, top_k=2, ffn_size=32, ep_size=2))
    model.setup_expert_parallel()
    method = FFT(DESMoEConfig(), 10, 2, aux_coef=0.01)
    return model, method, method.prepare_model(model)


def _grads(model, method, ids, labels, tdom, mask):
    method.model = FixedInputs(model, ids[:, :-1])
    model.zero_grad()
    method.loss(labels, tdom, mask)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _two_steps(vocab, ids, labels, tdom, mask):
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    import deepspeed.comm as dist

    model, method, parts = _model(vocab)
    ds = resolve_ds_config(read_ds_config(ROOT / "configs/zero2.json"), micro_batch=ids.shape[0], lr=1e-2)
    engine, train = build_engine(model, ds, parts=parts)
    method.attach(engine.module, train, None, dist.get_rank(), dist.get_world_size(), ids.shape[0], 32)
    for step in range(2):
        method.begin_step(step, 0)
        method.model = FixedInputs(engine.module, ids[:, :-1])
        loss, _ = method.loss(labels, tdom, mask)
        engine.backward(loss)
        engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def prompt_labels_case(root: str):
    import deepspeed.comm as dist

    from desmoe.data import PreparedData

    rank, world = dist.get_rank(), dist.get_world_size()
    data = PreparedData(root)
    vocab = data.tokenizer.vocab_size
    batch = next(data.batches("train", 4, 32, seed=0, rank=rank, world=world, domains=["qa"]))
    ids, mask, tdom = batch.input_ids, batch.loss_mask, batch.token_domain[:, :-1]
    labels_of = lambda m: m[:, 1:]  # noqa: E731  (the label at t+1 counts iff mask[t+1])
    assert labels_of(mask).any() and not labels_of(mask).all(), "the batch needs prompt and response labels"
    g = torch.Generator().manual_seed(7 + rank)
    prompts = ids.clone()
    swap = ~mask
    swap[:, 0] = False  # position 0 is no one's label
    prompts[swap] = (ids[swap] + torch.randint(1, vocab, ids.shape, generator=g)[swap]) % vocab
    assert (prompts != ids).sum() == swap.sum()
    response = ids.clone()
    b, t = next((b, t) for b in range(ids.shape[0]) for t in range(1, ids.shape[1]) if mask[b, t])
    response[b, t] = (ids[b, t] + 1) % vocab

    model, method, _ = _model(vocab)
    base = _grads(model, method, ids, ids, tdom, mask)
    same = _grads(model, method, ids, prompts, tdom, mask)
    other = _grads(model, method, ids, response, tdom, mask)
    unmasked = _grads(model, method, ids, prompts, tdom, None)
    assert base.keys() == same.keys() and any("expert" in n for n in base)
    for n in base:
        assert torch.equal(base[n], same[n]), f"{n}: prompt labels reached the gradient"
    changed = {n for n in base if not torch.equal(base[n], other[n])}
    assert changed, "a response label must reach the gradient"
    assert any(not torch.equal(base[n], unmasked[n]) for n in base)  # without the mask they would count

    w_base = _two_steps(vocab, ids, ids, tdom, mask)
    w_same = _two_steps(vocab, ids, prompts, tdom, mask)
    w_other = _two_steps(vocab, ids, response, tdom, mask)
    for n in w_base:
        assert torch.equal(w_base[n], w_same[n]), f"{n}: prompt labels changed the trained weights"
    return sum(not torch.equal(w_base[n], w_other[n]) for n in w_base), len(changed)


def test_prompt_tokens_contribute_no_gradient_ep2_zero2(ranks, instruct_data):
    moved = ranks.run(prompt_labels_case, str(instruct_data))
    # one response label on one rank moves the weights on both ranks (data-parallel gradient averaging)
    assert all(m[0] > 0 and m[1] > 0 for m in moved), moved


def trainer_case(root: str, run_dir: str):
    from desmoe.config import load_config
    from desmoe.recipes.des_moe.recipe import DESMoEExperiment, train_desmoe

    cfg = load_config(DESMoEExperiment, None, [
        "model.vocab_size=500", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.max_seq_len=32", "model.num_experts=4", "model.ffn_size=32", "model.ep_size=2",
        f"data.source={root}", "data.domains=[qa, prose]", "evaluation.downstream=false",
        "train.steps=4", "train.micro_batch=2", "train.seq_len=32", "train.log_every=1", "train.eval_every=4",
        "train.eval_batches=1", "train.save_every=4", "train.lr=0.01", "desmoe.method=desmoe",
        "desmoe.schedule.t1=0.5", f"run.dir={run_dir}", "run.name=sft"])
    return train_desmoe(cfg, str(ROOT / "configs/zero2.json"))


def test_trainer_runs_instruction_data_ep2(ranks, instruct_data, tmp_path):
    """The real Trainer, DES-MoE recipe, on the instruction folder: trains and evaluates on responses."""
    import json

    ranks.run(trainer_case, str(instruct_data), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/task_loss"] for r in rows if "train/task_loss" in r]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    assert any("val/loss/qa" in r for r in rows)
