"""A MASTER_ADDR no one can resolve (a typo, an IPv6 address written in URL brackets) is refused in one line
at start-up: torch's store retried it until the timeout (ten minutes by default) and then printed a
traceback.  A bare IPv6 address still works."""
import socket
import subprocess
import sys

import pytest

from jobs import ROOT, clean_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("addr", ["[::1]", "no-such-host.invalid"])
def test_unresolvable_master_addr_is_one_line(addr, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launcher/smoke.py"), "--config", str(ROOT / "configs/smoke.yaml"),
         "model.ep_size=1", f"run.dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=clean_env(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", MASTER_ADDR=addr, MASTER_PORT=str(_free_port())))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("desmoe: error:")]
    assert len(lines) == 1 and f"MASTER_ADDR='{addr}'" in lines[0] and "resolve" in lines[0], proc.stderr[-3000:]


def test_bare_ipv6_master_addr_meets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    script = ("from desmoe.distributed import init_distributed; import deepspeed.comm as dist; import torch; "
              "init_distributed(timeout_s=60); t = torch.ones(1); dist.all_reduce(t); print('OK', t.item())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=clean_env(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", MASTER_ADDR="::1",
                                        MASTER_PORT=str(_free_port())))
    assert proc.returncode == 0 and "OK 1.0" in proc.stdout, proc.stderr[-3000:]
