"""What the module loader costs (issue 10, section 2), against a broker with its embedded daemon that
this script starts and stops: the first eval of a runtime with and without a resolver, the first
import (which compiles the import lexer), a chain of modules (each waits for its importer's round
trip), a fan-out of TypeScript modules, and an eval with a cached import. Prints one line per
figure (medians over ``--rounds``).

    python -m scripts.module_figures                  # 15 rounds, a chain of 100, a fan-out of 50
    python -m scripts.module_figures --rounds 3 --chain 10 --fan 5

tests/test_modules.py runs it at the small size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import client
from client.modules import from_dict
from scripts.bench.env import ROOT, Processes


async def timed(call: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await call
    return (time.perf_counter() - t0) * 1000


async def first_eval(conn: client.Connection, rounds: int, modules: dict[str, str] | None, source: str) -> float:
    """Median ms of a new runtime's first eval of ``source``."""
    times = []
    for _ in range(rounds):
        rt = await conn.create_runtime(modules=None if modules is None else from_dict(modules))
        times.append(await timed(rt.eval(source)))
        await rt.dispose()
    return statistics.median(times)


async def figures(frontend: str, rounds: int, chain: int, fan: int) -> list[str]:
    out = []
    async with client.connect(frontend, timeout=60) as conn:
        await first_eval(conn, 3, None, "export default 1")  # the warm pool is filled
        plain = await first_eval(conn, rounds, None, "export default 1")
        out.append(f"first eval, no resolver: {plain:.2f} ms")
        quiet = await first_eval(conn, rounds, {}, "export default 1")
        out.append(f"first eval, a resolver, no import: {quiet:.2f} ms")
        first = await first_eval(conn, rounds, {"a.js": "export default 1"}, "import a from './a.js'; export default a")
        out.append(f"first eval importing one module (compiles the lexer): {first:.2f} ms")
        table = {f"m{i}.js": f"export {{ v }} from './m{i + 1}.js'; import './leaf.js';" for i in range(chain - 1)}
        table[f"m{chain - 1}.js"] = "export const v = 'deep';"
        table["leaf.js"] = "export const leaf = 1;"
        async with await conn.create_runtime(modules=from_dict(table)) as rt:
            await rt.eval("import './leaf.js';")  # the lexer is compiled
            ms = await timed(rt.eval("import { v } from './m0.js'; export default v;"))
            out.append(f"a chain of {chain} modules, first import: {ms:.1f} ms ({ms / chain:.2f} ms per module)")
            cached = statistics.median([await timed(rt.eval("import { v } from './m0.js';")) for _ in range(rounds)])
            bare = statistics.median([await timed(rt.eval("export default 1")) for _ in range(rounds)])
            out.append(f"eval with one cached import: {cached:.2f} ms (without: {bare:.2f} ms)")
        fanned = {f"f{i}.ts": f"export const x{i}: number = {i};" for i in range(fan)}
        async with await conn.create_runtime(modules=from_dict(fanned)) as rt:
            await rt.eval("import './f0.ts';")
            source = "".join(f"import {{ x{i} }} from './f{i}.ts';\n" for i in range(1, fan)) + "export default 1;"
            ms = await timed(rt.eval(source, filename="main.ts"))
            out.append(f"a fan-out of {fan - 1} TypeScript modules from one eval: {ms:.1f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.module_figures", description=__doc__)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--chain", type=int, default=100)
    p.add_argument("--fan", type=int, default=51)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="module-figures-") as tmp:
        procs = Processes(Path(tmp), ROOT)
        try:
            broker = procs.broker()
            for line in asyncio.run(figures(broker.field("frontend"), args.rounds, args.chain, args.fan)):
                print(line, flush=True)
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
