"""Our own client against our own broker (tests may import both; the broker never does).

In memory through ``Broker.connect_in_memory()`` and over loopback TCP with ``open_client``:
queues with acknowledgements, topics, transactions and request/reply through temp queues.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_stomp import open_client, open_client_over_stream
from trio_stomp.broker import open_broker


async def test_client_in_memory_queue_ack_transaction() -> None:
    async with open_broker(listen=[]) as broker:
        async with (
            open_client_over_stream(broker.connect_in_memory()) as client,
            client.subscribe("/queue/c", ack="client-individual", receipt=True) as subscription,
        ):
            await client.send("/queue/c", b"one", receipt=True)
            message = await subscription.receive()
            assert message.body == b"one"
            await message.nack()
            again = await subscription.receive()
            assert again.body == b"one" and again.headers["redelivered"] == "true"
            await again.ack(receipt=True)
            async with client.transaction() as tx:
                await client.send("/queue/c", b"two", transaction=tx)
                with trio.move_on_after(0.2):
                    await subscription.receive()
                    raise AssertionError("delivered before COMMIT")
            message = await subscription.receive()
            assert message.body == b"two"
            await message.ack(receipt=True)
        await trio.testing.wait_all_tasks_blocked()
        stats = broker.statistics()
        assert stats.messages_unacked == 0 and stats.messages_acked == 2
        assert stats.errors_sent == 0


async def test_client_over_tcp_request_reply_and_topic() -> None:
    async with open_broker(listen=["tcp://127.0.0.1:0"]) as broker:
        url = broker.addresses[0].replace("tcp://", "stomp://")
        async with (
            open_client(url) as service,
            open_client(url, subscribe_temp_queue=True) as requester,
        ):
            async with service.subscribe("/queue/add", receipt=True) as requests:

                async def serve() -> None:
                    async for request in requests:
                        a, b = request.body.split(b"+")
                        await service.reply(request, b"%d" % (int(a) + int(b)))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve)
                    with trio.fail_after(10):
                        reply = await requester.request("/queue/add", b"2+3")
                        assert reply.body == b"5"
                    nursery.cancel_scope.cancel()
            async with requester.subscribe("/topic/news", receipt=True) as news:
                await service.send("/topic/news", "hello", receipt=True)
                message = await news.receive()
                assert message.text == "hello"
                assert message.headers["destination"] == "/topic/news"
