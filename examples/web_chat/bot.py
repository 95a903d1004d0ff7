"""A chat bot for the web_chat example: it sits in a room with the browser tabs.

It subscribes to ``/topic/chat.ROOM`` with trio_stomp's client (over TCP or, with a
``ws://`` URL, over WebSocket exactly like the tabs) and answers commands:
``!help``, ``!time``, ``!upper TEXT``, ``!count``. Messages are JSON objects
``{"from": NAME, "text": TEXT}``; the bot marks its own with ``"bot": true`` and never
answers a bot, so two bots cannot loop.

Run it next to the broker (see README.md)::

    python examples/web_chat/bot.py --url stomp://127.0.0.1:61613 --room lobby
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import trio

import trio_stomp


def answer(text: str, sender: str, seen: int) -> str | None:
    """The bot's reply to one chat line, or None when it has nothing to say."""
    command, _, argument = text.strip().partition(" ")
    if command == "!help":
        return "commands: !help, !time, !upper TEXT, !count"
    if command == "!time":
        return time.strftime("it is %H:%M:%S UTC", time.gmtime())
    if command == "!upper":
        return argument.upper() or "!upper what?"
    if command == "!count":
        return f"{seen} messages in this room since I joined"
    if text == "(joined)":
        return f"welcome, {sender}! type !help"
    return None


async def run_bot(
    url: str,
    room: str,
    name: str = "bot",
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``room`` until cancelled. Reports ``started`` once it is subscribed.

    Raises what :func:`trio_stomp.open_client` raises (``ConnectionLost`` when the broker is
    unreachable or goes away).
    """
    topic = f"/topic/chat.{room}"

    async def say(client: trio_stomp.Client, text: str) -> None:
        body = json.dumps({"from": name, "text": text, "bot": True})
        await client.send(topic, body, content_type="application/json")

    async with trio_stomp.open_client(url) as client, client.subscribe(topic, receipt=True) as chat:
        await say(client, f"{name} is here: type !help")
        task_status.started()
        seen = 0
        async for message in chat:
            seen += 1
            try:
                data: Any = json.loads(message.text)
            except (ValueError, UnicodeDecodeError):
                continue  # not a chat line
            if not isinstance(data, dict) or data.get("bot"):
                continue
            reply = answer(str(data.get("text", "")), str(data.get("from", "?")), seen)
            if reply is not None:
                await say(client, reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default="stomp://127.0.0.1:61613",
        help="broker URL: stomp://HOST:PORT or ws://HOST:PORT/PATH (default: %(default)s)",
    )
    parser.add_argument("--room", default="lobby", help="chat room (default: %(default)s)")
    parser.add_argument("--name", default="bot", help="the bot's name (default: %(default)s)")
    args = parser.parse_args()
    try:
        trio.run(run_bot, args.url, args.room, args.name)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
