"""The ``grouped`` stage of ``bench/gpu_check.py``: the grouped_mm backend of the grouped experts against the loop
backend on the device, in the checking process (a kernel comparison needs no launcher).  Kept apart from the
stage runner, which only records what this returns; imported by the stage before its clock starts, so the
stage's seconds exclude the imports, as they did when it lived in gpu_check.py."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tolerance import bound  # noqa: E402 - the tests' rounding bound, so the check and the tests agree

from desmoe.moe import SwiGLUExpert  # noqa: E402
from desmoe.moe.grouped import grouped_mm_supported, grouped_swiglu  # noqa: E402


def compare_backends(cpu: bool, bf16: bool) -> tuple[bool, str]:
    """The grouped_mm backend against the loop backend, forward and backward, on expert-ordered rows and in token
    mode (against a gather, the loop and a sum).  Returns (within the bound and the empty expert's gradient exactly
    0, the figure for the table)."""
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    d, f, E, n = (64, 96, 8, 512) if cpu else (2048, 768, 128, 16384)
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLUExpert(d, f) for _ in range(E)).to(device, dtype)
    counts = torch.distributions.Multinomial(n, torch.ones(E)).sample().long()
    counts[0], counts[1] = counts[0] + counts[1], 0  # an expert without rows: its weight gradient must be 0
    counts = counts.to(device)
    x = (torch.randn(n, d, device=device) * 0.5).to(dtype).requires_grad_(True)
    w = torch.rand(n, device=device).to(dtype)
    # Token mode (what the dispatcher runs): x in token order, two routes a token, outputs summed per token.
    tokens = n // 2
    token_of_row = torch.randperm(n, device=device) % tokens
    x_tok = (torch.randn(tokens, d, device=device) * 0.5).to(dtype).requires_grad_(True)

    def run(backend: str, token_mode: bool):
        inp = x_tok if token_mode else x
        inp.grad = None
        experts.zero_grad(set_to_none=True)
        if token_mode and backend == "grouped_mm":
            y = grouped_swiglu(inp, counts, experts, w, backend=backend, token_of_row=token_of_row)
        elif token_mode:  # the reference: gather, the loop on expert-ordered rows, an fp32 sum per token
            rows = grouped_swiglu(inp.index_select(0, token_of_row), counts, experts, w, backend=backend)
            y = torch.zeros(tokens, d, device=device).index_add_(0, token_of_row, rows.float()).to(dtype)
        else:
            y = grouped_swiglu(inp, counts, experts, w, backend=backend)
        torch.manual_seed(1)
        y.backward(torch.randn(y.shape, device=device).to(dtype))
        empty = max(float(p.grad.abs().max()) for p in experts[1].parameters())
        return [y.detach().float(), inp.grad.float(), experts[0].gate_up.weight.grad.float()], empty
    runs = {(b, t): run(b, t) for t in (False, True) for b in ("loop", "grouped_mm")}
    res = {key: r[0] for key, r in runs.items()}
    empty = max(r[1] for r in runs.values())
    names = ("out", "d_x", "d_w_gate_up[0]")
    worst = []
    for token_mode in (False, True):
        for name, a, b in zip(names, res["grouped_mm", token_mode], res["loop", token_mode]):
            terms = (d + f if name == "out" else 2 * (d + f) + int(counts.max())) + (2 if token_mode else 0)
            tol = bound(terms, dtype=torch.float32, scale=float(b.abs().max()), roundings=4, stored=dtype)
            worst.append((float((a - b).abs().max()) / tol, name + (" (token mode)" if token_mode else "")))
    ratio, name = max(worst)
    auto = grouped_mm_supported(x, experts)
    figure = (f"grouped_mm vs loop, worst {name}: {ratio:.3f} of the bound; empty expert's max abs grad {empty:g}; "
              f"auto picks {'grouped_mm' if auto else 'loop'} ({dtype})").replace("torch.", "")
    return ratio <= 1.0 and empty == 0.0, figure
