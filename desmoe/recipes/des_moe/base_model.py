"""The pretrained MoE a multi-domain run adapts: an HF checkpoint on desmoe's EP blocks or desmoe's
MoELM, optionally with the weights of a desmoe checkpoint (``base.checkpoint``)."""
from __future__ import annotations

from pathlib import Path

import torch

from desmoe import checkpoint
from desmoe.config import bad
from desmoe.errors import UserError
from desmoe.models.moe_lm import MoELM


def build_model(cfg):
    """The pretrained MoE to adapt: an HF checkpoint on desmoe's EP blocks, or desmoe's MoELM."""
    if cfg.base.hf:
        from desmoe.models.hf_moe import load_hf_moe

        model = load_hf_moe(cfg.base.hf, ep_size=cfg.model.ep_size, bias_update_rate=cfg.base.bias_update_rate)
        from desmoe.moe import moe_blocks

        if not moe_blocks(model):  # the methods adapt experts and routers: DGES stopped on blocks[0] (IndexError)
            raise UserError(f"base.hf={cfg.base.hf}: no sparse MoE layer (config.json's first_k_dense_replace / "
                            f"mlp_only_layers / decoder_sparse_step leave all {len(model.model.layers)} layers dense)")
        model.config.use_cache = False
        # model.max_seq_len (checked in the config) does not describe an HF base: without this, a seq_len
        # beyond the positions it was trained for runs on silently (and a huge one runs out of memory)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and cfg.train.seq_len > limit:
            raise bad("train.seq_len", f"at most the base's max_position_embeddings={limit} ({cfg.base.hf})",
                      cfg.train.seq_len)
        return model
    model = MoELM(cfg.model)
    model.setup_expert_parallel()
    return model


def check_vocab(model, data, cfg) -> None:
    """The data's token ids must have embedding rows: without this check a base with a smaller vocabulary
    than the data's tokenizer (stdlib's 256 bytes, a prepared folder's sentencepiece) stops in the first
    forward with a traceback ("index out of range")."""
    n = getattr(getattr(data, "tokenizer", None), "vocab_size", None) or getattr(data, "vocab_size", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed
    if n is not None and n > embed.num_embeddings:
        what = f"base.hf={cfg.base.hf}: key 'vocab_size'" if cfg.base.hf else "key 'model.vocab_size'"
        raise UserError(f"{what}: expected at least the {n} token ids of the data (data.source={cfg.data.source}), "
                        f"got {embed.num_embeddings} (a base built for another tokenizer?)")
    root = getattr(getattr(data, "data", None), "root", None)  # a prepared folder (not stdlib)
    if cfg.base.hf and root is not None:  # same vocabulary size, other ids: a data folder rebuilt since
        from desmoe.data.prepared import shipped_tokenizer_differs

        why = shipped_tokenizer_differs(cfg.base.hf, root)
        if why:
            raise UserError(f"base.hf={cfg.base.hf}: {why}; expected the data the base was pretrained on, or a "
                            f"base re-pretrained on this data (launcher/pretrain.py)")


def load_base(engine, path: str) -> None:
    """Pretrained weights only (optimizer starts fresh); parameters the base lacks (the ALR) keep their init."""
    from desmoe.recipes.des_moe.alr import alr_routers

    tag = checkpoint.latest_tag(path)
    if tag is None:
        raise UserError(f"base.checkpoint='{path}': no 'latest' checkpoint there")
    # DeepSpeed restores parameters with requires_grad=False from the checkpoint's own list of frozen
    # parameters, which a base trained without the ALR lacks; the module weights load either way.
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        loaded, _ = engine.load_checkpoint(path, tag=tag, load_module_only=True, load_module_strict=False,
                                           load_optimizer_states=False, load_lr_scheduler_states=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if loaded is None:
        raise UserError(f"base.checkpoint='{path}': not a loadable DeepSpeed checkpoint")
    _load_wrapped_dense(engine.module, Path(path) / tag)
    for router in alr_routers(engine.module):
        router.reinit_from_teacher()  # the step-0 identity must hold for the loaded router
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        # ZeRO's fp32 master copy (which every step copies back, frozen groups included) must hold
        # the weights written into the module above.
        engine.optimizer.refresh_fp32_params()


def _load_wrapped_dense(model, tag_dir: Path) -> bool:
    """Dense weights of layers a method wrapped (peft's LoRA moves ``x.weight`` to ``x.base_layer.weight``),
    which the name-keyed load above skipped; anything else missing from the base is an error."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        return False
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    state = model.state_dict()
    missing, copied = [], False
    for key, value in state.items():
        if key in saved or "deepspeed_experts" in key or ".mlp_in." in key or ".mlp_out." in key or "lora_" in key:
            continue
        source = key.replace(".base_layer.", ".")
        if source in saved:
            with torch.no_grad():
                value.copy_(saved[source])
            copied = True
        else:
            missing.append(key)
    if missing:
        raise UserError(f"{tag_dir}: the base checkpoint has no '{missing[0]}' ({len(missing)} missing; "
                        f"same model.* as the base?)")
    return copied
