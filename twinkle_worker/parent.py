"""Exit with the parent: an embedded worker must not outlive the client that started it.

Used by twinkle_worker.cli (--exit-with-parent). The client keeps the write end of the worker's
stdin pipe open for as long as it lives; the kernel closes it when the client dies (kill -9
included), and the worker reads end-of-file. A client that forked children which still hold
the pipe is caught by the second test: the worker is re-parented once its parent is gone.
PR_SET_PDEATHSIG is not used: it fires when the parent *thread* that started the worker ends,
which kills the workers of a client built in a short-lived thread.
"""

from __future__ import annotations

import logging
import os
import selectors
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# How often the parent pid is compared (the pipe's end-of-file is seen at once).
POLL_SECONDS = 1.0
# After the parent died: the call in progress gets this long, then the process exits regardless.
ORPHAN_GRACE_SECONDS = 2.0
ORPHAN_EXIT_SECONDS = 5.0


def watch(parent_pid: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Calls on_gone() (once, from a daemon thread) when stdin reaches end-of-file or the
    process is re-parented away from parent_pid."""
    thread = threading.Thread(target=_watch, args=(parent_pid, on_gone), daemon=True, name="exit-with-parent")
    thread.start()
    return thread


def _watch(parent_pid: int, on_gone: Callable[[], None]) -> None:
    stdin = sys.stdin.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_READ)
        while os.getppid() == parent_pid:
            if selector.select(timeout=POLL_SECONDS) and not os.read(stdin, 4096):
                log.warning("stdin closed: the client that started this worker is gone")
                break
        else:
            log.warning("re-parented (parent %d is gone)", parent_pid)
    on_gone()


def exit_after(seconds: float) -> None:
    """Ends the process after `seconds` even if the orderly stop is still waiting (a long call)."""
    timer = threading.Timer(seconds, lambda: os._exit(1))
    timer.daemon = True
    timer.start()
