"""``python -m trio_stomp.broker``: run the broker from the command line.

This module owns the command line: flags and a TOML file become a :class:`Config`, logs go
to stderr, one flushed ``listening on URL`` line per bound listener goes to stdout, and
SIGINT/SIGTERM run the broker's graceful shutdown (listeners, then sessions with an ERROR
"broker shutting down" and the grace period, then housekeeping) before exiting 0.

It never holds broker logic: everything it does goes through :func:`serve_broker`.
Exit codes: 0 after a signal-driven shutdown, 1 when a listener cannot be bound, 2 for a
bad command line or configuration.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from ._auth import hash_password, load_users_file
from ._broker import Broker, serve_broker
from ._config import DEFAULT_LISTEN, LOG_LEVELS, Config, config_from_mapping, load_config
from ._listeners import make_server_ssl_context

logger = logging.getLogger("trio_stomp.broker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_stomp.broker",
        description=(
            "A STOMP 1.0/1.1/1.2 message broker on Trio. Prints one 'listening on URL' line "
            "per bound listener on stdout; logs go to stderr. SIGINT/SIGTERM shut it down "
            "gracefully (exit code 0). Flags override the --config file, which overrides "
            "the defaults."
        ),
    )
    add = parser.add_argument
    add(
        "--listen",
        action="append",
        metavar="URL",
        help=f"address to listen on: tcp://HOST:PORT, tls://HOST:PORT, ws://HOST:PORT/PATH "
        f"or wss://HOST:PORT/PATH (STOMP over WebSocket) (port 0 = any free port); repeatable "
        f"(default: {DEFAULT_LISTEN})",
    )
    add("--config", metavar="FILE.toml", help="read settings from a TOML file (same names)")
    add(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level for stderr (default: INFO)",
    )
    add(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="on shutdown, how long sessions may take to send their ERROR frame and flush "
        "(default: 5)",
    )
    add(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="close a connection that sent no CONNECT within this time (default: 10)",
    )
    add(
        "--heart-beat",
        metavar="CX,CY",
        help="heart-beat the broker announces, in ms: it sends every CX, wants one every CY "
        "(0 = never; default: 10000,10000)",
    )
    add(
        "--heart-beat-tolerance",
        type=float,
        metavar="FACTOR",
        help="drop a client silent for the negotiated interval times FACTOR (default: 2.0)",
    )
    add(
        "--default-destination-type",
        choices=("topic", "queue"),
        help="what a destination outside /queue/, /topic/, /temp-queue/ is (default: topic)",
    )
    add(
        "--prefetch",
        type=int,
        metavar="N",
        help="default max unacknowledged messages per client-ack subscription (default: 1000)",
    )
    add(
        "--max-prefetch",
        type=int,
        metavar="N",
        help="largest prefetch a SUBSCRIBE header may ask for (default: 100000)",
    )
    add(
        "--max-send-buffer",
        type=int,
        metavar="BYTES",
        help="bytes queued for one connection before it counts as a slow consumer "
        "(default: 1048576)",
    )
    add(
        "--slow-consumer-policy",
        choices=("disconnect", "drop"),
        help="what a topic does to a subscriber whose buffer is full: disconnect it with an "
        "ERROR, or drop the message for it and count (default: disconnect)",
    )
    add(
        "--max-frame-size",
        type=int,
        metavar="BYTES",
        help="largest frame (head and body) (default: 16 MiB + 64 KiB)",
    )
    add("--max-body-size", type=int, metavar="BYTES", help="largest body (default: 16 MiB)")
    add(
        "--max-line-length",
        type=int,
        metavar="BYTES",
        help="longest command or header line (default: 16384)",
    )
    add("--max-headers", type=int, metavar="N", help="most headers in one frame (default: 128)")
    add(
        "--store",
        metavar="URL",
        help="where persistent messages and durable subscriptions are kept: 'memory' "
        "(nothing survives the process) or sqlite:PATH (default: memory)",
    )
    add(
        "--store-sync",
        choices=("full", "normal"),
        help="SQLite commit durability: 'full' survives a power loss, 'normal' a broker "
        "crash (default: full)",
    )
    add(
        "--max-redeliveries",
        type=int,
        metavar="N",
        help="dead-letter a queue message that came back more than N times (NACK, consumer "
        "lost); 0 = never (default: 10)",
    )
    add(
        "--dead-letter-prefix",
        metavar="PREFIX",
        help="dead letters of /queue/NAME go to PREFIX+NAME (default: /queue/DLQ.)",
    )
    add(
        "--expiry-policy",
        choices=("drop", "dead-letter"),
        help="what happens to a message whose 'expires' time passed before delivery "
        "(default: drop)",
    )
    add(
        "--expiry-sweep-interval",
        type=float,
        metavar="SECONDS",
        help="how often expired messages are removed from unconsumed queues (default: 1)",
    )
    add(
        "--durable-backlog",
        type=int,
        metavar="N",
        help="messages a durable subscription keeps while its client is away (default: 10000)",
    )
    add(
        "--destinations",
        metavar="TOML",
        help="per-destination settings as inline TOML, one key per pattern, e.g. "
        "'\"/queue/orders.*\" = {persistent = true, ttl = 60, max_redeliveries = 3}' "
        "(keys: persistent, ttl, expiry_policy, max_redeliveries, dead_letter_queue; in a "
        '--config file: [destinations."PATTERN"] tables)',
    )
    add(
        "--durable-overflow",
        choices=("drop-oldest", "drop-newest"),
        help="what a full durable subscription drops (default: drop-oldest)",
    )
    add("--server-name", metavar="NAME", help="the CONNECTED frame's server header")
    # Security and limits (docs/security.md).
    add(
        "--users",
        metavar="FILE.toml",
        help="users file: password hashes, groups and ACL rules (make a hash with: "
        "python -m trio_stomp.broker passwd USER)",
    )
    add(
        "--allow-anonymous",
        action="store_true",
        default=None,
        help="let clients without credentials in (default: only when no users are "
        "configured and every listener is on loopback)",
    )
    add("--tls-cert", metavar="PEM", help="certificate chain for tls:// and wss:// listeners")
    add("--tls-key", metavar="PEM", help="private key for tls:// and wss:// listeners")
    add(
        "--tls-ca",
        metavar="PEM",
        help="require tls:// clients to present a certificate signed by these CAs; its "
        "common name is the client's user name",
    )
    add(
        "--auth-failure-delay",
        type=float,
        metavar="SECONDS",
        help="first delay after a failed CONNECT from an address, doubled per failure "
        "(default: 0.25)",
    )
    add(
        "--auth-failure-max-delay",
        type=float,
        metavar="SECONDS",
        help="longest delay after failed CONNECTs from an address (default: 10)",
    )
    add("--max-connections", type=int, metavar="N", help="open connections (default: 10000)")
    add(
        "--max-connections-per-address",
        type=int,
        metavar="N",
        help="open connections from one IP address (default: 1000)",
    )
    add(
        "--max-subscriptions",
        type=int,
        metavar="N",
        help="subscriptions per connection (default: 1000)",
    )
    add(
        "--max-transactions",
        type=int,
        metavar="N",
        help="open transactions per connection (default: 100)",
    )
    add(
        "--max-transaction-frames",
        type=int,
        metavar="N",
        help="SEND/ACK/NACK frames in one transaction (default: 10000)",
    )
    add(
        "--max-queue-depth",
        type=int,
        metavar="N",
        help="messages waiting in one queue (default: 100000)",
    )
    add(
        "--queue-full-policy",
        choices=("error", "drop-oldest"),
        help="a SEND to a full queue gets an ERROR, or the oldest message is dropped "
        "(default: error)",
    )
    add(
        "--max-destinations",
        type=int,
        metavar="N",
        help="queues, topics and temp queues at once (default: 100000)",
    )
    return parser


def build_config(args: argparse.Namespace) -> Config:
    """The Config the parsed command line asks for.

    Raises:
      ValueError: an invalid setting (or TOML file). OSError: the file cannot be read.
    """
    overrides: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name == "config" or value is None:
            continue
        overrides[name] = value
    if args.config is not None:
        return load_config(args.config, **overrides)
    return config_from_mapping({}, **overrides)


async def _run(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            broker: Broker = await nursery.start(serve_broker, config)
            for address in broker.addresses:
                print(f"listening on {address}", flush=True)
            async for signum in signals:
                logger.info("received %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _check_security_files(config: Config) -> None:
    """Read the users file and the TLS files once before starting, so a bad one is a
    command-line error (exit 2) rather than a failure inside the running broker."""
    if config.users is not None:
        load_users_file(config.users)
    if config.tls_cert is not None:
        make_server_ssl_context(config.tls_cert, config.tls_key, config.tls_ca)


def passwd(argv: Sequence[str]) -> int:
    """``python -m trio_stomp.broker passwd USER``: print a users-file entry for USER.

    Reads the password twice from the terminal (or once from stdin with
    ``--password-stdin``) and prints a ``[users.USER]`` table holding its salted scrypt
    hash, to paste into (or append to) the users file. Returns the exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m trio_stomp.broker passwd",
        description="Print a users-file entry ([users.USER] with a salted scrypt password "
        "hash) for USER; append it to the file given to --users.",
    )
    parser.add_argument("user")
    parser.add_argument("--groups", default="", help="comma-separated groups")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    args = parser.parse_args(argv)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(f"[users.{json.dumps(args.user)}]")
    print(f"password = {json.dumps(hash_password(password))}")
    if groups:
        print(f"groups = {json.dumps(groups)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the broker until SIGINT/SIGTERM. Returns the exit code (see the module doc)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["passwd"]:
        return passwd(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        _check_security_files(config)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(
        stream=sys.stderr,
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _raise_open_files_limit()
    _tune_garbage_collector()
    try:
        trio.run(_run, config)
    except OSError as exc:
        logger.error("cannot start the broker: %s", exc)
        return 1
    except BaseExceptionGroup as group:
        # A listener that cannot bind fails inside the broker's nurseries, so it arrives
        # wrapped (once per nursery level): report it like a bare OSError.
        errors, others = group.split(OSError)
        if errors is None or others is not None:
            raise
        logger.error("cannot start the broker: %s", _first_leaf(errors))
        return 1
    return 0


def _raise_open_files_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit to the hard one (a
    default soft limit of 1024 caps a broker at about a thousand clients), and log it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        logger.info("open files limit: %d", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning(
            "open files limit stays at %d (raising it to %d failed: %s)", soft, hard, exc
        )
        return
    logger.info("open files limit raised from %d to %d", soft, hard)


#: Allocations between two young-generation collections (CPython's default is 700).
_GC_YOUNG_THRESHOLD = 10_000


def _tune_garbage_collector() -> None:
    """Collect cycles less often: the broker allocates a few container objects per frame
    (frames, messages, tuples of headers), so at the default threshold the collector runs
    every ~150 messages and costs ~6% of the per-message CPU (`python
    benchmarks/bench_core.py --callgrind queue_ack`: 121k -> 114k instructions). What
    start-up made (modules, config) is frozen out of every later collection. Only the
    command line does this: an application embedding the broker keeps its own settings."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


if __name__ == "__main__":
    sys.exit(main())
