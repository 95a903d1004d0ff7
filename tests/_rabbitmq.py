"""A private, throw-away RabbitMQ node for interop tests.

This module owns starting and stopping one RabbitMQ node (Debian's
``rabbitmq-server`` package) that is isolated from any system-wide broker:

* its own Erlang port mapper (``epmd``) on a free loopback port
  (``ERL_EPMD_PORT``), so it never registers with, starts or kills the
  machine's shared epmd on 4369;
* its own node name, Erlang cookie (``HOME`` is the base directory),
  data/log/config/plugins files under the base directory, and free loopback
  ports for AMQP, Erlang distribution, STOMP and Web-STOMP;
* every listener bound to 127.0.0.1 only; ``guest``/``guest`` works because
  RabbitMQ allows that user from loopback by default.

It must never touch ``/etc/rabbitmq``, ``/var/lib/rabbitmq``, the system
service, or any process it did not start. It uses blocking calls
(``subprocess``, ``socket``) on purpose: it runs from a synchronous,
session-scoped pytest fixture, never inside trio code.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import attrs

__all__ = ["RabbitMQ", "RabbitMQStartError", "find_rabbitmq_server", "run_rabbitmq"]

#: How long we wait for the node to answer a STOMP CONNECT.
START_TIMEOUT = 60.0
#: How long a graceful ``rabbitmqctl stop`` may take before we signal the node.
STOP_TIMEOUT = 30.0
#: Upper bound for the open-files limit we ask for (capped by the hard limit).
NOFILE_TARGET = 65536

_SEARCH_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/sbin", "/usr/local/sbin")


class RabbitMQStartError(RuntimeError):
    """The node did not come up; the message ends with the tail of its logs."""


@attrs.frozen
class RabbitMQ:
    """A running private RabbitMQ node (value object; the node lives while
    the ``run_rabbitmq`` block that produced it is open)."""

    stomp_port: int
    """STOMP listener on 127.0.0.1 (plugin ``rabbitmq_stomp``)."""
    web_stomp_port: int
    """Web-STOMP listener on 127.0.0.1, websocket path ``/ws``."""
    amqp_port: int
    """AMQP 0-9-1 listener on 127.0.0.1."""
    node_name: str
    """Erlang node name, e.g. ``trio_stomp_1234@localhost``."""
    env: dict[str, str] = attrs.field(repr=False, eq=False)
    """Environment that lets ``rabbitmqctl`` reach this node (cookie, epmd port)."""
    host: str = "127.0.0.1"
    """Address every listener is bound to."""
    login: str = "guest"
    """User that may connect from loopback."""
    passcode: str = "guest"
    """Password of ``login``."""

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS...`` against this node; return stdout.

        Blocks until the command exits (at most *timeout* seconds; the Erlang
        CLI alone takes about a second to start). Raises
        ``subprocess.CalledProcessError`` on a non-zero exit and
        ``subprocess.TimeoutExpired`` on timeout.
        """
        result = subprocess.run(
            [_tool("rabbitmqctl"), "-n", self.node_name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout


def find_rabbitmq_server() -> str | None:
    """Path of the real ``rabbitmq-server`` script, or None if not installed.

    Prefers ``/usr/lib/rabbitmq/bin``: Debian's ``/usr/sbin`` wrapper switches
    to the ``rabbitmq`` user and ``/var/lib/rabbitmq``, which a private node
    must not do.
    """
    for directory in _SEARCH_DIRS:
        candidate = os.path.join(directory, "rabbitmq-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server")


def _tool(name: str) -> str:
    server = find_rabbitmq_server()
    if server is None:
        raise FileNotFoundError("rabbitmq-server is not installed")
    path = os.path.join(os.path.dirname(server), name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{name} not found next to {server}")
    return path


def _find_epmd() -> str:
    found = shutil.which("epmd")
    if found is not None:
        return found
    for candidate in sorted(pathlib.Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
        return str(candidate)
    raise FileNotFoundError("epmd (Erlang port mapper) not found; is erlang-base installed?")


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback TCP ports (all held open at once, then released).

    Another process may grab one before RabbitMQ binds it; that shows up as a
    start failure with a clear log, which is acceptable for tests.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _raise_nofile_limit() -> None:
    # Runs in the child between fork and exec: keep it to one syscall pair.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(NOFILE_TARGET, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _stomp_connected(port: int, timeout: float) -> bool:
    """True if a STOMP 1.2 CONNECT on *port* is answered with CONNECTED."""
    connect = (
        b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\nheart-beat:0,0\n\n\0"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(connect)
            data = b""
            while b"\0" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
            if not data.startswith(b"CONNECTED\n"):
                return False
            with contextlib.suppress(OSError):
                sock.sendall(b"DISCONNECT\n\n\0")
            return True
    except OSError:
        return False


def _tail(paths: list[pathlib.Path], lines: int = 40) -> str:
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tail = "\n".join(text.splitlines()[-lines:])
        parts.append(f"--- {path} (last {lines} lines) ---\n{tail}")
    return "\n".join(parts) if parts else "(no log output found)"


def _terminate_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of *proc*, then SIGKILL it after *grace* s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while children (beam, erl_child_setup) linger.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _write_config(base: pathlib.Path, amqp: int, dist: int, stomp: int, web_stomp: int) -> None:
    (base / "rabbitmq.conf").write_text(
        "\n".join(
            [
                f"listeners.tcp.1 = 127.0.0.1:{amqp}",
                f"stomp.listeners.tcp.1 = 127.0.0.1:{stomp}",
                f"web_stomp.tcp.port = {web_stomp}",
                "web_stomp.tcp.ip = 127.0.0.1",
                # Tests must never stall on a resource alarm of the test machine.
                "disk_free_limit.absolute = 1MB",
                "vm_memory_high_watermark.relative = 0.8",
                "log.console = false",
                "log.file.level = info",
                "",
            ]
        )
    )
    # Empty files that shadow the system-wide ones under /etc/rabbitmq.
    (base / "rabbitmq-env.conf").write_text("")
    # Exactly what ``rabbitmq-plugins enable --offline rabbitmq_stomp
    # rabbitmq_web_stomp`` writes (the node resolves dependencies at boot), but
    # without that command's 1-4 s of Erlang CLI start-up.
    (base / "enabled_plugins").write_text("[rabbitmq_stomp,rabbitmq_web_stomp].\n")
    cookie = base / ".erlang.cookie"
    cookie.write_text(f"TRIOSTOMP{os.getpid()}{dist}{time.monotonic_ns()}")
    cookie.chmod(0o400)


@contextlib.contextmanager
def run_rabbitmq(base_dir: pathlib.Path) -> Iterator[RabbitMQ]:
    """Start a private RabbitMQ node under *base_dir*; stop it on exit.

    Blocks until the STOMP listener answers a CONNECT with CONNECTED (about
    5-15 s; at most ``START_TIMEOUT``). Raises ``FileNotFoundError`` if
    RabbitMQ or epmd is not installed, ``RabbitMQStartError`` (with the tail of
    the node's logs) if it exits early or does not answer in time (also when a
    plugin is missing).

    On exit (normal or not) it asks the node to stop with ``rabbitmqctl
    stop``, then signals its process group, and always kills the private
    epmd. Nothing is left running and nothing outside *base_dir* is written.
    """
    server = find_rabbitmq_server()
    if server is None:
        raise FileNotFoundError("rabbitmq-server is not installed")
    base = base_dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    epmd_port, amqp, dist, stomp, web_stomp = _free_ports(5)
    node = f"trio_stomp_{os.getpid()}@localhost"
    _write_config(base, amqp, dist, stomp, web_stomp)
    for sub in ("mnesia", "log"):
        (base / sub).mkdir(exist_ok=True)

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_")) and key != "NOTIFY_SOCKET"
    }
    env.update(
        HOME=str(base),
        ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_NODENAME=node,
        RABBITMQ_USE_LONGNAME="false",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(amqp),
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
        # Erlang distribution listens on all interfaces unless told otherwise,
        # for the node and for every rabbitmqctl run alike.
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        # Do not spin idle schedulers on a small, shared CI machine.
        RABBITMQ_SCHEDULER_BUSY_WAIT_THRESHOLD="none",
        LC_ALL="C.UTF-8",
    )

    logs = [base / "server.out", base / "log" / f"{node}.log", base / "epmd.out"]
    with contextlib.ExitStack() as cleanup:
        epmd_out = cleanup.enter_context((base / "epmd.out").open("wb"))
        epmd = subprocess.Popen(
            [_find_epmd(), "-port", str(epmd_port), "-address", "127.0.0.1"],
            env=env,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=epmd_out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cleanup.callback(_terminate_group, epmd, 5.0)

        server_out = cleanup.enter_context((base / "server.out").open("wb"))
        proc = subprocess.Popen(
            [server],
            env=env,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=server_out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_nofile_limit,
        )
        info = RabbitMQ(
            stomp_port=stomp, web_stomp_port=web_stomp, amqp_port=amqp, node_name=node, env=env
        )
        cleanup.callback(_stop_node, info, proc)

        deadline = time.monotonic() + START_TIMEOUT
        while not _stomp_connected(stomp, timeout=5.0):
            if time.monotonic() > deadline:
                raise RabbitMQStartError(
                    f"RabbitMQ node {node} did not answer STOMP CONNECT on "
                    f"127.0.0.1:{stomp} within {START_TIMEOUT:.0f} s\n{_tail(logs)}"
                )
            try:
                # Poll interval that also notices an early exit at once.
                returncode = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise RabbitMQStartError(
                f"rabbitmq-server exited with status {returncode} before "
                f"STOMP answered on 127.0.0.1:{stomp}\n{_tail(logs)}"
            )
        yield info


def _stop_node(info: RabbitMQ, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        # Graceful first; any failure (node wedged, CLI broken) falls through
        # to signals, which the rabbitmq-server script forwards to the VM.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            info.ctl("stop", timeout=STOP_TIMEOUT)
    _terminate_group(proc, grace=STOP_TIMEOUT)
