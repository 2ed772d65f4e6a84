"""Issue 9, item 6: multi-host for real. The broker, two daemons and the client each in a network
namespace of their own (scripts/multihost.py builds them: veth pairs and a bridge on 10.77.0.0/24,
the client behind a delay link), then a 20 ms round trip between the client and everything else.

Skipped, saying why, where namespaces cannot be made (not root, no ``ip``, no TAP devices).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import multihost as MH

WHY = MH.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"multi-host test: {WHY}")

SIZE = 64 * MH.MiB
DELAY_MS = 10  # each way


def test_broker_daemons_and_client_on_separate_hosts(tmp_path: Path) -> None:
    broker = f"tcp://{MH.addr('broker')}:{MH.FRONTEND}"
    survivors: set[int] = set()
    with MH.cluster(tmp_path, max_seconds=300, survivors=survivors) as c:
        namespaces = list(c.net.made)
        # an eval on a runtime of each daemon, and a 64 MiB body each way, CRC-32 checked by the
        # receiver (the client role raises, and prints no result, on any difference)
        plain = c.client("--broker", broker, "--size", str(SIZE), "--check")
        assert plain["daemons"] == ["d1", "d2"]
        evals = sorted(plain["evals"], key=lambda e: e["on"])  # placement order is the broker's choice
        assert evals == [{"on": "d1", "v": 42}, {"on": "d2", "v": 42}]

        c.set_delay(DELAY_MS)
        slow = c.client("--broker", broker, "--size", str(SIZE))
        rtt = 2 * DELAY_MS
        # the delay is real: every round trip crosses the client's link once (via the broker)
        assert slow["eval_ms"] >= rtt and slow["dispatch_ms"] >= rtt, slow
        # the pipes' window follows the round trip: the former fixed 256 KiB buffers, measured on
        # the same link, move about buffer / RTT; the product must clearly beat that
        old = c.raw_zmq(SIZE, MH.OLD_KERNEL_BUFFER)
        assert old < 1.5 * MH.OLD_KERNEL_BUFFER / (rtt / 1000) / 1e6, f"the link does not delay: {old:.1f} MB/s"
        assert slow["down_mbps"] > 1.5 * old, f"{slow['down_mbps']:.1f} MB/s, fixed 256 KiB buffers {old:.1f}"
    assert not survivors, f"outlived the test and had to be killed: {sorted(survivors)}"
    assert not set(namespaces) & set(MH.list_namespaces())
