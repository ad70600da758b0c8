"""A small userspace TCP proxy that injects delay, jitter, resets, clean closes and stalls (N1, N4; the bench's
``links`` section sets a round-trip time with it).

The kernel here has no ``tc netem``, so delay and jitter are made in user space: every chunk read from one
side is released to the other after ``delay ± jitter`` milliseconds, never before the chunk ahead of it (TCP
does not reorder). After ``--after-bytes`` bytes from the server, ``--then`` decides what happens to the
connection: ``pass`` (keep forwarding), ``reset`` (RST to the client), ``close`` (a clean FIN to the client)
or ``stall`` (hold the connection open and forward nothing more).

Run it as a process (inside a host's namespace)::

    python -m gkt.netproxy --listen 127.0.0.1:9001 --target 10.1.2.2:8001 --delay-ms 80 --jitter-ms 40

It prints ``listening`` once bound and one line per connection when that connection ends.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import time
from dataclasses import dataclass


@dataclass
class Fault:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    after_bytes: int | None = None
    then: str = "pass"


class Proxy:
    def __init__(self, target: tuple[str, int], fault: Fault, seed: int = 0) -> None:
        self.target, self.fault = target, fault
        self.rng = random.Random(seed)
        self.connections = 0

    def _lag(self) -> float:
        f = self.fault
        return max(0.0, f.delay_s + self.rng.uniform(-f.jitter_s, f.jitter_s))

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n, t0 = self.connections, time.monotonic()
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            print(f"conn {n} target unreachable: {e}", flush=True)
            c_writer.close()
            return
        fired = asyncio.Event()
        stats = {"up": 0, "down": 0}
        up = asyncio.ensure_future(self._pipe(c_reader, s_writer, None, stats, "up"))
        down = asyncio.ensure_future(self._pipe(s_reader, c_writer, fired, stats, "down"))
        try:
            await asyncio.wait({up, down, asyncio.ensure_future(fired.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if fired.is_set():
                action = self.fault.then
                if action == "reset":
                    _abort(c_writer)
                    _abort(s_writer)
                elif action == "close":
                    c_writer.close()
                    s_writer.close()
                elif action == "stall":
                    await asyncio.wait({up}, return_when=asyncio.FIRST_COMPLETED)  # until the client gives up
            else:
                await asyncio.wait({up, down}, return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (c_writer, s_writer):
                w.close()
            print(f"conn {n} ended after {time.monotonic() - t0:.2f}s fault={'yes' if fired.is_set() else 'no'}"
                  f" up={stats['up']} down={stats['down']}", flush=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    fired: asyncio.Event | None, stats: dict[str, int], side: str) -> None:
        """Forward ``reader`` to ``writer`` with the configured lag; the server side counts bytes for faults."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sent = 0

        async def release() -> None:
            while True:
                at, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    queue.task_done()
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(data)
                await writer.drain()
                queue.task_done()

        releaser = asyncio.ensure_future(release())
        last = 0.0
        armed = fired is not None and self.fault.after_bytes is not None and self.fault.then != "pass"
        try:
            while True:
                data = await reader.read(4096)
                trip = armed and data and sent + len(data) >= self.fault.after_bytes  # type: ignore[operator]
                if trip:
                    data = data[: self.fault.after_bytes - sent]  # type: ignore[operator]
                sent += len(data)
                stats[side] = sent
                last = max(last, time.monotonic() + self._lag())
                queue.put_nowait((last, data))
                if trip:
                    await queue.join()  # the bytes before the fault are delivered first
                    fired.set()  # type: ignore[union-attr]
                    await asyncio.Event().wait()  # forward nothing more
                if not data:
                    await releaser
                    return
        finally:
            releaser.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main_async(args: argparse.Namespace) -> None:
    fault = Fault(args.delay_ms / 1000, args.jitter_ms / 1000, args.after_bytes, args.then)
    proxy = Proxy(_addr(args.target), fault, args.seed)
    host, port = _addr(args.listen)
    server = await asyncio.start_server(proxy.handle, host, port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--after-bytes", type=int, default=None, help="bytes from the target before --then applies")
    p.add_argument("--then", choices=["pass", "reset", "close", "stall"], default="pass")
    p.add_argument("--seed", type=int, default=0)
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
