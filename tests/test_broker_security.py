"""Broker authentication and authorization over the wire: TCP, TLS (mutual TLS too) and
in-memory connections, raw frames only.

The claim under test: with users and ACLs configured, no frame from an unauthenticated
or unauthorized client reaches any destination.
"""

from __future__ import annotations

import itertools
import ssl
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme
from test_broker import RawClient

from trio_stomp import Frame
from trio_stomp.broker import Broker, Config, open_broker
from trio_stomp.broker._auth import Credentials, Principal, hash_password, load_security
from trio_stomp.broker._listeners import make_server_ssl_context

USERS = """
[users.alice]
password = "{alice}"
groups = ["publishers"]

[users.bob]
password = "{bob}"
groups = ["consumers"]

[users.carol]                     # certificate only
groups = ["consumers"]

[[acl]]
group = "publishers"
destination = "/queue/orders.**"
permissions = ["write", "create"]

[[acl]]
group = "consumers"
destination = "/queue/orders.*"
permissions = ["read"]

[[acl]]
user = "*"
destination = "/topic/chat"
permissions = ["read", "write", "create"]
"""


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("security") / "users.toml"
    path.write_text(
        USERS.format(
            alice=hash_password("alice-secret", log_n=10),
            bob=hash_password("bob:secret\\x", log_n=10),
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_pem = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return {"tls_cert": str(cert), "tls_key": str(key), "ca": str(ca_pem)}


Connector = Callable[[], Awaitable[RawClient]]
_open: list[RawClient] = []


async def close_clients() -> None:
    """Close every client ``dial`` opened. Called from the broker fixtures' teardown:
    pytest-trio 0.8 under pytest 9 never runs an autouse async fixture."""
    while _open:
        stream = _open.pop().stream
        await trio.aclose_forcefully(stream)
        if isinstance(stream, trio.SSLStream):
            await trio.aclose_forcefully(stream.transport_stream)


def client_context(ca: trustme.CA, identity: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if identity is not None:
        ca.issue_cert(f"{identity}@example.org", common_name=identity).configure_cert(context)
    return context


async def dial(
    broker: Broker, scheme: str, context: ssl.SSLContext | None = None, version: str = "1.2"
) -> RawClient:
    if scheme == "memory":
        raw = RawClient(broker.connect_in_memory(), version)
    else:
        address = next(a for a in broker.addresses if a.startswith(scheme))
        host, _, port = address.partition("://")[2].rpartition(":")
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, int(port))
        if scheme == "tls":
            assert context is not None
            stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        raw = RawClient(stream, version)
    _open.append(raw)
    return raw


@pytest.fixture
async def broker(users_file: str, tls_files: dict[str, str]) -> AsyncIterator[Broker]:
    async with open_broker(
        listen=["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
        users=users_file,
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
        shutdown_grace=0.5,
        auth_failure_delay=0.0,
    ) as running:
        try:
            yield running
        finally:
            await close_clients()


@pytest.fixture(params=["tcp", "tls", "memory"])
def connector(request: pytest.FixtureRequest, broker: Broker, ca: trustme.CA) -> Connector:
    scheme = request.param

    async def connect() -> RawClient:
        return await dial(broker, scheme, client_context(ca) if scheme == "tls" else None)

    return connect


async def login(connector: Connector, user: str, password: str) -> RawClient:
    raw = await connector()
    await raw.connect(login=user, passcode=password)
    return raw


# -- authentication ------------------------------------------------------------------------


async def test_valid_credentials_connect(connector: Connector, broker: Broker) -> None:
    alice = await login(connector, "alice", "alice-secret")
    # A passcode with ':' and '\' arrives unescaped (CONNECT headers are never escaped).
    bob = await login(connector, "bob", "bob:secret\\x")
    await alice.send("SEND", {"destination": "/topic/chat", "receipt": "1"})
    await alice.expect("RECEIPT")
    await bob.send("DISCONNECT", {"receipt": "bye"})
    await bob.expect("RECEIPT")
    assert broker.statistics().authentication_failures == 0


async def test_unknown_user_and_wrong_password_look_the_same(
    connector: Connector, broker: Broker
) -> None:
    errors = []
    for user, password in [
        ("alice", "wrong"),
        ("mallory", "alice-secret"),
        ("carol", ""),  # certificate-only user
        ("alice", ""),
    ]:
        raw = await connector()
        await raw.send("CONNECT", {"accept-version": "1.2", "login": user, "passcode": password})
        errors.append(await raw.expect_error_and_close())
    first = errors[0]
    assert first.headers["message"] == "authentication failed"
    for error in errors[1:]:
        assert error == first
    assert b"mallory" not in first.body and b"alice" not in first.body
    assert broker.statistics().authentication_failures == 4


async def test_no_credentials_is_refused_when_users_exist(
    connector: Connector, broker: Broker
) -> None:
    raw = await connector()
    await raw.send("CONNECT", {"accept-version": "1.2"})
    error = await raw.expect_error_and_close()
    assert error.headers["message"] == "authentication failed"


async def test_frames_after_a_refused_connect_reach_nothing(
    connector: Connector, broker: Broker
) -> None:
    watcher = await login(connector, "alice", "alice-secret")
    await watcher.send("SUBSCRIBE", {"destination": "/topic/chat", "id": "1", "receipt": "r"})
    await watcher.expect("RECEIPT")
    before = broker.statistics()
    # CONNECT with a wrong password and a SEND in the same write: the SEND is never routed.
    attacker = await connector()
    await attacker.send_raw(
        b"CONNECT\naccept-version:1.2\nlogin:alice\npasscode:guess\n\n\x00"
        b"SEND\ndestination:/topic/chat\n\nsneaky\x00"
        b"SUBSCRIBE\ndestination:/queue/orders.x\nid:1\n\n\x00"
    )
    await attacker.expect_error_and_close()
    await watcher.send("SEND", {"destination": "/topic/chat"}, b"legit")
    message = await watcher.expect("MESSAGE")
    assert message.body == b"legit"
    after = broker.statistics()
    assert after.messages_enqueued == before.messages_enqueued + 1
    assert after.subscriptions == before.subscriptions


async def test_anonymous_only_when_allowed(users_file: str) -> None:
    async with open_broker(
        listen=[], users=users_file, allow_anonymous=True, shutdown_grace=0.2
    ) as broker:
        raw = RawClient(broker.connect_in_memory())
        await raw.connect()
        # The anonymous principal is bound by the ACL like anyone else ("*" rules apply).
        await raw.send("SUBSCRIBE", {"destination": "/topic/chat", "id": "1", "receipt": "r"})
        await raw.expect("RECEIPT")
        await raw.send("SEND", {"destination": "/queue/orders.x", "receipt": "s"})
        error = await raw.expect_error_and_close()
        assert error.headers["message"] == "access refused"
        # Wrong credentials are not "anonymous": they are refused.
        raw = RawClient(broker.connect_in_memory())
        await raw.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "x"})
        await raw.expect_error_and_close()


async def test_no_users_on_loopback_allows_anonymous_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_broker(listen=["tcp://127.0.0.1:0"], shutdown_grace=0.2) as broker:
        raw = await dial(broker, "tcp")
        await raw.connect(login="whoever", passcode="whatever")
        await close_clients()
    assert "anonymous access is allowed" in caplog.text


async def test_no_users_off_loopback_refuses_anonymous(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The policy is decided from the configured addresses: nothing is bound here.
    public = Config(listen=["tcp://0.0.0.0:61613"])
    security, _ = await load_security(public)
    assert not security.allow_anonymous
    assert "every CONNECT will be refused" in caplog.text
    assert await security.authenticate(Frame("CONNECT"), "10.1.2.3:4", None) is None
    loopback, _ = await load_security(Config(listen=["tcp://127.0.0.1:0", "tcp://[::1]:0"]))
    assert loopback.allow_anonymous
    explicit, _ = await load_security(attrs.evolve(public, allow_anonymous=True))
    assert explicit.allow_anonymous


async def test_refused_anonymous_over_the_wire() -> None:
    async with open_broker(listen=[], allow_anonymous=False, shutdown_grace=0.2) as broker:
        raw = RawClient(broker.connect_in_memory())
        await raw.send("CONNECT", {"accept-version": "1.2"})
        error = await raw.expect_error_and_close()
        assert error.headers["message"] == "authentication failed"


async def test_failures_are_slowed_down_per_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Fixed:
        async def authenticate(self, credentials: Credentials) -> Principal | None:
            await trio.lowlevel.checkpoint()
            return Principal("u") if credentials.passcode == "good" else None

    async with open_broker(
        listen=[],
        authenticator=Fixed(),
        auth_failure_delay=1.0,
        auth_failure_max_delay=8.0,
        shutdown_grace=0.2,
    ) as broker:
        times = []
        for _ in range(4):
            raw = RawClient(broker.connect_in_memory())
            await raw.send("CONNECT", {"accept-version": "1.2", "login": "u", "passcode": "bad"})
            await raw.expect_error_and_close()
            times.append(trio.current_time())
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(times)]
        assert gaps == [1.0, 2.0, 4.0]
        # The right password still gets in (after its slot), and resets the back-off.
        raw = RawClient(broker.connect_in_memory())
        await raw.connect(login="u", passcode="good")
        assert broker.statistics().authentication_failures == 4


# -- authorization -------------------------------------------------------------------------


async def test_authorized_exchange_stamps_user_id(connector: Connector) -> None:
    alice = await login(connector, "alice", "alice-secret")
    bob = await login(connector, "bob", "bob:secret\\x")
    await alice.send(
        "SEND", {"destination": "/queue/orders.eu", "user-id": "root", "receipt": "a"}, b"1"
    )
    await alice.expect("RECEIPT")
    await bob.send("SUBSCRIBE", {"destination": "/queue/orders.eu", "id": "s", "receipt": "r"})
    message = await bob.expect("MESSAGE")
    await bob.expect("RECEIPT")
    assert message.body == b"1"
    assert [v for k, v in message.headers.raw if k == "user-id"] == ["alice"]


async def test_unauthorized_send_is_refused_and_delivers_nothing(
    connector: Connector, broker: Broker
) -> None:
    alice = await login(connector, "alice", "alice-secret")
    bob = await login(connector, "bob", "bob:secret\\x")
    await alice.send("SEND", {"destination": "/queue/orders.eu", "receipt": "a"}, b"first")
    await alice.expect("RECEIPT")
    await bob.send("SUBSCRIBE", {"destination": "/queue/orders.eu", "id": "s", "receipt": "r"})
    assert (await bob.expect("MESSAGE")).body == b"first"
    await bob.expect("RECEIPT")
    # bob may read but not write.
    spy = await login(connector, "bob", "bob:secret\\x")
    await spy.send("SEND", {"destination": "/queue/orders.eu", "receipt": "x"}, b"forged")
    error = await spy.expect_error_and_close()
    assert error.headers["message"] == "access refused"
    assert error.headers["receipt-id"] == "x"
    # Nothing arrived: the next thing bob sees is alice's next message.
    await alice.send("SEND", {"destination": "/queue/orders.eu"}, b"second")
    assert (await bob.expect("MESSAGE")).body == b"second"
    assert broker.statistics().access_refused == 1


async def test_unauthorized_subscribe_is_refused(connector: Connector, broker: Broker) -> None:
    alice = await login(connector, "alice", "alice-secret")
    await alice.send("SUBSCRIBE", {"destination": "/queue/orders.eu", "id": "1", "receipt": "r"})
    error = await alice.expect_error_and_close()
    assert error.headers["message"] == "access refused"
    assert error.headers["receipt-id"] == "r"
    assert broker.statistics().subscriptions == 0


async def test_create_permission_is_needed_for_a_new_destination(connector: Connector) -> None:
    # bob may read /queue/orders.* but not create it.
    bob = await login(connector, "bob", "bob:secret\\x")
    await bob.send("SUBSCRIBE", {"destination": "/queue/orders.new", "id": "1"})
    error = await bob.expect_error_and_close()
    assert error.headers["message"] == "access refused"


async def test_unauthorized_transactional_send_never_commits(
    connector: Connector, broker: Broker
) -> None:
    bob = await login(connector, "bob", "bob:secret\\x")
    await bob.send("BEGIN", {"transaction": "t"})
    await bob.send("SEND", {"destination": "/queue/elsewhere", "transaction": "t"}, b"x")
    await bob.send("COMMIT", {"transaction": "t", "receipt": "c"})
    error = await bob.expect_error_and_close()
    assert error.headers["message"] == "access refused"
    assert broker.statistics().messages_enqueued == 0


async def test_temp_queues_stay_private(connector: Connector) -> None:
    alice = await login(connector, "alice", "alice-secret")
    bob = await login(connector, "bob", "bob:secret\\x")
    # Temp queues need no ACL rule for their owner.
    await alice.send("SUBSCRIBE", {"destination": "/temp-queue/replies", "id": "t"})
    await alice.send("SEND", {"destination": "/topic/chat", "reply-to": "/temp-queue/replies"})
    await bob.send("SUBSCRIBE", {"destination": "/topic/chat", "id": "c", "receipt": "r"})
    await bob.expect("RECEIPT")
    await alice.send("SEND", {"destination": "/topic/chat", "reply-to": "/temp-queue/replies"})
    request = await bob.expect("MESSAGE")
    reply_to = request.headers["reply-to"]
    assert reply_to.startswith("/reply-queue/")
    await bob.send("SEND", {"destination": reply_to}, b"answer")
    reply = await alice.expect("MESSAGE")
    assert reply.body == b"answer"
    assert reply.headers["user-id"] == "bob"
    # Nobody else can subscribe to it.
    await bob.send("SUBSCRIBE", {"destination": reply_to, "id": "steal"})
    await bob.expect_error_and_close()


# -- TLS -----------------------------------------------------------------------------------


async def test_tls_listener_url_and_tls_1_2_minimum(broker: Broker, ca: trustme.CA) -> None:
    assert any(a.startswith("tls://127.0.0.1:") for a in broker.addresses)
    old = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    raw = await dial(broker, "tls", old)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await raw.connect(login="alice", passcode="alice-secret")


async def test_server_context_is_tls_1_2_or_later(tls_files: dict[str, str]) -> None:
    context = make_server_ssl_context(tls_files["tls_cert"], tls_files["tls_key"])
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    mutual = make_server_ssl_context(tls_files["tls_cert"], tls_files["tls_key"], tls_files["ca"])
    assert mutual.verify_mode == ssl.CERT_REQUIRED


async def test_tls_client_verifies_the_broker(broker: Broker) -> None:
    untrusting = ssl.create_default_context()  # does not know our test CA
    raw = await dial(broker, "tls", untrusting)
    with pytest.raises(trio.BrokenResourceError):
        await raw.connect(login="alice", passcode="alice-secret")


@pytest.fixture
async def mtls_broker(users_file: str, tls_files: dict[str, str]) -> AsyncIterator[Broker]:
    async with open_broker(
        listen=["tls://127.0.0.1:0"],
        users=users_file,
        tls_cert=tls_files["tls_cert"],
        tls_key=tls_files["tls_key"],
        tls_ca=tls_files["ca"],
        shutdown_grace=0.5,
    ) as running:
        try:
            yield running
        finally:
            await close_clients()


async def test_mutual_tls_certificate_names_the_principal(
    mtls_broker: Broker, ca: trustme.CA
) -> None:
    alice = await dial(mtls_broker, "tls", client_context(ca, "alice"))
    await alice.connect()  # no login: the certificate says who it is
    carol = await dial(mtls_broker, "tls", client_context(ca, "carol"))
    await carol.connect(login="alice", passcode="alice-secret")  # the certificate wins
    await alice.send("SEND", {"destination": "/queue/orders.tls"}, b"over mtls")
    await carol.send("SUBSCRIBE", {"destination": "/queue/orders.tls", "id": "1"})
    message = await carol.expect("MESSAGE")
    assert message.body == b"over mtls"
    assert message.headers["user-id"] == "alice"
    # carol's groups come from the users file: she may read, not write.
    await carol.send("SEND", {"destination": "/queue/orders.tls", "receipt": "w"})
    error = await carol.expect_error_and_close()
    assert error.headers["message"] == "access refused"


async def test_mutual_tls_requires_a_certificate_from_the_ca(
    mtls_broker: Broker, ca: trustme.CA
) -> None:
    raw = await dial(mtls_broker, "tls", client_context(ca))  # no client certificate
    with pytest.raises((trio.BrokenResourceError, EOFError)):
        await raw.connect(login="alice", passcode="alice-secret")
    stranger_ca = trustme.CA()
    context = client_context(ca)
    stranger_ca.issue_cert("eve@example.org", common_name="alice").configure_cert(context)
    raw = await dial(mtls_broker, "tls", context)
    with pytest.raises((trio.BrokenResourceError, EOFError)):
        await raw.connect()
    assert mtls_broker.statistics().connections_total >= 2


async def test_config_rejects_tls_without_a_certificate() -> None:
    with pytest.raises(ValueError, match="tls_cert"):
        Config(listen=["tls://127.0.0.1:0"])
    with pytest.raises(ValueError, match="tls_cert"):
        Config(tls_ca="ca.pem")


async def test_bad_users_file_fails_open_broker(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text('[users.x]\npassword = "plaintext"\n')
    with pytest.raises(ValueError, match=r"users\.x\.password"):
        async with open_broker(listen=[], users=str(path)):
            pass  # pragma: no cover


# -- the library's own client, end to end ---------------------------------------------------


async def test_client_over_stomp_ssl_with_credentials(broker: Broker, ca: trustme.CA) -> None:
    from trio_stomp import BrokerError, StompError, open_client

    address = next(a for a in broker.addresses if a.startswith("tls://"))
    url = "stomp+ssl://" + address.removeprefix("tls://")
    context = client_context(ca)
    async with (
        open_client(url, login="bob", passcode="bob:secret\\x", ssl_context=context) as bob,
        bob.subscribe("/topic/chat", receipt=True) as chat,
        open_client(url, login="alice", passcode="alice-secret", ssl_context=context) as alice,
    ):
        await alice.send("/topic/chat", b"hello over TLS", headers={"user-id": "bob"})
        with trio.fail_after(10):
            message = await chat.__anext__()
        assert message.body == b"hello over TLS"
        assert message.frame.headers["user-id"] == "alice"
    # Wrong password: the client sees the broker's refusal.
    with pytest.raises((BrokerError, StompError)) as info:
        async with open_client(url, login="alice", passcode="nope", ssl_context=context):
            pass  # pragma: no cover
    assert "authentication failed" in str(info.value)
    # The client verifies the broker's certificate by default.
    with pytest.raises((StompError, OSError, trio.BrokenResourceError)):
        async with open_client(url, login="alice", passcode="alice-secret"):
            pass  # pragma: no cover


# -- the command line ----------------------------------------------------------------------


BROKER_CLI = (sys.executable, "-m", "trio_stomp.broker")


async def test_passwd_subcommand_writes_a_users_entry(tmp_path: Path) -> None:

    import tomllib

    from trio_stomp.broker._auth import load_users_file, verify_password

    result = await trio.run_process(
        [*BROKER_CLI, "passwd", "dave", "--groups", "a, b", "--password-stdin"],
        stdin=b"pa:ss\\word\n",
        capture_stdout=True,
    )
    text = result.stdout.decode()
    entry = tomllib.loads(text)["users"]["dave"]
    assert entry["groups"] == ["a", "b"]
    assert "pa:ss" not in text
    assert verify_password("pa:ss\\word", entry["password"])
    path = tmp_path / "users.toml"
    path.write_text(text)
    assert load_users_file(str(path)).users["dave"].groups == {"a", "b"}


async def test_cli_refuses_a_bad_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text('[users.x]\npassword = "plaintext"\n')
    result = await trio.run_process(
        [*BROKER_CLI, "--listen", "tcp://127.0.0.1:0", "--users", str(path)],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"users.x.password" in result.stderr
