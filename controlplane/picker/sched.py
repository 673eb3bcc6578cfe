"""A scheduling hint for the picker's process: a short time slice.

The picker is on the path of every prefix-aware request (Envoy holds the request until it
answers), yet it uses a few percent of a core: on a busy machine its answer is mostly
waiting for a CPU. Linux's EEVDF scheduler (6.12+) lets any process ask for a shorter slice
(`sched_attr.sched_runtime` of a SCHED_OTHER thread, 0.1 to 100 ms; the default is
0.7 ms times 1 + log2 of the CPUs). Its virtual deadline then comes sooner after it wakes,
so it runs sooner, in shorter turns. Its share of the CPU (its weight: nice) is unchanged,
so it cannot starve anything, and no privilege is needed, unlike a negative nice. Threads
inherit it; older kernels and other systems ignore it (measured: docs/benchmarks.md
section 12).
"""

from __future__ import annotations

import ctypes
import platform
import sys

SLICE_NS = 100_000  # the shortest the kernel accepts
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def request_short_slice(slice_ns: int = SLICE_NS) -> bool:
    """Ask for a `slice_ns` slice for the calling thread and the threads it starts later,
    keeping its policy and nice; whether the kernel took the request."""
    numbers = _SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return False
    set_attr, get_attr = numbers
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _SchedAttr()
    if libc.syscall(get_attr, 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return False
    if attr.sched_policy != 0:  # not SCHED_OTHER (e.g. made real-time by an operator)
        return False
    attr.size, attr.sched_runtime = ctypes.sizeof(attr), slice_ns
    return libc.syscall(set_attr, 0, ctypes.byref(attr), 0) == 0
