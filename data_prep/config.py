"""Build profiles: dataclasses filled from ``data_prep/profiles/<name>.yaml`` + dotted overrides."""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from desmoe.config import bad, load_config
from desmoe.errors import ConfigError

PROFILES = Path(__file__).resolve().parent / "profiles"


# a domain's name becomes folder names: "../x" or "a/b" wrote outside the data folder, and a name starting with
# "." never received user data (hidden folders are skipped), so its build stopped as "empty" without saying why
_FOLDER_NAME = re.compile(r"[^\W.][\w.-]*")

@dataclass
class TokenizerConfig:
    kind: Literal["sentencepiece", "hf"] = "sentencepiece"
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = 16000
    sample_chars_per_domain: int = 2_000_000   # balanced training sample: equal characters per domain
    hf_path: Optional[str] = None              # kind=hf: a local folder with an HF tokenizer

    def check(self) -> None:
        if self.kind == "hf" and not self.hf_path:
            raise bad("hf_path", "a local tokenizer folder when kind is 'hf'")
        if not 300 <= self.vocab_size <= 1_000_000:
            raise bad("vocab_size", "an integer in [300, 1000000]", self.vocab_size)


@dataclass
class MathGenConfig:
    enabled: bool = True          # run DeepMind's mathematics_dataset generator
    per_module_train: int = 20    # training Q/A per module (56 modules)
    per_module_eval: int = 4      # exact-answer eval Q/A per module (interpolation regime)


@dataclass
class EvalConfig:
    mcq_per_domain: int = 200
    choices: int = 4
    mcq_split: Literal["test", "val", "train"] = "test"  # which documents the items come from

    def check(self) -> None:
        if self.choices < 2:
            raise bad("choices", "at least 2", self.choices)


@dataclass
class InstructConfig:
    """Domains trained in instruction form (data_prep/instruct.py): domain -> 'records' | 'mixed'."""
    domains: dict[str, str] = field(default_factory=dict)
    max_records: int = 400        # per instruct domain, train split (val/test: their share)
    exact_per_domain: int = 40    # closed-book exact-match items per instruct domain (facts trained on)

    def check(self) -> None:
        from data_prep.instruct import MODES

        for name, mode in self.domains.items():
            if mode not in MODES:
                raise bad(f"domains.{name}", " or ".join(f"'{m}'" for m in MODES), mode)
        if self.max_records < 1:
            raise bad("max_records", "at least 1", self.max_records)
        if self.exact_per_domain < 1:
            raise bad("exact_per_domain", "at least 1", self.exact_per_domain)


@dataclass
class BuildConfig:
    profile: str = "custom"
    seed: int = 1234
    manifest: str = "manifest.yaml"                 # relative to data_prep/ unless absolute
    domains: dict[str, list[str]] = field(default_factory=dict)   # domain -> extractor names, in order
    heldout: str = "general-heldout"
    heldout_extractors: list[str] = field(default_factory=list)
    budget_tokens: int = 1_000_000                  # per domain, train split
    equalize: bool = True                           # cap every domain at the smallest one's tokens
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    min_chars: int = 40
    chunk_chars: int = 6000                         # long documents are cut at paragraphs (same split)
    max_record_tokens: int = 2048                   # instruction records are cut to this (eos included)
    near_dup_threshold: float = 0.8                 # estimated Jaccard of word 5-gram shingles
    heldout_max_chars: int = 2_000_000
    user_data: Optional[str] = None                 # folder of <domain>/*.{jsonl,parquet,txt}
    workers: int = 2
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    mathgen: MathGenConfig = field(default_factory=MathGenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)

    def check(self) -> None:
        from data_prep.extract import EXTRACTORS

        if not self.domains:
            raise bad("domains", "a mapping of domain name -> list of extractors")
        for name in [*self.domains, self.heldout]:  # each names folders (raw/<name>, <name>/, user_data/<name>)
            if not isinstance(name, str) or not _FOLDER_NAME.fullmatch(name):
                raise bad("heldout" if name == self.heldout else f"domains.{name}",
                          "a folder name: letters, digits, '_', '-' or '.', not starting with '.'", name)
        for name, extractors in self.domains.items():
            if name == self.heldout:
                raise bad(f"domains.{name}", f"a name other than the held-out set's ('{self.heldout}')")
            for i, ex in enumerate(extractors):
                if ex not in EXTRACTORS:
                    raise bad(f"domains.{name}[{i}]", "one of " + ", ".join(sorted(EXTRACTORS)), ex)
        for i, ex in enumerate(self.heldout_extractors):
            if ex not in EXTRACTORS:
                raise bad(f"heldout_extractors[{i}]", "one of " + ", ".join(sorted(EXTRACTORS)), ex)
        if not 0 < self.val_fraction < 0.5 or not 0 < self.test_fraction < 0.5:
            raise bad("val_fraction/test_fraction", "numbers in (0, 0.5)")
        if self.budget_tokens < 1000:
            raise bad("budget_tokens", "at least 1000", self.budget_tokens)
        if not 0.3 <= self.near_dup_threshold <= 1.0:
            raise bad("near_dup_threshold", "a number in [0.3, 1]", self.near_dup_threshold)
        if self.max_record_tokens < 2:
            raise bad("max_record_tokens", "at least 2", self.max_record_tokens)
        if self.workers < 1:
            raise bad("workers", "at least 1", self.workers)
        for name in self.instruct.domains:
            if name not in self.domains:
                raise bad(f"instruct.domains.{name}", "a configured domain (" + ", ".join(self.domains) + ")", name)


def load_profile(profile: str, overrides: list[str] = ()) -> BuildConfig:
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"profile '{profile}': no such profile (known: {known}) and not a YAML file")
    return load_config(BuildConfig, path, overrides)
