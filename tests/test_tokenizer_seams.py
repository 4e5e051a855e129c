"""Prompt/response and context/continuation seams with the tokenizers users bring (tests/tokfix.py).

Encoded apart, each piece got a word-start mark the text does not have (sentencepiece's dummy prefix:
the demo trained on a lone "\u2581" before every answer and its raw text read "Answer:  <a>"; Metaspace
and Llama's legacy Prepend: "\u2581" after every chat header) or lost a BPE merge across the seam
(GPT-2 / Qwen: "\\n\\n", " word").  Records must be the encoding of their whole text with masks that
follow its characters, and the harness must score the whole text's tokens (lm-eval's pair encoding)."""
import json

import pytest
import torch

from tokfix import HF_KINDS, hf_folder, oracle_mask, sentencepiece, token_spans
from data_prep.instruct import Renderer
from data_prep.user_data import Record, _segments, encode_record
from desmoe.data.tokenizer import HFTokenizer, encode_pairs, prefixed
from desmoe.errors import UserError

# a "\u2581" after every special token: the text a chat template renders is not what they encode
MARK_AFTER_SPECIALS = ("metaspace-always", "llama-legacy")
ANSWER = "the shallow copy of the list is returned"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    out = {k: HFTokenizer(hf_folder(k, root / k)) for k in HF_KINDS}
    out["sentencepiece"] = sentencepiece(root / "spm")
    out["gpt2-prefix"] = HFTokenizer(hf_folder("gpt2-prefix", root / "gpt2-prefix"))
    return out


def _cases(tok) -> dict[str, list[tuple[str, bool]]]:
    """Records as the build renders them: the demo's question/answer template, the user formats (a prompt
    ending in a space, Alpaca's "\\n\\n"), a chat through the template, code indentation and non-ASCII."""
    chat = None
    if isinstance(tok, HFTokenizer):
        chat = lambda m, g: tok.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)  # noqa: E731
    out = {"question_answer": Renderer().segments("Which function copies a list?", "copy"),
           "prompt_space": _segments("prompt/completion", {"prompt": "Question: what does it do?\nAnswer: ",
                                                           "completion": ANSWER}, "w", None, ""),
           "alpaca": _segments("instruction/output", {"instruction": "Describe the function.", "input": "Be brief.",
                                                     "output": ANSWER}, "w", None, ""),
           "code": [("def f(x):\n  ", False), ("  return x  # café, naïve 😀\n", True), ("Thanks!  ", False),
                    ("  Indeed.", True)]}
    if chat:
        msgs = [{"role": "system", "content": "You document Python."}, {"role": "user", "content": "What is it?"},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "the value 😀 é"}]
        out["chat"] = _segments("messages", {"messages": msgs}, "w", chat, "")
    return out


def test_records_are_their_whole_text_and_masks_follow_its_characters(toks):
    for kind, tok in toks.items():
        if kind == "gpt2-prefix":
            continue
        apart_differs = []
        for name, segs in _cases(tok).items():
            text = "".join(t for t, _ in segs)
            rec = Record(text, "s", "l", "0", segments=segs, origin=f"{kind}/{name}")
            if name == "chat" and kind in MARK_AFTER_SPECIALS:  # "<|end|>\n" encodes as "<|end|> \n"
                with pytest.raises(UserError, match=f"^{kind}/chat: tokenizer .* does not give the record's text "
                                                    f"back .* at character 10: '\\\\nYou documen' became ' "):
                    encode_record(tok, rec, 4096)
                continue
            ids = encode_record(tok, rec, 4096)
            assert ids == prefixed(tok, [text])[0], (kind, name)  # what the model sees for the text at inference
            # the tokenizer's prefix (llama-bos: <s>) first, never trained on; then the text's own tokens
            k = len(tok.prefix)
            assert ids[:k] == tok.prefix and rec.mask[:k] == [0] * k and (k == 0) == (kind != "llama-bos")
            bare = ids[k:]
            assert tok.decode(bare) == text, (kind, name)
            # a token counts iff it covers a response character (a seam-straddling one does)
            assert rec.mask[k:] == oracle_mask(tok, bare, segs), (kind, name)
            spans = [s for s in token_spans(tok, bare, text) if s]
            assert rec.mask[0] == 0 and any(rec.mask) and spans[-1][1] == len(text)
            apart_differs.append([i for p in tok.encode([t for t, _ in segs]) for i in p] != bare)
        # the cases reach the defect with every tokenizer: the old piece-by-piece ids were others
        assert any(apart_differs), kind
    spm = toks["sentencepiece"]  # the demo's template and tokenizer: the answer began with a lone dummy prefix
    prompt, answer = Renderer().segments("Which function copies a list?", "copy")
    apart = spm.encode([prompt[0], answer[0]])
    assert spm.sp.id_to_piece(apart[1][0]) == "\u2581" and spm.decode(apart[0] + apart[1]).endswith("Answer:  copy")


def test_truncation_keeps_whole_text_tokens(toks):
    tok = toks["metaspace-first"]
    segs = _cases(tok)["chat"]
    text = "".join(t for t, _ in segs)
    full = prefixed(tok, [text])[0]
    rec = Record(text, "s", "l", "0", segments=segs, origin="o")
    cut = len(full) // 2
    assert encode_record(tok, rec, cut + 1) == full[:cut] and not rec.complete and len(rec.mask) == cut


def test_a_tokenizer_that_changes_the_text_is_refused_in_one_line(toks):
    tok = toks["gpt2-prefix"]  # add_prefix_space: " " before the text and after every special token
    segs = _cases(tok)["chat"]
    rec = Record("".join(t for t, _ in segs), "s", "l", "0", segments=segs, origin="mine/qa/c.jsonl: line 3")
    with pytest.raises(UserError) as err:
        encode_record(tok, rec, 4096)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"mine/qa/c.jsonl: line 3: tokenizer {tok.path} does not give the "
                                              "record's text back") and "at character 10: '\\nYou documen' became ' \\nYou docume'" in msg


PAIRS = [("Question: what does it do?\nAnswer:", " " + ANSWER), ("Question: what does it do?\nAnswer: ", ANSWER),
         ("Describe the function.\n\n", ANSWER), ("<|assistant|>\n", ANSWER + "<|end|>"),
         ("", ANSWER), ("the value of the li", "st")]


def test_pairs_are_split_whole_encodings(toks):
    for kind, tok in toks.items():
        if kind == "gpt2-prefix":
            continue
        got = encode_pairs(tok, [c for c, _ in PAIRS], [x for _, x in PAIRS])
        old = list(zip(tok.encode([c for c, _ in PAIRS]), tok.encode([x for _, x in PAIRS])))
        for (c, x), (ctx, cont), (c_old, x_old) in zip(PAIRS, got, old):
            whole, bare = prefixed(tok, [c + x])[0], tok.encode([c + x])[0]
            # lm-eval's: the whole text with the tokenizer's prefix; an empty context is its prefix token
            assert (ctx + cont == whole) if c.strip() else (ctx == [tok.prefix_id] and cont == bare), (kind, c, x)
            # the continuation is every token not wholly inside the context (its trailing space moved out)
            inside = sum(1 for s in token_spans(tok, bare, c + x) if s and s[1] <= len(c.rstrip()))
            assert len(ctx) == len(tok.prefix) + inside or (not c.strip() and inside == 0), (kind, c, x)
        assert any(x_old != cont for (_, cont), (_, x_old) in zip(got, old)), kind


def test_harness_scores_the_whole_texts_tokens(toks):
    from desmoe.evaluation.harness import make_lm
    from types import SimpleNamespace

    tok = toks["sentencepiece"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, 16), torch.nn.Linear(16, tok.vocab_size))
    lm = make_lm(model, tok, batch_size=4, max_len=512)
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in PAIRS])
    for (c, x), (lp, _) in zip(PAIRS, got):
        whole = tok.encode([c + x])[0]
        n = sum(1 for s in token_spans(tok, whole, c + x) if s and s[1] <= len(c.rstrip()))
        seq = ([tok.eos_id] if n == 0 else []) + whole
        start = max(n, 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(seq)[None, :-1])[0].float(), -1)
        want = sum(logp[j - 1, seq[j]].item() for j in range(start, len(seq)))
        # float32 log-softmax and sums over len(seq) terms: a few eps of the magnitude per term
        assert abs(lp - want) <= 4 * torch.finfo(torch.float32).eps * len(seq) * max(abs(want), 1.0), (c, x, lp, want)
    # the old split scored a lone dummy-prefix piece before " <answer>": another number
    ctx, cont = tok.encode([PAIRS[0][0]])[0], tok.encode([PAIRS[0][1]])[0]
    assert tok.sp.id_to_piece(cont[0]) == "\u2581" and tok.encode([PAIRS[0][0] + PAIRS[0][1]])[0] != ctx + cont
    assert json.dumps(got)  # plain floats and bools for the harness


def test_exact_match_prompts_are_the_records_first_tokens(toks, tmp_path):
    """The exact-match tasks ask with the prompt encoded alone: the build refuses a tokenizer whose
    prompt tokens differ inside the record (a BPE without a split regex merges ":" with the answer's " ")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.instruct import check_prompt_tokens

    def record(tok, render):
        segs = render.segments("Which function copies a list?", "copy")
        rec = Record("".join(t for t, _ in segs), "s", "l", "0", segments=segs, origin="law/src/7")
        rec.fact = ("term", "Which function copies a list?", "copy", "")
        return rec, encode_record(tok, rec, 4096)

    for kind, tok in toks.items():
        if kind != "gpt2-prefix":
            chat = isinstance(tok, HFTokenizer) and kind not in MARK_AFTER_SPECIALS
            render = Renderer((lambda m, g: tok.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g))
                              if chat else None)
            check_prompt_tokens(tok, *record(tok, render))  # passes: the prompt ends on a token boundary
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), decoders.ByteLevel()
    tk.train_from_iterator([f"Question: {i}?\nAnswer: {i} copy" for i in range(300)],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(tmp_path / "noregex")
    tok = HFTokenizer(tmp_path / "noregex")
    rec, ids = record(tok, Renderer())
    with pytest.raises(UserError, match=r"^law/src/7: tokenizer \S+noregex encodes the prompt alone \(\d+ tokens\) "
                                        r"other than within the record \(a token straddles the prompt/answer seam\)"):
        check_prompt_tokens(tok, rec, ids)
