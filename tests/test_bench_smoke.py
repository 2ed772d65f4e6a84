"""`python -m scripts.bench` runs end to end, writes numeric rows with a stamp, rewrites only the
README's benchmark block, and compares two results (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench.report import README_BEGIN, README_END, replace_block

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("dispatch_rtt", "create_runtime")


def run_bench(*args: str, timeout: float) -> tuple[int, str]:
    """Run the bench; on timeout SIGTERM it (so it stops its broker and upstream) before giving up."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench", *args],
        cwd=ROOT,
        env=env,
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
        raise AssertionError(f"the bench did not finish within {timeout:g}s:\n{out[-3000:]}") from None
    return proc.returncode, out


def outside_block(text: str) -> tuple[str, str]:
    return text[: text.index(README_BEGIN)], text[text.index(README_END) :]


def test_quick_bench_writes_numeric_rows_and_the_readme_block(tmp_path: Path) -> None:
    out, readme = tmp_path / "bench.json", tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    code, output = run_bench(
        "--quick",
        "--rounds",
        "2",
        "--only",
        ",".join(SCENARIOS),
        "--json",
        str(out),
        "--readme",
        str(readme),
        timeout=120,
    )
    assert code == 0, output[-3000:]
    doc = json.loads(out.read_text())
    for name in SCENARIOS:
        rows = [r for r in doc["rows"] if r["scenario"] == name]
        assert rows, f"no rows for {name}: {output[-2000:]}"
        for row in rows:
            assert not row["error"], row
            assert isinstance(row["value"], int | float), row
    assert {r["scenario"] for r in doc["rows"]} == set(SCENARIOS)
    stamp = doc["meta"]["stamp"]
    assert stamp["commit"] and stamp["cores"] and stamp["loadavg_end"] and "--quick" in stamp["command"]
    # the block is rewritten with this run's stamp and rows; the rest of the README is untouched
    after = readme.read_text()
    assert outside_block(after) == outside_block(before)
    block = after[after.index(README_BEGIN) : after.index(README_END)]
    assert stamp["command"] in block and "A `--quick` run" in block
    assert all(f"\n{name} " in block for name in SCENARIOS), block
    # and two results compare figure by figure (the same run twice: every ratio is 1)
    code, output = run_bench("--compare", str(out), str(out), timeout=30)
    assert code == 0, output
    p50 = next(line for line in output.splitlines() if line.startswith("dispatch_rtt") and "| p50 " in line)
    assert p50.split("|")[4].strip() == "1.00", p50


def test_readme_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="bench:begin"):
        replace_block("# a README with no benchmark block\n", f"{README_BEGIN}\nx\n{README_END}")
