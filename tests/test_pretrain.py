"""Pretraining an HF MoE from scratch on 2 real ranks (EP=2, ZeRO-2): learns, resumes
where it stopped, exports an HF checkpoint with a perplexity report, then is reused."""
import json
import math

import pytest
import torch

ROOT_CFG = "configs/pretrain_base.yaml"


def pretrain_on_ranks(root: str, run_dir: str, steps: int) -> dict:
    from desmoe.config import load_config
    from desmoe.recipes.lm.pretrain import PretrainExperiment, pretrain

    cfg = load_config(PretrainExperiment, f"{root}/{ROOT_CFG}", [
        "data.source=stdlib_bytes", f"train.steps={steps}", "train.save_every=3", "train.eval_every=3",
        "train.log_every=1", "train.eval_tokens=1000", "train.warmup_steps=2",
        "train.lr=0.005", "train.seq_len=32", "train.micro_batch=4", "model.hidden_size=32", "model.num_layers=2",
        "model.num_experts=4", "model.expert_ffn=32", "model.shared_ffn=32", "model.dense_ffn=64",
        f"run.dir={run_dir}", f"output.dir={run_dir}/base"])
    return pretrain(cfg, f"{root}/configs/zero2.json")


def test_pretrain_resume_export_reuse(ranks, tmp_path):
    from jobs import ROOT
    from transformers import AutoModelForCausalLM

    first = ranks.run(pretrain_on_ranks, str(ROOT), str(tmp_path), 3)[0]
    rows = [json.loads(line) for line in (tmp_path / "pretrain_base" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    # a longer run of the same experiment resumes at step 4 (not from scratch)
    (tmp_path / "base" / "report.json").unlink()
    second = ranks.run(pretrain_on_ranks, str(ROOT), str(tmp_path), 6)[0]
    rows = [json.loads(line) for line in (tmp_path / "pretrain_base" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert second["heldout_nll"] < first["heldout_nll"] < math.log(256)  # learning, better than uniform bytes
    assert second["unigram_ppl"] > 1 and second["test_ppl"] > 1 and second["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    assert type(model).__name__ == "DeepseekV2ForCausalLM" and model.config.n_routed_experts == 4
    # the export is reused as long as the config is the same
    again = ranks.run(pretrain_on_ranks, str(ROOT), str(tmp_path), 6)[0]
    assert again["train_s_this_run"] == second["train_s_this_run"]


def upcycle_on_ranks(root: str, run_dir: str, dense: str, kind: str = "upcycle", name: str = "pretrain_base",
                     seq_len: int = 16, *extra: str):
    from desmoe.config import load_config
    from desmoe.errors import UserError
    from desmoe.recipes.lm.pretrain import PretrainExperiment, pretrain

    cfg = load_config(PretrainExperiment, f"{root}/{ROOT_CFG}", [
        "data.source=stdlib_bytes", "train.steps=2", "train.eval_tokens=500", "train.warmup_steps=1",
        f"train.seq_len={seq_len}", "train.micro_batch=2", f"init.kind={kind}", f"init.path={dense}", "init.num_experts=4",
        "model.num_experts=4",  # the shipped config's 16 (for a scratch model) contradicts the upcycled model's 4
        f"run.dir={run_dir}", f"run.name={name}", f"output.dir={run_dir}/{name}-out", *extra])
    try:
        return pretrain(cfg, f"{root}/configs/zero2.json")
    except UserError as err:  # every rank must raise it: none may wait at a barrier for rank 0
        return f"UserError: {err}"


def test_upcycle_then_continue_pretraining(ranks, tmp_path):
    """A dense Llama is upcycled (copy mode) and trained on with EP=2; the router moves."""
    from jobs import ROOT
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(str(tmp_path / "dense"))
    ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "dense"))
    before = load_file(str(tmp_path / "pretrain_base" / "init" / "model.safetensors"))
    after = load_file(str(tmp_path / "pretrain_base-out" / "model.safetensors"))
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert gate in after and not torch.equal(before[gate], after[gate])
    # a bad dense folder fails on every rank, in one line; none is left waiting for rank 0 at a barrier
    bad = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "nope"), "upcycle", "bad")
    assert all(isinstance(r, str) and "not a directory" in r for r in bad), bad
    # continuing from the export (init.kind=checkpoint) into a run directory nothing has created yet
    cont = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "pretrain_base-out"), "checkpoint",
                     "cont")
    assert cont[0]["steps"] == 2 and (tmp_path / "cont" / "config.yaml").is_file()
    # the checkpoint's positions (64) bound seq_len, not model.max_seq_len (a scratch model's): refused everywhere
    long = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "pretrain_base-out"), "checkpoint",
                     "long", 64)
    assert all(isinstance(r, str) and "key 'train.seq_len': expected below the initial model's "
               "max_position_embeddings=64" in r for r in long), long
    # a model.* key the checkpoint contradicts was ignored (top_k=1 trained top-2): refused everywhere, before training
    top1 = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "pretrain_base-out"), "checkpoint",
                     "top1", 16, "model.top_k=1")
    assert all(isinstance(r, str) and "key 'model.top_k': expected unset or 2, the value in the init.kind=checkpoint "
               "model" in r for r in top1), top1
    assert not (tmp_path / "top1" / "checkpoints").exists()
    # an output folder whose replacement would delete the run (here: the folder holding it) is refused at the
    # start, on every rank; it was refused only by the export after the whole run
    held = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "pretrain_base-out"), "checkpoint",
                     "held", 16, f"output.dir={tmp_path}")
    assert all(isinstance(r, str) and "is the run directory" in r for r in held), held
    assert not (tmp_path / "held" / "checkpoints").exists()
    # too little evaluation text for every rank's batches: refused at the start, naming what to change (the
    # in-domain test split was cut only when the final report needed it, after the whole run)
    short = ranks.run(upcycle_on_ranks, str(ROOT), str(tmp_path), str(tmp_path / "pretrain_base-out"), "checkpoint",
                      "short", 16, "train.eval_tokens=40")
    assert all(isinstance(r, str) and "held-out split: raise train.eval_tokens" in r for r in short), short
    assert not (tmp_path / "short" / "checkpoints").exists()
    # what the run ran on, one line per start: the versions it imported, its world size
    import json
    import importlib.metadata as md

    env = [json.loads(line) for line in (tmp_path / "cont" / "environment.jsonl").read_text().splitlines()]
    assert len(env) == 1 and env[0]["start_step"] == 0 and env[0]["world_size"] == 2
    assert env[0]["packages"]["torch"] == md.version("torch") and env[0]["packages"]["deepspeed"] == md.version(
        "deepspeed") and env[0]["cpu"]["logical_cores"] >= 1


def test_an_export_made_before_a_key_existed_is_reused(tmp_path):
    """report.json of an export made before train.grad_accum existed: reused while the key keeps its default."""
    from jobs import ROOT

    from desmoe.config import load_config, to_dict
    from desmoe.recipes.lm.pretrain import PretrainExperiment, _cached

    cfg = load_config(PretrainExperiment, ROOT / ROOT_CFG, [f"output.dir={tmp_path}"])
    then = {k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}
    del then["train"]["grad_accum"]
    (tmp_path / "report.json").write_text(json.dumps({"heldout_ppl": 80.9, "config": then}))
    assert _cached(cfg)["heldout_ppl"] == 80.9
    cfg.train.grad_accum = 2
    assert _cached(cfg) is None
    cfg.train.grad_accum, cfg.train.steps = 1, cfg.train.steps + 1
    assert _cached(cfg) is None


def test_an_export_of_another_tokenizer_is_not_reused_nor_fine_tuned(tmp_path):
    """A data folder rebuilt with a retrained sentencepiece model keeps its vocabulary size: the embedded base
    exported with the old model (same config) was reused, and DES-MoE fine-tuned it on other token ids."""
    import hashlib
    from types import SimpleNamespace

    import torch

    from jobs import ROOT

    from desmoe.config import load_config, to_dict
    from desmoe.errors import UserError
    from desmoe.recipes.des_moe.base_model import check_vocab
    from desmoe.recipes.lm.pretrain import PretrainExperiment, _cached

    data, out = tmp_path / "data", tmp_path / "base"
    data.mkdir()
    out.mkdir()
    cfg = load_config(PretrainExperiment, ROOT / ROOT_CFG, [f"output.dir={out}", f"data.root={data}"])
    (out / "report.json").write_text(json.dumps({"heldout_ppl": 80.9, "config": {
        k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}}))
    (out / "tokenizer.model").write_bytes(b"the sentencepiece model the base was trained with")

    def meta(model: bytes):
        (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "sentencepiece",
                                                                  "sha256": hashlib.sha256(model).hexdigest()}}))

    meta(b"the sentencepiece model the base was trained with")
    assert _cached(cfg)["heldout_ppl"] == 80.9
    model = SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(8, 2))
    run = SimpleNamespace(base=SimpleNamespace(hf=str(out)), data=SimpleNamespace(source=str(data)))
    prepared = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=8), data=SimpleNamespace(root=data))
    check_vocab(model, prepared, run)
    meta(b"a sentencepiece model retrained on rebuilt data")
    with pytest.raises(UserError, match=rf"^output.dir={out}: {out}/tokenizer.model \(sha256 \w{{12}}\) is not the "
                                        rf"tokenizer of {data} .*; expected a base pretrained on this data: retrain it "
                                        r"from scratch with output.reuse=false run.resume=false$"):
        _cached(cfg)  # not silently retrained either: runs/<name> would resume the old model's checkpoints
    cfg.output.reuse = False
    assert _cached(cfg) is None
    with pytest.raises(UserError, match=rf"^base.hf={out}: {out}/tokenizer.model \(sha256 \w{{12}}\) is not the "
                                        rf"tokenizer of {data} \(sha256 \w{{12}}\): the model was trained on other "
                                        r"token ids; expected the data the base was pretrained on"):
        check_vocab(model, prepared, run)


def test_an_export_of_another_build_of_the_data_is_not_reused(tmp_path):
    """Same config and tokenizer, other documents (a folder rebuilt from superseded sources, or with other
    overrides into the same path): the export was reused, and its report's perplexities, taken on the old
    data, printed as this data's.  An export made before the report carried the fingerprint is reused."""
    from jobs import ROOT

    from desmoe.config import load_config, to_dict
    from desmoe.data.prepared import fingerprint
    from desmoe.errors import UserError
    from desmoe.recipes.lm.pretrain import PretrainExperiment, _cached

    data, out = tmp_path / "data", tmp_path / "base"
    data.mkdir()
    out.mkdir()
    cfg = load_config(PretrainExperiment, ROOT / ROOT_CFG, [f"output.dir={out}", f"data.root={data}"])
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "hf"}, "counts": {"general": 1}}))
    report = {"heldout_ppl": 80.9, "config": {k: to_dict(cfg)[k] for k in ("model", "init", "data", "train")}}
    (out / "report.json").write_text(json.dumps(report))
    assert _cached(cfg)["heldout_ppl"] == 80.9  # made before the fingerprint was recorded: as before
    (out / "report.json").write_text(json.dumps(dict(report, data_fingerprint=fingerprint(data))))
    assert _cached(cfg)["heldout_ppl"] == 80.9
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "hf"}, "counts": {"general": 2}}))
    with pytest.raises(UserError, match=rf"^output.dir={out}: it was pretrained on another build of {data} \(data "
                                        r"fingerprint \w{12}, now \w{12}\), .*: retrain it from scratch with "
                                        r"output.reuse=false run.resume=false$"):
        _cached(cfg)
