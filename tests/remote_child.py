"""Child process for the interrupted-transfer tests: a push or pull that SIGKILLs itself mid-transfer.

usage: python remote_child.py push|pull SOURCE DESTINATION N
The N-th file copied by fsspec's local filesystem (``put_file`` for a push, ``get_file`` for a pull) kills the
process before it is copied.
"""

from __future__ import annotations

import os
import signal
import sys

from fsspec.implementations.local import LocalFileSystem

from modlora.library.transfer import pull, push

mode, source, destination, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
count = {"n": 0}
method = "put_file" if mode == "push" else "get_file"
real = getattr(LocalFileSystem, method)


def killing(self, *args, **kwargs):
    count["n"] += 1
    if count["n"] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)


setattr(LocalFileSystem, method, killing)
(push if mode == "push" else pull)(source, destination)
sys.exit(3)  # not reached when the kill happened
