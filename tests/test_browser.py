"""Independent WebSocket peers against our broker: @stomp/stompjs in headless Chromium, and
@stomp/stompjs in Node over the ``ws`` package.

Both run the same scenario (``tests/browser/scenario.js``): connect over WebSocket,
subscribe with ``client-individual`` acks, publish a text body, a binary body with NULs and
a large text body that stompjs splits over several WebSocket messages, ack what arrives,
disconnect. A Python client on plain TCP is the other side, in both directions.

The browser is Debian's ``/usr/bin/chromium`` driven by ``playwright-core`` (never a
downloaded browser); the page and stompjs's bundle (from ``tests/browser/node_modules``) are
served by this module's own HTTP server on 127.0.0.1. ``.ci/install-browser-deps.sh``
installs chromium and the npm packages; without them these tests skip locally and FAIL
under ``CI=true``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from _requirements import require

import trio_stomp
from trio_stomp.broker import Broker, open_broker

BROWSER_DIR = Path(__file__).parent / "browser"
WEB_CHAT_DIR = Path(__file__).parent.parent / "examples" / "web_chat"
NODE_MODULES = BROWSER_DIR / "node_modules"
STOMPJS_BUNDLE = NODE_MODULES / "@stomp" / "stompjs" / "bundles" / "stomp.umd.min.js"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
INSTALL_HINT = "run .ci/install-browser-deps.sh (as root)"

TEXT_FROM_PYTHON = "héllo from Python ✓ 🐍"
BINARY_FROM_PYTHON = bytes(range(256)) + b"\x00\x00\xff\x00"
TEXT_FROM_JS = "héllo from stompjs ✓ 🌐"
BINARY_FROM_JS = [0, 1, 2, 0, 255, 254, 0, 10, 13, 0, 128, 0]
#: Only BMP characters: stompjs splits a large frame's string at UTF-16 code units.
LARGE_FROM_JS = "".join(f"line {i}: é✓ {'x' * (i % 37)}\n" for i in range(200))


def _require_node() -> str:
    node = shutil.which("node")
    require(node is not None, f"node is not installed: {INSTALL_HINT}")
    assert node is not None
    for package in ("@stomp/stompjs", "ws", "playwright-core"):
        require(
            (NODE_MODULES / package / "package.json").is_file(),
            f"npm package {package} is missing in tests/browser/node_modules: {INSTALL_HINT}",
        )
    return node


def _require_chromium() -> None:
    require(Path(CHROMIUM).is_file(), f"{CHROMIUM} is not installed: {INSTALL_HINT}")


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker(
        listen=["tcp://127.0.0.1:0", "ws://127.0.0.1:0/stomp"], shutdown_grace=1.0
    ) as broker:
        yield broker


def _address(broker: Broker, scheme: str) -> str:
    (url,) = [a for a in broker.addresses if a.startswith(f"{scheme}://")]
    return url


# ---------------------------------------------------------------- a tiny static HTTP server


async def _serve_file(stream: trio.SocketStream, files: dict[str, tuple[bytes, str]]) -> None:
    """Answer one GET with a file from ``files`` (or 404), then close. Never raises."""
    try:
        request = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
        target = request.split(b"\r\n", 1)[0].split(b" ")[1:2]
        path = target[0].decode("latin-1").partition("?")[0] if target else ""
        body, content_type = files.get(path, (b"not found\n", "text/plain"))
        status = "200 OK" if path in files else "404 Not Found"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    """Serve the interop page, scenario.js and stompjs's bundle on 127.0.0.1."""
    files = {
        "/interop.html": ((BROWSER_DIR / "interop.html").read_bytes(), "text/html; charset=utf-8"),
        "/scenario.js": ((BROWSER_DIR / "scenario.js").read_bytes(), "text/javascript"),
        "/web_chat/": ((WEB_CHAT_DIR / "index.html").read_bytes(), "text/html; charset=utf-8"),
    }
    if STOMPJS_BUNDLE.is_file():
        files["/stomp.umd.min.js"] = (STOMPJS_BUNDLE.read_bytes(), "text/javascript")
        # the example loads its local copy first (the CDN only if that is missing)
        files["/web_chat/stomp.umd.min.js"] = files["/stomp.umd.min.js"]

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_file(stream, files)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the scenario


def _options(broker: Broker, inbox: str, outbox: str) -> dict[str, Any]:
    return {
        "url": _address(broker, "ws"),
        "inbox": inbox,
        "outbox": outbox,
        "expect": 2,
        "text": TEXT_FROM_JS,
        "binary": BINARY_FROM_JS,
        "large": LARGE_FROM_JS,
        "heartbeat": 2000,
        "timeoutMs": 20000,
    }


async def _run_node(node: str, args: list[str]) -> dict[str, Any]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [node, *args],
            cwd=BROWSER_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {stdout}\nstderr: {stderr}"
    outcome: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    assert outcome.get("error") is None, outcome["error"]
    return outcome


async def _exchange(broker: Broker, inbox: str, outbox: str, run_js: Any) -> dict[str, Any]:
    """Python on TCP publishes to ``inbox`` and consumes ``outbox`` while JS runs."""
    host_port = _address(broker, "tcp").removeprefix("tcp://")
    async with (
        trio_stomp.open_client(f"stomp://{host_port}") as python,
        python.subscribe(outbox, receipt=True) as from_js,
    ):
        await python.send(inbox, TEXT_FROM_PYTHON, receipt=True)
        await python.send(
            inbox, BINARY_FROM_PYTHON, content_type="application/octet-stream", receipt=True
        )
        outcome: dict[str, Any] = await run_js()
        with trio.fail_after(10):
            outcome["python_received"] = [await from_js.receive() for _ in range(3)]
    return outcome


def _check(outcome: dict[str, Any], broker: Broker) -> None:
    result = outcome["result"]
    # what JS saw
    assert result["subprotocol"] == "v12.stomp"
    assert result["connected"]["version"] == "1.2"
    text, binary = result["received"]
    assert text["text"] == TEXT_FROM_PYTHON
    assert bytes(text["bytes"]) == TEXT_FROM_PYTHON.encode()
    assert text["headers"]["content-type"] == "text/plain;charset=utf-8"
    assert bytes(binary["bytes"]) == BINARY_FROM_PYTHON
    assert binary["headers"]["content-type"] == "application/octet-stream"
    assert binary["headers"]["ack"]  # client-individual: an ack id per message
    # what Python saw
    got = outcome["python_received"]
    assert got[0].text == TEXT_FROM_JS
    assert got[1].body == bytes(BINARY_FROM_JS)
    assert got[1].headers["content-type"] == "application/octet-stream"
    assert got[2].text == LARGE_FROM_JS
    # the acks arrived: nothing came back to the queue when the client disconnected
    stats = broker.statistics()
    assert stats.messages_redelivered == 0
    assert stats.messages_queued == 0
    assert stats.messages_unacked == 0


async def test_stompjs_in_chromium(broker: Broker, http_port: int) -> None:
    node = _require_node()
    _require_chromium()
    options = _options(broker, "/queue/to-browser", "/queue/from-browser")
    url = f"http://127.0.0.1:{http_port}/interop.html?options={quote(json.dumps(options))}"

    async def run_js() -> dict[str, Any]:
        return await _run_node(node, ["drive_browser.mjs", url, "30000"])

    outcome = await _exchange(broker, "/queue/to-browser", "/queue/from-browser", run_js)
    assert "Chrome/" in outcome["userAgent"]
    _check(outcome, broker)


@pytest.mark.parametrize(
    ("protocols", "subprotocol", "version"),
    [
        (["v12.stomp", "v11.stomp", "v10.stomp"], "v12.stomp", "1.2"),
        (["v11.stomp"], "v11.stomp", "1.1"),
    ],
)
async def test_stompjs_in_node_over_ws(
    broker: Broker, protocols: list[str], subprotocol: str, version: str
) -> None:
    node = _require_node()
    options = _options(broker, "/queue/to-node", "/queue/from-node")
    options["protocols"] = protocols
    options["versions"] = [version]

    async def run_js() -> dict[str, Any]:
        return await _run_node(node, ["node_client.mjs", json.dumps(options)])

    outcome = await _exchange(broker, "/queue/to-node", "/queue/from-node", run_js)
    assert outcome["result"]["subprotocol"] == subprotocol
    assert outcome["result"]["connected"]["version"] == version
    if version == "1.2":
        _check(outcome, broker)
    else:  # the same exchange over STOMP 1.1 (ack ids are message ids there)
        received = outcome["result"]["received"]
        assert bytes(received[1]["bytes"]) == BINARY_FROM_PYTHON
        assert outcome["python_received"][1].body == bytes(BINARY_FROM_JS)
        assert broker.statistics().messages_redelivered == 0


async def test_web_chat_example(broker: Broker, http_port: int) -> None:
    """examples/web_chat: two tabs chat in a room, the Python bot (on WebSocket too)
    answers, and a Python client on TCP sees the tabs' messages."""
    node = _require_node()
    _require_chromium()
    spec = importlib.util.spec_from_file_location("web_chat_bot", WEB_CHAT_DIR / "bot.py")
    assert spec is not None and spec.loader is not None
    bot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot)
    room = "test-room"
    host_port = _address(broker, "tcp").removeprefix("tcp://")
    async with (
        trio.open_nursery() as nursery,
        trio_stomp.open_client(f"stomp://{host_port}") as python,
        python.subscribe(f"/topic/chat.{room}", receipt=True) as chat,
    ):
        await nursery.start(bot.run_bot, _address(broker, "ws"), room)
        outcome = await _run_node(
            node,
            [
                "drive_chat.mjs",
                f"http://127.0.0.1:{http_port}/web_chat/",
                _address(broker, "ws"),
                room,
            ],
        )
        seen = []
        with trio.fail_after(10):
            while {"from": "alice", "text": "hello from alice"} not in seen:
                seen.append(json.loads((await chat.receive()).text))
        nursery.cancel_scope.cancel()
    assert "alice: hello from alice" in outcome["bob"]
    assert "bot: SHOUT, BOT" in outcome["alice"]
    assert "bot: welcome, bob! type !help" in outcome["bob"]
