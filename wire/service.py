"""Process entry-point helpers shared by ``python -m broker`` and ``python -m daemon``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def run_until_signalled(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; cancellation does the clean-up."""

    async def runner() -> None:
        task = asyncio.ensure_future(main())  # owner: this runner, which awaits it below
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(runner())
    return 0
