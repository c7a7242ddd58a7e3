"""Waiting without spinning: torch's OpenMP workers parked while the caller blocks or runs
work on other threads.

After every parallel region libgomp's idle workers busy-wait for the next one (for
GOMP_SPINCOUNT iterations: milliseconds on the dev machine's EPYC) unless OMP_WAIT_POLICY=passive
was set before torch loaded libgomp, which a library cannot do. On a small machine that spinning
worker takes a core from whatever runs next beside it: the expert shards an engine waits for
(workers/ray_experts.py), or a second BLAS thread (workers/gemv.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any

import torch


class OmpParking:
    """Runs a blocking wait with the caller's OpenMP worker threads parked in a futex.

    After every parallel region, libgomp's idle workers busy-wait for the next one (for
    GOMP_SPINCOUNT iterations: milliseconds on the dev machine's EPYC) unless
    OMP_WAIT_POLICY=passive was set before torch loaded libgomp, which cannot be done from here. While the engine waits for its
    shards, that spinning worker takes a core from the shards it waits for: on the 2-core dev
    machine a 32-token layer over 2 socket shards took ~9 ms with the engine's worker spinning
    vs ~4.5 ms parked (the shards' own compute is ~3.5 ms). So the wait runs inside a parallel
    region of torch's own libgomp (GOMP_parallel, same thread pool), in which thread 0 does the
    round trip and every other thread blocks on a lock until it is done; a spinning worker joins
    that region at once. Costs tens of microseconds; a no-op (the wait runs directly) without
    libgomp or with one torch thread. One caller at a time (a backend's forward_layer).
    """

    _CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    def __init__(self) -> None:
        self._gomp = _load_libgomp()
        self._body = self._CALLBACK(self._run_body)  # kept alive: libgomp holds a raw pointer
        self._fn: Callable[[], Any] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Lock()

    @property
    def active(self) -> bool:
        return self._gomp is not None

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() with the OpenMP workers parked; returns its result or raises its exception."""
        threads = torch.get_num_threads()
        if self._gomp is None or threads < 2:
            return fn()
        self._fn, self._result, self._error = fn, None, None
        self._done.acquire()  # released by thread 0 when fn returns; the workers wait on it
        try:
            self._gomp.GOMP_parallel(self._body, None, threads, 0)
        finally:
            if self._done.locked():  # thread 0 never ran (cannot happen; never leave it held)
                self._done.release()
        fn_error, result = self._error, self._result
        self._fn = self._result = self._error = None
        if fn_error is not None:
            raise fn_error
        return result

    def _run_body(self, _data: int | None) -> None:
        """Every thread of the region runs this (a ctypes callback: it must never raise)."""
        assert self._gomp is not None
        if self._gomp.omp_get_thread_num() == 0:
            try:
                assert self._fn is not None
                self._result = self._fn()
            except BaseException as exc:  # re-raised by run() on the caller's thread
                self._error = exc
            finally:
                self._done.release()
        else:
            with self._done:  # futex wait: no CPU while the shards work
                pass


def _load_libgomp() -> Any:
    """torch's libgomp, already mapped into this process (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: not p.startswith(torch_dir)):  # torch's own first
        if not os.path.basename(path).startswith("libgomp"):
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.GOMP_parallel.argtypes = [
                OmpParking._CALLBACK,
                ctypes.c_void_p,
                ctypes.c_uint,
                ctypes.c_uint,
            ]
            lib.GOMP_parallel.restype = None
            lib.omp_get_thread_num.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None
