"""A real Slurm cluster on this machine: slurmctld + two slurmd ("nodes" n1, n2).

Debian's Slurm 22.05 packages, munge authentication, and every daemon and client
inside a private network namespace with only loopback, so nothing listens on a
real interface.  Daemons run in the foreground under our PIDs, so teardown can
stop them by PID even if ``scontrol shutdown`` fails.  Needs root (network
namespaces, the daemons); callers skip with that reason otherwise.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}

SLURM_CONF = """\
ClusterName=desmoeci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={ctld_port_plus}
AuthType=auth/munge
# A requeued job may start again only after the credential lifetime (default 120 s, then up to
# a 30-60 s scheduling pass): most of the preemption test's wall time.  15 s still covers a
# step launch on a loaded 2-core box (no prolog, no user environment to load).
AuthInfo=cred_expire=15
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={run}/state
SlurmdSpoolDir={run}/spool/%n
SlurmctldPidFile={run}/run/slurmctld.pid
SlurmdPidFile={run}/run/slurmd-%n.pid
SlurmctldLogFile={run}/log/slurmctld.log
SlurmdLogFile={run}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Scheduling passes every 2 s (defaults 60 s main, 30 s backfill): cheap with a handful of jobs.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={run}/log/jobcomp.txt
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_plus}] CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local Slurm cluster; the message says why."""


@dataclass
class JobResult:
    job_id: str
    state: str
    exit_code: str  # "N:S" as Slurm reports it
    restarts: int
    output: str


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root: network namespaces and the Slurm daemons")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter") if shutil.which(b) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {', '.join(missing)} and no apt-get to install Slurm")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True, timeout=900)


class LocalSlurm:
    def __init__(self, run_dir: Path, base_port: int = 16817) -> None:
        self.run = Path(run_dir)
        self.netns = f"desmoe{os.getpid()}"
        self.base_port = base_port
        self.pids: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.munged_started = False
        self.env = dict(os.environ, SLURM_CONF=str(self.run / "etc" / "slurm.conf"))
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        for sub in ("etc", "state", "spool/n1", "spool/n2", "log", "run", "out"):
            (self.run / sub).mkdir(parents=True, exist_ok=True)
        p = self.base_port
        (self.run / "etc" / "slurm.conf").write_text(SLURM_CONF.format(
            run=self.run, ctld_port=p, ctld_port_plus=p + 1, node_port=p + 100, node_port_plus=p + 101))
        self._netns_up()
        self._munge_up()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.env["SLURM_CONF"]])
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", self.env["SLURM_CONF"], "-N", node])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cmd(["sinfo", "-h", "-o", "%T"], check=False).stdout.split()
            if out and set(out) == {"idle"}:
                return self
            time.sleep(0.2)
        logs = "\n".join(f.read_text()[-1500:] for f in sorted((self.run / "log").glob("*.log")))
        self.stop()
        raise RuntimeError(f"local Slurm did not become idle in {timeout}s; logs:\n{logs}")

    def stop(self) -> None:
        if self.procs:
            # Running job steps outlive the daemons: cancel every job and wait for it first.
            self.cmd(["scancel", "--full", "--user=root"], check=False, timeout=15)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.cmd(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.2)
            self.cmd(["scontrol", "shutdown"], check=False, timeout=15)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and any(_alive(p.pid) for p in self.procs):
                time.sleep(0.1)
            for proc in self.procs:
                if _alive(proc.pid):
                    proc.kill()
                proc.wait(timeout=10)
            self.procs.clear()
        if self.munged_started:
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
            self.munged_started = False
        if Path(f"/run/netns/{self.netns}").exists():
            subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------------------
    def cmd(self, argv: list[str], check: bool = True, timeout: float = 60, env: Optional[dict] = None,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv], capture_output=True,
                              text=True, check=check, timeout=timeout, env=env or self.env, cwd=cwd)

    def submit(self, script: Path, *args: str, sbatch_args: tuple[str, ...] = (), env: Optional[dict] = None,
               cwd: Optional[Path] = None) -> str:
        out = self.cmd(["sbatch", "--parsable", *sbatch_args, str(script), *args], env={**self.env, **(env or {})},
                       cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.cmd(["scontrol", "show", "job", job_id, "-o"], check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, timeout: float = 600, poll: float = 0.2) -> JobResult:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in TERMINAL:
                break
            if time.monotonic() > deadline:
                self.cmd(["scancel", job_id], check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s")
            time.sleep(poll)
        out_path = Path(info.get("StdOut", ""))
        output = out_path.read_text() if out_path.is_file() else ""
        return JobResult(job_id, info["JobState"], info.get("ExitCode", "?"), int(info.get("Restarts", "0")), output)

    # -- internals ---------------------------------------------------------------------
    def _netns_up(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)
        for argv in (["ip", "netns", "add", self.netns], ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                     # glibc's AI_ADDRCONFIG ignores 127.0.0.1 alone; slurmd needs a second address
                     ["ip", "-n", self.netns, "addr", "add", "127.0.0.2/8", "dev", "lo"]):
            subprocess.run(argv, check=True, capture_output=True)

    def _munge_up(self) -> None:
        ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
        if ok.returncode == 0 and "Success" in ok.stdout:
            return  # a munged is already serving
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create", "--keyfile=/etc/munge/munge.key"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
            os.chmod("/etc/munge/munge.key", 0o400)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        self.munged_started = True

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.run / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
