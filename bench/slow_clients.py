"""``ssd bench slow-clients``: slow clients against ``ssd serve`` with its default timeouts, while
a normal client goes on sending /detect requests.

The attackers, all opened at once and each reopened as soon as it is cut, for ``--seconds``:

- ``--header-attackers`` connections (100) that never finish their headers: half send nothing,
  half trickle one header byte a second (the classic slowloris);
- ``--body-attackers`` uploads (20) that trickle their body at ``--trickle-rate`` bytes/s (64), far
  below SSD_MIN_BODY_RATE: half multipart declaring 300 MB, half raw ``image/jpeg`` declaring 20 MB
  (both within the size limits, so only the clock can end them).

Measured: when each attacker was cut (from its connection's opening) and how (status, or a close
without an answer), against its allowance (SSD_HEADER_TIMEOUT_S; SSD_BODY_TIMEOUT_S plus what it
sent over SSD_MIN_BODY_RATE); the normal client's latency (one client, closed loop, the photos of
photos/) unloaded and under attack; the server's /metrics counts of the cuts and its memory. Writes
``OUT/slow_clients.json``.

    ssd bench slow-clients [--model models/demo.onnx | --url URL] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import machine
from bench.peers import PEERS
from bench.server import Server, ServerSettings, add_server_options, metric_sum
from bench.workload import Pace, measure, photos

SLACK_S = 1.0  # a cut may come this late after its allowance and still count as on time
MB = 1024 * 1024


@dataclass
class Cut:
    kind: str  # "idle", "slowloris", "multipart", "raw"
    seconds: float  # from the connection's opening to the answer or the close
    status: int  # 0: closed without an answer
    allowance: float  # what the settings allow it


@dataclass
class Attack:
    host: str
    port: int
    header_timeout: float
    body_timeout: float
    min_rate: int
    trickle_rate: float
    stop: float  # perf_counter time at which attackers stop reopening
    cuts: list[Cut] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)


async def _status_or_close(reader: asyncio.StreamReader, limit: float) -> int:
    """The status of the server's answer, 0 if it closed without one; TimeoutError past ``limit``."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limit)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0
    return int(head.split(b" ", 2)[1])


async def _one(attack: Attack, kind: str) -> None:
    """One attacker connection, from its opening to its cut."""
    opened = time.perf_counter()
    reader, writer = await asyncio.open_connection(attack.host, attack.port)
    sent = 0
    head = b""
    if kind in ("multipart", "raw"):
        content_type = "multipart/form-data; boundary=x" if kind == "multipart" else "image/jpeg"
        declared = 300 * MB if kind == "multipart" else 20 * MB
        head = (
            f"POST /detect HTTP/1.1\r\nHost: {attack.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        writer.write(head)
    elif kind == "slowloris":
        head = f"POST /detect HTTP/1.1\r\nHost: {attack.host}\r\nX-Slow: ".encode()
    answer = asyncio.ensure_future(_status_or_close(reader, 120.0))
    try:
        if kind == "slowloris":
            for byte in (head + b"a" * 1000)[:-1]:  # one a second, never ending the headers
                writer.write(bytes([byte]))
                done, _ = await asyncio.wait({answer}, timeout=1.0)
                if done:
                    break
        elif kind in ("multipart", "raw"):
            chunk = max(1, int(attack.trickle_rate / 4))
            prefix = (
                b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
                if kind == "multipart"
                else b""
            )
            while not answer.done():
                piece = prefix[sent : sent + chunk] if sent < len(prefix) else b"\xff" * chunk
                writer.write(piece)
                sent += len(piece)
                await asyncio.wait({answer}, timeout=0.25)
        status = await answer
    except (ConnectionError, OSError):
        status = await answer if answer.done() else 0
    finally:
        if not answer.done():
            answer.cancel()
        writer.close()
    if kind in ("idle", "slowloris"):
        allowance = attack.header_timeout
    else:
        allowance = attack.body_timeout + sent / attack.min_rate
    attack.cuts.append(Cut(kind, time.perf_counter() - opened, status, allowance))


async def _attacker(attack: Attack, kind: str) -> None:
    """Reopens a ``kind`` connection each time one is cut, until the attack's end."""
    while time.perf_counter() < attack.stop:
        try:
            await _one(attack, kind)
        except OSError as exc:
            attack.failures[type(exc).__name__] += 1
            await asyncio.sleep(0.5)


def _run_attack(attack: Attack, kinds: list[str]) -> None:
    async def main() -> None:
        await asyncio.gather(*(_attacker(attack, k) for k in kinds))

    asyncio.run(main())


def _summary(cuts: list[Cut]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind in sorted({c.kind for c in cuts}):
        mine = [c for c in cuts if c.kind == kind]
        seconds = np.array([c.seconds for c in mine])
        late = [c for c in mine if c.seconds > c.allowance + SLACK_S]
        out[kind] = {
            "cuts": len(mine),
            "statuses": dict(Counter(str(c.status) for c in mine)),
            "seconds_min": round(float(seconds.min()), 2),
            "seconds_p50": round(float(np.median(seconds)), 2),
            "seconds_max": round(float(seconds.max()), 2),
            "allowance_max": round(max(c.allowance for c in mine), 2),
            "late": len(late),
        }
    return out


def main(args: argparse.Namespace) -> int:
    from service.settings import Settings

    defaults = Settings()
    settings = ServerSettings(args.max_batch, args.max_delay_ms, args.threads)
    images, source = photos(Path(args.images) if args.images else None, limit=args.photos)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = Path(args.model).resolve() if not args.url else None
    kinds = (
        ["idle"] * (args.header_attackers // 2)
        + ["slowloris"] * (args.header_attackers - args.header_attackers // 2)
        + ["multipart"] * (args.body_attackers // 2)
        + ["raw"] * (args.body_attackers - args.body_attackers // 2)
    )
    with Server(
        PEERS["ours"], artifact, settings, url=args.url, log=out / "slow_clients-server.log"
    ) as server:
        unloaded, _ = measure(server, images, Pace(clients=1), args.measure_seconds)
        print(f"ssd bench slow-clients: unloaded: {json.dumps(unloaded)}", file=sys.stderr)
        before = server.metrics()
        rss_before = server.rss_bytes()
        attack = Attack(
            server.host,
            server.port,
            defaults.header_timeout_s,
            defaults.body_timeout_s,
            defaults.min_body_rate,
            args.trickle_rate,
            stop=time.perf_counter() + args.seconds,
        )
        attackers = threading.Thread(target=_run_attack, args=(attack, kinds), daemon=True)
        attackers.start()
        time.sleep(1.0)  # every attacker connected before the normal client's first request
        loaded, _ = measure(server, images, Pace(clients=1), args.seconds - 1.0, warmup=0)
        rss_peak = server.rss_bytes()
        attackers.join(timeout=args.seconds + 60)
        after = server.metrics()
        rss_after = server.rss_bytes()
    cuts = _summary(attack.cuts)
    counted = {
        reason: metric_sum(after, f'detector_rejected_requests_total{{reason="{reason}"}}')
        - metric_sum(before, f'detector_rejected_requests_total{{reason="{reason}"}}')
        for reason in ("header_timeout", "header_too_large", "body_timeout")
    }
    report = {
        "machine": machine.machine_info(),
        "command": "ssd bench " + " ".join(sys.argv[2:]),
        "artifact": str(artifact or args.url),
        "photos": source,
        "settings": vars(settings)
        | {
            "header_timeout_s": defaults.header_timeout_s,
            "body_timeout_s": defaults.body_timeout_s,
            "min_body_rate": defaults.min_body_rate,
            "keepalive_timeout_s": defaults.keepalive_timeout_s,
        },
        "attackers": {
            "header": args.header_attackers,
            "body": args.body_attackers,
            "trickle_rate": args.trickle_rate,
            "seconds": args.seconds,
        },
        "cuts": cuts,
        "all_cut_on_time": all(c["late"] == 0 for c in cuts.values()),
        "connect_failures": dict(attack.failures),
        "counted_by_server": counted,
        "unloaded": unloaded,
        "under_attack": loaded,
        "p50_under_attack_over_unloaded": round(loaded["p50_ms"] / unloaded["p50_ms"], 2),  # type: ignore[operator]
        "rss_mb": {
            k: round(v / MB, 1)
            for k, v in (("before", rss_before), ("peak", rss_peak), ("after", rss_after))
            if v
        },
    }
    (out / "slow_clients.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}))
    print(f"ssd bench slow-clients: wrote {out / 'slow_clients.json'}", file=sys.stderr)
    return 0 if report["all_cut_on_time"] else 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/demo.onnx")
    parser.add_argument("--url", default=None, help="a running service instead of starting one")
    parser.add_argument(
        "--images", default=None, help="folder of JPEG photos (default: photos/val2017, the repository's own)"
    )
    parser.add_argument("--photos", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--header-attackers", type=int, default=100)
    parser.add_argument("--body-attackers", type=int, default=20)
    parser.add_argument("--trickle-rate", type=float, default=64.0, help="body attackers' bytes/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the attack")
    parser.add_argument(
        "--measure-seconds", type=float, default=15.0, help="length of the unloaded measurement"
    )
    add_server_options(parser)
    parser.add_argument("--out", default="runs/bench")
