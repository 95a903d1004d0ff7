"""Soak test: well-behaved clients keep exchanging messages while half of 2,000
connections attack the broker (not run in CI; run it by hand, it takes about a minute).

Three processes, all on loopback:

- the **broker** (``--role broker``): ``open_broker`` with a users file and its limits;
  on a line from stdin it prints its ``statistics()`` as JSON and stops;
- the **attackers** (``--role attack``), from source addresses 127.0.0.2 and up (so that
  the per-address back-off and limits see them as other hosts), five kinds in equal
  numbers: garbage bytes, slowloris (one byte a second), oversize frames (a huge
  ``content-length``, a huge header line, a body that never ends), never-reading topic
  consumers, and CONNECT floods with a wrong password;
- the **good clients** (this process): idle authenticated connections, producer/consumer
  pairs on queues (every SEND window confirmed by a RECEIPT) and a topic publisher with a
  fast subscriber, all from 127.0.0.1.

It measures the good clients' throughput and latency without the attack, then under it,
checks that every accepted (receipted) message arrived exactly once and in order, that
every idle client is still connected, and reports the broker's peak RSS (``VmHWM``) and
its RSS over time. Every loop is bounded by ``--duration``.

    python benchmarks/soak.py                 # 1,000 good + 1,000 hostile, 2 x 20 s
    python benchmarks/soak.py --duration 5 --idle 100 --bad 100   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trio_stomp import Frame, FrameParser, Heartbeat, serialize
from trio_stomp.broker._auth import hash_password

GOOD_USER, GOOD_PASSWORD = "good", "soak-password"
FAN_TOPIC = "/topic/soak.fan"
ATTACK_KINDS = ("garbage", "slowloris", "oversize", "never_reading", "connect_flood")


# -- shared --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


class Conn:
    """A raw STOMP connection (frames in, frames out)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = FrameParser("1.2")
        self.pending: list[Frame] = []

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        return cls(stream)

    async def send(self, command: str, headers: Any = (), body: bytes = b"") -> None:
        await self.stream.send_all(serialize(Frame(command, list(headers), body)))

    async def receive(self) -> Frame:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.pending.extend(e for e in self.parser.feed(data) if not isinstance(e, Heartbeat))
        return self.pending.pop(0)

    async def connect(self, login: str = GOOD_USER, passcode: str = GOOD_PASSWORD) -> Frame:
        await self.send(
            "CONNECT",
            [("accept-version", "1.2"), ("host", "soak"), ("login", login), ("passcode", passcode)],
        )
        return await self.receive()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- the broker process --------------------------------------------------------------------


async def run_broker(args: argparse.Namespace) -> None:
    import logging

    import attrs

    from trio_stomp.broker import open_broker

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    async with open_broker(
        listen=["tcp://127.0.0.1:0"],
        users=args.users,
        connect_timeout=5.0,
        heart_beat=(0, 0),
        max_connections=10_000,
        max_connections_per_address=2_000,
        max_body_size=1 << 20,
        max_frame_size=(1 << 20) + 65536,
        max_send_buffer=256 * 1024,
        shutdown_grace=1.0,
    ) as broker:
        print(f"listening on {broker.addresses[0]}", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        await stdin.receive_some(1)
        print(json.dumps(attrs.asdict(broker.statistics())), flush=True)


# -- the attacker process ------------------------------------------------------------------


async def attack(
    kind: str, number: int, port: int, deadline: float, counts: dict[str, int]
) -> None:
    # Wrong-password floods come from 127.0.0.2-21, the other attacks from 127.0.0.22-41,
    # so the back-off the floods earn does not shield the broker from the other attacks.
    source = f"127.0.0.{(2 if kind == 'connect_flood' else 22) + number % 20}"
    rng = random.Random(number)
    while trio.current_time() < deadline:
        try:
            with trio.fail_after(max(0.01, deadline - trio.current_time())):
                conn = await Conn.open(port, source)
        except (OSError, trio.TooSlowError):
            counts["connect_errors"] += 1
            await trio.sleep(0.5)
            continue
        counts[kind] += 1
        try:
            with trio.move_on_at(deadline):
                await ATTACKS[kind](conn, rng)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            pass
        except Exception as exc:  # an unexpected answer: count it, keep attacking
            name = f"unexpected {type(exc).__name__}"
            counts[name] = counts.get(name, 0) + 1
        finally:
            await conn.aclose()
        await trio.sleep(0.05 + rng.random() * 0.1)


async def drain(conn: Conn) -> None:
    """Read until the broker closes the connection."""
    try:
        while await conn.stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def garbage(conn: Conn, rng: random.Random) -> None:
    await conn.stream.send_all(bytes(rng.getrandbits(8) for _ in range(512)))
    await drain(conn)


async def slowloris(conn: Conn, rng: random.Random) -> None:
    data = b"CONNECT\naccept-version:1.2\nlogin:good\npasscode:" + b"x" * 100
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, conn)
        try:
            for byte in data:
                await conn.stream.send_all(bytes([byte]))
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # closed by the broker (the CONNECT timeout)
        nursery.cancel_scope.cancel()


async def oversize(conn: Conn, rng: random.Random) -> None:
    choice = rng.randrange(3)
    if choice == 0:  # before authenticating: a header line far beyond the limit
        await conn.stream.send_all(b"CONNECT\nx:" + b"y" * 100_000)
    else:
        frame = await conn.connect()
        if frame.command != "CONNECTED":
            return
        if choice == 1:  # a content-length far beyond the body limit
            await conn.stream.send_all(
                b"SEND\ndestination:/queue/big\ncontent-length:999999999\n\n" + b"z" * 65536
            )
        else:  # a body that never ends
            await conn.stream.send_all(b"SEND\ndestination:/queue/big\n\n")
            for _ in range(64):
                await conn.stream.send_all(b"z" * 65536)
    await drain(conn)


async def never_reading(conn: Conn, rng: random.Random) -> None:
    await conn.send(
        "CONNECT",
        [("accept-version", "1.2"), ("login", GOOD_USER), ("passcode", GOOD_PASSWORD)],
    )
    await conn.send("SUBSCRIBE", [("destination", FAN_TOPIC), ("id", "1")])
    while True:  # never read; notice a closed connection by writing a heart-beat
        await trio.sleep(2.0)
        await conn.stream.send_all(b"\n")


async def connect_flood(conn: Conn, rng: random.Random) -> None:
    frame = await conn.connect(passcode=f"wrong-{rng.random()}")
    assert frame.command == "ERROR"
    await drain(conn)


ATTACKS: dict[str, Callable[[Conn, random.Random], Awaitable[None]]] = {
    "garbage": garbage,
    "slowloris": slowloris,
    "oversize": oversize,
    "never_reading": never_reading,
    "connect_flood": connect_flood,
}


async def run_attack(args: argparse.Namespace) -> None:
    counts = dict.fromkeys((*ATTACK_KINDS, "connect_errors"), 0)
    deadline = trio.current_time() + args.duration
    async with trio.open_nursery() as nursery:
        for number in range(args.bad):
            kind = ATTACK_KINDS[number % len(ATTACK_KINDS)]
            nursery.start_soon(attack, kind, number, args.port, deadline, counts)
            if number % 50 == 49:
                await trio.sleep(0.01)
        print("ready", flush=True)
    print(json.dumps(counts), flush=True)


# -- the good clients ----------------------------------------------------------------------


class Meter:
    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[float] = []

    def reset(self) -> None:
        self.received = 0
        self.latencies = []


async def pair(
    number: int,
    port: int,
    stop: trio.Event,
    meter: Meter,
    totals: dict[str, int],
    window: int,
    size: int,
) -> None:
    destination = f"/queue/soak.{number}"
    producer, consumer = await Conn.open(port), await Conn.open(port)
    for conn in (producer, consumer):
        assert (await conn.connect()).command == "CONNECTED"
    await consumer.send("SUBSCRIBE", [("destination", destination), ("id", "1"), ("receipt", "s")])
    assert (await consumer.receive()).command == "RECEIPT"
    accepted = 0
    expected = 0
    errors: list[str] = []

    async def produce() -> None:
        nonlocal accepted
        seq = 0
        while not stop.is_set():
            batch = []
            for i in range(window):
                head = b"%012d %020d " % (seq, time.perf_counter_ns())
                headers = [("destination", destination)]
                if i == window - 1:
                    headers.append(("receipt", str(seq)))
                batch.append(serialize(Frame("SEND", headers, head.ljust(size, b"."))))
                seq += 1
            await producer.stream.send_all(b"".join(batch))
            frame = await producer.receive()
            if frame.command != "RECEIPT":
                errors.append(f"producer {number}: {frame}")
                break
            accepted = seq
        # The queue keeps one producer's order: END arrives after everything accepted.
        await producer.send("SEND", [("destination", destination), ("receipt", "end")], b"END")

    async def consume() -> None:
        nonlocal expected
        while True:
            frame = await consumer.receive()
            if frame.command != "MESSAGE":
                errors.append(f"consumer {number}: {frame}")
                return
            if frame.body == b"END":
                return
            seq_text, sent_ns = frame.body[:12], int(frame.body[13:33])
            if int(seq_text) != expected:
                errors.append(f"consumer {number}: expected {expected}, got {int(seq_text)}")
            expected = int(seq_text) + 1
            meter.received += 1
            meter.latencies.append((time.perf_counter_ns() - sent_ns) / 1e6)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        with trio.fail_after(3600):
            await consume()
    totals["accepted"] += accepted
    totals["delivered"] += expected
    totals["errors"] += len(errors)
    for error in errors[:3]:
        print("  !", error, file=sys.stderr)
    for conn in (producer, consumer):
        await conn.aclose()


async def fan(port: int, stop: trio.Event, totals: dict[str, int]) -> None:
    """A topic publisher (~200 msg/s of 4 KiB, which the never-reading attackers also
    subscribe to) and one fast subscriber that must get every message."""
    publisher, subscriber = await Conn.open(port), await Conn.open(port)
    for conn in (publisher, subscriber):
        await conn.connect()
    await subscriber.send("SUBSCRIBE", [("destination", FAN_TOPIC), ("id", "1"), ("receipt", "r")])
    assert (await subscriber.receive()).command == "RECEIPT"
    sent = 0

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            await publisher.send(
                "SEND", [("destination", FAN_TOPIC)], b"%012d" % sent + b"f" * 4084
            )
            sent += 1
            await trio.sleep(0.005)
        await publisher.send("SEND", [("destination", FAN_TOPIC), ("receipt", "end")], b"END")

    got = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        while True:
            frame = await subscriber.receive()
            if frame.body == b"END":
                break
            got += 1
    totals["fan_sent"] += sent
    totals["fan_received"] += got
    for conn in (publisher, subscriber):
        await conn.aclose()


async def idle_client(port: int, alive: list[Conn]) -> None:
    conn = await Conn.open(port)
    frame = await conn.connect()
    assert frame.command == "CONNECTED", frame
    alive.append(conn)


def summary(meter: Meter, seconds: float, cpu: tuple[float, float]) -> dict[str, float]:
    lat = sorted(meter.latencies) or [0.0]
    return {
        "broker_cpu_share": round(cpu[0] / seconds, 2),
        "msgs_per_broker_cpu_s": round(meter.received / cpu[0]) if cpu[0] else 0,
        "good_clients_cpu_share": round(cpu[1] / seconds, 2),
        "msgs_per_s": round(meter.received / seconds),
        "latency_p50_ms": round(lat[len(lat) // 2], 2),
        "latency_p99_ms": round(lat[int(len(lat) * 0.99)], 2),
        "latency_max_ms": round(lat[-1], 2),
    }


def prepare() -> tuple[str, str]:
    """Write the users file; returns its path and this script's."""
    folder = tempfile.mkdtemp(prefix="soak-")
    users = os.path.join(folder, "users.toml")
    with open(users, "w") as file:
        # Cheap hash parameters (ln=10) so 1,000 good CONNECTs take a second or two; the
        # wrong-password flood is slowed by the back-off, not by the hash.
        entry = hash_password(GOOD_PASSWORD, log_n=10)
        file.write(f'[users.{GOOD_USER}]\npassword = "{entry}"\n')
    return users, os.path.abspath(__file__)


async def run_main(args: argparse.Namespace) -> int:
    users, script = prepare()
    broker = await trio.lowlevel.open_process(
        [sys.executable, script, "--role", "broker", "--users", users],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert broker.stdout is not None and broker.stdin is not None
    broker_out = FrameLines(broker.stdout)
    line = await broker_out.readline()
    port = int(line.rsplit(":", 1)[1])
    print(f"broker pid {broker.pid} on port {port}", flush=True)
    rss_samples: list[tuple[float, int]] = []
    fds: list[int] = []  # the broker's open file descriptors (sockets, mostly)
    start = trio.current_time()

    async def sample_rss() -> None:
        while True:
            rss_samples.append((trio.current_time() - start, rss_kib(broker.pid)[0]))
            fds.append(len(os.listdir(f"/proc/{broker.pid}/fd")))
            await trio.sleep(0.5)

    def cpus(since: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        """(broker, this process) CPU seconds, minus ``since``."""
        mine = os.times()
        return (
            cpu_seconds(broker.pid) - since[0],
            mine.user + mine.system - since[1],
        )

    alive: list[Conn] = []
    totals = dict.fromkeys(("accepted", "delivered", "errors", "fan_sent", "fan_received"), 0)
    meter = Meter()
    results: dict[str, Any] = {}
    attack_counts: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        t0 = time.perf_counter()
        async with trio.open_nursery() as connecting:
            for n in range(args.idle):
                connecting.start_soon(idle_client, port, alive)
                if n % 100 == 99:
                    await trio.sleep(0.05)
        print(f"{len(alive)} idle good clients connected in {time.perf_counter() - t0:.1f} s")
        stop = trio.Event()
        async with trio.open_nursery() as traffic:
            for n in range(args.pairs):
                traffic.start_soon(pair, n, port, stop, meter, totals, args.window, args.size)
            traffic.start_soon(fan, port, stop, totals)
            await trio.sleep(2)  # warm up
            meter.reset()
            t0, cpu0 = time.perf_counter(), cpus()
            await trio.sleep(args.duration)
            results["baseline"] = summary(meter, time.perf_counter() - t0, cpus(cpu0))
            print("without attack:", results["baseline"], flush=True)
            if not args.no_attack:
                attacker = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        script,
                        "--role",
                        "attack",
                        "--port",
                        str(port),
                        "--bad",
                        str(args.bad),
                        "--duration",
                        str(args.duration + 8),
                    ],
                    stdout=subprocess.PIPE,
                )
                assert attacker.stdout is not None
                attack_out = FrameLines(attacker.stdout)
                assert await attack_out.readline() == "ready"
                await trio.sleep(5)  # let every kind of attack get going
                meter.reset()
                t0, cpu0 = time.perf_counter(), cpus()
                await trio.sleep(args.duration)
                results["under_attack"] = summary(meter, time.perf_counter() - t0, cpus(cpu0))
                print("under attack:  ", results["under_attack"], flush=True)
                with trio.move_on_after(args.duration + 30):
                    attack_counts = json.loads(await attack_out.readline())
                    await attacker.wait()
                if attacker.returncode is None:
                    attacker.kill()
            stop.set()
            # Producers finish their window, consumers drain: bounded.
            traffic.cancel_scope.deadline = trio.current_time() + 60
        if traffic.cancel_scope.cancelled_caught:
            print("! the good clients did not finish draining within 60 s", flush=True)
            totals["errors"] += 1
        # Every idle client is still connected and answers.
        answered = 0
        with trio.move_on_after(30):
            for n, conn in enumerate(alive):
                try:
                    await conn.send("DISCONNECT", [("receipt", str(n))])
                    if (await conn.receive()).command == "RECEIPT":
                        answered += 1
                except (trio.BrokenResourceError, EOFError, OSError):
                    pass
                await conn.aclose()
        nursery.cancel_scope.cancel()
    _, hwm = rss_kib(broker.pid)
    await broker.stdin.send_all(b"stop\n")
    stats = json.loads(await broker_out.readline())
    await broker.wait()
    results.update(
        {
            "good_connections": args.idle + 2 * args.pairs + 2,
            "hostile_connections": 0 if args.no_attack else args.bad,
            "attack_connections_made": attack_counts,
            "attack_connections_per_s": round(sum(attack_counts.values()) / (args.duration + 8), 1),
            "idle_clients_alive_at_end": f"{answered}/{len(alive)}",
            "queue_messages_accepted": totals["accepted"],
            "queue_messages_delivered": totals["delivered"],
            "order_or_loss_errors": totals["errors"],
            "topic_sent_received": f"{totals['fan_received']}/{totals['fan_sent']}",
            "broker_peak_open_fds": max(fds),
            "broker_peak_rss_mib": round(hwm / 1024, 1),
            "broker_rss_mib_over_time": " ".join(
                f"{t:.0f}s:{kib / 1024:.0f}"
                for t, kib in rss_samples[:: max(1, len(rss_samples) // 12)]
            ),
            "broker_statistics": {
                k: stats[k]
                for k in (
                    "connections_total",
                    "authentication_failures",
                    "access_refused",
                    "limits_hit",
                    "slow_consumers",
                    "errors_sent",
                    "messages_enqueued",
                    "messages_delivered",
                    "messages_dropped",
                )
            },
            "load_average": os.getloadavg(),
        }
    )
    print(json.dumps(results, indent=2))
    lost = totals["accepted"] - totals["delivered"]
    ok = lost == 0 and totals["errors"] == 0 and answered == len(alive)
    ok = ok and totals["fan_received"] == totals["fan_sent"]
    print("PASS" if ok else "FAIL", f"(lost {lost})")
    return 0 if ok else 1


class FrameLines:
    """Lines from a subprocess pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def readline(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the subprocess ended")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("main", "broker", "attack"), default="main")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--idle", type=int, default=946, help="idle good connections")
    parser.add_argument("--pairs", type=int, default=25, help="producer/consumer pairs")
    parser.add_argument("--bad", type=int, default=1000, help="hostile connections")
    parser.add_argument("--window", type=int, default=20, help="SENDs per RECEIPT")
    parser.add_argument("--size", type=int, default=256, help="message body bytes")
    parser.add_argument("--no-attack", action="store_true")
    parser.add_argument("--users")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.role == "broker":
        trio.run(run_broker, args)
        return 0
    if args.role == "attack":
        trio.run(run_attack, args)
        return 0
    return trio.run(run_main, args)


if __name__ == "__main__":
    sys.exit(main())
