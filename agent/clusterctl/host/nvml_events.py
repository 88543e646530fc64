"""XID errors as they happen, through NVML's event API.

One NVML event set takes ``nvmlEventTypeXidCriticalError`` from every GPU that reports it
(``nvmlDeviceGetSupportedEventTypes``); :meth:`XidWatcher.wait` waits on that set with a
short timeout and hands back the XIDs that arrived. It never raises: a GPU that does not
report XIDs is left out (said once, and not asked again until the GPU count changes); a
GPU that is lost is left out and watched again once it answers (looked at every
``lost_retry_s``); a wait that fails (a GPU lost, an unknown error) builds the set again
at the next wait; any other failure is handed to ``failed`` (the agent counts it) and the
next wait goes on. ``problem`` says why XIDs are not watched now on some or all GPUs.

A wait that has nothing to wait on (no NVML, no GPU reports XIDs) or that failed takes
the rest of its timeout all the same, so a caller looping on it never spins; ``close()``
ends such a rest at once and frees the event set (after any wait in progress, which
ends within its timeout: NVML's own wait cannot be interrupted).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterctl.host.nvml import Nvml, NvmlCallError, _text, answer, call, query

log = logging.getLogger("clusterctl.gpu")
XID_CRITICAL = 0x8  # nvmlEventTypeXidCriticalError (nvml.h)
_TIMEOUT = 10  # NVML_ERROR_TIMEOUT
_GONE = frozenset({15, 16})  # GPU_IS_LOST, RESET_REQUIRED: a GPU's state, not a failure
LOST_RETRY_S = 2.0  # a lost GPU is looked at this often, to watch it again once it answers
RECHECK_S = 30.0  # the GPU count is looked at this often (a GPU added, or gone)
MAX_EVENTS_PER_WAIT = 256  # a storm is handed back in parts


@dataclass(frozen=True)
class XidEvent:
    index: int  # the GPU's NVML index
    uuid: str | None
    xid: int
    at: float  # time.time() when it was taken from NVML


@dataclass(frozen=True)
class _Watched:
    index: int
    uuid: str | None


def _handle_key(handle: Any) -> Any:
    """What tells one GPU's handle from another's: the address a ctypes handle points
    at (NVML gives the same one for the same GPU, and in its events); any other handle
    (a stand-in's) is its own key."""
    try:
        return ("address", ctypes.cast(handle, ctypes.c_void_p).value)
    except (TypeError, ctypes.ArgumentError):
        return ("object", id(handle))


class XidWatcher:
    def __init__(self, nvml: Nvml, *, failed: Callable[[Exception], None] | None = None,
                 clock: Callable[[], float] = time.time, lost_retry_s: float = LOST_RETRY_S,
                 recheck_s: float = RECHECK_S) -> None:
        self.nvml = nvml
        self.problem: str | None = None  # why XIDs are not watched now (on some GPUs)
        self.watched: frozenset[int] = frozenset()  # GPU indices whose XIDs are watched
        self.failures = 0  # failures handed to ``failed`` so far
        self._failed = failed
        self._clock = clock
        self._lost_retry_s = lost_retry_s
        self._recheck_s = recheck_s
        self._lock = threading.Lock()  # one wait at a time; close() waits for it
        self._closed = threading.Event()
        self._set: Any = None
        self._keep: dict[Any, Any] = {}  # key -> handle: the handles the keys point at
        self._gpus: dict[Any, _Watched] = {}  # handle key -> the GPU it is
        self._skipped: dict[int, str] = {}  # index -> why it is not watched (not retried)
        self._lost: dict[int, str] = {}  # index -> why: watched again once it answers
        self._count: int | None = None
        self._rebuild = True
        self._next_check = 0.0
        self._said: set[str] = set()
        self._told: frozenset[int] = frozenset()  # the GPUs last said to be watched

    # -- the one call ------------------------------------------------------------------

    def wait(self, timeout_s: float) -> list[XidEvent]:
        """The XIDs that arrive within ``timeout_s`` (a burst is taken whole, up to
        MAX_EVENTS_PER_WAIT); never raises; takes about ``timeout_s`` when none arrives."""
        started = time.monotonic()
        events: list[XidEvent] = []
        if not self._closed.is_set():
            with self._lock:
                if not self._closed.is_set():
                    try:
                        events = self._wait(timeout_s)
                    except Exception as err:  # whatever NVML or a binding raised: go on
                        self._rebuild = True
                        self._fail(err)
                if self._closed.is_set():  # closed while this wait was in NVML
                    self._free(self.nvml.module() if self._set is not None else None)
        if not events:
            rest = timeout_s - (time.monotonic() - started)
            if rest > 0:
                self._closed.wait(rest)
        return events

    def close(self, timeout_s: float = 2.0) -> None:
        """Free the event set, after a wait in progress (at most ``timeout_s``: a wait
        held up in a hung driver frees it itself when it returns); ``wait`` then returns
        at once."""
        self._closed.set()
        if not self._lock.acquire(timeout=timeout_s):
            log.debug("an XID wait is still in NVML: it frees the event set when it returns")
            return
        try:
            self._free(self.nvml.module() if self._set is not None else None)
        finally:
            self._lock.release()

    # -- inside -----------------------------------------------------------------------

    def _wait(self, timeout_s: float) -> list[XidEvent]:
        nv = self.nvml.module()
        if nv is None:
            failure = self.nvml.failure()
            self._set_problem(f"NVML is not available: {failure[0] if failure else 'unknown'}")
            return []
        now = time.monotonic()
        if self._rebuild or now >= self._next_check:
            self._refresh(nv, now)
        if self._set is None or not self._gpus:
            return []
        try:
            data = call(nv, nv.nvmlEventSetWait_v2, self._set, max(0, int(timeout_s * 1000)))
        except NvmlCallError as err:
            if self._wait_failed(err):
                self._refresh(nv, time.monotonic())  # at once: XIDs are not heard meanwhile
            return []
        events = []
        for taken in range(1, MAX_EVENTS_PER_WAIT + 1):  # events left out count too
            event = self._event(nv, data)
            if event is not None:
                events.append(event)
            if taken == MAX_EVENTS_PER_WAIT:
                break
            try:  # the rest of a burst, without waiting
                data = call(nv, nv.nvmlEventSetWait_v2, self._set, 0)
            except NvmlCallError as err:
                if err.code != _TIMEOUT:
                    self._wait_failed(err)
                break
        return events

    def _wait_failed(self, err: NvmlCallError) -> bool:
        """True when the event set must be built again (anything but a timeout)."""
        if err.code == _TIMEOUT:
            return False
        self._rebuild = True  # without a GPU that is lost
        if err.code in _GONE:
            self._say(f"a GPU stopped answering while XIDs were watched ({err.text}): "
                      "watching the others", level=logging.INFO)
        else:
            self._fail(err)
        return True

    def _event(self, nv: Any, data: Any) -> XidEvent | None:
        if not int(getattr(data, "eventType", 0)) & self._xid_type(nv):
            return None
        gpu = self._gpus.get(_handle_key(data.device))
        if gpu is None:  # a handle NVML made anew: ask it which GPU it is
            get_index = getattr(nv, "nvmlDeviceGetIndex", None)
            index = None if get_index is None else answer(nv, get_index, data.device)
            if index is None:
                self._say(f"XID {int(data.eventData)} from a GPU NVML does not name: left out")
                return None
            gpu = next((g for g in self._gpus.values() if g.index == int(index)),
                       _Watched(int(index), None))
        return XidEvent(gpu.index, gpu.uuid, int(data.eventData), self._clock())

    @staticmethod
    def _xid_type(nv: Any) -> int:
        return int(getattr(nv, "nvmlEventTypeXidCriticalError", XID_CRITICAL))

    def _refresh(self, nv: Any, now: float) -> None:
        """Build the event set again when it must be: the GPU count changed, a wait
        failed, or a lost GPU answers again."""
        try:
            count = int(call(nv, nv.nvmlDeviceGetCount))
        except NvmlCallError as err:
            self._rebuild = True
            self._next_check = now + self._lost_retry_s
            self._set_problem(f"NVML could not count GPUs: {err.text}")
            return
        if count != self._count:
            self._rebuild = True
            self._skipped.clear()  # other GPUs: each asked once again
        elif self._lost and any(self._answers(nv, index) for index in self._lost):
            self._rebuild = True
        if self._rebuild:
            self._register(nv, count)
        self._next_check = now + (self._lost_retry_s if self._lost or self._rebuild
                                  else self._recheck_s)

    @staticmethod
    def _answers(nv: Any, index: int) -> bool:
        try:
            handle = call(nv, nv.nvmlDeviceGetHandleByIndex, index)
            call(nv, nv.nvmlDeviceGetUUID, handle)
        except NvmlCallError:
            return False
        return True

    def _register(self, nv: Any, count: int) -> None:
        self._free(nv)
        self._lost.clear()
        self._count = count
        if count == 0:
            self._rebuild = False
            self._set_problem("the NVIDIA driver reports no GPU")
            return
        try:
            self._set = call(nv, nv.nvmlEventSetCreate)
        except (NvmlCallError, AttributeError) as err:
            why = err.text if isinstance(err, NvmlCallError) else "no nvmlEventSetCreate"
            self._set_problem(f"NVML's event API is not available ({why}): XIDs are not "
                              "watched")
            self._rebuild = not (isinstance(err, NvmlCallError) and err.unreported)
            return
        xid = self._xid_type(nv)
        for index in range(count):
            if index in self._skipped:
                continue
            try:
                handle = call(nv, nv.nvmlDeviceGetHandleByIndex, index)
                supported = query(nv, nv.nvmlDeviceGetSupportedEventTypes, handle, default=0)
                if not int(supported) & xid:
                    self._skip(index, "it does not report XID events "
                               "(nvmlDeviceGetSupportedEventTypes)")
                    continue
                call(nv, nv.nvmlDeviceRegisterEvents, handle, xid, self._set)
                uuid = _text(answer(nv, nv.nvmlDeviceGetUUID, handle))
            except NvmlCallError as err:
                if err.unreported:
                    self._skip(index, f"NVML cannot register its XID events ({err.text})")
                elif err.lost:
                    self._lost[index] = err.text
                    self._say(f"not watching XID errors on GPU {index} while it is lost "
                              f"({err.text})", level=logging.INFO)
                else:  # permission, a driver error: tried again with the lost ones
                    self._lost[index] = err.text
                    self._fail(NvmlCallError(f"GPU {index}: {err.call}", err.code, err.text))
                continue
            key = _handle_key(handle)
            self._keep[key] = handle
            self._gpus[key] = _Watched(index, uuid)
        self._rebuild = False
        watched = frozenset(g.index for g in self._gpus.values())
        if watched != self._told and watched:
            log.info("watching XID errors on GPU %s", ", ".join(map(str, sorted(watched))))
        self._told = self.watched = watched
        said = [f"GPU {i}: {w}" for i, w in sorted(self._skipped.items()) if i < count]
        said += [f"GPU {i}: {w} (watched again once it answers)"
                 for i, w in sorted(self._lost.items())]
        self.problem = "; ".join(said) or None  # each part said once, as it was found
        if not self._gpus:
            self._free(nv)

    def _skip(self, index: int, why: str) -> None:
        self._skipped[index] = why
        self._say(f"not watching XID errors on GPU {index}: {why}")

    def _free(self, nv: Any) -> None:
        if self._set is not None and nv is not None:
            try:
                call(nv, nv.nvmlEventSetFree, self._set)
            except NvmlCallError as err:
                log.debug("freeing the XID event set: %s", err.message)
        self._set = None
        self._gpus.clear()
        self._keep.clear()
        self.watched = frozenset()

    def _set_problem(self, problem: str | None) -> None:
        if problem is not None and problem != self.problem:
            self._say(problem)
        self.problem = problem

    def _say(self, message: str, level: int = logging.WARNING) -> None:
        if message not in self._said:
            self._said.add(message)
            log.log(level, "%s", message)

    def _fail(self, err: Exception) -> None:
        self.failures += 1
        if self._failed is not None:
            self._failed(err)
        else:
            self._say(f"watching XID errors: {type(err).__name__}: {err}")
