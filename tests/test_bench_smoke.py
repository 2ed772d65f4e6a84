"""Issue 4: scripts/bench.py runs end to end and writes its rows (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("dispatch_rtt", "create_runtime")


def run_bench(*args: str, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run the bench; on timeout SIGTERM it (so it stops its broker and upstream) before giving up."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"bench.py did not finish within {timeout:g}s:\n{out[-3000:]}") from None
    return proc.returncode, out


def test_quick_bench_writes_numeric_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code, output = run_bench("--quick", "--only", ",".join(SCENARIOS), "--json", str(out), cwd=tmp_path, timeout=120)
    assert code == 0, output[-3000:]
    doc = json.loads(out.read_text())
    for name in SCENARIOS:
        rows = [r for r in doc["rows"] if r["scenario"] == name]
        assert rows, f"no rows for {name}: {output[-2000:]}"
        for row in rows:
            assert not row["error"], row
            assert isinstance(row["value"], int | float), row
    assert {r["scenario"] for r in doc["rows"]} == set(SCENARIOS)
