"""XID codes (pure): what each common one means, whether it is fatal, what to do.

An XID is the NVIDIA driver's report that a GPU hit an error (the ``NVRM: Xid`` lines
of the kernel log). The agent hears them through NVML's event API
(``clusterctl.host.nvml_events``) and says each one with these words.

**Fatal** codes are the ones where the GPU itself is in doubt until it has been reset:
uncorrectable memory errors and memory repairs waiting for a reset (48, 63, 64, 94, 95),
an NVLink failure (74), a GPU that fell off the bus (79), a halted internal
micro-controller (62) and GSP firmware failures (119, 120). A fatal XID makes ``/healthz``
unhealthy and keeps placement off the GPU until it recovers (see
``clusterctl.gpu.xid_ledger``). Application faults (13, 31, 43, 45, 68, 109) and warnings
(61, 92) are said and counted, nothing more: the GPU goes on serving. A code not in the
table is said with a pointer to NVIDIA's catalog and is not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass

CATALOG = "https://docs.nvidia.com/deploy/xid-errors/"
RESET = "drain the GPU's work and reset it (nvidia-smi -r -i {index}) or reboot the node"


@dataclass(frozen=True)
class XidInfo:
    xid: int
    kind: str  # application, memory, nvlink, bus, gsp, driver, other
    meaning: str
    action: str  # what an operator should do; {index} is the GPU's NVML index
    fatal: bool

    def action_for(self, index: int) -> str:
        return self.action.replace("{index}", str(index))


def _info(xid: int, kind: str, meaning: str, action: str, *, fatal: bool = False) -> XidInfo:
    return XidInfo(xid, kind, meaning, action, fatal)


_APP = ("an application fault, not the GPU's: fix or restart the application; if it "
        "repeats with different applications, check the GPU (dcgmi diag -r 2)")

TABLE: dict[int, XidInfo] = {i.xid: i for i in (
    _info(13, "application", "graphics engine exception: the application ran an illegal "
          "instruction or reached memory out of range", _APP),
    _info(31, "application", "GPU memory page fault: the application used an address it "
          "does not own", _APP),
    _info(43, "application", "GPU stopped processing: an application hit a fault and its "
          "work was stopped; the GPU itself is fine", "nothing on the GPU: check the "
          "application that was running"),
    _info(45, "application", "preemptive cleanup: the driver ended an application's work "
          "(it was killed, or an earlier error stopped it)", "nothing on its own: look at "
          "the XIDs just before it"),
    _info(48, "memory", "double-bit ECC error: an uncorrectable error in GPU memory",
          f"{RESET}; if it repeats, the GPU needs service (RMA)", fatal=True),
    _info(61, "driver", "internal micro-controller breakpoint or warning",
          "watch for XID 62 next; update the driver if it repeats"),
    _info(62, "driver", "internal micro-controller halt", f"{RESET}; update the driver if "
          "it repeats", fatal=True),
    _info(63, "memory", "ECC page retirement or row remapping recorded: the bad memory is "
          "set aside only at the next reset", f"{RESET} so the repair takes effect",
          fatal=True),
    _info(64, "memory", "ECC page retirement or row remapping failed",
          f"{RESET}; if it repeats, the GPU needs service (RMA)", fatal=True),
    _info(68, "application", "video processor exception (NVDEC/NVENC)", "check the video "
          "application; update the driver if it repeats"),
    _info(74, "nvlink", "NVLink error: a link to another GPU or an NVSwitch failed",
          f"{RESET}, with the GPUs on the same links; check nvidia-smi nvlink -s; if it "
          "repeats, the board or NVSwitch needs service", fatal=True),
    _info(79, "bus", "the GPU has fallen off the bus: the host can no longer reach it",
          "reboot the node; check the GPU's power, cooling and PCIe seating; if it repeats, "
          "the GPU needs service (RMA)", fatal=True),
    _info(92, "memory", "high single-bit ECC error rate (corrected)", "nothing now; if it "
          "goes on, plan a reset and check the GPU's memory (dcgmi diag -r 3)"),
    _info(94, "memory", "contained uncorrectable ECC error: the application that hit it was "
          "ended, the others go on", f"restart that application; {RESET} so the bad row is "
          "remapped", fatal=True),
    _info(95, "memory", "uncontained uncorrectable ECC error: every application on the GPU "
          "may have read corrupted memory", f"stop the GPU's work; {RESET}; if it repeats, "
          "the GPU needs service (RMA)", fatal=True),
    _info(109, "application", "context switch timeout: an application's work could not be "
          "switched out in time", "check the application; if it repeats, reset the GPU and "
          "update the driver"),
    _info(119, "gsp", "GSP RPC timeout: the GPU's System Processor stopped answering the "
          "driver", f"{RESET}; update the driver if it repeats", fatal=True),
    _info(120, "gsp", "GSP error: the GPU's System Processor reported an error",
          f"{RESET}; update the driver if it repeats", fatal=True),
)}

FATAL: frozenset[int] = frozenset(x for x, info in TABLE.items() if info.fatal)
APPLICATION: frozenset[int] = frozenset(x for x, info in TABLE.items()
                                        if info.kind == "application")


def describe(xid: int) -> XidInfo:
    """The words for ``xid``; a code not in the table is not fatal and points to NVIDIA's
    catalog."""
    known = TABLE.get(xid)
    if known is not None:
        return known
    return XidInfo(xid, "other", f"XID {xid}, not one clusterctl knows",
                   f"look it up in NVIDIA's XID catalog ({CATALOG}) and the kernel log "
                   "(journalctl -k | grep Xid)", False)
