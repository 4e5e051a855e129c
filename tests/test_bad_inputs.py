"""The bad-input catalogue: every user mistake ends in one line naming the file, key or
value and what was expected, and leaves nothing on disk damaged.

`python tests/test_bad_inputs.py` prints the catalogue with the message each case
produces (the table in docs/reliability.md).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from desmoe.config import load_config, split_overrides  # noqa: E402
from desmoe.data.text_corpus import TextCorpusConfig, load_byte_corpus  # noqa: E402
from desmoe.distributed import expand_hostlist, resolve_env  # noqa: E402
from desmoe.engine import read_ds_config, resolve_ds_config  # noqa: E402
from desmoe.errors import UserError  # noqa: E402
from desmoe.recipes.lm.recipe import LMExperiment  # noqa: E402

TORCH_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
SLURM_ENV = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]",
             "SLURM_JOB_ID": "42"}


@dataclass
class Case:
    name: str
    area: str
    trigger: Callable[[Path], object]
    expect: str


def yaml_file(tmp: Path, text: str) -> Path:
    path = tmp / "exp.yaml"
    path.write_text(text)
    return path


def json_file(tmp: Path, text: str) -> Path:
    path = tmp / "ds.json"
    path.write_text(text)
    return path


def exp(tmp: Path, text: str = "", overrides=()):
    return load_config(LMExperiment, yaml_file(tmp, text), list(overrides))


def ds(tmp: Path, text: str):
    return resolve_ds_config(read_ds_config(json_file(tmp, text)), micro_batch=1)


def files(tmp: Path, names: dict[str, str]) -> Path:
    for name, text in names.items():
        (tmp / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "corpus" / name).write_text(text)
    return tmp / "corpus"


CASES = [
    # experiment configs
    Case("config file missing", "config", lambda t: load_config(LMExperiment, t / "none.yaml"), "config file not found"),
    Case("YAML syntax", "config", lambda t: exp(t, "model:\n  top_k: 2\n   x: 1\n"), "not valid YAML (line 3)"),
    Case("top level not a mapping", "config", lambda t: exp(t, "- 1\n"), "expected a mapping at the top level"),
    Case("unknown key", "config", lambda t: exp(t, "model:\n  num_expert: 4\n"), "unknown key 'model.num_expert'"),
    Case("key given twice in the YAML", "config", lambda t: exp(t, "train:\n  steps: 10\ntrain:\n  lr: 0.001\n"),
         "key 'train' given twice (lines 1 and 3)"),
    Case("section is not a mapping", "config", lambda t: exp(t, "train: 5\n"), "key 'train': expected a mapping"),
    Case("wrong type", "config", lambda t: exp(t, "train:\n  steps: ten\n"), "key 'train.steps': expected an integer"),
    Case("not one of the choices", "config", lambda t: exp(t, overrides=["model.expert_type=relu"]),
         "key 'model.expert_type': expected one of 'swiglu', 'mlp'"),
    Case("boolean expected", "config", lambda t: exp(t, overrides=["run.resume=maybe"]), "key 'run.resume': expected true or false"),
    Case("non-positive count", "config", lambda t: exp(t, overrides=["train.steps=0"]), "key 'train.steps': expected a positive integer"),
    Case("learning rate out of range", "config", lambda t: exp(t, overrides=["train.lr=5"]), "key 'train.lr': expected a number in (0, 1)"),
    Case("top-k above expert count", "config", lambda t: exp(t, overrides=["model.top_k=9"]), "key 'model.top_k': expected 1..num_experts=8"),
    Case("ep_size does not divide experts", "config", lambda t: exp(t, overrides=["model.ep_size=3"]),
         "key 'model.ep_size': expected a divisor of num_experts=8"),
    Case("sequence longer than the model", "config", lambda t: exp(t, overrides=["train.seq_len=512"]),
         "key 'train.seq_len': expected at most model.max_seq_len=256"),
    Case("capacity factor not positive", "config", lambda t: exp(t, overrides=["model.capacity_factor=0"]),
         "key 'model.capacity_factor': expected a positive number or null"),
    # command line
    Case("override without a value", "cli", lambda t: split_overrides(["train.steps"]), "expected the form key.path=value"),
    Case("flag without a value", "cli", lambda t: split_overrides(["--train.steps"]), "override '--train.steps': expected a value"),
    Case("override into a value", "cli", lambda t: exp(t, overrides=["train=3", "train.steps=4"]), "'train' is not a section"),
    Case("override cut by a YAML comment", "cli", lambda t: exp(t, overrides=["run.dir=/data/exp #3"]),
         "override 'run.dir=/data/exp #3': YAML reads what follows '#' as a comment"),
    Case("null for a section", "cli", lambda t: exp(t, overrides=["train=null"]),
         "override 'train=null': 'train' is a section, not a value; set its keys (train.KEY=VALUE)"),
    Case("integer YAML 1.1 reads as octal", "cli", lambda t: exp(t, overrides=["train.steps=010"]),
         "key 'train.steps': expected an integer, got '010'"),
    Case("'~' the shell left alone", "cli", lambda t: _tilde(t),
         "run.dir='~/runs': nothing expands '~' here (not the shell in key=value, nor YAML)"),
    # DeepSpeed JSON
    Case("DeepSpeed config missing", "deepspeed", lambda t: read_ds_config(t / "none.json"), "DeepSpeed config not found"),
    Case("DeepSpeed JSON syntax", "deepspeed", lambda t: ds(t, '{"a": 1,}'), "not valid JSON (line 1"),
    Case("DeepSpeed JSON not an object", "deepspeed", lambda t: ds(t, "[1]"), "expected a JSON object at the top level"),
    Case("ZeRO stage 3", "deepspeed", lambda t: ds(t, '{"zero_optimization": {"stage": 3}}'),
         "key 'zero_optimization.stage': expected 0, 1 or 2 (DeepSpeed MoE does not support ZeRO-3), got 3"),
    Case("optimizer other than AdamW", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "SGD"}}'),
         "key 'optimizer.type': expected AdamW, got 'SGD'"),
    Case("unknown optimizer parameter", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}}'),
         "key 'optimizer.params.momentum': unknown"),
    Case("fp16 requested", "deepspeed", lambda t: ds(t, '{"fp16": {"enabled": true}}'), "key 'fp16.enabled': fp16 is not supported (use bf16)"),
    # values DeepSpeed itself would assert on (a traceback) or misread
    Case("micro batch of zero", "deepspeed", lambda t: ds(t, '{"train_micro_batch_size_per_gpu": 0}'),
         "key 'train_micro_batch_size_per_gpu': expected a positive integer, got 0"),
    Case("accumulation not an integer", "deepspeed", lambda t: ds(t, '{"gradient_accumulation_steps": 1.5}'),
         "key 'gradient_accumulation_steps': expected a positive integer, got 1.5"),
    # options desmoe cannot honour exactly: refused instead of silently changing the training
    Case("accumulation unlike the experiment's", "deepspeed", lambda t: ds(t, '{"gradient_accumulation_steps": 2}'),
         "key 'gradient_accumulation_steps': expected \"auto\" or 1 (the experiment's train.grad_accum), got 2"),
    Case("micro batch unlike the experiment's", "deepspeed", lambda t: ds(t, '{"train_micro_batch_size_per_gpu": 4}'),
         "key 'train_micro_batch_size_per_gpu': expected \"auto\" or 1 (the experiment's train.micro_batch), got 4"),
    Case("DeepSpeed LR scheduler", "deepspeed", lambda t: ds(t, '{"scheduler": {"type": "WarmupLR"}}'),
         "key 'scheduler': not supported (the learning rate comes from train.lr"),
    Case("key given twice in the JSON", "deepspeed", lambda t: ds(t, '{"train_micro_batch_size_per_gpu": 1, "train_micro_batch_size_per_gpu": 4}'),
         "key 'train_micro_batch_size_per_gpu' given twice in one object"),
    Case("Adam with L2 weight decay", "deepspeed",
         lambda t: ds(t, '{"optimizer": {"type": "Adam", "params": {"adam_w_mode": false, "weight_decay": 0.01}}}'),
         "key 'optimizer.params.adam_w_mode': expected true or unset (desmoe's optimizer is AdamW"),
    Case("ZeRO-Offload, older spelling", "deepspeed", lambda t: ds(t, '{"zero_optimization": {"stage": 2, "cpu_offload": true}}'),
         "key 'zero_optimization.cpu_offload': not supported"),
    Case("bf16 under both its names", "deepspeed", lambda t: ds(t, '{"bf16": {"enabled": true}, "bfloat16": {"enabled": false}}'),
         "key 'bfloat16': expected only one of 'bf16' and its older name 'bfloat16'"),
    Case("bf16 flag not boolean, older block name", "deepspeed", lambda t: ds(t, '{"bfloat16": {"enabled": "yes"}}'),
         "key 'bf16.enabled': expected true, false or \"auto\", got 'yes'"),
    Case("block DeepSpeed has removed", "deepspeed", lambda t: ds(t, '{"elasticity": {"enabled": false}}'),
         "ds.json: Elastic training has been removed; the 'elasticity' configuration block is no longer supported"),
    Case("ZeRO-Offload", "deepspeed", lambda t: ds(t, '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}'),
         "key 'zero_optimization.offload_optimizer': not supported"),
    Case("optimizer value \"auto\"", "deepspeed",
         lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": {"weight_decay": "auto"}}}'),
         "key 'optimizer.params.weight_decay': expected a number >= 0, got 'auto'"),
    Case("lr \"auto\" without train.lr", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}'),
         "key 'optimizer.params.lr': expected a number when train.lr is not set, got 'auto'"),
    Case("optimizer parameters not an object", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": [0.1]}}'),
         "key 'optimizer.params': expected an object, got [0.1]"),
    Case("clipping as a string", "deepspeed", lambda t: ds(t, '{"gradient_clipping": "1.0"}'),
         "key 'gradient_clipping': expected a number >= 0, got '1.0'"),
    Case("section not an object", "deepspeed", lambda t: ds(t, '{"zero_optimization": 2}'),
         "key 'zero_optimization': expected an object, got 2"),
    Case("flag as a string", "deepspeed", lambda t: ds(t, '{"zero_optimization": {"stage": 2, "overlap_comm": "true"}}'),
         "key 'zero_optimization.overlap_comm': expected true or false, got 'true'"),
    Case("bf16 flag not boolean", "deepspeed", lambda t: ds(t, '{"bf16": {"enabled": "yes"}}'),
         "key 'bf16.enabled': expected true, false or \"auto\", got 'yes'"),
    Case("one beta", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}}'),
         "key 'optimizer.params.betas': expected two numbers in [0, 1), got [0.9]"),
    Case("negative learning rate", "deepspeed", lambda t: ds(t, '{"optimizer": {"type": "AdamW", "params": {"lr": -1}}}'),
         "key 'optimizer.params.lr': expected a number > 0, got -1"),
    Case("tokenizer folder without tokenizer files", "data", lambda t: _hf_tokenizer(t),
         "no tokenizer files (expected tokenizer.json"),
    # what desmoe wrote, damaged afterwards (desmoe/integrity.py)
    Case("truncated data file", "integrity", lambda t: _damaged_data(t, truncate=True), "file is truncated"),
    Case("data file replaced by a longer one", "integrity", lambda t: _damaged_data(t, truncate=False),
         "file is longer than written"),
    Case("altered file, hashes requested", "integrity", lambda t: _altered_file(t), "file was altered (sha256 differs"),
    Case("run directory that is a file", "integrity", lambda t: _run_dir_is_a_file(t),
         "is a file, expected a run directory"),
    # data files
    Case("data path is not a folder", "data", lambda t: load_byte_corpus(TextCorpusConfig(path=str(t / "nope"))), "not a directory"),
    Case("no file matches the pattern", "data", lambda t: load_byte_corpus(TextCorpusConfig(path=str(files(t, {"a.md": "x"})))),
         "no files match '*.py'"),
    Case("too little text", "data", lambda t: load_byte_corpus(TextCorpusConfig(path=str(files(t, {"a.py": "x = 1\n"})))),
         "too little text"),
    # checkpoints
    Case("latest points nowhere", "checkpoint", lambda t: _latest_nowhere(t), "points to 'step00000007', which does not exist"),
    Case("latest is empty", "checkpoint", lambda t: _latest_nowhere(t, ""), "latest: is empty; write the tag of a checkpoint"),
    Case("unknown fine-tuning method", "config", lambda t: _unknown_method(), "desmoe.method 'lroa': expected one of"),
    Case("model key with an HF base", "config", lambda t: _desmoe_config("base.hf=some/hf-model", "model.top_k=1"),
         "key 'model.top_k': expected unset with base.hf (the model comes from some/hf-model; only model.ep_size"),
    Case("negative pretraining aux coefficient", "config", lambda t: _pretrain_config("train.aux_loss_coef=-1"),
         "key 'train.aux_loss_coef': expected a finite number >= 0, got -1.0"),
    Case("evaluation size not positive", "config", lambda t: _desmoe_config("evaluation.items_per_task=-1"),
         "key 'evaluation.items_per_task': expected a positive integer, got -1"),
    Case("sequence longer than an HF base", "config", lambda t: _hf_base_too_short(t),
         "key 'train.seq_len': expected at most the base's max_position_embeddings=64"),
    Case("model key an initial checkpoint contradicts", "config", lambda t: _pretrain_checkpoint_top1(t),
         "key 'model.top_k': expected unset or 2, the value in the init.kind=checkpoint model"),
    Case("shared expert width for a Mixtral", "config", lambda t: _pretrain_config("model.arch=mixtral",
                                                                                     "model.shared_ffn=512"),
         "key 'model.shared_ffn': expected unset with arch=mixtral (it has no dense layers or shared expert), got 512"),
    Case("accumulation of no micro-batch", "config", lambda t: _desmoe_config("train.grad_accum=0"),
         "key 'train.grad_accum': expected a positive integer, got 0"),
    # launcher / Slurm environment
    Case("torchrun variables incomplete", "environment", lambda t: resolve_env({"RANK": "0", "WORLD_SIZE": "2"}),
         "incomplete launcher environment: RANK, WORLD_SIZE set but MASTER_ADDR, MASTER_PORT missing"),
    Case("rank outside the world", "environment", lambda t: resolve_env({**TORCH_ENV, "RANK": "2"}), "rank 2 is not in a world of size 2"),
    Case("non-numeric rank", "environment", lambda t: resolve_env({**TORCH_ENV, "RANK": "one"}), "RANK='one': expected an integer"),
    Case("bad port", "environment", lambda t: resolve_env({**TORCH_ENV, "MASTER_PORT": "70000"}), "MASTER_PORT=70000: expected a port"),
    Case("Slurm variables incomplete", "environment",
         lambda t: resolve_env({k: v for k, v in SLURM_ENV.items() if k != "SLURM_LOCALID"}),
         "incomplete Slurm environment: SLURM_LOCALID missing (run the job with srun)"),
    Case("unreadable Slurm node list", "environment", lambda t: expand_hostlist("gpu[1-x]"), "cannot read the range '1-x'"),
    Case("JSON lr and another train.lr", "deepspeed", lambda t: _two_lrs(t),
         "key 'optimizer.params.lr': 0.0005, but train.lr=0.002 from "),
    # the downstream tasks' windows past the model's learned positions: an IndexError after the whole run
    Case("evaluation window beyond the model", "config",
         lambda t: _desmoe_config("data.source=data/demo", "model.max_seq_len=128", "train.seq_len=64"),
         "key 'evaluation.max_len': expected at most model.max_seq_len=128"),
]


def _two_lrs(tmp: Path):
    from desmoe.engine import fold_lr

    cfg = exp(tmp, "train:\n  lr: 0.002\n")
    return fold_lr(cfg, read_ds_config(json_file(tmp, '{"optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}}')))


def _tilde(tmp: Path):
    """`run.dir=~/runs` reaches the launcher as it is (bash expands ~ in assignments, not in key.path=value)."""
    from desmoe.cli import check_relative_paths

    return check_relative_paths(exp(tmp, overrides=["run.dir=~/runs"]), cwd=tmp)


def _unknown_method():
    from desmoe.recipes.des_moe.baselines import build_method
    from desmoe.recipes.des_moe.config import DESMoEConfig

    cfg = DESMoEConfig()
    cfg.method = "lroa"  # bypasses the config's own check, as a launcher setting it by hand would
    return build_method(cfg, total_steps=1, num_domains=2, aux_coef=0.0)


def _desmoe_config(*overrides: str):
    """An HF base brings its own architecture: a model.* key was ignored silently (top_k=1 ran as top-2)."""
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    return load_config(DESMoEExperiment, None, list(overrides))


def _pretrain_config(*overrides: str):
    from desmoe.recipes.lm.pretrain import PretrainExperiment

    return load_config(PretrainExperiment, None, list(overrides))


def _pretrain_checkpoint_top1(tmp: Path):
    """init.kind=checkpoint trains the checkpoint's architecture: model.top_k=1 trained its top-2 silently."""
    from desmoe.models.hf_build import MoEModelSpec, hf_config
    from desmoe.recipes.lm.pretrain import check_against

    cfg = _pretrain_config("init.kind=checkpoint", f"init.path={tmp}", "model.top_k=1")
    check_against(cfg.model, hf_config(MoEModelSpec(), vocab_size=64), "checkpoint", tmp)


def _hf_base_too_short(tmp: Path):
    """model.max_seq_len (checked in the config) does not apply to an HF base; its positions do."""
    from hf_tiny import save_tiny

    from desmoe.recipes.des_moe.base_model import build_model
    from desmoe.recipes.des_moe.config import DESMoEExperiment

    cfg = load_config(DESMoEExperiment, None, [f"base.hf={save_tiny('deepseek_v2', tmp / 'hf')}", "train.seq_len=128",
                                               "model.ep_size=1"])
    return build_model(cfg)


def _latest_nowhere(tmp: Path, tag: str = "step00000007"):
    from desmoe.checkpoint import latest_tag

    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "latest").write_text(tag)
    return latest_tag(tmp / "ckpt")


def _hf_tokenizer(tmp: Path):
    from desmoe.data.tokenizer import HFTokenizer

    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    return HFTokenizer(tmp / "model")


def _sealed(tmp: Path) -> Path:
    from desmoe.integrity import seal

    folder = tmp / "sealed"
    folder.mkdir()
    (folder / "meta.json").write_text('{"format": 1}')
    (folder / "train.bin").write_bytes(bytes(range(256)) * 4)
    seal(folder)
    return folder


def _damaged_data(tmp: Path, truncate: bool):
    from desmoe.data.prepared import PreparedData

    folder = _sealed(tmp)
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(data[:100] if truncate else data + b"x")
    return PreparedData(folder)


def _altered_file(tmp: Path):
    from desmoe.integrity import verify

    folder = _sealed(tmp)
    data = bytearray((folder / "train.bin").read_bytes())
    data[7] ^= 1  # same size: only the hash can tell
    (folder / "train.bin").write_bytes(bytes(data))
    assert verify(folder, "checkpoint")  # sizes agree
    return verify(folder, "checkpoint", hashes=True)


def _run_dir_is_a_file(tmp: Path):
    from desmoe.inspect_run import describe

    (tmp / "run.txt").write_text("not a run")
    return describe(tmp / "run.txt")


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, but the run lock's: each launch, failed or not, takes it and names itself in it."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def produce(case: Case, tmp: Path) -> str:
    with pytest.raises(UserError) as err:
        case.trigger(tmp)
    return str(err.value)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # a run directory the mistake must not touch
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    before = snapshot(tmp_path / "run")
    message = produce(case, work)
    assert case.expect in message
    assert "\n" not in message and len(message) < 400
    assert snapshot(tmp_path / "run") == before


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert {c.area for c in CASES} >= {"config", "cli", "deepspeed", "data", "checkpoint", "environment", "integrity"}


if __name__ == "__main__":
    import tempfile

    print("| # | area | mistake | message |\n|---|---|---|---|")
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                case.trigger(Path(tmp))
                message = "(no error!)"
            except UserError as err:
                message = str(err).replace(tmp, "<tmp>")
        print(f"| {i} | {case.area} | {case.name} | `{message}` |")
