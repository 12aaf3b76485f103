"""The open-files limit: every client connection and every upstream connection holds a
file descriptor, so the soft limit, not memory, is what first caps a busy proxy.

Container runtimes and shells often start processes with a soft limit of 1,024 under a
hard limit hundreds of times higher; like nginx's ``worker_rlimit_nofile`` and Go's
runtime, Relay raises its soft limit to the hard one at start (workers inherit it). The
README (*At platform size*) says how many descriptors a config needs.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("relay.server")

# With no hard limit, this many: far more than one process serves, and a bound for
# anything sized by the limit.
UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "open files: soft limit stays %d (cannot raise to %d: %s)", soft, target, exc
            )
            return soft
        log.info("open files: soft limit raised from %d to %d (the hard limit)", soft, target)
        return target
    return soft
