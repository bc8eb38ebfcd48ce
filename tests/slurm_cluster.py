"""A real, private, single-node SLURM cluster for tests: munged + slurmctld + slurmd.

    cluster = SlurmCluster()            # state, logs, config under a fresh temp dir
    cluster.start()                     # installs Debian packages if missing; idempotent
    job = cluster.sbatch(["slurm/vitb_ocl.sbatch", ...], env=...)
    cluster.wait_for(job, {"COMPLETED"})
    cluster.stop()                      # stops what start() started, by PID

Or from a shell: `python tests/slurm_cluster.py start --dir /tmp/scale-slurm` (prints the
`export SLURM_CONF=...` line that points sbatch/squeue/scontrol at it), `... stop --dir ...`.

Everything is private to the base directory, so it can run beside any other SLURM on
the machine (the system one, or ../shared/tools/local-slurm): its own munge key and
socket (AuthInfo=socket=...), its own free TCP ports, its own config read through
SLURM_CONF (nothing is written to /etc/slurm or /etc/munge). Clients must get `env`
(it carries SLURM_CONF); jobs inherit it from the submitting environment.

No systemd: the daemons are started by hand and stopped by the PIDs in their pid files.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "squeue", "munged", "mungekey")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed (no apt-get, not root, apt failed)."""


def _missing_binaries() -> List[str]:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed(log=print) -> None:
    """apt-get install the SLURM and munge packages if any binary is missing."""
    if not _missing_binaries():
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(_missing_binaries())}) and no apt-get")
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM binaries missing and not root: cannot apt-get install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    log(f"installing {' '.join(PACKAGES)}")
    out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # stale or missing package lists: refresh once
        upd = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        out = subprocess.run(install, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed (update rc={upd.returncode}): "
                                   f"{(out.stderr or out.stdout).strip()[-500:]}")
    if _missing_binaries():
        raise SlurmUnavailable(f"still missing after install: {', '.join(_missing_binaries())}")


def _free_ports(n: int) -> List[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours (e.g. a daemon that failed before forking) is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: Optional[int], timeout: float = 10.0) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def parse_fields(line: str) -> Dict[str, str]:
    """`scontrol show job -o` output -> {field: value}. Values may contain spaces only in
    fields we do not read (e.g. Comment), so splitting on ` Key=` is good enough."""
    fields: Dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)", line.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


class SlurmCluster:
    DAEMONS = ("munged", "slurmctld", "slurmd")

    def __init__(self, base: Optional[Path] = None, node_cpus: Optional[int] = None,
                 cred_expire: int = 5, log=print):
        self._own_base = base is None
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="scale-slurm-"))
        self.node_cpus = node_cpus
        self.cred_expire = cred_expire  # also the wait before a requeued job may start again
        self.log = log
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.sock"
        self.partition = "debug"

    # ------------------------------------------------------------------ paths / env
    def pidfile(self, daemon: str) -> Path:
        return self.base / "run" / f"{daemon}.pid"

    @property
    def env(self) -> Dict[str, str]:
        """The environment clients (sbatch, scontrol, ...) need; merge it into os.environ."""
        path = os.environ.get("PATH", "")
        for extra in ("/usr/sbin", "/sbin"):
            if extra not in path.split(os.pathsep):
                path += os.pathsep + extra
        return {"SLURM_CONF": str(self.conf), "PATH": path}

    def client_env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ)
        # A test process may itself run inside a SLURM job: don't leak that job's identity.
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[key]
        env.update(self.env)
        env.update(extra or {})
        return env

    def running(self) -> bool:
        return all(_alive(_read_pid(self.pidfile(d))) for d in self.DAEMONS) and self._ping()

    def _ping(self) -> bool:
        if not self.conf.is_file():
            return False
        out = subprocess.run(["sinfo", "-h", "-n", self.host, "-o", "%t"], env=self.client_env(),
                             capture_output=True, text=True, timeout=15)
        return out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mix", "alloc")

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Install if needed, write the config, start the daemons, wait for an idle node.
        A no-op when this base directory's cluster is already up."""
        if self.running():
            return self
        t0 = time.monotonic()
        ensure_installed(self.log)
        self.stop()  # leftovers of a half-started cluster in this base dir
        shutil.rmtree(self.base / "state", ignore_errors=True)  # fresh controller state: no old jobs
        for sub in ("etc", "run", "log", "state/ctld", "state/d", "munge"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.base / "munge", 0o755)  # munged requires an accessible socket dir
        self._start_munged()
        self._write_config()
        self._run_daemon("slurmctld", ["slurmctld", "-f", str(self.conf)])
        self._run_daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", self.host])
        deadline = time.monotonic() + timeout
        while not self._ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM node {self.host} did not become idle within {timeout:.0f}s:\n"
                                   + self.tail_logs())
            time.sleep(0.2)
        self._warm_up(deadline)
        self.log(f"local SLURM up in {time.monotonic() - t0:.1f}s (base {self.base}, "
                 f"SLURM_CONF={self.conf})")
        return self

    def _start_munged(self) -> None:
        key = self.base / "munge" / "munge.key"
        if not key.is_file():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True,
                           capture_output=True)
            os.chmod(key, 0o400)
        pidfile = self.pidfile("munged")
        subprocess.run(["munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={pidfile}", f"--log-file={self.base / 'log' / 'munged.log'}",
                        f"--seed-file={self.base / 'munge' / 'munged.seed'}", "--force"],
                       check=True, capture_output=True, text=True)
        self._wait_file(pidfile, "munged")
        ok = subprocess.run(f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}",
                            shell=True, capture_output=True)
        if ok.returncode != 0:
            raise RuntimeError("munged started but munge/unmunge fails:\n" + self.tail_logs())

    def _write_config(self) -> None:
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        mem = re.search(r"RealMemory=(\d+)", hw).group(1)
        if self.node_cpus:
            node_hw = f"CPUs={self.node_cpus} RealMemory={mem}"
        else:
            node_hw = re.sub(r"^NodeName=\S+\s*", "", hw)
        ctld_port, d_port = _free_ports(2)
        b = self.base
        self.conf.write_text(f"""\
# Private single-node SLURM for scale's tests (written by tests/slurm_cluster.py)
ClusterName=scaletest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={b}/state/ctld
SlurmdSpoolDir={b}/state/d
SlurmctldPidFile={self.pidfile('slurmctld')}
SlurmdPidFile={self.pidfile('slurmd')}
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EnforcePartLimits=ALL
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=300
MailProg=/bin/true
NodeName={self.host} NodeAddr=127.0.0.1 NodeHostname={self.host} {node_hw} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_file(self, path: Path, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (path.is_file() and path.stat().st_size > 0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not write {path}:\n" + self.tail_logs())
            time.sleep(0.05)

    def _run_daemon(self, name: str, cmd: Sequence[str]) -> None:
        out = subprocess.run(cmd, env=self.client_env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}\n" + self.tail_logs())
        self._wait_file(self.pidfile(name), name)

    def _warm_up(self, deadline: float) -> None:
        """The first batch job after slurmctld starts is scheduled a few seconds late; a
        trivial job absorbs that and proves munge + slurmctld + slurmd + slurmstepd work."""
        job = self.sbatch(["-J", "warmup", "-o", "/dev/null", "--wrap", "true"])
        state = self.wait_for(job, {"COMPLETED"}, timeout=max(5.0, deadline - time.monotonic()))
        if state != "COMPLETED":
            raise RuntimeError(f"warm-up job {job} ended {state}:\n" + self.tail_logs())

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd, slurmctld and munged by the PIDs this base dir holds."""
        ctld = _read_pid(self.pidfile("slurmctld"))
        if _alive(ctld) and self.conf.is_file():
            env = self.client_env()
            subprocess.run(["scancel", "--quiet", "--partition", self.partition], env=env,
                           capture_output=True, timeout=15)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                   timeout=15)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop_pid(_read_pid(self.pidfile(daemon)))
            self.pidfile(daemon).unlink(missing_ok=True)

    def purge(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def tail_logs(self, lines: int = 20) -> str:
        out = []
        for name in ("munged", "slurmctld", "slurmd"):
            path = self.base / "log" / f"{name}.log"
            if path.is_file():
                out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.client_env(env), cwd=cwd,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.client_env(),
                             capture_output=True, text=True, timeout=15)
        return parse_fields(out.stdout) if out.returncode == 0 else {}

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.client_env(), check=True, capture_output=True, timeout=15)

    def wait_for(self, job_id: str, states: Iterable[str], timeout: float = 120.0, poll: float = 0.25) -> str:
        """Poll `scontrol show job -o` until JobState is in `states` or final; return it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "?")
            if state in wanted or state in FINAL_STATES:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--dir", default="/tmp/scale-slurm", help="base directory (state, logs, config)")
    p.add_argument("--node-cpus", type=int, default=None, help="CPUs the node advertises")
    a = p.parse_args(argv)
    cluster = SlurmCluster(Path(a.dir), node_cpus=a.node_cpus, log=lambda m: print(m, file=sys.stderr))
    if a.action == "start":
        try:
            cluster.start()
        except SlurmUnavailable as err:
            print(f"cannot start SLURM: {err}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
    elif a.action == "stop":
        cluster.stop()
    else:
        up = cluster.running()
        print("running" if up else "not running")
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
