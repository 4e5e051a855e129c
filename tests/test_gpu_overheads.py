"""Per-step costs of the CUDA path that a CPU run can still check (see also tests/test_gpu_paths.py)."""
from types import SimpleNamespace

import torch

import desmoe.engine as engine


def test_bf16_auto_refuses_emulated_bf16(monkeypatch):
    """"bf16": {"enabled": "auto"} on a pre-Ampere GPU (compute capability 7.x): torch's default
    is_bf16_supported() says True there because a bf16 tensor can be created (emulated, slow); "auto"
    must pick bf16 only where the GPU runs it natively.  The device is described to torch's own check."""
    monkeypatch.setattr(engine, "use_cuda", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    for major, native in ((7, False), (8, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=major: SimpleNamespace(major=m))
        cfg = engine.resolve_ds_config({"bf16": {"enabled": "auto"}}, micro_batch=1)
        assert cfg["bf16"]["enabled"] is native, (major, cfg["bf16"])


def rank0_thread_device_case():
    """What device fn runs on, with CUDA's per-thread current device described to torch.cuda: a new
    host thread starts on device 0 whatever device the thread that started it had set."""
    import threading

    from desmoe.collectives import on_rank0

    per_thread = threading.local()
    saved = torch.cuda.is_initialized, torch.cuda.current_device, torch.cuda.set_device
    torch.cuda.is_initialized = lambda: True
    torch.cuda.current_device = lambda: getattr(per_thread, "device", 0)
    torch.cuda.set_device = lambda d: setattr(per_thread, "device", d)
    try:
        torch.cuda.set_device(1)  # this rank's device (local rank 1 of its node)
        return on_rank0(torch.cuda.current_device, poll_s=0.05)
    finally:
        torch.cuda.is_initialized, torch.cuda.current_device, torch.cuda.set_device = saved


def test_on_rank0_runs_fn_on_the_callers_device(ranks):
    assert ranks.run(rank0_thread_device_case) == [(1, None), (None, None)]


class _HostCopies(torch.overrides.TorchFunctionMode):
    """Records each ``.to`` / ``.cuda`` / ``copy_`` of one of ``tables`` (host tensors that live across
    forwards): on CUDA each is a blocking copy of pageable memory, i.e. a wait for the GPU."""

    def __init__(self, tables) -> None:
        super().__init__()
        self.tables, self.seen = [t for t in tables if t is not None], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        moved = args[1:2] if func is torch.Tensor.copy_ else args[:1]
        if getattr(func, "__name__", "") in ("to", "cuda", "copy_") and any(m is t for m in moved for t in self.tables):
            self.seen += 1
        return func(*args, **(kwargs or {}))


def _slotted_block():
    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert
    from desmoe.moe.slots import add_spare_slots

    torch.manual_seed(0)
    block = MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 2))
    add_spare_slots(block, 2)  # slot_of_expert: logical expert -> slot
    return block


def test_slot_tables_are_not_copied_to_the_device_every_forward():
    block, x = _slotted_block(), torch.randn(6, 8)
    keys = set(block.state_dict())
    plain = block(x)
    for fanout in (None, torch.tensor([[0, 4], [1, -1], [2, 5], [3, -1]])):
        block.slot_fanout = fanout
        first = block(x)
        with _HostCopies([block.slot_of_expert, block.slot_fanout]) as ops:
            again = block(x)
        assert ops.seen == 0, "a slot table was copied again in a later forward"
        assert torch.equal(again, first)
    block.slot_fanout = None
    assert torch.equal(block(x), plain) and set(block.state_dict()) == keys
    block.slot_of_expert.fill_(4)  # changed in place (every expert on spare slot 4): the next forward uses it
    assert not torch.equal(block(x), plain)


def test_dges_tables_are_not_copied_to_the_device_every_forward():
    from desmoe.recipes.des_moe.dges import DomainExpertMap
    from desmoe.recipes.des_moe.duplication import ExpertCopies

    dom = torch.tensor([0, 1, -1, 1])
    dmap = DomainExpertMap(1, 2, 4)
    dmap.M = torch.tensor([[[True, False, True, False], [False, True, True, True]]])
    copies = ExpertCopies([_slotted_block()], 2, 2)
    copies.tables[0][1, 2] = 5  # domain 1's tokens routed to expert 2 run on spare slot 5
    first = dmap.route_mask(0, dom), copies.route_slots(0, dom)
    with _HostCopies([dmap.M, *copies.tables, *copies.originals]) as ops:
        again = dmap.route_mask(0, dom), copies.route_slots(0, dom)
    assert ops.seen == 0, "a DGES table was copied again in a later forward"
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(first[0], dmap.M[0][dom.clamp_min(0)] & (dom >= 0).unsqueeze(1))
    assert first[1][1].tolist() == [0, 1, 5, 3] and first[1][2].tolist() == copies.originals[0].tolist()
    copies.tables[0][1, 2] = 4  # a table changed in place is seen by the next forward
    assert copies.route_slots(0, dom)[1].tolist() == [0, 1, 4, 3]


def test_loop_backend_weight_mask_selects_no_rows_off_the_cpu():
    """The loop backend off the CPU (fp32 or unaligned widths on a GPU) with a weight-gradient mask:
    torch.nonzero per expert made the backward wait for the GPU once per expert and layer.  Run on the
    meta device (no CPU kernels, and a nonzero there cannot be sized); the math of zeroed rows is the
    grouped_mm backend's, checked against the loop in tests/test_grouped_mm.py."""
    from desmoe.moe import SwiGLUExpert
    from desmoe.moe.grouped import grouped_swiglu

    experts = [SwiGLUExpert(8, 16).to("meta") for _ in range(3)]
    x = torch.empty(10, 8, device="meta", requires_grad=True)
    w = torch.empty(10, device="meta", requires_grad=True)
    keep = torch.empty(10, dtype=torch.bool, device="meta")
    grouped_swiglu(x, [3, 0, 7], experts, route_w=w, keep=keep, backend="loop").sum().backward()
    assert [tuple(e.gate_up.weight.grad.shape) for e in experts] == [(32, 8)] * 3
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


class _Reads(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__"):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_dges_keeps_each_steps_counts_on_the_device_until_read():
    """DGES counted every micro-batch's routing on the device, then read the counts back (``.cpu()``) at once:
    a wait for the GPU every micro-step.  The counts now stay on the device until the window is read."""
    from desmoe.moe import LinearRouter, MoEBlock, SwiGLUExpert
    from desmoe.recipes.des_moe.dges import DomainExpertMap

    torch.manual_seed(0)
    model = torch.nn.ModuleList(MoEBlock(8, SwiGLUExpert(8, 16), LinearRouter(8, 4, 2)) for _ in range(2))
    dmap, expected, tokens = DomainExpertMap(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3)
    for step in range(3):
        x, dom = torch.randn(12, 8), torch.tensor([0, 1, 2, -1] * 3).roll(step)
        for block in model:
            block(x)
        with _Reads() as reads:
            dmap.record_model(model, dom)
        assert reads.seen == [], reads.seen
        for layer, block in enumerate(model):
            ids, valid = block.last_routing.expert_ids, dom >= 0
            pairs = (dom[valid].unsqueeze(1) * 4 + ids[valid]).reshape(-1)
            expected[layer] += torch.bincount(pairs, minlength=12).view(3, 4).double()
            tokens[layer] += torch.bincount(dom[valid], minlength=3).double()
    assert torch.equal(dmap.window, expected) and torch.equal(dmap.window_tokens, tokens.double())
    dmap.refresh()  # reads the window, starts a new one
    assert dmap.window.sum() == 0 and dmap.window_tokens.sum() == 0
    assert torch.equal(dmap.A, expected / tokens.double().clamp_min(1).unsqueeze(-1))
