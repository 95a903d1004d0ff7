"""Interop: our client against a real RabbitMQ (rabbitmq_stomp plugin), a broker nobody here wrote.

The session-scoped ``rabbitmq`` fixture (tests/conftest.py) starts a private node; every test
uses its own destination names and leaves nothing connected. RabbitMQ specifics that show up
here, and that our client copes with:

- the ``host`` header is RabbitMQ's *virtual host*: we pass ``vhost="/"``;
- ``/temp-queue/x`` in a ``reply-to`` is created and subscribed by RabbitMQ itself; the replier
  sees ``reply-to: /reply-queue/amq.gen-...``, the reply arrives with
  ``subscription: /temp-queue/x`` (no SUBSCRIBE from us, and none allowed);
- STOMP 1.0 ACK carries ``message-id`` only; RabbitMQ packs the subscription into it;
- ``client`` mode ACK is cumulative (AMQP ``multiple``), NACK requeues (``redelivered:true``);
- an ACK for an unknown delivery is a channel error (ERROR, then close): our client never sends
  one twice, nor one already covered by a cumulative ACK.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from _rabbitmq import RabbitMQ

from trio_stomp import BrokerError, Client, Message, Subscription, open_client

#: Every test finishes well within 60 s (RabbitMQ on a busy 2-core machine included); the
#: first one also pays for the node's start (about 10 s).
pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(120)]

#: How long "nothing arrives" is watched for.
QUIET = 0.5


def name(kind: str, label: str) -> str:
    return f"/{kind}/trio-stomp-{label}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def rabbit(rabbitmq: RabbitMQ, **options: Any) -> AsyncIterator[Client]:
    options.setdefault("login", "guest")
    options.setdefault("passcode", "guest")
    options.setdefault("vhost", "/")
    options.setdefault("heart_beat", (0, 0))
    async with open_client(f"stomp://127.0.0.1:{rabbitmq.stomp_port}", **options) as client:
        yield client


async def receive(sub: Subscription) -> Message:
    with trio.fail_after(10):
        return await sub.receive()


async def nothing_arrives(sub: Subscription) -> None:
    with trio.move_on_after(QUIET):
        message = await sub.receive()
        pytest.fail(f"unexpected {message!r}: {message.body!r}")


# --------------------------------------------------------------------------- connecting


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
async def test_connect_send_subscribe_ack_with_each_version(
    rabbitmq: RabbitMQ, version: str
) -> None:
    queue = name("queue", f"v{version}")
    async with rabbit(rabbitmq, versions=[version]) as client:
        assert client.version == version
        assert (client.server or "").startswith("RabbitMQ")
        assert client.session
        async with client.subscribe(queue, ack="client-individual", receipt=True) as sub:
            await client.send(queue, f"hello {version}", receipt=True)
            message = await receive(sub)
            assert message.text == f"hello {version}"
            assert message.destination == queue
            await message.ack(receipt=True)
        # Acked: a new consumer gets nothing.
        async with client.subscribe(queue, receipt=True) as sub:
            await nothing_arrives(sub)


async def test_bad_credentials_raise_broker_error(rabbitmq: RabbitMQ) -> None:
    with pytest.raises(BrokerError) as info:
        async with rabbit(rabbitmq, passcode="wrong"):
            pytest.fail("connected with a wrong passcode")  # pragma: no cover
    assert info.value.message  # RabbitMQ: "Bad CONNECT" / "Access refused..."


async def test_heart_beats_hold_for_several_periods(rabbitmq: RabbitMQ) -> None:
    async with rabbit(rabbitmq, heart_beat=(500, 500)) as client:
        # RabbitMQ counts heart-beats in whole seconds: it answers 1000,1000 to 500,500.
        assert client.heart_beat == (1000, 1000)
        await trio.sleep(4)  # four periods, real time: both sides kept beating
        assert client.connected
        stats = client.statistics().peer
        assert stats is not None
        assert stats.heart_beats_out >= 3
        assert stats.bytes_in >= 4  # RabbitMQ's beats arrived (no frames were sent to us)
        await client.send(name("queue", "hb"), b"still alive", receipt=True)


# --------------------------------------------------------------------------- destinations


async def test_queue_delivers_each_message_to_one_consumer_with_headers(
    rabbitmq: RabbitMQ,
) -> None:
    queue = name("queue", "q")
    async with rabbit(rabbitmq) as client:
        async with client.subscribe(queue, receipt=True) as sub:
            await client.send(queue, "one", headers={"x-custom": "kept"}, content_type="text/plain")
            await client.send(queue, b"two")
            first, second = await receive(sub), await receive(sub)
        assert first.body == b"one"
        assert first.headers["x-custom"] == "kept"
        assert first.content_type == "text/plain"
        assert second.body == b"two"
        assert first.message_id != second.message_id


async def test_topic_delivers_to_every_subscriber(rabbitmq: RabbitMQ) -> None:
    topic = name("topic", "t")
    async with rabbit(rabbitmq) as client:
        cm_a, cm_b = client.subscribe(topic, receipt=True), client.subscribe(topic, receipt=True)
        async with cm_a as a, cm_b as b:
            await client.send(topic, b"fan-out", receipt=True)
            assert (await receive(a)).body == b"fan-out"
            assert (await receive(b)).body == b"fan-out"


async def test_one_mebibyte_binary_body(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "big")
    body = bytes(range(256)) * 4096  # 1 MiB, NULs included
    async with rabbit(rabbitmq) as client:
        async with client.subscribe(queue, receipt=True) as sub:
            await client.send(queue, body, receipt=True)
            message = await receive(sub)
        assert len(message.body) == 1 << 20
        assert message.body == body


# --------------------------------------------------------------------------- acknowledging


async def test_auto_ack_consumes(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "auto")
    async with rabbit(rabbitmq) as client, client.subscribe(queue, ack="auto", receipt=True) as sub:
        await client.send(queue, b"a")
        assert (await receive(sub)).body == b"a"
    async with rabbit(rabbitmq) as client, client.subscribe(queue, receipt=True) as sub:
        await nothing_arrives(sub)


async def test_client_ack_is_cumulative(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "client")
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client", receipt=True) as sub,
    ):
        for n in range(4):
            await client.send(queue, str(n))
        messages = [await receive(sub) for _ in range(4)]
        await messages[2].ack()  # acks 0, 1 and 2
        await messages[0].ack()  # already covered: sends nothing (RabbitMQ would ERROR)
        await client.send(queue, b"sync", receipt=True)
        assert (await receive(sub)).body == b"sync"
        await messages[3].ack(receipt=True)  # acks 3, not the later 'sync'
    # 0..2 acked cumulatively, 3 acked, "sync" left unacked -> only "sync" comes back.
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client", receipt=True) as sub,
    ):
        redelivered = await receive(sub)
        assert redelivered.body == b"sync"
        assert redelivered.headers.get("redelivered") == "true"
        await redelivered.ack(receipt=True)
        await nothing_arrives(sub)


async def test_client_individual_ack_is_not_cumulative(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "individual")
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client-individual", receipt=True) as sub,
    ):
        for n in range(3):
            await client.send(queue, str(n))
        messages = [await receive(sub) for _ in range(3)]
        await messages[2].ack(receipt=True)  # only "2"
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client-individual", receipt=True) as sub,
    ):
        back = sorted([(await receive(sub)).text, (await receive(sub)).text])
        assert back == ["0", "1"]
        await nothing_arrives(sub)


async def test_nack_redelivers(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "nack")
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client-individual", receipt=True) as sub,
    ):
        await client.send(queue, b"try again")
        first = await receive(sub)
        assert first.headers.get("redelivered") == "false"
        await first.nack()
        again = await receive(sub)
        assert again.body == b"try again"
        assert again.headers.get("redelivered") == "true"
        await again.ack(receipt=True)
        await nothing_arrives(sub)


# --------------------------------------------------------------------------- transactions


async def test_transaction_commit_and_abort(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "tx")
    async with rabbit(rabbitmq) as client, client.subscribe(queue, receipt=True) as sub:
        async with client.transaction() as tx:
            await tx.send(queue, b"t1")
            await tx.send(queue, b"t2")
            await client.send(queue, b"outside", receipt=True)
            assert (await receive(sub)).body == b"outside"
            await nothing_arrives(sub)  # not before COMMIT
        assert [(await receive(sub)).body for _ in range(2)] == [b"t1", b"t2"]
        with pytest.raises(RuntimeError):
            async with client.transaction() as tx:
                await tx.send(queue, b"aborted")
                raise RuntimeError("abort it")
        await client.send(queue, b"after", receipt=True)
        assert (await receive(sub)).body == b"after"
        await nothing_arrives(sub)


async def test_transactional_ack(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "txack")
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client-individual", receipt=True) as sub,
    ):
        await client.send(queue, b"kept")
        await client.send(queue, b"acked")
        kept, acked = await receive(sub), await receive(sub)
        with pytest.raises(RuntimeError):
            async with client.transaction() as tx:
                await tx.ack(kept)
                raise RuntimeError("abort the ack")
        async with client.transaction() as tx:
            await tx.ack(acked)
    async with rabbit(rabbitmq) as client, client.subscribe(queue, ack="auto", receipt=True) as sub:
        assert (await receive(sub)).body == b"kept"
        await nothing_arrives(sub)


# --------------------------------------------------------------------------- receipts, errors


async def test_receipts_for_send_subscribe_and_ack(rabbitmq: RabbitMQ) -> None:
    queue = name("queue", "receipt")
    async with (
        rabbit(rabbitmq) as client,
        client.subscribe(queue, ack="client", receipt=True) as sub,
    ):
        await client.send(queue, b"r", receipt=True)
        await (await receive(sub)).ack(receipt=True)
        assert client.statistics().pending_receipts == 0


async def test_error_frame_becomes_broker_error(rabbitmq: RabbitMQ) -> None:
    async with rabbit(rabbitmq) as client:
        with pytest.raises(BrokerError) as info:
            async with client.subscribe("/exchange/trio-stomp-no-such-exchange", receipt=True):
                pass  # pragma: no cover
        assert info.value.message
        assert not client.connected


# --------------------------------------------------------------------------- request / reply


async def test_request_reply_with_temp_queue(rabbitmq: RabbitMQ) -> None:
    service = name("queue", "service")
    seen_reply_to: list[str] = []
    async with rabbit(rabbitmq) as server, rabbit(rabbitmq) as requester:

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            async with server.subscribe(service, receipt=True) as sub:
                task_status.started()
                for _ in range(2):
                    request = await sub.receive()
                    seen_reply_to.append(request.headers["reply-to"])
                    await server.reply(request, "echo:" + request.text)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            first = await requester.request(service, "a", timeout=10)
            second = await requester.request(service, "b", timeout=10)
        assert (first.text, second.text) == ("echo:a", "echo:b")
        assert first.headers["subscription"] == "/temp-queue/trio-stomp-replies"
        assert all(r.startswith("/reply-queue/") for r in seen_reply_to)


# --------------------------------------------------------------------------- the docs


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "client.md"


def test_docs_example_runs_as_written(rabbitmq: RabbitMQ) -> None:
    """The first example of docs/client.md (the README's client section) runs unchanged,
    except for the port of our private RabbitMQ node."""
    example = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert example is not None
    code = example.group(1)
    assert "stomp://127.0.0.1:61613" in code
    code = code.replace("127.0.0.1:61613", f"127.0.0.1:{rabbitmq.stomp_port}")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=True
    )
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("connected to RabbitMQ/")
    assert lines[0].endswith("with STOMP 1.2")
    assert lines[1] == "/queue/greetings: hello, world"
