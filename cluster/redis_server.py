"""A private `redis-server` process for local runs and tests.

`moeray serve` without a Redis URL, and the test fixture, start one of these: the `redis-server`
binary from PATH, bound to loopback on a free port, with persistence off (no RDB, no AOF, its
working directory a temp dir removed on stop). `restart()` stops and starts it on the SAME port
with empty memory, which is exactly what a crashed-and-restarted Redis looks like to clients.

The process is always reaped: `stop()`, the context manager, and a finalizer that runs at
interpreter exit or garbage collection all terminate it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType

import redis


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not come up in time."""


#: Where free_port looks: above Ray's default worker ports (10002-19999) and below Linux's
#: default ephemeral range (32768-60999), from which the OS gives every outgoing connection a
#: port: a port picked there can be taken by any process's connection before its user binds it
#: (a Ray head failed to start its GCS on one so, under the test suite's load).
PORT_RANGE = (20000, 32768)


_given: deque[int] = deque(maxlen=1024)  # ports this process handed out lately: not again


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, outside the ephemeral range (PORT_RANGE) when one
    of those binds, and none this process handed out lately; else one the OS picks."""
    for _ in range(64):
        port = random.randrange(*PORT_RANGE)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.append(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Stops the process (TERM, then KILL after 5 s) and removes its working directory."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)


class RedisServer:
    """A private redis-server on `host:port` (port 0 = pick a free one at first start).

    Usage: `with RedisServer() as srv: ClusterState(srv.url)`.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
        binary: str = "redis-server",
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RedisServerError("RedisServer has no port yet; call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Starts the server and returns once it answers PING (within startup_timeout_s)."""
        if self.is_running():
            return self
        exe = shutil.which(self.binary)
        if exe is None:
            raise RedisServerError(
                f"{self.binary!r} was not found on PATH; install Redis (e.g. `apt-get install "
                "redis-server`) or give state.redis_url of a running server"
            )
        fixed_port = self.port != 0
        # A port picked by free_port() can be taken by someone else before redis binds it;
        # then try another one. A fixed port (restart) is retried while the old socket closes.
        for _attempt in range(5):
            if not fixed_port:
                self.port = free_port(self.host)
            if self._spawn(exe):
                return self
            time.sleep(0.1)
        raise RedisServerError(
            f"redis-server did not answer PING on {self.host}:{self.port} within "
            f"{self.startup_timeout_s} s"
        )

    def _spawn(self, exe: str) -> bool:
        """One attempt: start the process and wait for PING; False (and reaped) on failure."""
        workdir = tempfile.mkdtemp(prefix="moeray-redis-")
        args = [exe, "--port", str(self.port), "--bind", self.host, "--save", ""]
        args += ["--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
        args += ["--loglevel", "warning", "--logfile", str(Path(workdir) / "redis.log")]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finalizer = weakref.finalize(self, _terminate, proc, workdir)
        deadline = time.monotonic() + self.startup_timeout_s / 5
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.ping():
                        self._proc, self._finalizer = proc, finalizer
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        finalizer()
        return False

    def stop(self) -> None:
        """Terminates the server (idempotent); its memory is lost."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._finalizer = None, None

    def restart(self, down_s: float = 0.0) -> None:
        """Stops the server, stays down `down_s` seconds, starts it again on the same port, empty."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
