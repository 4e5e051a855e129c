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
