"""Checkpoints: exact round trip, and weights reloaded at another ep_size."""
import torch
from tolerance import assert_close, transformer_terms

from test_freeze_zero2 import batch_for, tiny_engine


def eval_logits(engine, rank):
    engine.module.eval()
    with torch.no_grad():
        out = engine.module(batch_for(99, rank))
    engine.module.train()
    return out


def train_steps(engine, rank, steps, start=0):
    for step in range(start, start + steps):
        loss, _ = engine.module.loss(batch_for(step, rank), aux_coef=0.01)
        engine.backward(loss)
        engine.step()


def roundtrip_case(ckpt_dir):
    import deepspeed.comm as dist

    from desmoe import checkpoint

    rank = dist.get_rank()
    engine, _ = tiny_engine(ep_size=2)
    train_steps(engine, rank, 3)
    torch.manual_seed(123 + rank)
    checkpoint.save(engine, ckpt_dir, step=3)
    ref_draw = torch.rand(4)  # what the generator gives next, after the save
    ref = eval_logits(engine, rank)
    train_steps(engine, rank, 2, start=3)  # continue: the reference for resumed training
    ref_after = eval_logits(engine, rank)

    fresh, _ = tiny_engine(ep_size=2, seed=5)  # different init, so a no-op load would show
    assert not torch.equal(eval_logits(fresh, rank), ref)
    torch.manual_seed(999)
    state = checkpoint.load(fresh, ckpt_dir)
    assert state["step"] == 3
    assert torch.equal(torch.rand(4), ref_draw), "each rank's RNG must resume where it was saved"
    assert torch.equal(eval_logits(fresh, rank), ref), "outputs after load differ"
    train_steps(fresh, rank, 2, start=3)
    assert torch.equal(eval_logits(fresh, rank), ref_after), "resumed training diverged"
    engine = fresh  # its experts now equal the checkpoint's + 2 steps; reload to compare weights
    checkpoint.load(engine, ckpt_dir)

    # ep_size 2 -> 1: every rank now holds all 4 experts, loaded from the per-expert files.
    single, _ = tiny_engine(ep_size=1, seed=6)
    checkpoint.load(single, ckpt_dir, module_only=True)
    # Same weights; a larger GEMM per expert under EP=1 may round differently (tiny_engine's shapes)
    assert_close(eval_logits(single, rank), ref, terms=transformer_terms(hidden=32, layers=2, seq=17, ffn=32,
                                                                         heads=2, top_k=2),
                 msg="EP=1 reload of an EP=2 checkpoint")
    from desmoe.moe import moe_blocks

    for b_ep2, b_ep1 in zip(moe_blocks(engine.module), moe_blocks(single.module)):
        for local_id, global_id in enumerate(b_ep2.local_global_ids()):
            for p2, p1 in zip(b_ep2.local_experts[local_id].parameters(),
                              b_ep1.local_experts[global_id].parameters()):
                assert torch.equal(p2, p1), f"expert {global_id} weights differ after reshard"
    return sorted(p.name for p in (ckpt_dir / checkpoint.tag_for(3)).iterdir())


def test_checkpoint_roundtrip_and_reshard(ranks, tmp_path):
    files = ranks.run(roundtrip_case, tmp_path / "ckpt")[0]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step00000003"
    # one file per (MoE layer, global expert): 2 layers x 4 experts
    assert sum(f.startswith("layer_") for f in files) == 8
    assert not (tmp_path / "ckpt" / ".staging" / "step00000003").exists()


def test_prune_keeps_newest_tags(tmp_path):
    from desmoe import checkpoint

    for step in (1, 2, 3, 5, 9):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
        (tmp_path / checkpoint.tag_for(step) / "w.pt").write_text("x")
    (tmp_path / "notes").mkdir()  # not a tag: never touched
    checkpoint.prune(tmp_path, step=5, keep=2)  # resumed from step 5: the abandoned step 9 is re-saved later
    assert [s for s, _ in checkpoint.tags(tmp_path)] == [3, 5, 9] and (tmp_path / "notes").is_dir()
    checkpoint.prune(tmp_path, step=9, keep=1)
    assert [s for s, _ in checkpoint.tags(tmp_path)] == [9]
    assert not list((tmp_path / checkpoint.STAGING).iterdir())  # nothing half-deleted left behind
