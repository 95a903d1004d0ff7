"""Our client against our own broker, over loopback TCP (integration, both sides ours).

The RabbitMQ suite (test_interop_rabbitmq.py) is the independent check; this one makes sure
the two halves of trio_stomp agree with each other on real sockets: negotiation,
heart-beats, ack modes, transactions, request/reply through ``/temp-queue/``, reconnection
after the broker restarts on the same port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_stomp import BrokerError, Client, ReconnectPolicy, open_client
from trio_stomp.broker import open_broker


@asynccontextmanager
async def broker_url(**settings: Any) -> AsyncIterator[str]:
    settings.setdefault("listen", ["tcp://127.0.0.1:0"])
    settings.setdefault("shutdown_grace", 0.5)
    async with open_broker(**settings) as broker:
        [address] = broker.addresses
        yield address.replace("tcp://", "stomp://")


@asynccontextmanager
async def client_and_url(**options: Any) -> AsyncIterator[tuple[Client, str]]:
    options.setdefault("heart_beat", (0, 0))
    async with broker_url() as url, open_client(url, **options) as client:
        yield client, url


async def test_connect_send_subscribe_ack() -> None:
    async with client_and_url() as (client, _url):
        assert client.version == "1.2"
        assert (client.server or "").startswith("trio_stomp/")
        async with client.subscribe("/queue/a", ack="client-individual", receipt=True) as sub:
            await client.send("/queue/a", "hello", headers={"x": "1"}, receipt=True)
            message = await sub.receive()
            assert (message.text, message.headers["x"]) == ("hello", "1")
            await message.nack()
            again = await sub.receive()
            assert again.text == "hello"
            await again.ack(receipt=True)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_older_versions(version: str) -> None:
    async with client_and_url(versions=[version]) as (client, _url):
        assert client.version == version
        async with client.subscribe("/queue/v", ack="client", receipt=True) as sub:
            await client.send("/queue/v", b"1")
            await client.send("/queue/v", b"2", receipt=True)
            await sub.receive()
            await (await sub.receive()).ack(receipt=True)


async def test_transactions() -> None:
    async with (
        client_and_url() as (client, _url),
        client.subscribe("/queue/tx", receipt=True) as sub,
    ):
        async with client.transaction() as tx:
            await tx.send("/queue/tx", b"committed")
        with pytest.raises(KeyError):
            async with client.transaction() as tx:
                await tx.send("/queue/tx", b"aborted")
                raise KeyError
        await client.send("/queue/tx", b"last", receipt=True)
        assert (await sub.receive()).body == b"committed"
        assert (await sub.receive()).body == b"last"


@pytest.mark.parametrize("subscribe_temp_queue", [None, True])
async def test_request_reply(subscribe_temp_queue: bool | None) -> None:
    # Our broker, like ActiveMQ, delivers a temp queue only to a SUBSCRIBE; the client's
    # default (None) sends one because the broker is not RabbitMQ.
    async with (
        broker_url() as url,
        open_client(url, heart_beat=(0, 0)) as server,
        open_client(url, heart_beat=(0, 0), subscribe_temp_queue=subscribe_temp_queue) as c,
    ):

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            async with server.subscribe("/queue/rpc", receipt=True) as sub:
                task_status.started()
                request = await sub.receive()
                await server.reply(request, "pong")

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            with trio.fail_after(10):
                reply = await c.request("/queue/rpc", "ping")
        assert reply.text == "pong"


async def test_heart_beats_over_tcp() -> None:
    async with (
        broker_url(heart_beat=(200, 200)) as url,
        open_client(url, heart_beat=(200, 200)) as client,
    ):
        assert client.heart_beat == (200, 200)
        await trio.sleep(1.2)  # six periods each way
        assert client.connected
        await client.send("/queue/hb", b"x", receipt=True)


async def test_reconnects_when_the_broker_comes_back() -> None:
    async with broker_url() as url:
        port = int(url.rsplit(":", 1)[1])
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, jitter=0)
    async with trio.open_nursery() as nursery:
        stopped = trio.Event()
        restart = trio.Event()

        async def run_broker(task_status: trio.TaskStatus[None]) -> None:
            async with open_broker(listen=[f"tcp://127.0.0.1:{port}"], shutdown_grace=0.2):
                task_status.started()
                await restart.wait()
            stopped.set()

        await nursery.start(run_broker)
        async with (
            open_client(url, heart_beat=(0, 0), reconnect=policy) as client,
            client.subscribe("/queue/r", receipt=True) as sub,
        ):
            restart.set()
            await stopped.wait()
            with trio.fail_after(10):
                while client.connected:  # noqa: ASYNC110 - polling a flag is all we have
                    await trio.sleep(0.01)
                async with open_broker(listen=[f"tcp://127.0.0.1:{port}"], shutdown_grace=0.2):
                    await client.send("/queue/r", b"after restart", receipt=True)
                    assert (await sub.receive()).body == b"after restart"
                    assert client.statistics().connections == 2


async def test_broker_shutdown_without_policy_fails_the_client() -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run_broker(task_status: trio.TaskStatus[str]) -> None:
            async with broker_url() as url:
                task_status.started(url)
                await stop.wait()

        url = await nursery.start(run_broker)
        async with open_client(url, heart_beat=(0, 0)) as client:
            async with client.subscribe("/queue/x", receipt=True) as sub:
                stop.set()
                with pytest.raises(BrokerError, match="shutting down"), trio.fail_after(10):
                    await sub.receive()
            with pytest.raises(BrokerError):
                await client.send("/queue/x", b"too late")
