"""The stamp of a run: what was measured (commits), where (cores, CPU, memory, load) and how (the
exact command), so a figure can be traced to the code and the machine that produced it."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def git_state(root: Path) -> str:
    """``git describe`` of the checkout at ``root``: tag or short sha, "+dirty" with uncommitted changes
    to tracked files."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return out.stdout.strip() if out.returncode == 0 else f"unknown ({root} is not a git checkout)"


def _proc_field(path: str, name: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def memory_gib() -> float | None:
    kb = _proc_field("/proc/meminfo", "MemTotal").split()
    return round(int(kb[0]) / 2**20, 1) if kb else None


def command_line() -> str:
    """How this run was started, as a command one can paste."""
    return shlex.join(["python", "-m", "scripts.bench", *sys.argv[1:]])


def stamp(harness_root: Path, product_root: Path) -> dict[str, Any]:
    """The stamp at the start of a run; ``finish`` adds the end."""
    return {
        "commit": git_state(harness_root),
        "product_commit": git_state(product_root),
        "product_root": str(product_root),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": command_line(),
    }


def finish(st: dict[str, Any]) -> None:
    st["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def stamp_line(st: dict[str, Any]) -> str:
    """The stamp as one line of prose (for the README and the console)."""
    product = "" if st.get("product_commit") == st.get("commit") else f", product {st.get('product_commit')}"
    load = f"load average {st.get('loadavg_start', ['?'])[0]} at the start"
    if st.get("loadavg_end"):
        load += f", {st['loadavg_end'][0]} at the end"
    return (
        f"commit {st.get('commit')}{product}, {st.get('date')}; {st.get('cores')} cores ({st.get('cpu_model')}), "
        f"{st.get('memory_gib')} GiB; {load}; command `{st.get('command')}`"
    )
