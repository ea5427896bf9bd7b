"""Keep a process's memory out of core dumps.

The daemon holds the master key, every chain's keys and, in its caches,
plaintext pages of swapped-out memory; the standby holds the connection
that carries them; a driver holds the key it agreed with the daemon and the
plaintext of the records it seals. A core dump of any of them would put
that on disk, readable long after. So each of them, at start:

* writes 0 to ``/proc/self/coredump_filter``: a dump, if one is still
  made, holds no memory mapping at all: not the heap, where Python keeps
  keys and cached blocks in objects it moves and copies at will (so
  ``madvise(MADV_DONTDUMP)`` on one buffer would miss the copies), nor the
  mapped seal files. First, because the file is the process's own only
  while it is dumpable;
* sets ``RLIMIT_CORE`` to 0, soft and hard, so that nothing it starts can
  raise it (systemd's ``LimitCORE=0`` does the same for the units);
* clears its dumpable flag (``PR_SET_DUMPABLE`` 0): no core dump even when
  ``fs.suid_dumpable`` would allow one, and no ``ptrace`` attach or
  ``/proc/PID/mem`` read by another process of the same user without
  CAP_SYS_PTRACE.

The guest driver uses this too, and the guest side imports only swapfs's
protocol layer and below: this module is at the bottom (the standard
library only) so that the daemon, the standby and the driver share one
definition of "no core dumps".
"""

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def dumpable() -> bool:
    """The kernel's dumpable flag of this process (PR_GET_DUMPABLE)."""
    return bool(_libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def forbid_core_dumps() -> bool:
    """Keep this process's memory out of any core dump; True once the kernel
    says it is no longer dumpable (each step that fails is logged)."""
    try:
        with open("/proc/self/coredump_filter", "w") as dump_filter:
            dump_filter.write("0")
    except OSError as exc:
        log.warning("cannot clear the core dump filter: %s", exc)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("cannot set the core file size limit to 0: %s", exc)
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot clear PR_SET_DUMPABLE: %s", os.strerror(ctypes.get_errno()))
    return not dumpable()
