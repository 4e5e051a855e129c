"""Users' own data: ``<folder>/<domain>/*.{jsonl,parquet,txt}`` enters the same pipeline.

- ``.jsonl``: one JSON object per line; ``.parquet``: one record per row (columns = keys);
- ``.txt``: the whole file is one plain-text document.
A record is one of (decided by its keys; one format per file; ``source``/``licence`` optional):

- ``text``: plain text, every token trained on;
- ``prompt`` + ``completion``: loss on the completion only (both used verbatim: put the separator
  you want at the end of the prompt);
- ``instruction`` (+ optional ``input``) + ``output``: the Alpaca layout; the prompt is
  ``instruction``, then ``"\\n\\n" + input`` when non-empty, then ``"\\n\\n"``; loss on ``output``;
- ``messages``: a chat, a list of ``{"role", "content"}``, rendered with the HF tokenizer's chat
  template; loss on the assistant turns (their text and end-of-turn markup), not on the template's
  assistant header nor on system/user turns.
Instruction records become :class:`Record` s: the text cut into (segment, counts-in-the-loss)
pieces; the whole text is tokenized at once (what the model sees at inference) and each token's mask
follows the characters it covers (``encode_record``).
A sub-folder whose name is not a configured domain (or the held-out set) is refused.
"""
from __future__ import annotations

import gzip
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from data_prep.extract import Doc
from desmoe.errors import ConfigError, UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
FORMATS = "a string field 'text', 'messages', 'prompt'+'completion' or 'instruction'+'output'"
# chat(messages, add_generation_prompt) -> rendered text; None: no chat template available
Chat = Optional[Callable[[list, bool], str]]


@dataclass
class Record(Doc):
    """An instruction record: ``text`` is the concatenation of ``segments``."""
    segments: list[tuple[str, bool]] = field(default_factory=list)  # (text, is_response)
    origin: str = ""     # "<file>: line <n>", for one-line errors after tokenization
    mask: list[int] = field(default_factory=list)  # per token of its ids, set by the build
    complete: bool = True  # False when cut to max_record_tokens (set by the build)

    @property
    def response(self) -> str:
        """What it trains on (near-duplicate records must match there too, data_prep.clean.dedupe)."""
        return "".join(t for t, counts in self.segments if counts)


def encode_record(tok, rec: Record, max_tokens: int) -> list[int]:
    """Token ids of a record, cut to ``max_tokens`` (the eos the build appends included); sets ``rec.mask``.
    The ids are the encoding of the whole text, as the model sees it at inference: segments encoded apart
    got a word-start mark (sentencepiece's dummy prefix, a Metaspace "\u2581") at every prompt/response
    seam, and BPE merges across a seam were lost.  A token counts in the loss iff it covers a character of
    a response: one straddling a seam ("Answer: " + "Paris" -> " Paris") is trained on, since predicting
    it is what produces the response's first characters; a token that covers no character (a lone dummy
    prefix) goes with the character it stands before.  The record starts with the tokenizer's prefix (the BOS
    a Llama-style base saw at position 0 of every pretraining sequence, and lm-eval's HF model feeds before
    every prompt), masked: it is markup, not a response.  A record the tokenizer does not give back
    (decode(ids) != text) is refused; so is one with no response token left."""
    from desmoe.data.tokenizer import lead

    text = "".join(t for t, _ in rec.segments)
    ids, spans = tok.spans(text)
    flags = [c for t, c in rec.segments for _ in t]  # per character: part of a response?
    mask = [int(any(flags[a:b]) if b > a else flags[min(a, len(text) - 1)]) for a, b in spans]
    back = tok.decode(ids)
    if back != text:
        at = next((i for i, (x, y) in enumerate(zip(back, text)) if x != y), min(len(back), len(text)))
        raise UserError(f"{rec.origin}: tokenizer {tok.path} does not give the record's text back (decode(encode("
                        f"text)) differs at character {at}: {text[at:at + 12]!r} became {back[at:at + 12]!r}); the "
                        f"model would train on other text; expected a tokenizer without a normaliser that changes "
                        f"text, add_prefix_space, or a word-start mark after special tokens (prepend_scheme "
                        f"'always', a legacy Prepend)")
    first = lead(tok, text)
    ids, mask = first + list(ids), [0] * len(first) + mask
    if sum(mask[: max_tokens - 1]) == 0:
        raise UserError(f"{rec.origin}: the response is empty after truncation to max_record_tokens={max_tokens} "
                        f"(prompt {mask.index(1) if 1 in mask else len(mask)} tokens); shorten the prompt or "
                        f"raise max_record_tokens")
    rec.mask, rec.complete = mask[: max_tokens - 1], len(ids) <= max_tokens - 1
    return ids[: max_tokens - 1]


def closing_eos_counts(rec: Record, kept: int) -> int:
    """The loss mask of the eos the build appends to a record's first ``kept`` tokens: 1 (learn to stop)
    only after a whole record that ends in its response; after a cut (``max_record_tokens``, the budget)
    or a trailing prompt turn there is nothing to stop, and training it would teach stopping mid-answer."""
    return int(rec.complete and kept == len(rec.mask) and kept > 0 and rec.mask[kept - 1] == 1)


def user_docs(folder: str | Path, domains: list[str], heldout: str, chat: Chat = None,
              chat_why: str = "", specials: tuple[str, ...] = ()) -> dict[str, list[Doc]]:
    """``chat``: renders ``messages``; when None, a ``messages`` record is refused with ``chat_why``.
    ``specials``: the texts of the tokenizer's special tokens (``special_texts``), refused in users' text."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"key 'user_data': '{root}' is not a directory")
    out: dict[str, list[Doc]] = {}
    # hidden entries (.git, .DS_Store, .ipynb_checkpoints) are not data; any other file is read or refused:
    # a file skipped without a word (train.jsonl.gz, data.json, a file beside the domain folders) is lost data
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            raise UserError(f"{p}: a file directly in user_data; put it in a domain folder "
                            f"({root}/<domain>/{p.name}; domains: {', '.join(domains)})")
    # a folder name is matched in NFC: macOS (and zips made there) store "médecine" decomposed (NFD), which looks
    # the same as the profile's composed name yet was refused as an unknown domain naming what looked like it
    names = {unicodedata.normalize("NFC", d): d for d in [*domains, heldout]}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = names.get(unicodedata.normalize("NFC", sub.name))
        if name is None:
            raise ConfigError(f"{sub}: unknown domain '{sub.name}' (configured: {', '.join(domains)}, "
                              f"held-out: {heldout})")
        files = sorted(p for p in sub.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(sub).parts))
        for f in files:
            if not f.name.endswith(SUFFIXES):
                raise UserError(f"{f}: not a user data file (expected {', '.join('*' + x for x in SUFFIXES)})")
        out.setdefault(name, []).extend(d for f in files for d in _read(f, root, chat, chat_why, specials))
    return out


def chat_renderer(t) -> tuple[Chat, str]:
    """(renderer of ``messages`` with the build's HF tokenizer's chat template, or None and why not);
    ``t``: the profile's ``tokenizer`` section."""
    if t.kind != "hf":
        return None, ("tokenizer.kind is 'sentencepiece', which has no chat template; use tokenizer.kind=hf "
                      "with an HF tokenizer that has a chat_template")
    from desmoe.data.tokenizer import HFTokenizer

    tok = HFTokenizer(t.hf_path).tok
    if not getattr(tok, "chat_template", None):
        return None, f"the HF tokenizer '{t.hf_path}' (tokenizer.hf_path) has no chat_template"
    return (lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)), ""


def special_texts(t) -> tuple[str, ...]:
    """The texts of the special tokens of the build's HF tokenizer (``t``: the profile's ``tokenizer``): an HF
    tokenizer encodes "</s>" or "<|im_start|>" written in a text as that token, so a user's text holding one
    trained an eos mid-document (the model learnt to stop there) or chat markup the user never wrote.
    sentencepiece encodes such text as text: none."""
    if t.kind != "hf":
        return ()
    from desmoe.data.tokenizer import HFTokenizer

    tok = HFTokenizer(t.hf_path).tok
    found = {a.content for a in tok.added_tokens_decoder.values() if a.special} | set(tok.all_special_tokens)
    return tuple(sorted(x for x in found if x))


def _no_special(text: str, where: str, specials: tuple[str, ...]) -> None:
    hit = min(((text.find(x), x) for x in specials if x in text), default=None)
    if hit is not None:
        raise UserError(f"{where} holds {hit[1]!r} at character {hit[0]}, the text of a special token of the "
                        f"tokenizer (tokenizer.hf_path): it would be encoded as that token, not as text; expected "
                        f"text without it")


def record_format(row) -> Optional[str]:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt/completion"
    if "instruction" in row and "output" in row:
        return "instruction/output"
    return "text" if "text" in row else None


def _text(path: Path) -> str:
    # a UTF-8 byte-order mark (some Windows editors write one) is not part of the data
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    # CRLF and a lone CR end lines, as text mode read them (a CR byte is never part of a UTF-8 sequence, and JSON
    # strings hold no raw CR: nothing else changes)
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # not utf-8-sig: its error offsets skip the mark
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:  # name the line (one bad byte in a million-line export is hard to find)
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: unreadable user file (not UTF-8 text: byte "
                        f"{raw[err.start]:#04x})") from None


def _unique_keys(where: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:  # json keeps the last one without a word: which one did the user mean?
                raise UserError(f"{where}: key '{key}' appears twice in one object")
            seen.add(key)
        return dict(pairs)
    return hook


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a .jsonl(.gz) or .parquet file."""
    if path.suffix != ".parquet":
        # lines end at "\n" only (a "\r" before it is JSON whitespace): str.splitlines() would also cut at
        # U+2028, U+0085, ..., which JSON allows unescaped inside strings (json.dumps(..., ensure_ascii=False))
        for i, line in enumerate(_text(path).split("\n")):
            if line.strip():
                where = f"{path}: line {i + 1}"
                try:
                    yield where, json.loads(line, object_pairs_hook=_unique_keys(where))
                except json.JSONDecodeError:
                    raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
    else:
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i + 1}", row


def _read(path: Path, root: Path, chat: Chat, chat_why: str, specials: tuple[str, ...] = ()) -> Iterator[Doc]:
    name = f"user:{path.relative_to(root)}"
    try:  # the default source: a name in another encoding (a Windows zip's) holds surrogates that no hash takes
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{path}: the file's name is not UTF-8 (it is the records' default 'source'); "
                        f"rename it") from None
    try:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8-sig")  # no BOM in the text
            _no_special(text, f"{path}:", specials)
            yield Doc(text, name, "user-supplied", "0")
            return
        first = None
        for i, (where, row) in enumerate(_rows(path)):
            fmt = record_format(row)
            if fmt is None:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{where}: expected an object with {FORMATS} (unknown record format; keys: {keys})")
            if first is None:
                first = (fmt, where)
            elif fmt != first[0]:
                raise UserError(f"{where}: a '{fmt}' record in a file of '{first[0]}' records ({first[1]}); "
                                f"one format per file")
            # 'license' (US spelling, most HF datasets' column) was ignored: the card said "user-supplied"
            licence = row.get("licence") or row.get("license") or "user-supplied"
            # a missing source is the file's name; 0 is a source like 12 ("or" made it the file's name)
            source = name if row.get("source") in (None, "") else str(row.get("source"))
            # they key the split and order hashes and are written to parquet: a lone surrogate there was a
            # UnicodeEncodeError traceback from the build, not a line naming the record
            source = _unicode(source, f"{where}: key 'source'")
            licence = _unicode(str(licence), f"{where}: key 'licence'")
            if fmt == "text":
                if isinstance(row["text"], str):
                    _no_special(row["text"], f"{where}: key 'text'", specials)
                    yield Doc(_unicode(row["text"], where), source, licence, str(i))
                # parquet: null cells are skipped, as before; any other type (an integer or binary column) is
                # refused: it was skipped too, so a whole file of them vanished from the data without a word
                elif path.suffix != ".parquet" or row["text"] is not None:
                    got = f", got {type(row['text']).__name__}" if path.suffix == ".parquet" else ""
                    raise UserError(f"{where}: expected an object with a string field 'text'{got}")
                continue
            for key, value in _fields(fmt, row):  # what the user wrote; a chat template's markup is meant
                if isinstance(value, str):
                    _no_special(value, f"{where}: key '{key}'", specials)
            segments = _segments(fmt, row, where, chat, chat_why)
            _unicode("".join(t for t, _ in segments), where)
            yield Record("".join(t for t, _ in segments), source, licence, str(i), segments=segments, origin=where)
    except UnicodeDecodeError:
        raise UserError(f"{path}: unreadable user file (not UTF-8 text)") from None
    except (OSError, EOFError) as err:  # gzip: BadGzipFile is an OSError, a cut-off file an EOFError
        # an EOFError has no strerror (reading it was an AttributeError traceback); gzip's own text says why
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise UserError(f"{path}: unreadable user file ({why})") from None
    except Exception as err:  # pyarrow's errors for a corrupt parquet file
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: unreadable user file ({type(err).__name__})") from None


def _fields(fmt: str, row: dict) -> list[tuple[str, object]]:
    """(key, value) of the user's own text in a record."""
    if fmt == "messages":
        msgs = row["messages"] if isinstance(row["messages"], list) else []
        return [(f"messages[{k}].content", m.get("content")) for k, m in enumerate(msgs) if isinstance(m, dict)]
    keys = ("prompt", "completion") if fmt == "prompt/completion" else ("instruction", "input", "output")
    return [(k, row.get(k)) for k in keys]


def _unicode(text: str, where: str) -> str:
    """JSON's escapes can spell a lone UTF-16 surrogate ("\\ud83d" of an emoji cut in half), which no UTF-8
    writer takes: refused here, naming the line, rather than as a traceback from the de-duplication."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{where}: a lone UTF-16 surrogate {text[err.start]!r} at character {err.start} "
                        f"(not valid Unicode text; a \\ud800-\\udfff escape without its pair)") from None
    return text


def _string(row: dict, key: str, where: str, empty_ok: bool = False) -> str:
    value = row.get(key)
    if value is None and empty_ok:
        return ""
    if not isinstance(value, str) or (not value.strip() and not empty_ok):
        raise UserError(f"{where}: key '{key}': expected a non-empty string, got {json.dumps(value)[:60]}")
    return value


def _segments(fmt: str, row: dict, where: str, chat: Chat, chat_why: str) -> list[tuple[str, bool]]:
    if fmt == "prompt/completion":
        return [(_string(row, "prompt", where, empty_ok=True), False), (_string(row, "completion", where), True)]
    if fmt == "instruction/output":
        extra = _string(row, "input", where, empty_ok=True)
        prompt = _string(row, "instruction", where) + (f"\n\n{extra}" if extra.strip() else "") + "\n\n"
        return [(prompt, False), (_string(row, "output", where), True)]
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise UserError(f"{where}: key 'messages': expected a non-empty list of {{'role': str, 'content': str}}")
    # A chat is rendered from each message's role and content: any other key (an assistant's tool_calls, a tool
    # message's name) and the record's tools/documents (which apply_chat_template renders into the prompt) were
    # dropped without a word, so the model trained on another text than the template gives for the chat (a tool
    # answer with no call before it).  Refused; empty values are absent (HF datasets' exports write a null for
    # every key any message of the column has).
    absent = (None, "", [], {})
    for k, m in enumerate(msgs):
        extra = sorted(key for key, value in m.items() if key not in ("role", "content") and value not in absent)
        if extra:
            raise UserError(f"{where}: key 'messages[{k}].{extra[0]}': not rendered (a message is rendered from its "
                            f"'role' and 'content' only); expected no other key, or null")
    for key in ("tools", "documents"):
        if row.get(key) not in absent:
            raise UserError(f"{where}: key '{key}': not rendered (a chat is rendered from its 'messages' only); "
                            f"expected no '{key}', or null")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise UserError(f"{where}: key 'messages': no non-empty 'assistant' turn (nothing to train on)")
    if chat is None:
        raise UserError(f"{where}: 'messages' needs a chat template: {chat_why}")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    # Render prefix by prefix: the prompt up to an assistant turn (with the template's generation
    # header) is context, the rest of that turn (content + end-of-turn markup) is response.
    segs, done = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant" or not m["content"].strip():
            continue  # an empty assistant turn stays context: training on it would teach answering nothing
        head, full = _render(chat, msgs[:k], True, where, k), _render(chat, msgs[: k + 1], False, where, k + 1)
        if not head.startswith(done) or not full.startswith(head):
            raise UserError(f"{where}: key 'messages': the chat template does not render the chat prefix by "
                            f"prefix (turn {k + 1}); cannot tell prompt from response tokens")
        segs += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    rest = _render(chat, msgs, False, where, len(msgs))
    if not rest.startswith(done):
        raise UserError(f"{where}: key 'messages': the chat template does not render the chat prefix by prefix")
    # a template renders the roles it knows: many skip any other ('tool', 'function', 'ipython') without a word, so
    # the model trained on an answer to a turn it never saw; each turn's text must be there, in order (stripped:
    # templates often trim it)
    at = 0
    for k, m in enumerate(msgs):
        found = rest.find(m["content"].strip(), at)
        if found < 0:
            raise UserError(f"{where}: key 'messages[{k}].content': the chat template does not render this "
                            f"'{m['role']}' turn's text; expected a role the template renders")
        at = found + len(m["content"].strip())
    return [s for s in segs + [(rest[len(done):], False)] if s[0]]


def _render(chat, msgs: list, gen: bool, where: str, turns: int) -> str:
    try:
        return chat(msgs, gen)
    except Exception as err:  # noqa: BLE001 - raise_exception in a template (jinja2's TemplateError), ValueError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{where}: key 'messages': the chat template cannot render messages[:{turns}] "
                        f"({type(err).__name__}: {first})") from None
