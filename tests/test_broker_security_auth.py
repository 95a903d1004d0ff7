"""Unit tests of the broker's security policy (``trio_stomp.broker._auth``), without sockets:
password hashes, the users file, ACL rules, the failure back-off, the authenticators, and
the per-frame checks against a real routing core."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
import trio
import trio.testing

from trio_stomp import Frame, RemoteProtocolError
from trio_stomp.broker import _auth
from trio_stomp.broker._auth import (
    ANONYMOUS,
    AccessControl,
    AclRule,
    CertificateAuthenticator,
    Credentials,
    FailureBackoff,
    Principal,
    Refused,
    Security,
    UsersAuthenticator,
    address_key,
    compile_pattern,
    hash_password,
    is_loopback_listen,
    parse_users,
    verify_password,
)
from trio_stomp.broker._router import Router
from trio_stomp.broker._session import frame_handlers


# Cheap parameters: the real defaults take ~70 ms (scrypt) / ~230 ms (PBKDF2) per hash.
def fast_hash(password: str) -> str:
    return hash_password(password, log_n=10)


# -- hashes --------------------------------------------------------------------------------


def test_scrypt_hash_round_trip_and_salt() -> None:
    first, second = fast_hash("s3cret"), fast_hash("s3cret")
    assert first.startswith("$scrypt$ln=10,r=8,p=1$")
    assert first != second  # a fresh salt each time
    assert "s3cret" not in first
    assert verify_password("s3cret", first)
    assert verify_password("s3cret", second)
    assert not verify_password("s3cret ", first)
    assert not verify_password("", first)


def test_pbkdf2_hash_round_trip() -> None:
    encoded = hash_password("pässwörd:\\", scheme="pbkdf2-sha256", iterations=100_000)
    assert encoded.startswith("$pbkdf2-sha256$i=100000$")
    assert verify_password("pässwörd:\\", encoded)
    assert not verify_password("passwoerd", encoded)


def test_default_scrypt_parameters() -> None:
    assert hash_password("x").startswith("$scrypt$ln=14,r=8,p=1$")


@pytest.mark.parametrize(
    "bad",
    [
        "plaintext",
        "$scrypt$ln=14,r=8,p=1$c2FsdA",  # missing hash
        "$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g",  # n too big
        "$scrypt$r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g",  # no ln
        "$pbkdf2-sha256$i=10$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g",  # too few rounds
        "$md5$x$y$z",
    ],
)
def test_malformed_hashes_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        verify_password("x", bad)


def test_hash_parameters_are_validated() -> None:
    with pytest.raises(ValueError):
        hash_password("x", log_n=30)
    with pytest.raises(ValueError):
        hash_password("x", scheme="pbkdf2-sha256", iterations=10)


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert not verify_password("wrong", fast_hash("right"))
    assert len(calls) == 1


# -- users file ----------------------------------------------------------------------------


def users_doc() -> dict[str, Any]:
    return {
        "users": {
            "alice": {"password": fast_hash("alice-pw"), "groups": ["publishers"]},
            "bob": {"password": fast_hash("bob-pw"), "groups": ["consumers", "ops"]},
            "carol": {"groups": "consumers"},  # certificate only
        },
        "acl": [
            {"group": "publishers", "destination": "/queue/orders.**", "permissions": ["write"]},
            {"user": "alice", "destination": "/queue/orders.*", "permissions": "create"},
            {"group": "consumers", "destination": "/queue/orders.*", "permissions": ["read"]},
            {"user": "*", "destination": "/topic/public", "permissions": ["read", "write"]},
        ],
    }


def test_parse_users() -> None:
    users = parse_users(users_doc())
    assert set(users.users) == {"alice", "bob", "carol"}
    assert users.users["bob"].groups == {"consumers", "ops"}
    assert users.users["carol"].password_hash is None
    assert users.users["carol"].groups == {"consumers"}
    assert len(users.acl.rules) == 4
    assert "alice-pw" not in repr(users.users["alice"])


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"userz": {}}, "unknown key"),
        ({"users": {"a": {"password": "plain"}}}, "users.a.password"),
        ({"users": {"a": {"pass": "x"}}}, "unknown key"),
        ({"users": {"anonymous": {}}}, "reserved"),
        ({"users": {"a": {"groups": [1]}}}, "groups"),
        ({"acl": [{"user": "a", "destination": "/q", "permissions": ["delete"]}]}, "delete"),
        ({"acl": [{"destination": "/q", "permissions": ["read"]}]}, "user or a group"),
        ({"acl": [{"user": "a", "permissions": ["read"]}]}, "destination"),
        ({"acl": {"user": "a"}}, "array of tables"),
    ],
)
def test_parse_users_errors(doc: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_users(doc)


def test_load_users_file(tmp_path: Any) -> None:
    path = tmp_path / "users.toml"
    path.write_text(f'[users.dave]\npassword = "{fast_hash("pw")}"\ngroups = ["g"]\n')
    users = _auth.load_users_file(str(path))
    assert users.users["dave"].groups == {"g"}
    path.write_text("[users\n")
    with pytest.raises(ValueError, match=r"users\.toml"):
        _auth.load_users_file(str(path))


# -- ACL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("/queue/a", "/queue/a", True),
        ("/queue/a", "/queue/ab", False),
        ("/queue/*", "/queue/a", True),
        ("/queue/*", "/queue/a.b", False),
        ("/queue/*", "/queue/a/b", False),
        ("/queue/**", "/queue/a/b.c", True),
        ("/queue/orders.*", "/queue/orders.eu", True),
        ("/queue/orders.*", "/queue/orders.eu.x", False),
        ("/queue/a.b", "/queue/aXb", False),  # the dot is literal
        ("**", "anything at all", True),
        ("/topic/[x]", "/topic/[x]", True),  # regex characters are literal
    ],
)
def test_patterns(pattern: str, name: str, matches: bool) -> None:
    assert (compile_pattern(pattern).fullmatch(name) is not None) is matches


def test_acl_without_rules_allows_everything() -> None:
    acl = AccessControl()
    assert not acl.enabled
    assert acl.allowed(ANONYMOUS, "/queue/x", "write")


def test_acl_denies_by_default_once_a_rule_exists() -> None:
    acl = parse_users(users_doc()).acl
    alice = Principal("alice", {"publishers"})
    bob = Principal("bob", {"consumers"})
    mallory = Principal("mallory")
    assert acl.allowed(alice, "/queue/orders.eu", "write")
    assert acl.allowed(alice, "/queue/orders.eu.late", "write")
    assert acl.allowed(alice, "/queue/orders.eu", "create")
    assert not acl.allowed(alice, "/queue/orders.eu.late", "create")
    assert not acl.allowed(alice, "/queue/orders.eu", "read")
    assert acl.allowed(bob, "/queue/orders.eu", "read")
    assert not acl.allowed(bob, "/queue/orders.eu", "write")
    assert not acl.allowed(mallory, "/queue/orders.eu", "read")
    assert not acl.allowed(mallory, "/queue/other", "write")
    # "*" names every principal, the anonymous one included.
    for who in (alice, mallory, ANONYMOUS):
        assert acl.allowed(who, "/topic/public", "write")
        assert not acl.allowed(who, "/topic/public", "create")


def test_acl_rule_groups_do_not_leak_to_users_of_that_name() -> None:
    rule = AclRule(users=(), groups={"ops"}, pattern="/queue/x", permissions={"read"})
    assert not rule.applies_to(Principal("ops"))
    assert rule.applies_to(Principal("eve", {"ops"}))


# -- back-off ------------------------------------------------------------------------------


def test_backoff_doubles_and_caps() -> None:
    backoff = FailureBackoff(base=0.5, maximum=4.0)
    assert [backoff.delay(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(10_000) == 4.0


def test_backoff_serializes_attempts_from_one_address() -> None:
    backoff = FailureBackoff(base=1.0, maximum=4.0)
    assert backoff.reserve("10.0.0.1", 100.0) == 100.0  # no failures: no wait
    backoff.failure("10.0.0.1", 100.0)
    # Three parallel attempts queue up one delay apart; a fourth would wait too long.
    assert backoff.reserve("10.0.0.1", 100.0) == 101.0
    assert backoff.reserve("10.0.0.1", 100.0) == 102.0
    assert backoff.reserve("10.0.0.1", 100.0) == 103.0
    assert backoff.reserve("10.0.0.1", 100.0) == 104.0
    assert backoff.reserve("10.0.0.1", 100.0) is None
    # Another address is not affected.
    assert backoff.reserve("10.0.0.2", 100.0) == 100.0
    backoff.success("10.0.0.1")
    assert backoff.reserve("10.0.0.1", 100.0) == 100.0


def test_backoff_forgets_old_failures_and_is_bounded() -> None:
    backoff = FailureBackoff(base=1.0, maximum=8.0, forget_after=60.0, max_addresses=100)
    backoff.failure("a", 0.0)
    backoff.failure("a", 0.0)
    assert backoff.reserve("a", 10.0) == 10.0  # the slot (2.0) has passed
    assert backoff.reserve("a", 100.0) == 100.0  # forgotten
    for n in range(1000):
        backoff.failure(f"10.0.{n // 256}.{n % 256}", 1.0)
    assert len(backoff) == 100


def test_address_key_and_loopback() -> None:
    assert address_key("127.0.0.1:5000") == "127.0.0.1"
    assert address_key("[::1]:5000") == "::1"
    assert address_key("memory") == "memory"
    assert is_loopback_listen("tcp://127.0.0.1:0")
    assert is_loopback_listen("tls://[::1]:61614")
    assert is_loopback_listen("tcp://localhost:1")
    assert not is_loopback_listen("tcp://0.0.0.0:61613")
    assert not is_loopback_listen("tcp://example.org:61613")


# -- authenticators ------------------------------------------------------------------------


def creds(login: str | None, passcode: str | None, cert: Any = None) -> Credentials:
    return Credentials(login, passcode, {}, "127.0.0.1:1", cert)


async def test_users_authenticator() -> None:
    auth = UsersAuthenticator(parse_users(users_doc()))
    principal = await auth.authenticate(creds("alice", "alice-pw"))
    assert principal == Principal("alice", {"publishers"}, "password")
    assert await auth.authenticate(creds("alice", "bob-pw")) is None
    assert await auth.authenticate(creds("alice", None)) is None
    assert await auth.authenticate(creds("nobody", "alice-pw")) is None
    assert await auth.authenticate(creds("carol", "")) is None  # certificate-only user
    assert "alice-pw" not in repr(creds("alice", "alice-pw"))


async def test_unknown_user_costs_one_hash_like_a_wrong_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = UsersAuthenticator(parse_users(users_doc()))
    seen: list[_auth._ParsedHash] = []
    real = _auth._verify

    def spy(password: str, parsed: _auth._ParsedHash) -> bool:
        seen.append(parsed)
        return real(password, parsed)

    monkeypatch.setattr(_auth, "_verify", spy)
    assert await auth.authenticate(creds("nobody", "x")) is None
    assert await auth.authenticate(creds("alice", "x")) is None
    assert await auth.authenticate(creds("carol", "x")) is None
    assert len(seen) == 3
    # The dummy hash has the real ones' cost parameters.
    assert seen[0].scheme == seen[1].scheme == "scrypt"
    assert seen[0].params == seen[1].params


def cert(common_name: str | None) -> dict[str, Any]:
    subject: list[Any] = [(("organizationName", "Example"),)]
    if common_name is not None:
        subject.append((("commonName", common_name),))
    return {"subject": tuple(subject)}


async def test_certificate_authenticator() -> None:
    auth = CertificateAuthenticator(parse_users(users_doc()))
    principal = await auth.authenticate(creds(None, None, cert("carol")))
    assert principal == Principal("carol", {"consumers"}, "certificate")
    stranger = await auth.authenticate(creds(None, None, cert("zed")))
    assert stranger == Principal("zed", frozenset(), "certificate")
    assert await auth.authenticate(creds(None, None, cert(None))) is None
    assert await auth.authenticate(creds(None, None, None)) is None


def connect_frame(**headers: str) -> Frame:
    return Frame("CONNECT", tuple(headers.items()))


async def test_security_anonymous_policy() -> None:
    open_door = Security(allow_anonymous=True)
    assert await open_door.authenticate(connect_frame(), "memory", None) is ANONYMOUS
    # Without users, credentials are ignored when anonymous access is allowed...
    assert await open_door.authenticate(connect_frame(login="x", passcode="y"), "m", None) == (
        ANONYMOUS
    )
    closed = Security(allow_anonymous=False)
    assert await closed.authenticate(connect_frame(), "memory", None) is None
    assert await closed.authenticate(connect_frame(login="x"), "memory", None) is None
    assert closed.counters.authentication_failures == 2
    # ...but never replace a wrong password when users exist.
    users = Security(
        authenticator=UsersAuthenticator(parse_users(users_doc())), allow_anonymous=True
    )
    assert await users.authenticate(connect_frame(), "memory", None) is ANONYMOUS
    assert await users.authenticate(connect_frame(login="alice", passcode="no"), "m", None) is None


async def test_security_backs_off_per_address(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []

    class Counting:
        async def authenticate(self, credentials: Credentials) -> Principal | None:
            calls.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            return Principal("ok") if credentials.passcode == "good" else None

    security = Security(authenticator=Counting(), backoff=FailureBackoff(base=1.0, maximum=4.0))
    bad = connect_frame(login="u", passcode="bad")
    start = trio.current_time()
    for _ in range(3):
        assert await security.authenticate(bad, "10.0.0.9:1000", None) is None
    # Attempts 2 and 3 each waited for their slot: 1 s, then 2 s after the previous one.
    assert [round(t - start, 3) for t in calls] == [0.0, 1.0, 3.0]
    # Another address is served at once.
    assert await security.authenticate(bad, "10.0.0.8:1000", None) is None
    assert round(calls[-1] - start, 3) == 3.0
    # Parallel attempts queue up; those too far out are refused without calling in.
    calls.clear()
    results: list[Principal | None] = []

    async def attempt() -> None:
        results.append(await security.authenticate(bad, "10.0.0.9:2000", None))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(attempt)
    assert results == [None] * 5
    assert len(calls) < 5
    assert security.counters.authentication_failures == 9
    # A success clears the address.
    await trio.sleep(60)
    good = connect_frame(login="u", passcode="good")
    assert await security.authenticate(good, "10.0.0.9:3000", None) == Principal("ok")
    before = trio.current_time()
    assert await security.authenticate(bad, "10.0.0.9:3000", None) is None
    assert trio.current_time() == before


async def test_security_logs_and_refuses_when_the_authenticator_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        async def authenticate(self, credentials: Credentials) -> Principal | None:
            raise RuntimeError("directory down")

    security = Security(authenticator=Broken())
    assert await security.authenticate(connect_frame(login="u"), "memory", None) is None
    assert "directory down" in caplog.text


# -- per-frame checks ----------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> bool:
        self.data.append(data)
        return True

    def close(self, message: str) -> None:
        pass


def frame(command: str, **headers: str) -> Frame:
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def setup(**limits: Any) -> tuple[Router, Security, Any]:
    router = Router()
    security = Security(acl=parse_users(users_doc()).acl, **limits)
    return router, security, router.connect("s1", "1.2", Sink())


def test_check_send_and_subscribe_against_the_acl() -> None:
    router, security, connection = setup()
    alice = Principal("alice", {"publishers"})
    bob = Principal("bob", {"consumers"})
    # bob may not create /queue/orders.eu; alice may; then bob may read it.
    with pytest.raises(Refused, match=r"^access refused$") as info:
        security.check(router, connection, bob, frame("SUBSCRIBE", destination="/queue/orders.eu"))
    assert info.value.reason == "access"
    security.check(router, connection, alice, frame("SEND", destination="/queue/orders.eu"))
    router.send(connection, frame("SEND", destination="/queue/orders.eu"))
    security.check(router, connection, bob, frame("SUBSCRIBE", destination="/queue/orders.eu"))
    with pytest.raises(Refused):
        security.check(router, connection, bob, frame("SEND", destination="/queue/orders.eu"))
    # alice may write but not create deeper names.
    with pytest.raises(Refused):
        security.check(router, connection, alice, frame("SEND", destination="/queue/orders.a.b"))
    # A topic SEND creates nothing, so write is enough.
    security.check(router, connection, bob, frame("SEND", destination="/topic/public"))
    with pytest.raises(Refused):
        security.check(router, connection, bob, frame("SUBSCRIBE", destination="/topic/public"))
    # Transactional SENDs are checked when sent.
    with pytest.raises(Refused):
        security.check(
            router, connection, bob, frame("SEND", destination="/queue/x", transaction="t")
        )
    assert security.counters.access_refused == 5


def test_temp_and_reply_queues_bypass_the_acl() -> None:
    router, security, connection = setup()
    nobody = Principal("nobody")
    security.check(router, connection, nobody, frame("SUBSCRIBE", destination="/temp-queue/r"))
    security.check(router, connection, nobody, frame("SEND", destination="/temp-queue/r"))
    security.check(router, connection, nobody, frame("SEND", destination="/reply-queue/s2.r"))


def test_limit_max_subscriptions() -> None:
    router, security, connection = setup(max_subscriptions=2)
    security.acl = AccessControl()
    for n in range(2):
        sub = frame("SUBSCRIBE", destination=f"/queue/{n}", id=str(n))
        security.check(router, connection, ANONYMOUS, sub)
        router.subscribe(connection, sub)
    with pytest.raises(Refused, match=r"limit exceeded: max_subscriptions") as info:
        security.check(router, connection, ANONYMOUS, frame("SUBSCRIBE", destination="/q", id="3"))
    assert info.value.reason == "max_subscriptions"
    assert security.counters.limits["max_subscriptions"] == 1


def test_limit_transactions_and_their_frames() -> None:
    router, security, connection = setup(max_transactions=1, max_transaction_frames=2)
    security.acl = AccessControl()
    security.check(router, connection, ANONYMOUS, frame("BEGIN", transaction="t"))
    router.begin(connection, frame("BEGIN", transaction="t"))
    with pytest.raises(Refused, match="max_transactions"):
        security.check(router, connection, ANONYMOUS, frame("BEGIN", transaction="u"))
    for _ in range(2):
        send = frame("SEND", destination="/queue/q", transaction="t")
        security.check(router, connection, ANONYMOUS, send)
        router.send(connection, send)
    with pytest.raises(Refused, match="max_transaction_frames"):
        security.check(
            router, connection, ANONYMOUS, frame("SEND", destination="/queue/q", transaction="t")
        )
    with pytest.raises(Refused, match="max_transaction_frames"):
        security.check(router, connection, ANONYMOUS, frame("ACK", id="1", transaction="t"))
    # Outside the transaction, or in an unknown one (the router refuses that), no limit.
    security.check(router, connection, ANONYMOUS, frame("ACK", id="1"))
    security.check(router, connection, ANONYMOUS, frame("ACK", id="1", transaction="zz"))
    assert dict(security.counters.limits) == {"max_transactions": 1, "max_transaction_frames": 2}


@pytest.mark.parametrize("name", ["/queue/deep", "/temp-queue/deep"])
def test_limit_queue_depth_error(name: str) -> None:
    router, security, connection = setup(max_queue_depth=3)
    security.acl = AccessControl()
    for _ in range(3):
        send = frame("SEND", destination=name)
        security.check(router, connection, ANONYMOUS, send)
        router.send(connection, send)
    with pytest.raises(Refused, match="max_queue_depth"):
        security.check(router, connection, ANONYMOUS, frame("SEND", destination=name))
    assert router.counters.queued == 3


def test_limit_queue_depth_drop_oldest() -> None:
    router, security, connection = setup(max_queue_depth=2, queue_full_policy="drop-oldest")
    security.acl = AccessControl()
    for n in range(5):
        send = Frame("SEND", (("destination", "/queue/q"),), str(n).encode())
        security.check(router, connection, ANONYMOUS, send)
        router.send(connection, send)
    queue = router.queues["/queue/q"]
    assert [m.body for m in queue.messages] == [b"3", b"4"]
    assert router.counters.queued == 2
    assert router.counters.dropped == 3
    assert security.counters.limits["max_queue_depth"] == 3


def test_limit_max_destinations() -> None:
    router, security, connection = setup(max_destinations=2)
    security.acl = AccessControl()
    for n in range(2):
        sub = frame("SUBSCRIBE", destination=f"/queue/{n}", id=str(n))
        security.check(router, connection, ANONYMOUS, sub)
        router.subscribe(connection, sub)
    # Existing destinations stay usable; a topic SEND creates nothing.
    security.check(router, connection, ANONYMOUS, frame("SEND", destination="/queue/1"))
    security.check(router, connection, ANONYMOUS, frame("SEND", destination="/topic/none"))
    for new in ("/queue/new", "/temp-queue/new"):
        with pytest.raises(Refused, match="max_destinations"):
            security.check(router, connection, ANONYMOUS, frame("SEND", destination=new))


def test_observe_error_counts_parser_limits() -> None:
    security = Security()
    security.observe_error("frame body exceeds the maximum size of 10 bytes")
    security.observe_error("content-length 99 exceeds the maximum body size of 10 bytes")
    security.observe_error("frame has more than the maximum of 3 headers")
    security.observe_error("header line exceeds the maximum length of 80 bytes")
    security.observe_error("no CONNECT frame within 1 s")
    security.observe_error("limit exceeded: max_subscriptions (...)")
    security.observe_error("unknown command 'X'")
    assert dict(security.counters.limits) == {
        "max_body_size": 2,
        "max_headers": 1,
        "max_line_length": 1,
        "connect_timeout": 1,
    }


# -- the SEND check that also routes ---------------------------------------------------------
# The session calls security.checks[command] and then the router's handler unless the check
# returned True: for SEND the check routes the common cases itself. It must behave exactly
# as security.check() followed by router.send(): same errors (and their order), counters,
# queue contents and deliveries.

SEND_STEPS: list[tuple[str, dict[str, str]]] = [
    ("SEND", {"destination": "/queue/a"}),  # creates /queue/a
    ("SEND", {"destination": "/queue/a", "x-h": "1"}),
    ("SEND", {"destination": "/queue/a", "x-h": "1"}),  # the same head: the SEND plan
    ("SEND", {"destination": "/queue/a", "x-h": "1"}),  # past max_queue_depth 2
    ("SEND", {"destination": "/queue/a", "receipt": "r1"}),
    ("SEND", {"destination": "/queue/a", "expires": "soon"}),
    ("SEND", {"destination": "/queue/a", "reply-to": "/temp-queue/back"}),
    ("SEND", {"destination": "/queue/orders.eu"}),
    ("SEND", {"destination": "/queue/orders.eu"}),
    ("SEND", {"destination": "/queue/orders.a.b"}),
    ("SEND", {"destination": "/queue/b"}),
    ("SEND", {"destination": "/topic/t"}),
    ("SEND", {"destination": "/topic/public"}),
    ("SEND", {"destination": "/topic/nobody"}),
    ("SEND", {"destination": "/topic/"}),
    ("SEND", {"destination": "/queue/"}),
    ("SEND", {"destination": ""}),
    ("SEND", {}),
    ("SEND", {"destination": "/temp-queue/mine"}),
    ("SUBSCRIBE", {"destination": "/temp-queue/mine", "id": "1"}),
    ("SEND", {"destination": "/temp-queue/mine"}),
    ("SEND", {"destination": "/temp-queue/mine"}),
    ("SEND", {"destination": "/reply-queue/s1.back"}),
    ("SEND", {"destination": "no-prefix"}),
    ("BEGIN", {"transaction": "t"}),
    ("SEND", {"destination": "/queue/a", "transaction": "t"}),
    ("SEND", {"destination": "/queue/a", "transaction": "t"}),  # past max_transaction_frames
    ("SEND", {"destination": "/queue/a", "transaction": "zz"}),
    ("SEND", {"destination": "/queue/a", "transaction": "t", "expires": "x"}),
    ("SEND", {"destination": "/topic/t", "transaction": "t"}),
    ("COMMIT", {"transaction": "t"}),
    ("SEND", {"destination": "/queue/c"}),  # past max_destinations
    ("SEND", {"destination": "/queue/a"}),
]


def _run_sends(
    *, routed_by_check: bool, acl: bool, principal: Principal, **limits: Any
) -> list[object]:
    router = Router(default_destination_type="queue")
    security = Security(acl=parse_users(users_doc()).acl if acl else None, **limits)
    subscriber = Sink()
    router.subscribe(
        router.connect("s0", "1.2", subscriber),
        frame("SUBSCRIBE", destination="/topic/t", id="0"),
    )
    connection = router.connect("s1", "1.2", Sink())
    handlers = frame_handlers(router)
    seen: list[object] = []
    for command, headers in SEND_STEPS:
        sent = Frame(command, tuple(headers.items()), b"body")
        try:
            if routed_by_check:  # as the session does
                check = security.checks.get(command)
                if check is None or not check(router, connection, principal, sent):
                    handlers[command](connection, sent)
            else:
                security.check(router, connection, principal, sent)
                handlers[command](connection, sent)
        except Refused as exc:
            seen.append(("refused", str(exc), exc.reason))
        except RemoteProtocolError as exc:
            seen.append(("error", str(exc)))
        else:
            seen.append("ok")
        seen.append(
            (
                {name: getattr(router.counters, name) for name in router.counters.__slots__},
                dict(security.counters.limits),
                security.counters.access_refused,
                {
                    name: [(m.message_id, m.sender_headers, m.body) for m in queue.messages]
                    for name, queue in router.queues.items()
                },
                sorted(router.topics),
                list(subscriber.data),
            )
        )
    return seen


@pytest.mark.parametrize("acl", [False, True])
@pytest.mark.parametrize("principal", [ANONYMOUS, Principal("alice", {"publishers"})])
@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"max_queue_depth": 2, "max_transaction_frames": 1, "max_destinations": 6},
        {"max_queue_depth": 2, "queue_full_policy": "drop-oldest"},
        {"max_queue_depth": 1, "max_destinations": 2},
    ],
)
def test_the_send_check_that_routes_agrees_with_check_then_send(
    acl: bool, principal: Principal, limits: dict[str, Any]
) -> None:
    reference = _run_sends(routed_by_check=False, acl=acl, principal=principal, **limits)
    assert _run_sends(routed_by_check=True, acl=acl, principal=principal, **limits) == reference
    assert "ok" in reference


def test_the_send_check_routes_the_common_cases_itself() -> None:
    router, security, connection = setup()
    security.acl = AccessControl()
    send = frame("SEND", destination="/queue/q")
    assert security.checks["SEND"](router, connection, ANONYMOUS, send) is False  # new queue
    router.send(connection, send)
    assert security.checks["SEND"](router, connection, ANONYMOUS, send) is True
    assert router.counters.queued == 2
    topic = frame("SEND", destination="/topic/t")
    assert security.checks["SEND"](router, connection, ANONYMOUS, topic) is True
    assert router.counters.unrouted == 1
    # Never with access rules, nor in a transaction: checked only, routed by the caller.
    security.acl = parse_users(users_doc()).acl
    alice = Principal("alice", {"publishers"})
    for send in (frame("SEND", destination="/topic/public"),):
        assert security.checks["SEND"](router, connection, alice, send) is False
    security.acl = AccessControl()
    router.begin(connection, frame("BEGIN", transaction="t"))
    send = frame("SEND", destination="/queue/q", transaction="t")
    assert security.checks["SEND"](router, connection, ANONYMOUS, send) is False
    # check() itself never routes.
    security.check(router, connection, ANONYMOUS, frame("SEND", destination="/queue/q"))
    assert router.counters.queued == 2
