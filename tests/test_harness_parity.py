"""desmoe's harness adapter against lm-evaluation-harness's own HF model, ``HFLM``.

``DesmoeLM`` claims the numbers ``lm_eval --model hf`` gives on the exported folder.  A tiny Mixtral (the
Llama-family MoE) is built offline on each kind of tokenizer users bring (tests/tokfix.py: Llama-style
Metaspace with a BOS post-processor, GPT-2 and Qwen byte-level without one; all three define ``<s>``, so
lm-eval's prefix token for empty contexts and rolling windows is ``<s>``, not eos), loaded through
``load_hf_moe`` (desmoe's MoE blocks) and exported with ``export_hf``; ``HFLM`` loads the exported folder as
the family's own class.  Both answer the same loglikelihood (an empty context included), rolling and
generate_until requests, and per request must feed the same tokens (read off HFLM's own encoding calls and
desmoe's scorer), give the same log-likelihoods within the fp32 rounding of two implementations of the same
forward, and the same greedy texts.  The one request where a token straddles the context/continuation seam
is checked to be desmoe's documented departure (encode_pairs) instead.  The previous code (no BOS, eos before
empty contexts and rolling windows, prompts cut to max_len) failed all nine.  Offline, CPU, fp32, ~5 s."""
from __future__ import annotations

import math

import pytest
import torch

from tokfix import hf_folder
from tolerance import bound, transformer_terms

MAX_LEN = 32  # short windows: rolling documents span several, long prompts are cut from the left
KINDS = ("llama-bos", "gpt2", "qwen")
LL = [("Question: what does the function do with its argument?\nAnswer:",
       " it returns a shallow copy of the list and leaves the original list as it was"),
      ("The value of the list is", " returned"), ("def f(x):\n    return", " x + 1"),
      ("Describe the function.\n\n", "It copies."), ("", "Return the shallow copy."), ("", " the answer"),
      ("", "<s>Return the value."), ("<s>Question: what is it?\nAnswer:", " a list")]
ROLLING = ["Return a shallow copy of the list.",
           "Return the number of items in a container. The argument may be a sequence (such as a string, bytes, "
           "tuple, list, or range) or a collection (such as a dictionary, set, or frozen set). " * 2]
GEN = [("Question: what does it do?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 8}),
       ("def f(x):\n    return", {"until": ["\n"], "max_gen_toks": 8}),
       ("Return the number of items in a container. The argument may be a sequence (such as a string, bytes, "
        "tuple, list, or range) or a collection.", {"until": ["."], "max_gen_toks": 8})]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(kind, HFLM on the exported folder, DesmoeLM on the same folder through load_hf_moe, its model)."""
    from hf_tiny import tiny_config
    from lm_eval.models.huggingface import HFLM

    from desmoe.data.tokenizer import HFTokenizer
    from desmoe.evaluation.harness import make_lm
    from desmoe.models.hf_build import write_initial_checkpoint
    from desmoe.models.hf_moe import export_hf, load_hf_moe

    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    tok = HFTokenizer(hf_folder(kind, tmp / "tok"))
    cfg = tiny_config("mixtral")
    cfg.vocab_size = tok.vocab_size
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.tok.bos_token_id, tok.eos_id, tok.pad_id
    base = write_initial_checkpoint(cfg, tmp / "base", seed=5)
    folder = export_hf(load_hf_moe(base), tmp / "export", tokenizer=tok.tok)
    hf = HFLM(pretrained=str(folder), backend="causal", device="cpu", dtype="float32", batch_size=4,
              max_length=MAX_LEN)
    model = load_hf_moe(folder).eval()
    return kind, hf, make_lm(model, HFTokenizer(folder), batch_size=4, max_len=MAX_LEN), model


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _fed(pairs) -> list[tuple[list[int], list[int]]]:
    """What a scorer feeds for (context, continuation) pairs: the last MAX_LEN + 1 tokens of both (the first
    only ever an input), and the continuation it sums."""
    return [((list(c) + list(x))[-(MAX_LEN + 1):], list(x)) for c, x in pairs]


def _record(monkeypatch, obj, name: str, calls: list) -> None:
    """Wrap ``obj.name`` (for this test) to append each call's (args, kwargs, result) to ``calls``; the call
    goes through unchanged."""
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(obj, name, wrapper)


def _per_token(model, seq: list[int]) -> float:
    """How far two fp32 evaluations of one log-probability in ``seq`` may differ: desmoe's MoE blocks and the
    family's own class (other kernels, batch shapes, padding) give each logit within ``bound`` over the
    forward's reduction lengths at the logits' magnitude; a log-probability is a logit minus a log-sum-exp
    over the vocabulary (at most the largest logit error again, plus the rounding of its sum)."""
    terms = transformer_terms(hidden=32, layers=2, seq=MAX_LEN, ffn=24, heads=4, top_k=2)
    with torch.no_grad():
        scale = float(model(torch.tensor([seq])).logits.abs().max())
    return 2 * bound(terms, scale=scale) + bound(model.config.vocab_size, scale=scale)


def _tolerance(model, fed: list[tuple[list[int], list[int]]], total: float) -> float:
    """A sum of log-probabilities over ``fed`` windows: each term's error, plus the sum's own rounding."""
    n = sum(len(cont) for _, cont in fed)
    return sum(len(cont) * _per_token(model, seq) for seq, cont in fed) + bound(n, scale=max(abs(total), 1.0))


def test_loglikelihood_is_lm_evals_own(pair, monkeypatch):
    kind, hf, lm, model = pair
    hf_calls, our_calls = [], []
    _record(monkeypatch, hf, "_loglikelihood_tokens", hf_calls)
    _record(monkeypatch, lm, "_score", our_calls)
    want, got = hf.loglikelihood(_instances("loglikelihood", LL)), lm.loglikelihood(_instances("loglikelihood", LL))
    split = [(list(c), list(x)) for (_, c, x) in hf_calls[0][0][0]]
    pairs = [(list(c), list(x)) for args, _, _ in our_calls for c, x in args[0]]
    theirs, ours = _fed(split), _fed(pairs)
    assert len(ours) == len(theirs) == len(LL)
    compared = 0
    for req, (c, x), t, o, (lp, greedy), (lp_h, greedy_h) in zip(LL, split, theirs, ours, got, want):
        whole = hf.tok_encode(req[0] + req[1])
        if req[0] and c + x != whole:
            # the one departure (desmoe.data.tokenizer.encode_pairs): a token straddles the seam (llama-bos:
            # "." + "\n\nIt" -> ".\n\n"); HFLM drops it from both sides, desmoe scores it as continuation
            assert o[0] == whole[-(MAX_LEN + 1):] and len(o[1]) == len(t[1]) + 1, (kind, req, o, t)
            continue
        assert o == t, (kind, req, o, t)
        tol = _tolerance(model, [o], lp_h)
        assert abs(lp - lp_h) <= tol and greedy == greedy_h, (kind, req, lp, lp_h, tol)
        compared += 1
    assert compared >= len(LL) - 1, kind
    if kind == "llama-bos":  # every context starts with one BOS, an empty context is BOS alone: never eos
        bos = hf.tokenizer.bos_token_id
        assert all(c[0] == bos and (c + x)[1] != bos for c, x in pairs), pairs
    assert any(len(c) + len(x) > MAX_LEN + 1 for c, x in pairs)  # one request is cut from the left (as in HFLM)


def test_loglikelihood_rolling_is_lm_evals_own(pair, monkeypatch):
    kind, hf, lm, model = pair
    hf_calls, our_calls = [], []
    _record(monkeypatch, hf, "_loglikelihood_tokens", hf_calls)
    _record(monkeypatch, lm, "_score", our_calls)
    docs = _instances("loglikelihood_rolling", [(d,) for d in ROLLING])
    want, got = hf.loglikelihood_rolling(docs), lm.loglikelihood_rolling(docs)
    theirs = _fed([(c, x) for _, kwargs, _ in hf_calls for (_, c, x) in kwargs["requests"]])
    ours = _fed([p for args, _, _ in our_calls for p in args[0]])
    assert ours == theirs, kind
    # windows per document: its default encoding (HFLM's tok_encode) in MAX_LEN pieces
    counts = [-(-len(hf.tok_encode(d)) // MAX_LEN) for d in ROLLING]
    assert sum(counts) == len(ours) and counts[-1] > 1, (kind, counts)  # the long document spans several
    if kind == "llama-bos":  # lm-eval's first window: the prefix token, then the document's own BOS
        bos = hf.tokenizer.bos_token_id
        assert ours[0][0][:2] == [bos, bos] and ours[0][1][0] == bos
    starts = [sum(counts[:i]) for i in range(len(counts))]
    for doc, start, n, lp, lp_h in zip(ROLLING, starts, counts, got, want):
        tol = _tolerance(model, ours[start:start + n], lp_h)
        assert abs(lp - lp_h) <= tol, (kind, doc[:20], lp, lp_h, tol)


def test_generate_until_is_lm_evals_own(pair, monkeypatch):
    from desmoe.evaluation import harness

    kind, hf, lm, model = pair
    hf_calls, our_calls = [], []
    _record(monkeypatch, hf, "tok_batch_encode", hf_calls)
    _record(monkeypatch, harness, "greedy_generate", our_calls)
    reqs = _instances("generate_until", GEN)
    want, got = hf.generate_until(reqs), lm.generate_until(reqs)
    theirs = {}
    for args, kwargs, (ids, mask) in hf_calls:  # HFLM sorts and left-pads: each row's own tokens, by its prompt
        strings = args[0] if args else kwargs["strings"]
        theirs.update({s: row[m.bool()].tolist() for s, row, m in zip(strings, ids, mask)})
    ours = [list(p) for args, _, _ in our_calls for p in args[1]]
    assert len(ours) == len(GEN) == len(theirs)
    for (prompt, _), o in zip(GEN, ours):
        assert o == theirs[prompt], (kind, prompt, o, theirs[prompt])
    assert any(len(p) == MAX_LEN - 8 for p in ours), kind  # one prompt is cut from the left (and loses its BOS)
    assert got == want, kind


def test_in_house_perplexity_leaves_the_prefix_out(pair):
    """``ppl/*`` (lm_tasks.perplexity) lays documents out as training does (default encoding, then eos) and,
    as training's sampler and lm-eval's rolling windows, never counts a document's prefix (BOS) as a label:
    after an eos it is certain.  The reference here encodes with the HF tokenizer itself and scores each
    window with one plain forward."""
    from desmoe.evaluation.lm_tasks import LMEvalConfig, perplexity

    kind, hf, lm, model = pair
    tok, seq_len = hf.tokenizer, 16
    docs = [ROLLING[0], ROLLING[1][:70], ROLLING[0], ROLLING[1][:40]] * 2  # several start inside the windows
    stream, counts = [], []
    for d in docs:
        ids, bare = tok(d)["input_ids"], tok(d, add_special_tokens=False)["input_ids"]
        added = len(ids) - len(bare)  # the default encoding's own prefix (llama-bos: <s>; gpt2, qwen: none)
        stream += ids + [tok.eos_token_id]
        counts += [False] * added + [True] * (len(bare) + 1)
    cfg = LMEvalConfig(batch_size=3, ppl_seq_len=seq_len, ppl_tokens=5 * seq_len)
    stream, counts = stream[:cfg.ppl_tokens + 1], counts[:cfg.ppl_tokens + 1]
    total = {True: 0.0, False: 0.0}  # NLL summed over the counted labels, and over all of them
    n = {True: 0, False: 0}
    tol = 0.0
    for s in range(0, cfg.ppl_tokens, seq_len):
        window = stream[s:s + seq_len + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), -1)
        for j, t in enumerate(window[1:]):
            for masked in (True, False):
                if counts[s + 1 + j] or not masked:
                    total[masked] -= logp[j, t].item()
                    n[masked] += 1
        tol += seq_len * _per_token(model, window)
    want = total[True] / n[True]
    tol = (tol + bound(n[False], scale=total[False])) / n[True]
    got = math.log(perplexity(model, lm.tok, docs, cfg))
    assert abs(got - want) <= tol, (kind, got, want, tol)
    if kind == "llama-bos":  # counting the BOS labels would give another number
        assert n[False] - n[True] >= 3 and abs(total[False] / n[False] - want) > tol, (kind, n, tol)
    else:
        assert n[True] == n[False]
