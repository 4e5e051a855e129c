"""desmoe.collectives on 2 real ranks: CPU tensors (and CUDA ones where CUDA exists) on the
process groups desmoe creates, and the guard that keeps hand-written reductions out."""
import re
from pathlib import Path

import torch

from desmoe.collectives import config_serves

ROOT = Path(__file__).resolve().parents[1]


def collectives_case():
    import torch.distributed as dist

    from desmoe import collectives as C
    from desmoe.distributed import dist_backend

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {"config": dist.get_backend_config(), "expected_backend": dist_backend()}
    sub = dist.new_group(list(range(world)))  # how DeepSpeed builds its expert-parallel groups
    out["sub_config"] = dist.get_backend_config(sub)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and C.serves(torch.device("cuda")) else [])
    for dev in devices:
        t = torch.tensor([rank + 1.0, -rank, 2.5 * rank], device=dev)
        out[f"{dev}/sum"] = C.all_reduce_(t.clone()).tolist()
        out[f"{dev}/max"] = C.all_reduce_(t.clone(), "max", group=sub).tolist()
        out[f"{dev}/min"] = C.all_reduce_(t.clone(), "min").tolist()
        out[f"{dev}/int64"] = C.all_reduce_(torch.arange(3, device=dev) * (rank + 1)).tolist()
        out[f"{dev}/f64"] = C.all_reduce_(torch.tensor([0.1 * (rank + 1)], dtype=torch.float64, device=dev)).item()
        flags = torch.tensor([rank == 0, False, True], device=dev)
        out[f"{dev}/bool_max"] = C.all_reduce_(flags.clone(), "max").tolist()
        m = torch.arange(6.0, device=dev).view(2, 3) + rank
        view = m.t()  # not contiguous: reduced through a copy, written back into the view
        C.all_reduce_(view)
        out[f"{dev}/noncontig"] = m.tolist()
        out[f"{dev}/device_kept"] = str(view.device.type)
        before = t.tolist()
        out[f"{dev}/reduced_leaves_input"] = (C.reduced(t, "sum").tolist(), t.tolist() == before)
    out["number_sum"] = C.reduce_number(rank + 1)
    out["number_max"] = C.reduce_number(torch.tensor(float(rank)), "max")
    out["mean"] = C.mean_over_ranks(torch.tensor(rank * 2.0))
    out["any"], out["all"] = C.any_rank(rank == 1), C.all_ranks(rank == 1)
    out["gather"] = C.all_gather_object({"rank": rank})
    out["world"] = C.world_size()
    return out


def test_reductions_on_real_ranks(ranks):
    r0, r1 = ranks.run(collectives_case)
    assert r0 == r1  # every rank holds the same result
    assert r0["config"] == r0["sub_config"]  # new groups inherit the default group's device->backend map
    assert config_serves(r0["config"], "cpu")
    devices = ["cpu"] + (["cuda"] if "cuda/sum" in r0 else [])
    for dev in devices:
        assert r0[f"{dev}/sum"] == [3.0, -1.0, 2.5]
        assert r0[f"{dev}/max"] == [2.0, 0.0, 2.5]
        assert r0[f"{dev}/min"] == [1.0, -1.0, 0.0]
        assert r0[f"{dev}/int64"] == [0, 3, 6]
        assert abs(r0[f"{dev}/f64"] - 0.3) < 1e-12
        assert r0[f"{dev}/bool_max"] == [True, False, True]
        assert r0[f"{dev}/noncontig"] == [[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]
        assert r0[f"{dev}/device_kept"] == dev
        assert r0[f"{dev}/reduced_leaves_input"] == ([3.0, -1.0, 2.5], True)
    assert (r0["number_sum"], r0["number_max"], r0["mean"]) == (3.0, 1.0, 1.0)
    assert (r0["any"], r0["all"]) == (True, False)
    assert r0["gather"] == [{"rank": 0}, {"rank": 1}]
    assert r0["world"] == 2


def test_backend_map_reading():
    assert config_serves("cpu:gloo,cuda:nccl", "cpu") and config_serves("cpu:gloo,cuda:nccl", "cuda")
    assert not config_serves("nccl", "cpu") and config_serves("nccl", "cuda")
    assert config_serves("gloo", "cpu")
    assert not config_serves("cuda:nccl", "cpu")  # such a group gets a device copy from all_reduce_


def test_no_hand_written_reductions():
    """Every all-reduce of the package goes through desmoe.collectives (NCCL-safe for CPU tensors)."""
    owned_elsewhere: set[str] = set()
    found = []
    for path in sorted((ROOT / "desmoe").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "desmoe/collectives.py" or rel in owned_elsewhere:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bdist\.all_reduce\(", line):
                found.append(f"{rel}:{n}")
    assert not found, f"use desmoe.collectives.all_reduce_ instead: {found}"


def long_rank0_case(seconds: float):
    """Rank 0 works for longer than the group's timeout; the other rank must still be waiting for it."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from desmoe.collectives import any_rank, on_rank0

    short = dist.new_group(list(range(dist.get_world_size())), backend="gloo", timeout=timedelta(seconds=2))
    t0 = time.perf_counter()
    result, error = on_rank0(lambda: (time.sleep(seconds), "exported")[1], poll_s=0.25, group=short)
    failed, _ = on_rank0(lambda: 1 / 0, poll_s=0.25, group=short)[1], None
    return {"result": result, "error": error, "waited": time.perf_counter() - t0,
            "failure_seen": any_rank(failed is not None, group=short), "failure": type(failed).__name__}


def test_on_rank0_outlasts_the_process_group_timeout(ranks):
    r0, r1 = ranks.run(long_rank0_case, 5.0)
    assert r0["result"] == "exported" and r0["error"] is None and r1["result"] is None
    assert r1["waited"] >= 5.0  # rank 1 waited 2.5 group timeouts without failing
    assert r0["failure"] == "ZeroDivisionError" and r1["failure"] == "NoneType"
    assert r0["failure_seen"] and r1["failure_seen"]  # rank 0's error reaches every rank as one decision
