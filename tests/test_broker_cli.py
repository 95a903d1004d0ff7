"""``python -m trio_stomp.broker``: the command line, as a user runs it.

Subprocess tests: it starts, prints its real port, serves a client, and on SIGTERM or
SIGINT sends that client ERROR "broker shutting down" and exits 0.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import attrs
import pytest
import trio
from test_broker import RawClient

from trio_stomp.broker import Config
from trio_stomp.broker.__main__ import _parser, build_config


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def _start(*args: str) -> tuple[trio.Process, list[str]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_stomp.broker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    buffer = bytearray()
    count = args.count("--listen") or 1
    lines = []
    with trio.fail_after(20):
        for _ in range(count):
            lines.append((await _read_line(process.stdout, buffer)).decode())
    return process, lines


async def _finish(process: trio.Process) -> tuple[int, str]:
    assert process.stderr is not None
    with trio.fail_after(20):
        chunks = []
        while data := await process.stderr.receive_some(65536):
            chunks.append(data)
        code = await process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            await pipe.aclose()
    return code, b"".join(chunks).decode()


async def test_cli_serves_and_shuts_down_cleanly_on_sigterm(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('server_name = "cli-test/1"\nprefetch = 10\nlisten = ["tcp://127.0.0.1:0"]\n')
    process, lines = await _start(
        "--config", str(config), "--listen", "tcp://127.0.0.1:0", "--shutdown-grace", "2"
    )
    try:
        (line,) = lines
        assert line.startswith("listening on tcp://127.0.0.1:")
        port = int(line.rpartition(":")[2])
        assert port != 0
        raw = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        connected = await raw.connect()
        assert connected.headers["server"] == "cli-test/1"  # from the TOML file
        await raw.send("SUBSCRIBE", {"destination": "/queue/cli", "id": "1"})
        await raw.send("SEND", {"destination": "/queue/cli"}, b"hello")
        assert (await raw.expect("MESSAGE")).body == b"hello"
        process.send_signal(signal.SIGTERM)
        error = await raw.expect_error_and_close()
        assert error.headers["message"] == "broker shutting down"
        await raw.aclose()
    except BaseException:
        process.kill()
        raise
    code, stderr = await _finish(process)
    assert code == 0, stderr
    assert "opened from 127.0.0.1:" in stderr
    assert "closed" in stderr
    assert "ERROR broker shutting down" in stderr
    assert stderr.index("received SIGTERM") < stderr.index("broker stopped")


async def test_cli_sigint_with_two_listeners_exits_0() -> None:
    process, lines = await _start(
        "--listen", "tcp://127.0.0.1:0", "--listen", "tcp://127.0.0.1:0", "--log-level", "debug"
    )
    assert len(lines) == 2 and len(set(lines)) == 2
    assert all(line.startswith("listening on tcp://127.0.0.1:") for line in lines)
    process.send_signal(signal.SIGINT)
    code, stderr = await _finish(process)
    assert code == 0, stderr


async def test_cli_rejects_bad_settings() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_stomp.broker", "--listen", "udp://127.0.0.1:0"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"udp" in result.stderr


#: Settings that are Python objects, not command-line values (embedding only).
NOT_FLAGS = frozenset({"authenticator"})


async def test_cli_help_documents_every_setting() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_stomp.broker", "--help"], capture_stdout=True
    )
    text = result.stdout.decode()
    for field in attrs.fields(Config):
        if field.name in NOT_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    assert "--config" in text


def test_flags_override_the_toml_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(
        "[broker]\nprefetch = 7\nheart-beat = [0, 500]\nslow_consumer_policy = 'drop'\n"
    )
    args = _parser().parse_args(["--config", str(path), "--prefetch", "9"])
    config = build_config(args)
    assert config.prefetch == 9
    assert config.heart_beat == (0, 500)
    assert config.slow_consumer_policy == "drop"
    path.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="unknown configuration key"):
        build_config(_parser().parse_args(["--config", str(path)]))


@pytest.mark.parametrize(
    "settings",
    [
        {"listen": ["http://127.0.0.1:1"]},
        {"listen": ["tcp://127.0.0.1:99999"]},
        {"prefetch": 0},
        {"heart_beat": (-1, 0)},
        {"slow_consumer_policy": "ignore"},
        {"default_destination_type": "stream"},
        {"heart_beat_tolerance": 0.5},
        {"prefetch": 10, "max_prefetch": 5},
    ],
)
def test_config_validation(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Config(**settings)  # type: ignore[arg-type]


async def test_a_port_in_use_is_a_one_line_error_and_exit_1() -> None:
    holder = trio.socket.socket()
    await holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with trio.fail_after(20):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_stomp.broker", "--listen", f"tcp://127.0.0.1:{port}"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        holder.close()
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert "cannot start the broker" in stderr and "in use" in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""


async def test_the_open_files_limit_is_raised_and_logged() -> None:
    import resource
    import shlex

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.fail(f"the hard open-files limit ({hard}) is too low to test raising it")
    command = shlex.join(
        [sys.executable, "-m", "trio_stomp.broker", "--listen", "tcp://127.0.0.1:0"]
    )
    process = await trio.lowlevel.open_process(
        ["bash", "-c", f"ulimit -S -n 256 && exec {command}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    with trio.fail_after(20):
        line = await _read_line(process.stdout, bytearray())
    assert line.startswith(b"listening on tcp://127.0.0.1:")
    process.send_signal(signal.SIGTERM)
    code, stderr = await _finish(process)
    assert code == 0
    expected = "open files limit: 256" if hard == resource.RLIM_INFINITY else "raised from 256"
    assert expected in stderr
