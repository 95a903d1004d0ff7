"""Client resume: a consumer with a reconnect policy loses nothing when its TCP link is
cut mid-stream, and processes each message once by de-duplicating on ``message-id``.

A proxy between the consumer and the broker drops every link on demand (both sockets
closed at once, as a failing network would); the producer talks to the broker directly
and keeps sending meanwhile. Covered: a ``client-individual`` queue subscription and a
durable topic subscription (CONNECT ``client-id`` + ``durable-subscription-name``)."""

from __future__ import annotations

import pytest
import trio

from trio_stomp import ConnectionLost, Message, ReconnectPolicy, open_client
from trio_stomp.broker import Broker, open_broker

N = 300
RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.1, jitter=0.0)


class CuttingProxy:
    """Forwards loopback TCP connections to ``port``; :meth:`cut` drops them all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.links: set[trio.CancelScope] = set()
        self.cuts = 0
        self.accepted = 0

    async def handle(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
        with trio.CancelScope() as link:
            self.links.add(link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, link)
                nursery.start_soon(self._pump, upstream, downstream, link)
        self.links.discard(link)
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(downstream)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope
    ) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        link.cancel()

    def cut(self) -> None:
        self.cuts += 1
        for link in self.links:
            link.cancel()


async def ack(message: Message) -> None:
    """Acknowledge; an ACK that cannot be written because the link just dropped is
    harmless: the broker redelivers the message and the message-id check skips it."""
    try:
        await message.ack()
    except ConnectionLost:
        pass


async def run_resume(
    broker: Broker, destination: str, subscribe_headers: dict[str, str], cuts: int
) -> tuple[list[int], int, int]:
    """Consume ``N`` messages through a proxy cut ``cuts`` times; returns the processed
    bodies, the deliveries seen and the client's connection count."""
    port = int(broker.addresses[0].rpartition(":")[2])
    proxy = CuttingProxy(port)
    processed: list[int] = []
    deliveries = 0
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, proxy.handle, 0)
        proxy_port = listeners[0].socket.getsockname()[1]
        async with (
            open_client(
                f"stomp://127.0.0.1:{proxy_port}",
                reconnect=RECONNECT,
                heart_beat=(0, 0),
                connect_headers={"client-id": "resumer"},
            ) as consumer,
            open_client(f"stomp://127.0.0.1:{port}", heart_beat=(0, 0)) as producer,
        ):
            seen: set[str] = set()
            async with consumer.subscribe(
                destination, ack="client-individual", headers=subscribe_headers, receipt=True
            ) as subscription:

                async def produce() -> None:
                    for i in range(N):
                        await producer.send(destination, b"%d" % i)
                        if i % 10 == 9:
                            await trio.sleep(0.002)  # a steady stream, across the cuts
                    await producer.send(destination, b"end-of-stream", receipt=True)

                nursery.start_soon(produce)
                next_cut = [N * (k + 1) // (cuts + 1) for k in range(cuts)]
                async for message in subscription:
                    deliveries += 1
                    # The recipe for processing each message once: remember message-ids
                    # (a redelivery keeps its id), skip repeats, acknowledge everything.
                    if message.message_id not in seen:
                        seen.add(message.message_id)
                        if message.body == b"end-of-stream":
                            await ack(message)
                            break
                        processed.append(int(message.body))
                    await ack(message)
                    if next_cut and len(processed) >= next_cut[0]:
                        del next_cut[0]
                        proxy.cut()
            connections = consumer.statistics().connections
        nursery.cancel_scope.cancel()
    assert proxy.cuts == cuts
    return processed, deliveries, connections


@pytest.mark.parametrize("cuts", [1, 3])
async def test_queue_consumer_resumes_without_loss(cuts: int) -> None:
    async with open_broker(listen=["tcp://127.0.0.1:0"], shutdown_grace=0.5) as broker:
        with trio.fail_after(60):
            processed, deliveries, connections = await run_resume(
                broker, "/queue/resume", {"prefetch": "20"}, cuts
            )
    assert sorted(processed) == list(range(N))  # every message, each processed once
    assert processed == list(range(N))  # and in queue order (redeliveries go first)
    assert connections == cuts + 1
    assert deliveries >= N + 1


@pytest.mark.parametrize("cuts", [1, 3])
async def test_durable_subscriber_resumes_without_loss(cuts: int) -> None:
    async with open_broker(listen=["tcp://127.0.0.1:0"], shutdown_grace=0.5) as broker:
        with trio.fail_after(60):
            processed, _, connections = await run_resume(
                broker,
                "/topic/resume",
                {"durable-subscription-name": "stream", "prefetch": "20"},
                cuts,
            )
        # While the link was down, the durable subscription kept what was published.
        assert broker.statistics().messages_dropped == 0
    assert sorted(processed) == list(range(N))
    assert processed == list(range(N))
    assert connections == cuts + 1
