"""Peak memory of a command, measured by the kernel (tests and benchmarks).

``ru_maxrss`` of a child counts the pages it had before ``exec``: a child forked (or
vforked) from a big test process reports the parent's size. So the command is started by
a small launcher (``python -S``, a few MiB) that forks it and reports its ``wait4`` usage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(command, env=None, timeout=None) -> tuple[float, subprocess.CompletedProcess]:
    """(peak RSS MiB of ``command`` (a list: executable path first), its CompletedProcess
    with stdout/stderr as text)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rss")
        with open(os.path.join(tmp, "out"), "w+") as out, open(os.path.join(tmp, "err"), "w+") as err:
            proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report, *map(str, command)],
                                  stdout=out, stderr=err, env=env, timeout=timeout, check=False)
            out.seek(0), err.seek(0)
            done = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
        with open(report) as f:
            kib, _ = f.read().split()
    return int(kib) / 1024, done
