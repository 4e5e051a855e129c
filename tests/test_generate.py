"""Batched greedy generation and log-likelihood scoring agree with one-at-a-time
computation and with transformers' own generate."""

import warnings

import pytest
import torch

from hf_tiny import save_tiny
from tolerance import bound, transformer_terms

PROMPTS = [[5, 9, 3], [7], [1, 2, 3, 4, 5, 6], [8, 8]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("olmoe", tmp_path_factory.mktemp("gen") / "olmoe", seed=5)


def test_greedy_matches_transformers_and_single(tiny):
    from transformers import AutoModelForCausalLM

    from desmoe.models.generate import greedy_generate
    from desmoe.models.hf_moe import load_hf_moe

    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32, local_files_only=True).eval()
    want = [hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                        eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    ours = load_hf_moe(tiny)
    with warnings.catch_warnings():  # a deprecated argument is one that a later transformers ignores
        warnings.simplefilter("error", FutureWarning)
        cached = greedy_generate(ours, PROMPTS, max_new_tokens=6)
    recomputed = greedy_generate(ours, PROMPTS, max_new_tokens=6, use_cache=False)
    assert cached == want and recomputed == want
    assert len({tuple(w) for w in want}) > 1  # not a degenerate constant output
    # eos cuts a sequence right after the token; the others keep going
    eos = want[0][2]
    cut = greedy_generate(ours, PROMPTS, max_new_tokens=6, eos_id=eos)
    assert cut[0] == want[0][:3]
    for c, w in zip(cut, want):
        assert c == (w[:w.index(eos) + 1] if eos in w else w)


def test_scoring_matches_direct_computation(tiny):
    from desmoe.models.generate import greedy_generate, mean_nll, score_continuations
    from desmoe.models.hf_moe import load_hf_moe

    model = load_hf_moe(tiny)
    contexts = [[5, 9, 3], [7, 1], [2]]
    conts = [[4, 4], [9], [6, 7, 8]]
    got = score_continuations(model, contexts, conts)
    for (ctx, cont), (lp, n, greedy) in zip(zip(contexts, conts), got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        direct = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        # the scorer batches and pads: other shapes, other kernels; then log-softmax over the vocabulary
        # and a sum over the continuation (hf_tiny's olmoe: hidden 32, 2 layers, 4 heads, experts of 16, top-2)
        terms = transformer_terms(hidden=32, layers=2, seq=8, ffn=16, heads=4, top_k=2) + 96 + len(cont)
        assert n == len(cont)
        assert abs(lp - direct) <= bound(terms, scale=max(abs(direct), 1.0)), (lp, direct)
        assert greedy == (greedy_generate(model, [ctx], len(cont))[0] == cont)
    # the greedy continuation is recognised as greedy
    g = greedy_generate(model, [[5, 9, 3]], 3)[0]
    assert score_continuations(model, [[5, 9, 3]], [g])[0][2]
    batch = torch.tensor([[5, 9, 3, 4, 4], [7, 1, 9, 2, 2]])
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    # the same forward; the mean over 8 tokens may be summed in another order
    assert abs(mean_nll(model, [batch]) - ref) <= bound(8 + 96, scale=ref)


def generate_ep2(path: str) -> list:
    import deepspeed.comm as dist

    from desmoe.models.generate import greedy_generate
    from desmoe.models.hf_moe import load_hf_moe

    rank = dist.get_rank()
    ep1 = greedy_generate(load_hf_moe(path, ep_size=1), PROMPTS[rank::2], 5)
    # rank 0 stops at once on eos, rank 1 keeps generating: neither may hang
    eos = ep1[0][0] if rank == 0 else None
    ep2 = greedy_generate(load_hf_moe(path, ep_size=2), PROMPTS[rank::2], 5, eos_id=eos)
    return [ep1, ep2, eos]


def test_generation_under_expert_parallelism(ranks, tiny):
    for ep1, ep2, eos in ranks.run(generate_ep2, str(tiny)):
        expected = [s[:s.index(eos) + 1] if eos in s else s for s in ep1] if eos is not None else ep1
        assert ep2 == expected
