"""The command line: ``python -m scripts.bench --help``."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from scripts.bench import __doc__ as DOC
from scripts.bench.env import ROOT, use_product
from scripts.bench.machine import finish, stamp, stamp_line
from scripts.bench.model import FULL, QUICK, SCENARIO_NAMES
from scripts.bench.report import compare, load_json, table, write_json, write_png, write_readme


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (a few minutes)")
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="rounds per figure instead of the plan's")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these scenarios (repeatable or comma-separated): " + ", ".join(SCENARIO_NAMES),
    )
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"), help="results (%(default)s)")
    p.add_argument("--png", type=Path, default=None, help="plot llm_stream's timeline here (needs matplotlib)")
    p.add_argument(
        "--readme",
        type=Path,
        nargs="?",
        const=ROOT / "README.md",
        default=None,
        metavar="PATH",
        help="rewrite the table between the bench markers of README.md (or PATH) with this run's rows",
    )
    p.add_argument(
        "--product-root",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="measure the broker, daemon and client of the checkout DIR with this harness (default: this one)",
    )
    p.add_argument("--compare", type=Path, nargs=2, metavar=("OLD", "NEW"), help="print two JSON results side by side")
    p.add_argument("--from-json", type=Path, metavar="PATH", help="do not run: report (and --readme) an earlier JSON")
    args = p.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIO_NAMES)}")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.names = [n for n in SCENARIO_NAMES if n in names] if names else list(SCENARIO_NAMES)
    missing = [d for d in ("broker", "daemon", "client", "wire") if not (args.product_root / d).is_dir()]
    if missing:
        p.error(f"--product-root {args.product_root} has no {', '.join(missing)}/: not a sandbox-mesh checkout")
    return args


def report_only(args: argparse.Namespace) -> int:
    """--compare and --from-json: no processes, no product code."""
    if args.compare:
        print(compare(load_json(args.compare[0]), load_json(args.compare[1])))
        return 0
    rows, meta = load_json(args.from_json)
    print(table(rows))
    if args.readme is not None:
        write_readme(args.readme, rows, meta)
        print(f"\nwrote the benchmark table of {args.readme}")
    return 0


def product_module_path() -> Path:
    """Where ``import client`` found the product: proof of which checkout this process measures."""
    import client

    return Path(client.__file__).resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.compare or args.from_json:
        return report_only(args)
    use_product(args.product_root)
    from scripts.bench.run import run  # imports the product: after use_product

    product_client = product_module_path()
    if not product_client.is_relative_to(args.product_root.resolve()):
        sys.exit(f"import client found {product_client}, not the checkout {args.product_root}: not measuring")

    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = replace(plan, rounds=args.rounds)
    started = time.time()
    meta: dict[str, Any] = {"stamp": stamp(ROOT, args.product_root), "quick": args.quick, "plan": asdict(plan)}
    meta["stamp"]["client_module"] = str(product_client)
    rows, extras, interrupted = run(plan, args.names, args.product_root)
    finish(meta["stamp"])
    meta["seconds"] = round(time.time() - started, 1)
    meta["interrupted"] = str(interrupted) if interrupted else None
    print(table(rows))
    write_json(args.json, rows, extras, meta)
    print(f"\n{stamp_line(meta['stamp'])}\nwrote {args.json} ({meta['seconds']} s)")
    if args.png is not None:
        print(write_png(args.png, extras))
    failed = interrupted is not None or any(r.error for r in rows)
    if args.readme is not None:
        if failed:
            print(f"not writing {args.readme}: the run had errors")
        else:
            write_readme(args.readme, rows, meta)
            print(f"wrote the benchmark table of {args.readme}")
    if interrupted is not None:
        return 128 + interrupted.signum
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
