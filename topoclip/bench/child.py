"""Run one measurement in a fresh Python process and watch its memory.

Each measurement gets its own process so that one method's allocations (and the allocator's
cached pages) cannot inflate the next one's peak. The parent polls the child's high-water mark
(``VmHWM`` in /proc) and kills it once it passes a limit: an address-space rlimit is no good
with PyTorch (it reserves far more virtual memory than it touches, and a failed allocation can
surface as a crash rather than a MemoryError), while the resident peak is what a budget means.
The final peak comes from ``wait4``'s rusage of that very child.

    python -m topoclip.bench.child KIND JSON_PARAMS   # prints one JSON line
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["ChildOutcome", "run_child", "rss_bytes", "reset_peak_rss", "peak_rss_bytes", "available_memory_bytes"]

# KIND -> "module:function"; the function takes the params as keywords and returns a dict.
KINDS = {
    "loss": "topoclip.bench.loss:measure",
    "max-batch": "topoclip.bench.max_batch:trial",
}
_POLL_SECONDS = 0.02


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Restart this process's resident high-water mark from its current resident set (Linux
    >= 4.0: writing 5 to clear_refs); elsewhere the peak keeps counting from process start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (since ``reset_peak_rss``, where supported)."""
    hwm = _high_water_mark("self")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _high_water_mark(pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # already gone, or no /proc
        pass
    return None


@dataclasses.dataclass
class ChildOutcome:
    ok: bool
    result: dict[str, Any]      # what the measurement returned (empty on failure)
    peak_rss: int               # the child's resident peak, bytes (whole process)
    seconds: float              # wall time of the child
    error: str = ""             # why it failed: "exceeded N GiB", "killed by signal 9", the last stderr line


def run_child(kind: str, params: dict[str, Any], limit_bytes: int | None = None,
              timeout: float | None = None) -> ChildOutcome:
    """Run KINDS[kind](**params) in a child; kill it past ``limit_bytes`` resident or ``timeout`` s."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown measurement {kind!r} (known: {sorted(KINDS)})")
    cmd = [sys.executable, "-m", "topoclip.bench.child", kind, json.dumps(params)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        reason, peak_seen = "", 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                hwm = _high_water_mark(proc.pid) or 0
                peak_seen = max(peak_seen, hwm)
                if limit_bytes is not None and hwm > limit_bytes:
                    reason = f"exceeded {limit_bytes / 2**30:.1f} GiB"
                elif timeout is not None and time.perf_counter() - start > timeout:
                    reason = f"timed out after {timeout:.0f} s"
                if reason:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(_POLL_SECONDS)
        except BaseException:  # Ctrl-C: do not leave a large child running
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        seconds = time.perf_counter() - start
        peak = max(usage.ru_maxrss * 1024, peak_seen)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = proc.returncode
    if not reason and limit_bytes is not None and peak > limit_bytes:
        reason = f"exceeded {limit_bytes / 2**30:.1f} GiB"  # finished between two polls
    if not reason and code != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = f"killed by signal {-code}" if code < 0 else (lines[-1] if lines else f"exit code {code}")
    if reason:
        return ChildOutcome(False, {}, peak, seconds, reason)
    return ChildOutcome(True, json.loads(stdout.strip().splitlines()[-1]), peak, seconds)


def main(argv: list[str] | None = None) -> None:
    kind, params = (argv if argv is not None else sys.argv[1:])[:2]
    module, func = KINDS[kind].split(":")
    result = getattr(importlib.import_module(module), func)(**json.loads(params))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
