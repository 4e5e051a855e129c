"""The CUDA path's properties that a CPU run can still check: what a routed forward asks the device for."""
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert, load_balancing_loss

# aten ops whose CUDA kernels read a device value back to the host (the stream waits for the GPU):
# bincount reads the largest id to size its output, nonzero / masked_select / unique their output
# length, repeat_interleave without output_size its total, _local_scalar_dense is .item().  (A .tolist()
# reads back too but is no aten op on a CPU tensor: the split sizes an all-to-all needs are read that way.)
CUDA_SYNCING = {"aten.bincount", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
                "aten.unique_consecutive", "aten.repeat_interleave", "aten._local_scalar_dense"}


class _SyncingOps(TorchDispatchMode):
    """Records syncing ops, except those of desmoe.kernels (CPU-only C loops, never on a CUDA path)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        sized = name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is not None
        if name in CUDA_SYNCING and not sized and not _inside_cpu_kernels():
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _inside_cpu_kernels() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "desmoe/kernels" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


def test_routing_aux_loss_and_load_count_without_host_sync():
    """The router, its auxiliary loss and the bias-update load count run in every MoE layer's forward: on
    CUDA a bincount there (it sizes its output from the largest id) stalled every layer on the host."""
    torch.manual_seed(0)
    block = MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 2, selection_bias=True, bias_update_rate=0.01))
    block.train()
    x = torch.randn(3, 5, 8)
    with _SyncingOps() as ops:
        block(x)
        load_balancing_loss(block.last_routing.scores, block.last_routing.expert_ids, 4)
    assert ops.seen == [], f"ops that wait for the device in the routed forward: {ops.seen}"
    # the counts themselves are unchanged: the routes per expert
    ids = block.last_routing.expert_ids.reshape(-1)
    assert torch.equal(block.pending_load, torch.bincount(ids, minlength=4).float())


def ep_case():
    torch.manual_seed(0)
    block = MoEBlock(16, SwiGLUExpert(16, 24), LinearRouter(16, 4, 2), ep_size=2)
    block.set_deepspeed_parallelism()
    block.init_experts(seed=7)
    x = torch.randn(2, 12, 16, requires_grad=True)
    with _SyncingOps() as ops:
        block(x).square().sum().backward()
    return ops.seen


def test_expert_parallel_dispatch_reads_back_only_split_sizes(ranks):
    """EP = 2: the all-to-all's split sizes are read on the host once; the rest of the dispatch (the
    received rows' regrouping, forward and backward) asks the device for nothing."""
    assert ranks.run(ep_case) == [[], []]


def test_dges_counts_every_step_without_host_sync():
    """DES-MoE counts every layer's routing by domain after every training step: counted on the device,
    with no size read back per layer (a boolean selection and two bincounts each, before)."""
    from desmoe.recipes.des_moe.dges import DomainExpertMap

    torch.manual_seed(0)
    model = torch.nn.ModuleList(MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 2)) for _ in range(2))
    x = torch.randn(12, 8)
    for block in model:
        block(x)
    token_domain = torch.tensor([0, 1, 2, -1] * 3)  # -1: a token no domain counts (padding, prompt)
    dmap = DomainExpertMap(2, 3, 4)
    with _SyncingOps() as ops:
        dmap.record_model(model, token_domain)
    again = DomainExpertMap(2, 3, 4)
    again.record_model(model, token_domain.int())  # an int32 domain tensor counts the same
    assert torch.equal(again.window, dmap.window) and torch.equal(again.window_tokens, dmap.window_tokens)
    assert ops.seen == [], f"ops that wait for the device in DGES's per-step count: {ops.seen}"
    for layer, block in enumerate(model):  # the counts themselves: (domain, expert) routes, tokens per domain
        ids, valid = block.last_routing.expert_ids, token_domain >= 0
        pairs = (token_domain[valid].unsqueeze(1) * 4 + ids[valid]).reshape(-1)
        assert torch.equal(dmap.window[layer], torch.bincount(pairs, minlength=12).view(3, 4).double())
        assert torch.equal(dmap.window_tokens[layer], torch.bincount(token_domain[valid], minlength=3).double())
