#!/usr/bin/env python3
"""Holds N idle WebSocket connections (bench/ws.sh): raw RFC 6455
handshakes from asyncio, no library, each answered 101 and then left
open, idle, for --seconds. Prints one JSON line when they are all open
({"opened": n}) and another when it lets them go. The server's pings
are answered by nothing (it measures idle memory, not liveness).

  bench/ws-hold.py --url ws://127.0.0.1:8080/api/notifications/ws \
      --cookie 'shoal_session=...' -n 10000 --seconds 10
"""
import argparse
import asyncio
import base64
import json
import os
import sys
from urllib.parse import urlparse


async def open_one(host, port, path, cookie, sem):
    async with sem:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Cookie: {cookie}\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"no upgrade: {head[:200]!r}")
        return reader, writer


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--cookie", default="")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--parallel", type=int, default=200)
    a = p.parse_args()
    u = urlparse(a.url)
    path = u.path + (f"?{u.query}" if u.query else "")
    sem = asyncio.Semaphore(a.parallel)
    conns = await asyncio.gather(
        *(open_one(u.hostname, u.port, path, a.cookie, sem) for _ in range(a.n))
    )
    print(json.dumps({"opened": len(conns)}), flush=True)
    await asyncio.sleep(a.seconds)
    for _, w in conns:
        w.close()
    print(json.dumps({"closed": len(conns)}), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # a refused upgrade or connect: say which
        print(f"ws-hold: {e}", file=sys.stderr)
        sys.exit(1)
