"""What a user's DeepSpeed JSON asks for is what the engine runs with, on 2 real ranks: the optimizer's
hyper-parameters (desmoe builds the optimizer, DeepSpeed never sees the block), the clip, the ZeRO stage, the
precision, the batch triple and the gradient communication dtype."""
import json

import pytest
import torch

CASES = [
    {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "train_batch_size": 16,
     "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05}}},
    {"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0, "bf16": {"enabled": False},
     "communication_data_type": "fp32",
     "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.5, 0.99], "eps": 1e-7, "weight_decay": 0.0,
                                               "adam_w_mode": True, "torch_adam": True}}},
]


def engine_settings(path):
    from desmoe.engine import build_engine, read_ds_config, resolve_ds_config
    from desmoe.models.moe_lm import MoELM, MoELMConfig

    cfg = MoELMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32, num_experts=4,
                      top_k=2, ffn_size=32, ep_size=2, init_seed=0)
    model = MoELM(cfg)
    model.setup_expert_parallel()
    raw = read_ds_config(path)
    params = raw["optimizer"]["params"]
    lr = params["lr"] if params["lr"] != "auto" else 1e-3  # what fold_lr makes train.lr for a number in the JSON
    engine, _ = build_engine(model, resolve_ds_config(raw, micro_batch=4, grad_accum=2, lr=lr))
    opt = engine.optimizer.optimizer  # ZeRO-1/2 wrap desmoe's optimizer
    return {"clip": engine.gradient_clipping(), "stage": engine.zero_optimization_stage(),
            "bf16": engine.bfloat16_enabled(), "batch": engine.train_batch_size(),
            "micro": engine.train_micro_batch_size_per_gpu(), "accum": engine.gradient_accumulation_steps(),
            "comm": str(engine.communication_data_type),
            "groups": [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in opt.param_groups]}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_engine_runs_with_what_the_json_says(ranks, tmp_path, case):
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", **CASES[case]}
    path = tmp_path / "user.json"
    path.write_text(json.dumps(ds))
    p = ds["optimizer"]["params"]
    want_lr = p["lr"] if p["lr"] != "auto" else 1e-3
    for got in ranks.run(engine_settings, str(path)):
        assert got["clip"] == ds["gradient_clipping"]
        assert got["stage"] == ds["zero_optimization"]["stage"]
        assert got["bf16"] is False  # "auto" on this CPU, false as written
        assert (got["micro"], got["accum"], got["batch"]) == (4, 2, 4 * 2 * 2)
        if "communication_data_type" in ds:
            assert got["comm"] == str(torch.float32)
        assert got["groups"]
        for lr, betas, eps, wd in got["groups"]:
            assert (lr, betas, eps) == (want_lr, tuple(p["betas"]), p["eps"])
            assert wd in (p["weight_decay"], 0.0)  # 0 for the groups build_param_groups never decays
        assert any(wd == p["weight_decay"] for *_, wd in got["groups"])
