"""HF MoE causal LMs on desmoe's expert-parallel block, and back.

``load_hf_moe(path, ep_size)`` builds the checkpoint's own transformers model
(attention, norms, dense layers, embeddings untouched) with every sparse MoE
block replaced by a :class:`desmoe.moe.MoEBlock` carrying the same weights and
the same routing rule (see ``hf_arch``).  The skeleton is built on the meta
device, so nothing is allocated twice, and each rank reads from disk only its
own experts (by global id, DeepSpeed's layout).  ``export_hf(model, out_dir)``
gathers the experts from all EP ranks and writes an ordinary HF checkpoint
that ``AutoModelForCausalLM.from_pretrained`` loads.  ``hf_names`` (desmoe's
names -> the family's) and ``write_hf_folder`` (staged, sealed, renamed) are
shared with ``desmoe.export``, which writes the same folders from checkpoints.

Call ``load_hf_moe`` after the process group exists (``init_distributed``)
when ``ep_size > 1``; it creates DeepSpeed's expert-parallel groups itself.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from desmoe import integrity
from desmoe.checkpoint import replace_dir_atomic
from desmoe.errors import UserError
from desmoe.models.hf_arch import MoEArch, arch_for, experts_from_hf, experts_to_hf
from desmoe.models.hf_io import CheckpointTensors, checkpoint_config, refuse_untied_head
from desmoe.moe import LinearRouter, MoEBlock

MOE_ATTR = "desmoe_hf"  # the model attribute holding (arch, original config)


class TupleMoEBlock(MoEBlock):
    """For decoder layers that unpack (hidden states, router weights) from their MLP (GPT-OSS)."""

    def forward(self, hidden_states: Tensor):  # type: ignore[override]
        out = super().forward(hidden_states)
        return out, self.last_routing.weights


def _build_block(arch: MoEArch, cfg, hf_block: nn.Module, ep_size: int) -> MoEBlock:
    d = cfg.hidden_size
    router = LinearRouter(d, arch.num_experts(cfg), bias=arch.router_bias, **arch.router(cfg))
    shared = getattr(hf_block, arch.shared) if arch.shared else None  # the model's own MLP module
    cls = TupleMoEBlock if arch.returns_tuple else MoEBlock
    return cls(d, arch.expert(cfg), router, ep_size=ep_size, shared=shared, shared_gate=arch.shared_gate is not None)


def moe_layer_ids(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEBlock)]


def _check_ep(num_experts: int, ep_size: int, source: str) -> None:
    import torch.distributed as dist

    if ep_size < 1 or num_experts % ep_size:
        raise UserError(f"{source}: ep_size {ep_size} does not divide the checkpoint's {num_experts} experts")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % ep_size:
        raise UserError(f"ep_size {ep_size} does not divide the world size {world}")


def load_hf_moe(path: str | Path, ep_size: int = 1, dtype: torch.dtype = torch.float32,
                bias_update_rate: float = 0.0) -> nn.Module:
    """The HF model at ``path`` with desmoe MoE blocks holding this rank's experts.

    ``bias_update_rate`` > 0 (families with a selection bias, e.g. DeepSeek-V3's
    ``e_score_correction_bias``): the bias follows the auxiliary-loss-free balancing rule, one step
    of ``rate * sign(mean load - load)`` per ``desmoe.moe.update_selection_biases(model)`` call (the
    trainer calls it after each optimizer step); 0 keeps the checkpoint's bias fixed."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if dtype not in (torch.float32, torch.bfloat16):  # the fused SwiGLU kernels (desmoe.kernels) take these two
        raise UserError(f"load_hf_moe: dtype {dtype}: expected torch.float32 or torch.bfloat16 (fp16 training "
                        f"is not supported; load in fp32 and let DeepSpeed's bf16 engine cast)")
    integrity.verify(path, "model folder")  # a folder desmoe exported: every file complete
    cfg = checkpoint_config(path)
    arch = arch_for(cfg, str(path / "config.json"))
    _check_ep(arch.num_experts(cfg), ep_size, str(path))
    if bias_update_rate and not arch.selection_bias:
        raise UserError(f"{path}: bias_update_rate {bias_update_rate}: architecture '{arch.model_type}' has no "
                        f"selection bias to update (deepseek_v3 and glm4_moe have one)")
    source = CheckpointTensors(path, arch.renames)
    original = copy.deepcopy(cfg)
    cfg.output_router_logits = False  # the HF router modules are gone; desmoe keeps routing on the blocks
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except (KeyError, ValueError, TypeError) as err:  # e.g. an unknown rope_type: transformers' KeyError
        text = " ".join(str(err).split())[:200]
        raise UserError(f"{path / 'config.json'}: transformers cannot build this model from it "
                        f"({type(err).__name__}: {text})") from None
    for i, layer in enumerate(model.model.layers):
        if arch.is_moe_layer(cfg, i):
            with torch.device("meta"):
                layer.mlp = _build_block(arch, cfg, layer.mlp, ep_size)
    model.to_empty(device="cpu")
    model.to(dtype)
    restore_buffers(model)
    blocks = {i: model.model.layers[i].mlp for i in moe_layer_ids(model)}
    for block in blocks.values():
        block.router.bias_update_rate = float(bias_update_rate)
        if block.router.selection_bias is not None:  # fp32 like transformers keeps it: small steps must not round away
            block.router.selection_bias = block.router.selection_bias.float()
        for p in block.local_experts.parameters():  # to_empty made new Parameters: re-tag them as
            p.allreduce, p.group_name = False, block.expert_group_name  # DeepSpeed's Experts does
        if ep_size > 1 or torch.distributed.is_initialized():
            block.set_deepspeed_parallelism()  # DeepSpeed's EP groups; fixes this rank's experts
    with torch.no_grad():
        _load_dense(model, source, skip=tuple(f"model.layers.{i}.mlp." for i in blocks), tied=cfg.tie_word_embeddings)
        for i, block in blocks.items():
            _load_block(block, source, arch, f"model.layers.{i}.mlp")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    setattr(model, MOE_ATTR, (arch, original))
    return model


def restore_buffers(model: nn.Module) -> None:
    """Non-persistent buffers are not in checkpoints; after ``to_empty`` recompute them."""
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise NotImplementedError(f"cannot rebuild buffers {sorted(names)} of {type(module).__name__}")
        model._init_weights(module)


def _fill(dst: Tensor, src: Tensor, key: str, source: CheckpointTensors) -> None:
    """Copy a checkpoint tensor into the parameter config.json sized; ``copy_`` alone would broadcast a
    smaller one (e.g. a norm weight of shape [1]) silently, or fail with a bare size message."""
    if tuple(src.shape) != tuple(dst.shape):
        raise UserError(f"{source.path}: tensor '{key}': expected shape {list(dst.shape)} (from config.json), "
                        f"got {list(src.shape)}")
    dst.copy_(src)


def _load_dense(model: nn.Module, source: CheckpointTensors, skip: tuple[str, ...], tied: bool) -> None:
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(skip) or (tied and name == "lm_head.weight"):
            continue
        _fill(tensor.data, source.get(name), name, source)
    if tied and "lm_head.weight" in source:
        refuse_untied_head(source.get("lm_head.weight"), source.get("model.embed_tokens.weight"),
                           source.path / "config.json")


def _load_block(block: MoEBlock, source: CheckpointTensors, arch: MoEArch, prefix: str) -> None:
    router = f"{prefix}.{arch.router_name}"
    _fill(block.router.proj.weight, source.get(f"{router}.weight"), f"{router}.weight", source)
    if arch.router_bias:
        _fill(block.router.proj.bias, source.get(f"{router}.bias"), f"{router}.bias", source)
    if arch.selection_bias:
        key = f"{router}.{arch.selection_bias}"
        _fill(block.router.selection_bias, source.get(key), key, source)
    ids = block.local_global_ids()
    tensors = experts_from_hf(arch, source, prefix, ids)
    for local_id, expert in enumerate(block.local_experts):
        params = dict(expert.named_parameters())
        for name, stacked in tensors.items():
            if len(stacked) != len(ids):  # a fused tensor with fewer experts than config.json says
                raise UserError(f"{source.path}: tensor '{prefix}.experts' ({name}): expected "
                                f"{block.num_experts} experts (config.json), found {ids.start + len(stacked)}")
            _fill(params[name], stacked[local_id], f"{prefix}.experts.{ids[local_id]} ({name})", source)
    if block.shared is not None:
        for name, tensor in block.shared.state_dict(keep_vars=True).items():
            key = f"{prefix}.{arch.shared}.{name}"
            _fill(tensor.data, source.get(key), key, source)
    if block.shared_gate is not None:
        key = f"{prefix}.{arch.shared_gate}.weight"
        _fill(block.shared_gate.weight, source.get(key), key, source)


def _gather_experts(block: MoEBlock) -> dict[str, Tensor]:
    """{expert parameter name: [E, ...]} over all experts, from every EP rank."""
    names = [name for name, _ in block.local_experts[0].named_parameters()]
    local = {name: torch.stack([dict(e.named_parameters())[name].detach() for e in block.local_experts])
             for name in names}
    if block.ep_size == 1:
        return local
    import deepspeed.comm as dist

    group = block.deepspeed_moe.ep_group
    out = {}
    for name, t in local.items():
        parts = [torch.empty_like(t) for _ in range(block.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=group)  # EP rank order = global id order
        out[name] = torch.cat(parts)
    return out


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the HF (transformers-5, fused-expert) names; collective."""
    arch, _ = getattr(model, MOE_ATTR)
    experts = {i: _gather_experts(model.model.layers[i].mlp) for i in moe_layer_ids(model)}
    dense = {k: v for k, v in model.state_dict().items() if EXPERT_KEY not in k}
    return hf_names(arch, dense, experts)


EXPERT_KEY = ".deepspeed_moe.experts."  # the routed experts' parameters inside an MoE block


def hf_names(arch: MoEArch, dense: dict[str, Tensor], experts: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """desmoe's names -> the family's: ``dense`` is the training model's state without the routed
    experts, ``experts`` {layer: {expert parameter name: [E, ...]}} in desmoe's layout, logical order.
    The one mapping behind every export (in-memory ``export_hf`` and ``desmoe.export`` from checkpoints)."""
    state: dict[str, Tensor] = {}
    moe_prefixes = tuple(f"model.layers.{i}.mlp." for i in experts)
    for i, stacked in experts.items():
        prefix = f"model.layers.{i}.mlp"
        router = f"{prefix}.{arch.router_name}"
        state[f"{router}.weight"] = dense[f"{prefix}.router.proj.weight"]
        if arch.router_bias:
            state[f"{router}.bias"] = dense[f"{prefix}.router.proj.bias"]
        if arch.selection_bias:
            state[f"{router}.{arch.selection_bias}"] = dense[f"{prefix}.router.selection_bias"]
        for name, t in experts_to_hf(arch, stacked).items():
            state[f"{prefix}.experts.{name}"] = t
        for key, t in dense.items():
            if arch.shared and key.startswith(f"{prefix}.shared."):
                state[f"{prefix}.{arch.shared}." + key[len(f"{prefix}.shared."):]] = t
        if arch.shared_gate and f"{prefix}.shared_gate.weight" in dense:
            state[f"{prefix}.{arch.shared_gate}.weight"] = dense[f"{prefix}.shared_gate.weight"]
    for name, t in dense.items():
        if not name.startswith(moe_prefixes):
            state[name] = t
    return state


def export_hf(model: nn.Module, out_dir: str | Path, tokenizer=None,
              extra_files: Optional[dict[str, str | Path]] = None) -> Optional[Path]:
    """Write an HF checkpoint of ``model`` (all experts) to ``out_dir``, atomically.

    ``extra_files`` maps a file name in ``out_dir`` to a file to copy there (inside the swap).

    Collective: every rank must call it; global rank 0 writes.  Returns the path on rank 0.
    """
    import torch.distributed as dist

    if not hasattr(model, MOE_ATTR):
        raise UserError("export_hf: the model was not built by desmoe.models (load_hf_moe / upcycle)")
    state = hf_state_dict(model)
    out_dir = Path(out_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        write_hf_folder(getattr(model, MOE_ATTR)[1], state, out_dir, tokenizer=tokenizer, extra_files=extra_files)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank0 else None


def write_hf_folder(cfg, state: dict[str, Tensor], out_dir: str | Path, tokenizer=None,
                    extra_files: Optional[dict[str, str | Path]] = None, model_class=None,
                    texts: Optional[dict[str, str]] = None) -> Path:
    """Save ``state`` as the model ``model_class`` (default: the family's own) of config ``cfg`` at ``out_dir``:
    staged, sealed, renamed into place.  ``texts`` {file name: content} are written beside the weights."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    with torch.device("meta"):
        hf = model_class(cfg) if model_class is not None else AutoModelForCausalLM.from_config(cfg)
    hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    restore_buffers(hf)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, staging / name)
        for name, text in (texts or {}).items():
            (staging / name).write_text(text)
        integrity.seal(staging)
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own SafetensorError
        from desmoe.errors import TrainingFailure

        shutil.rmtree(staging, ignore_errors=True)  # the space a full disk needs back; out_dir is untouched
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise TrainingFailure(f"{out_dir}: cannot write the model folder ({type(err).__name__}: {first}; "
                              f"{shutil.disk_usage(staging.parent).free / 2**20:.0f} MiB free there); "
                              f"nothing was replaced") from None
    return replace_dir_atomic(staging, out_dir)


def check_tokenizer(tokenizer, config, where: str = "tokenizer") -> None:
    """A tokenizer fits a checkpoint when every id it can produce has an embedding row and
    its special ids agree.  Takes HF tokenizers and desmoe.data's tokenizer wrappers."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)
    if n > config.vocab_size:
        raise UserError(f"{where}: {n} tokens but the checkpoint's vocab_size is {config.vocab_size} "
                        f"(tokenizer does not match the checkpoint)")
    for name in ("eos", "bos"):
        tok_id = getattr(tokenizer, f"{name}_token_id", getattr(tokenizer, f"{name}_id", None))
        cfg_id = getattr(config, f"{name}_token_id", None)
        if isinstance(tok_id, int) and isinstance(cfg_id, int) and tok_id != cfg_id:
            raise UserError(f"{where}: {name} id {tok_id} differs from the checkpoint's {cfg_id} "
                            f"(tokenizer does not match the checkpoint)")
