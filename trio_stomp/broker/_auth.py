"""Who may connect, and what they may do: authentication, access control and limits.

This module owns the broker's security policy, as values and small objects the broker
consults at three points:

- **accept** (:meth:`Security.admit` / :meth:`Security.release`): the connection limits,
  total and per source address.
- **CONNECT** (:meth:`Security.authenticate`): an :class:`Authenticator` turns the
  CONNECT frame's ``login``/``passcode``, the peer's address and its TLS client
  certificate into a :class:`Principal`, or refuses. Built in: :class:`UsersAuthenticator`
  (a TOML users file of salted scrypt/PBKDF2 hashes, see :func:`hash_password`),
  :class:`CertificateAuthenticator` (mutual TLS: the certificate subject's common name is
  the principal) and the anonymous policy. Repeated failures from one address are slowed
  down by :class:`FailureBackoff` (bounded memory).
- **every later frame** (:meth:`Security.check`): :class:`AccessControl` (rules of user or
  group, destination pattern, permissions ``read``/``write``/``create``; deny by default
  once any rule exists) and the per-connection limits (subscriptions, transactions, frames
  per transaction, queue depth, destinations). A refusal raises :class:`Refused`, a
  :class:`~trio_stomp.RemoteProtocolError` whose message the session puts in an ERROR frame
  before closing the connection. The session calls :attr:`Security.checks`, whose SEND
  check also routes the common cases (one look-up of the destination for both).

Hashing is slow on purpose (scrypt, ~70 ms here): it runs in Trio's worker threads through
``trio.to_thread.run_sync`` under a :class:`trio.CapacityLimiter` of one, so a flood of
wrong passwords costs at most one core and never stalls the event loop. Those threads are
Trio's own, and bounded.

It never reads sockets or writes frames (the session does), never holds plaintext
passwords beyond the call that checks one, never compares secrets with ``==`` (only
:func:`hmac.compare_digest`), and never tells an unknown user from a wrong password: both
cost one hash and end in the same ``authentication failed``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, Protocol

import attrs
import trio

from .._errors import RemoteProtocolError
from .._frames import Frame
from ._config import Config
from ._destinations import Connection, Queue
from ._listeners import make_server_ssl_context
from ._router import QUEUE_PREFIX, REPLY_QUEUE_PREFIX, TEMP_QUEUE_PREFIX, TOPIC_PREFIX, Router

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ANONYMOUS",
    "AccessControl",
    "AclRule",
    "Authenticator",
    "CertificateAuthenticator",
    "Credentials",
    "DefaultAuthenticator",
    "FailureBackoff",
    "Permission",
    "Principal",
    "Refused",
    "Security",
    "SecurityCounters",
    "User",
    "UsersAuthenticator",
    "UsersFile",
    "hash_password",
    "is_loopback_listen",
    "load_security",
    "load_users_file",
    "parse_users",
    "verify_password",
]

logger: Final = logging.getLogger("trio_stomp.broker")

Permission = Literal["read", "write", "create"]
PERMISSIONS: Final = ("read", "write", "create")

#: The message of every refused CONNECT, whatever the reason.
AUTHENTICATION_FAILED: Final = "authentication failed"
#: The message of every refused SEND or SUBSCRIBE.
ACCESS_REFUSED: Final = "access refused"


def _frozen(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


# -- principals and credentials ------------------------------------------------------------


@attrs.frozen
class Principal:
    """Who a connection is, once authenticated.

    Attributes:
      name: the user name (a users-file entry, or a certificate's common name). The broker
        stamps it as the ``user-id`` header of every MESSAGE this connection sends.
      groups: the groups the user belongs to (for access-control rules).
      method: how it was established: ``"password"``, ``"certificate"``, ``"anonymous"``
        or whatever a custom authenticator says.
    """

    name: str
    groups: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen)
    method: str = "password"

    @property
    def anonymous(self) -> bool:
        """True for the anonymous principal (no ``user-id`` is stamped for it)."""
        return self.method == "anonymous"


#: The principal of a connection let in without credentials.
ANONYMOUS: Final = Principal("anonymous", frozenset(), "anonymous")


@attrs.frozen
class Credentials:
    """What a client presented when connecting; an :class:`Authenticator` judges it.

    Attributes:
      login: the CONNECT ``login`` header, or None.
      passcode: the CONNECT ``passcode`` header, or None. Never log it.
      headers: every CONNECT header (first occurrence wins).
      remote: the peer's printable address (``"127.0.0.1:53422"``, ``"memory"``).
      certificate: the peer's verified TLS client certificate as returned by
        :meth:`ssl.SSLSocket.getpeercert`, or None (no TLS, or no certificate).
    """

    login: str | None
    passcode: str | None = attrs.field(repr=False)
    headers: Mapping[str, str] = attrs.field(repr=False)
    remote: str
    certificate: Mapping[str, Any] | None = None


class Authenticator(Protocol):
    """The pluggable authentication interface.

    ``authenticate`` returns the :class:`Principal` a connection acts as, or None to refuse
    it. It may take time (hash a password, ask a directory) and is cancelled if the broker
    shuts down. It must not raise for bad credentials (return None); an exception is logged
    and treated as a refusal.
    """

    async def authenticate(self, credentials: Credentials) -> Principal | None: ...


# -- password hashes -----------------------------------------------------------------------

_SCRYPT_DEFAULT_LOG_N: Final = 14  # n = 16384, r = 8: 16 MiB and ~70 ms per check here
_SCRYPT_MAX_LOG_N: Final = 20
_PBKDF2_DEFAULT_ITERATIONS: Final = 600_000
_PBKDF2_MAX_ITERATIONS: Final = 10_000_000
_HASH_RE: Final = re.compile(
    r"\$(?P<scheme>scrypt|pbkdf2-sha256)\$(?P<params>[a-z0-9=,]+)\$(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<hash>[A-Za-z0-9+/=]+)"
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(
    password: str,
    *,
    scheme: Literal["scrypt", "pbkdf2-sha256"] = "scrypt",
    log_n: int = _SCRYPT_DEFAULT_LOG_N,
    iterations: int = _PBKDF2_DEFAULT_ITERATIONS,
) -> str:
    """A salted, slow hash of ``password`` for a users file.

    ``$scrypt$ln=14,r=8,p=1$SALT$HASH`` (the default) or
    ``$pbkdf2-sha256$i=600000$SALT$HASH``, with a fresh 16-byte salt. Slow on purpose:
    call it from a thread (``trio.to_thread.run_sync``) inside Trio.

    Raises:
      ValueError: an unknown scheme or parameters out of range.
    """
    salt = secrets.token_bytes(16)
    secret = password.encode("utf-8")
    if scheme == "scrypt":
        if not 10 <= log_n <= _SCRYPT_MAX_LOG_N:
            raise ValueError(f"scrypt log_n must be in 10..{_SCRYPT_MAX_LOG_N}")
        digest = _scrypt(secret, salt, log_n, 8, 1)
        return f"$scrypt$ln={log_n},r=8,p=1${_b64(salt)}${_b64(digest)}"
    if scheme == "pbkdf2-sha256":
        if not 100_000 <= iterations <= _PBKDF2_MAX_ITERATIONS:
            raise ValueError(f"pbkdf2 iterations must be in 100000..{_PBKDF2_MAX_ITERATIONS}")
        digest = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)
        return f"$pbkdf2-sha256$i={iterations}${_b64(salt)}${_b64(digest)}"
    raise ValueError(f"unknown hash scheme {scheme!r}")


def _scrypt(secret: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(
        secret, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n * p + (1 << 20), dklen=32
    )


@attrs.frozen
class _ParsedHash:
    scheme: str
    params: tuple[int, ...]
    salt: bytes
    digest: bytes


def _parse_hash(encoded: str) -> _ParsedHash:
    """Raises ValueError for anything that is not a hash this module writes."""
    match = _HASH_RE.fullmatch(encoded)
    if match is None:
        raise ValueError(
            "not a password hash (expected $scrypt$... or $pbkdf2-sha256$...; "
            "make one with: python -m trio_stomp.broker passwd USER)"
        )
    scheme = match["scheme"]
    try:
        params = dict(item.split("=", 1) for item in match["params"].split(","))
        salt, digest = _unb64(match["salt"]), _unb64(match["hash"])
        if scheme == "scrypt":
            values: tuple[int, ...] = (int(params["ln"]), int(params["r"]), int(params["p"]))
            ok = 10 <= values[0] <= _SCRYPT_MAX_LOG_N and 1 <= values[1] <= 32
            ok = ok and 1 <= values[2] <= 16
        else:
            values = (int(params["i"]),)
            ok = 1000 <= values[0] <= _PBKDF2_MAX_ITERATIONS
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed {scheme} password hash: {exc}") from None
    if not ok or len(salt) < 8 or len(digest) < 16:
        raise ValueError(f"{scheme} password hash parameters out of range")
    return _ParsedHash(scheme, values, salt, digest)


def _verify(password: str, parsed: _ParsedHash) -> bool:
    secret = password.encode("utf-8", "surrogatepass")
    if parsed.scheme == "scrypt":
        log_n, r, p = parsed.params
        digest = _scrypt(secret, parsed.salt, log_n, r, p)
    else:
        digest = hashlib.pbkdf2_hmac("sha256", secret, parsed.salt, parsed.params[0])
    return hmac.compare_digest(digest[: len(parsed.digest)], parsed.digest)


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (from :func:`hash_password`).

    Constant-time comparison; slow on purpose (call it from a thread inside Trio).

    Raises:
      ValueError: ``encoded`` is not a valid hash.
    """
    return _verify(password, _parse_hash(encoded))


# -- the users file ------------------------------------------------------------------------


@attrs.frozen
class User:
    """One users-file entry.

    Attributes:
      name: the login (and the principal's name).
      password_hash: its password hash, or None for a user who may only connect with a
        TLS client certificate.
      groups: the groups it belongs to.
    """

    name: str
    password_hash: str | None = attrs.field(repr=False)
    groups: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen)


@attrs.frozen
class AclRule:
    """One access-control rule: who, which destinations, what.

    Attributes:
      users: user names it applies to (``"*"`` = every principal, anonymous included).
      groups: group names it applies to.
      pattern: a destination pattern: ``*`` matches within one segment (not ``/`` or
        ``.``), ``**`` matches anything; everything else is literal.
      permissions: among ``read`` (SUBSCRIBE), ``write`` (SEND) and ``create`` (the first
        use of a destination that does not exist yet).
    """

    users: frozenset[str] = attrs.field(converter=_frozen)
    groups: frozenset[str] = attrs.field(converter=_frozen)
    pattern: str
    permissions: frozenset[str] = attrs.field(converter=_frozen)
    _regex: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        unknown = self.permissions - set(PERMISSIONS)
        if unknown:
            raise ValueError(
                f"unknown permission(s) {', '.join(sorted(unknown))}; "
                f"expected {', '.join(PERMISSIONS)}"
            )
        if not self.users and not self.groups:
            raise ValueError("an ACL rule needs a user or a group")
        if not self.pattern:
            raise ValueError("an ACL rule needs a destination pattern")
        object.__setattr__(self, "_regex", compile_pattern(self.pattern))

    def applies_to(self, principal: Principal) -> bool:
        return (
            "*" in self.users
            or principal.name in self.users
            or bool(self.groups & principal.groups)
        )

    def matches(self, destination: str) -> bool:
        return self._regex.fullmatch(destination) is not None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of an ACL destination pattern (see :class:`AclRule`)."""
    parts = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(".*")
        elif piece == "*":
            parts.append(r"[^/.]*")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)


class AccessControl:
    """Access-control rules. With no rule at all, everything is allowed (a broker without
    ACLs); with any rule, a permission is granted only by a rule that names the principal
    (or one of its groups), matches the destination and lists the permission.
    """

    def __init__(self, rules: Iterable[AclRule] = ()) -> None:
        self.rules: tuple[AclRule, ...] = tuple(rules)

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def allowed(self, principal: Principal, destination: str, permission: str) -> bool:
        """True if ``principal`` may do ``permission`` on ``destination``. Never blocks."""
        if not self.rules:
            return True
        for rule in self.rules:
            if (
                permission in rule.permissions
                and rule.applies_to(principal)
                and rule.matches(destination)
            ):
                return True
        return False


@attrs.frozen
class UsersFile:
    """A parsed users file: users by name, and the ACL rules."""

    users: Mapping[str, User] = attrs.field(factory=dict, hash=False)
    acl: AccessControl = attrs.field(factory=AccessControl, eq=False, hash=False)


def _strings(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{what} must be a string or a list of strings")


def parse_users(data: Mapping[str, Any], source: str = "users file") -> UsersFile:
    """Build a :class:`UsersFile` from a parsed TOML document::

        [users.alice]
        password = "$scrypt$ln=14,r=8,p=1$..."   # python -m trio_stomp.broker passwd alice
        groups = ["publishers"]

        [users.bob]                               # no password: TLS certificate only
        groups = ["consumers"]

        [[acl]]
        group = "publishers"                      # or user = "alice", or user = "*"
        destination = "/queue/orders.**"
        permissions = ["write", "create"]

    Raises:
      ValueError: unknown keys, a malformed hash, a bad rule. The message names the entry.
    """
    unknown = set(data) - {"users", "acl"}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    users: dict[str, User] = {}
    table = data.get("users", {})
    if not isinstance(table, Mapping):
        raise ValueError(f"{source}: [users] must be a table")
    for name, entry in table.items():
        where = f"{source}: users.{name}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table")
        if name == ANONYMOUS.name or not name or any(c in name for c in "\r\n\0"):
            raise ValueError(f"{where}: this user name is reserved or invalid")
        extra = set(entry) - {"password", "groups"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        password = entry.get("password")
        if password is not None:
            if not isinstance(password, str):
                raise ValueError(f"{where}.password must be a string")
            try:
                _parse_hash(password)
            except ValueError as exc:
                raise ValueError(f"{where}.password: {exc}") from None
        groups = _strings(entry.get("groups", []), f"{where}.groups")
        users[name] = User(name, password, frozenset(groups))
    rules = []
    acl = data.get("acl", [])
    if not isinstance(acl, list):
        raise ValueError(f"{source}: acl must be an array of tables ([[acl]])")
    for index, entry in enumerate(acl):
        where = f"{source}: acl[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table")
        extra = set(entry) - {"user", "group", "destination", "permissions"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        destination = entry.get("destination")
        if not isinstance(destination, str):
            raise ValueError(f"{where}.destination must be a string")
        try:
            rules.append(
                AclRule(
                    users=_strings(entry.get("user", []), f"{where}.user"),
                    groups=_strings(entry.get("group", []), f"{where}.group"),
                    pattern=destination,
                    permissions=_strings(entry.get("permissions", []), f"{where}.permissions"),
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return UsersFile(users, AccessControl(rules))


def load_users_file(path: str) -> UsersFile:
    """Read and parse a users file (see :func:`parse_users`). Blocks on file I/O.

    Raises:
      OSError: the file cannot be read. ValueError: it is not valid.
    """
    with open(path, "rb") as file:
        try:
            data = tomllib.load(file)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return parse_users(data, path)


# -- authenticators ------------------------------------------------------------------------


class UsersAuthenticator:
    """Checks ``login``/``passcode`` against a :class:`UsersFile`.

    An unknown user, a user without a password and a wrong password all cost one hash
    (against a dummy hash made at start-up with the same parameters) and return None.
    Hashes run in Trio's worker threads, at most ``concurrency`` at a time; waiting for a
    slot pushes back on CONNECTs, not on established connections.
    """

    def __init__(self, users: UsersFile, *, concurrency: int = 1) -> None:
        self.users = users
        self._limiter = trio.CapacityLimiter(concurrency)
        schemes = {_parse_hash(u.password_hash) for u in users.users.values() if u.password_hash}
        # The dummy hash uses the parameters of the (first) real one, so that an unknown
        # user takes as long as a known one.
        template = next(iter(sorted(schemes, key=repr)), None)
        if template is None or template.scheme == "scrypt":
            log_n = template.params[0] if template else _SCRYPT_DEFAULT_LOG_N
            self._dummy = _ParsedHash(
                "scrypt", (log_n, 8, 1), secrets.token_bytes(16), secrets.token_bytes(32)
            )
        else:
            self._dummy = _ParsedHash(
                "pbkdf2-sha256", template.params, secrets.token_bytes(16), secrets.token_bytes(32)
            )

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Blocks for one password hash (in a worker thread). None: refused."""
        login = credentials.login
        user = self.users.users.get(login) if login is not None else None
        parsed = self._dummy
        if user is not None and user.password_hash is not None:
            parsed = _parse_hash(user.password_hash)
        password = credentials.passcode or ""
        ok = await trio.to_thread.run_sync(
            _verify, password, parsed, limiter=self._limiter, abandon_on_cancel=True
        )
        if ok and parsed is not self._dummy and user is not None:
            return Principal(user.name, user.groups, "password")
        return None


class CertificateAuthenticator:
    """Mutual TLS: a verified client certificate's subject common name is the principal.

    The TLS layer has already verified the certificate against ``--tls-ca``; this only
    names it. If a users file has an entry with that name, its groups apply. A
    certificate without a common name is refused.
    """

    def __init__(self, users: UsersFile | None = None) -> None:
        self.users = users

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Never blocks beyond a checkpoint. None: no usable certificate."""
        await trio.lowlevel.checkpoint()
        name = certificate_name(credentials.certificate)
        if name is None:
            return None
        user = self.users.users.get(name) if self.users is not None else None
        return Principal(name, user.groups if user else frozenset(), "certificate")


def certificate_name(certificate: Mapping[str, Any] | None) -> str | None:
    """The subject common name of a ``getpeercert()`` dict, or None."""
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


# -- back-off ------------------------------------------------------------------------------


class FailureBackoff:
    """Per-address slow-down after failed CONNECTs, in bounded memory.

    Each address with recent failures has a next free *slot*: an authentication attempt
    from it waits until its slot, and pushes the slot ``delay`` further, where ``delay``
    doubles with each failure (``base``, ``2*base``, ... up to ``maximum``). Parallel
    connections from one address therefore queue up instead of guessing in parallel; an
    attempt whose slot is more than ``maximum`` away is refused at once, without hashing.
    A success forgets the address; so does ``forget_after`` seconds without failures. At
    most ``max_addresses`` are remembered (the least recently failed are forgotten first).
    Sans-I/O: callers pass the time.
    """

    def __init__(
        self,
        *,
        base: float = 0.25,
        maximum: float = 10.0,
        forget_after: float = 300.0,
        max_addresses: int = 10_000,
    ) -> None:
        self.base = base
        self.maximum = maximum
        self.forget_after = forget_after
        self.max_addresses = max_addresses
        # address -> [failures, next_slot, last_failure]
        self._entries: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def delay(self, failures: float) -> float:
        if failures <= 0 or self.base <= 0:
            return 0.0
        return float(min(self.maximum, self.base * 2 ** min(failures - 1, 60)))

    def _entry(self, address: str, now: float) -> list[float] | None:
        entry = self._entries.get(address)
        if entry is not None and now - entry[2] > self.forget_after:
            del self._entries[address]
            return None
        return entry

    def reserve(self, address: str, now: float) -> float | None:
        """The time at which an attempt from ``address`` may be checked (``now`` if it has
        no recent failures), or None if it should be refused without checking."""
        entry = self._entry(address, now)
        if entry is None:
            return now
        slot = max(now, entry[1])
        if slot - now > self.maximum:
            return None
        entry[1] = slot + self.delay(entry[0])
        return slot

    def failure(self, address: str, now: float) -> None:
        """Record a failed attempt from ``address``."""
        entry = self._entry(address, now)
        if entry is None:
            entry = self._entries[address] = [0.0, now, now]
        entry[0] += 1
        entry[2] = now
        entry[1] = max(entry[1], now + self.delay(entry[0]))
        self._entries.move_to_end(address)
        while len(self._entries) > self.max_addresses:
            self._entries.popitem(last=False)

    def success(self, address: str) -> None:
        """Forget ``address`` (it authenticated)."""
        self._entries.pop(address, None)


def address_key(remote: str) -> str:
    """The host part of a printable address: ``"[::1]:5"`` → ``"::1"``; ``"memory"`` as is."""
    host, colon, port = remote.rpartition(":")
    if not colon or not port.isdigit():
        return remote
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback_listen(url: str) -> bool:
    """True if a ``scheme://HOST:PORT`` listen address binds only to loopback."""
    rest = url.partition("://")[2].rstrip("/")
    host = rest[1:].partition("]")[0] if rest.startswith("[") else rest.rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- limits and counters -------------------------------------------------------------------


class Refused(RemoteProtocolError):
    """A frame the policy refuses. The session answers with an ERROR frame carrying the
    message (and ``receipt-id``), then closes the connection.

    Attributes:
      reason: ``"access"`` or the name of the limit (a config key, ``"max_subscriptions"``).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SecurityCounters:
    """Running totals of refusals (read by ``Broker.statistics()``)."""

    __slots__ = ("access_refused", "authentication_failures", "limits")

    def __init__(self) -> None:
        self.authentication_failures = 0
        self.access_refused = 0
        #: limit name (a config key) -> times hit.
        self.limits: collections.Counter[str] = collections.Counter()


# Parser and session errors that name a limit, and the config key they count under.
_ERROR_LIMITS: Final = (
    ("maximum body size", "max_body_size"),
    ("body exceeds the maximum size", "max_body_size"),
    ("maximum frame size", "max_frame_size"),
    ("maximum length of", "max_line_length"),
    ("maximum of", "max_headers"),
    ("without an end of line", "max_line_length"),
    ("no CONNECT frame within", "connect_timeout"),
)


class Security:
    """The broker's security policy, as the session sees it. Made by the broker.

    Args:
      authenticator: judges every CONNECT (None: everyone is anonymous).
      allow_anonymous: let a CONNECT without ``login`` (and without a client certificate)
        in as :data:`ANONYMOUS`.
      acl: access-control rules.
      backoff: the per-address failure back-off.
      limits (keyword arguments named as the config keys): ``max_connections``,
        ``max_connections_per_address``, ``max_subscriptions``, ``max_transactions``,
        ``max_transaction_frames``, ``max_queue_depth`` (with ``queue_full_policy``) and
        ``max_destinations``.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator | None = None,
        allow_anonymous: bool = True,
        acl: AccessControl | None = None,
        backoff: FailureBackoff | None = None,
        max_connections: int = 10_000,
        max_connections_per_address: int = 1_000,
        max_subscriptions: int = 1000,
        max_transactions: int = 100,
        max_transaction_frames: int = 10_000,
        max_queue_depth: int = 100_000,
        queue_full_policy: str = "error",
        max_destinations: int = 100_000,
    ) -> None:
        self.authenticator = authenticator
        self.allow_anonymous = allow_anonymous
        self.acl = acl if acl is not None else AccessControl()
        self.backoff = backoff if backoff is not None else FailureBackoff()
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.max_subscriptions = max_subscriptions
        self.max_transactions = max_transactions
        self.max_transaction_frames = max_transaction_frames
        self.max_queue_depth = max_queue_depth
        self.queue_full_policy = queue_full_policy
        self.max_destinations = max_destinations
        self.counters = SecurityCounters()
        # The check of each command that has one (what :meth:`check` runs).
        self._checks: dict[str, Callable[[Router, Connection, Principal, Frame], None]] = {
            "SEND": self._check_send,
            "SUBSCRIBE": self._check_subscribe,
            "BEGIN": self._check_begin,
            "ACK": self._check_ack,
            "NACK": self._check_ack,
        }
        #: What a session calls for a command that has a check, before the router's
        #: handler (it looks the check up here itself: one call fewer per frame). Each
        #: raises as :meth:`check` does; one that returns True has also applied the frame,
        #: and the session skips the handler: a SEND is checked and, in the common cases,
        #: routed by one call that looks its destination up once (:meth:`_send`).
        self.checks: dict[str, Callable[[Router, Connection, Principal, Frame], object]] = {
            **self._checks,
            "SEND": self._send,
        }
        self._connections = 0
        # address -> connections open from it (entries vanish at zero: bounded by the
        # number of open connections).
        self._per_address: dict[str, int] = {}

    # -- connections ------------------------------------------------------------------

    def admit(self, remote: str) -> str | None:
        """Count a new connection from ``remote``; returns None if it may proceed (call
        :meth:`release` when it closes), else the ERROR message naming the limit (the
        connection was not counted). In-memory connections count only towards the total.
        Never blocks."""
        if self._connections >= self.max_connections:
            name, detail = "max_connections", f"{self.max_connections} connections are open"
        else:
            key = address_key(remote)
            count = self._per_address.get(key, 0)
            if key != "memory" and count >= self.max_connections_per_address:
                name = "max_connections_per_address"
                detail = f"{count} connections are open from this address"
            else:
                self._connections += 1
                self._per_address[key] = count + 1
                return None
        self.counters.limits[name] += 1
        logger.warning("connection from %s refused: %s (%s)", remote, name, detail)
        return f"limit exceeded: {name} ({detail})"

    def release(self, remote: str) -> None:
        """A connection :meth:`admit` let in has closed."""
        self._connections -= 1
        key = address_key(remote)
        count = self._per_address.get(key, 0) - 1
        if count > 0:
            self._per_address[key] = count
        else:
            self._per_address.pop(key, None)

    # -- CONNECT ----------------------------------------------------------------------

    async def authenticate(
        self, frame: Frame, remote: str, certificate: Mapping[str, Any] | None
    ) -> Principal | None:
        """The principal for a CONNECT frame, or None (refused: answer
        ``authentication failed`` and close).

        Blocks for the address's back-off slot (at most the back-off maximum) and for the
        authenticator (a password hash). Never raises but ``trio.Cancelled``.
        """
        headers = frame.headers
        login = headers.get("login")
        credentials = Credentials(login, headers.get("passcode"), headers, remote, certificate)
        if login is None and certificate is None:
            await trio.lowlevel.checkpoint()
            if self.allow_anonymous:
                return ANONYMOUS
            self._failed(remote, trio.current_time(), "no credentials")
            return None
        if self.authenticator is None:
            # No users configured: credentials are ignored, the anonymous policy decides.
            await trio.lowlevel.checkpoint()
            if self.allow_anonymous:
                return ANONYMOUS
            self._failed(remote, trio.current_time(), "no authenticator configured")
            return None
        key = address_key(remote)
        slot = self.backoff.reserve(key, trio.current_time())
        if slot is None:
            await trio.lowlevel.checkpoint()
            self._failed(remote, trio.current_time(), "too many failures from this address")
            return None
        await trio.sleep_until(slot)
        try:
            principal = await self.authenticator.authenticate(credentials)
        except Exception:
            logger.exception("authenticator failed for a CONNECT from %s", remote)
            principal = None
        if principal is None:
            self._failed(remote, trio.current_time(), f"login {login!r}")
            return None
        self.backoff.success(key)
        logger.info("%s authenticated as %r (%s)", remote, principal.name, principal.method)
        return principal

    def _failed(self, remote: str, now: float, why: str) -> None:
        self.counters.authentication_failures += 1
        self.backoff.failure(address_key(remote), now)
        logger.warning("authentication failed for %s (%s)", remote, why)

    # -- every later frame ------------------------------------------------------------

    def check(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> None:
        """Refuse ``frame`` if the ACL or a limit forbids it; otherwise do nothing (or, for
        a full queue under the ``drop-oldest`` policy, drop its oldest message). Call it
        before handing the frame to the router. Never blocks.

        Raises:
          Refused: ``access refused``, or a message naming the limit.
        """
        check = self._checks.get(frame.command)
        if check is not None:
            check(router, connection, principal, frame)

    def _check_subscribe(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> None:
        if len(connection.subscriptions) >= self.max_subscriptions:
            self._limit(
                "max_subscriptions",
                f"this connection already has {self.max_subscriptions} subscriptions",
            )
        destination = frame.headers.get("destination")
        if destination:
            self._authorize(router, connection, principal, destination, "read")

    def _check_begin(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> None:
        if len(connection.transactions) >= self.max_transactions:
            self._limit(
                "max_transactions",
                f"this connection already has {self.max_transactions} open transactions",
            )

    def _check_ack(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> None:
        headers = frame.headers
        # Decoded once (the router reads it next); the slot once decoded: no property call.
        if "transaction" in (headers._first or headers.first):
            self._check_transaction(connection, frame)

    def _check_transaction(self, connection: Connection, frame: Frame) -> None:
        transaction = frame.headers.get("transaction")
        if transaction is None:
            return
        frames = connection.transactions.get(transaction)
        if frames is not None and len(frames) >= self.max_transaction_frames:
            self._limit(
                "max_transaction_frames",
                f"transaction {transaction!r} already holds {self.max_transaction_frames} frames",
            )

    def _send(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> bool:
        """Check a SEND and, in the common cases, route it: True when it did both.

        Without access rules or a ``transaction``, a SEND to an existing queue or to a
        reply queue that exists (writable by whoever holds its name) has only the queue
        depth to check, and one to a topic nothing (a topic holds no message and a SEND
        never creates one): those are routed from here, with the destination and the
        queue looked up once for both. Anything else is checked by :meth:`_check_send`
        (same checks, same order) and left to the caller to route.
        """
        headers = frame.headers
        first = headers._first or headers.first  # decoded once: the router reads it too
        destination = first.get("destination")
        if destination and "transaction" not in first and not self.acl.rules:
            queue: Queue | None = None
            if destination.startswith(QUEUE_PREFIX):
                queue = router.queues.get(destination)
            elif destination.startswith(TOPIC_PREFIX):
                router.send(connection, frame)
                return True
            elif destination.startswith(REPLY_QUEUE_PREFIX):
                # The reply hop of request/reply (see _authorize and _existing_queue).
                queue = router.reply_queues.get(destination)
            if queue is not None:
                if len(queue.messages) >= self.max_queue_depth:
                    self._queue_full(router, queue, destination)
                router.send_to_queue(connection, frame, queue, destination)
                return True
        self._check_send(router, connection, principal, frame)
        return False

    def _check_send(
        self, router: Router, connection: Connection, principal: Principal, frame: Frame
    ) -> None:
        headers = frame.headers
        first = headers._first or headers.first  # decoded once: the router reads it next
        destination = first.get("destination")
        if not destination:
            return  # the router refuses it
        if "transaction" in first:
            self._check_transaction(connection, frame)
        if destination.startswith(QUEUE_PREFIX):
            # The common case, first: a SEND to a queue that already exists (no other
            # check applies without access rules).
            queue = router.queues.get(destination)
            if queue is None or self.acl.enabled:
                self._authorize(router, connection, principal, destination, "write")
        else:
            self._authorize(router, connection, principal, destination, "write")
            queue = _existing_queue(router, connection, destination)
        if queue is not None and len(queue.messages) >= self.max_queue_depth:
            self._queue_full(router, queue, destination)

    def _queue_full(self, router: Router, queue: Queue, destination: str) -> None:
        """A SEND to ``queue``, which holds ``max_queue_depth`` messages: make room by the
        ``drop-oldest`` policy, or refuse."""
        if self.queue_full_policy == "drop-oldest":
            router.drop_oldest(queue)  # also removes a persistent message's stored copy
            self.counters.limits["max_queue_depth"] += 1
            return
        self._limit(
            "max_queue_depth",
            f"queue {destination} holds {self.max_queue_depth} messages",
        )

    def _authorize(
        self,
        router: Router,
        connection: Connection,
        principal: Principal,
        destination: str,
        permission: str,
    ) -> None:
        if destination.startswith(TEMP_QUEUE_PREFIX):
            # The connection's own temp queue: always its owner's, never anyone else's.
            if destination[len(TEMP_QUEUE_PREFIX) :] not in connection.temp_queues:
                self._check_destinations(router)
            return
        if destination.startswith(REPLY_QUEUE_PREFIX):
            # A reply-to address someone handed out: writable by whoever holds it (the
            # router refuses SUBSCRIBE to it), and never creates anything.
            return
        # A SEND to a topic nobody subscribes to creates nothing (the message is unrouted).
        exists = _exists(router, destination) or (
            permission == "write" and _is_topic(router, destination)
        )
        acl = self.acl
        if acl.enabled and not (
            acl.allowed(principal, destination, permission)
            and (exists or acl.allowed(principal, destination, "create"))
        ):
            self.counters.access_refused += 1
            logger.warning(
                "access refused: %r may not %s %s%s",
                principal.name,
                permission,
                destination,
                "" if exists else " (or create it)",
            )
            raise Refused(ACCESS_REFUSED, "access")
        if not exists:
            self._check_destinations(router)

    def _check_destinations(self, router: Router) -> None:
        queues, topics, temp_queues = router.counts
        if queues + topics + temp_queues >= self.max_destinations:
            self._limit(
                "max_destinations", f"the broker already has {self.max_destinations} destinations"
            )

    def _limit(self, name: str, detail: str) -> None:
        self.counters.limits[name] += 1
        raise Refused(f"limit exceeded: {name} ({detail})", name)

    def limits_hit(self, *, slow_consumers: int = 0) -> dict[str, int]:
        """How often each limit was hit, by config key; ``slow_consumers`` (counted by the
        routing core when it disconnects one) is reported as ``max_send_buffer``."""
        hits = dict(self.counters.limits)
        if slow_consumers:
            hits["max_send_buffer"] = slow_consumers
        return hits

    def observe_error(self, message: str) -> None:
        """Count an ERROR the session sends for a limit it did not check here (a parser
        limit, the CONNECT timeout). Never blocks."""
        if message.startswith("limit exceeded: "):
            return  # counted when raised
        for fragment, name in _ERROR_LIMITS:
            if fragment in message:
                self.counters.limits[name] += 1
                return


def _exists(router: Router, destination: str) -> bool:
    return destination in router.queues or destination in router.topics


def _is_topic(router: Router, destination: str) -> bool:
    if destination.startswith(TOPIC_PREFIX):
        return True
    return not destination.startswith(QUEUE_PREFIX) and router.default_destination_type == "topic"


def _existing_queue(router: Router, connection: Connection, destination: str) -> Queue | None:
    if destination.startswith(TEMP_QUEUE_PREFIX):
        return connection.temp_queues.get(destination[len(TEMP_QUEUE_PREFIX) :])
    if destination.startswith(REPLY_QUEUE_PREFIX):
        return router.reply_queues.get(destination)
    if destination.startswith(TOPIC_PREFIX):
        return None
    if destination.startswith(QUEUE_PREFIX) or router.default_destination_type == "queue":
        return router.queues.get(destination)
    return None


# -- from configuration --------------------------------------------------------------------


class DefaultAuthenticator:
    """The broker's built-in authentication: a verified TLS client certificate names the
    principal (when ``certificates``); otherwise ``login``/``passcode`` are checked against
    the users file. A certificate wins over a login."""

    def __init__(self, users: UsersFile | None, *, certificates: bool = False) -> None:
        self.passwords = UsersAuthenticator(users) if users is not None else None
        self.certificates = CertificateAuthenticator(users) if certificates else None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Blocks for one password hash at most. None: refused."""
        if credentials.certificate is not None and self.certificates is not None:
            return await self.certificates.authenticate(credentials)
        if self.passwords is not None:
            return await self.passwords.authenticate(credentials)
        await trio.lowlevel.checkpoint()
        return None


async def load_security(config: Config) -> tuple[Security, ssl.SSLContext | None]:
    """The :class:`Security` policy and the TLS context a configuration asks for.

    Reads the users file and the certificates in a worker thread. Logs a warning when
    anonymous access is allowed only because nothing else is configured, and when no
    client could ever connect.

    Raises:
      OSError: a file cannot be read. ValueError: the users file is invalid.
      ssl.SSLError: the certificate or key is invalid.
    """
    users = None
    if config.users is not None:
        users = await trio.to_thread.run_sync(load_users_file, config.users)
    ssl_context = None
    if config.tls_cert is not None:
        ssl_context = await trio.to_thread.run_sync(
            make_server_ssl_context, config.tls_cert, config.tls_key, config.tls_ca
        )
    authenticator: Authenticator | None = config.authenticator
    if authenticator is None and (users is not None or config.tls_ca is not None):
        authenticator = DefaultAuthenticator(users, certificates=config.tls_ca is not None)
    allow_anonymous = config.allow_anonymous
    if allow_anonymous is None:
        allow_anonymous = authenticator is None and all(
            is_loopback_listen(url) for url in config.listen
        )
        if allow_anonymous:
            logger.warning(
                "anonymous access is allowed: no users are configured and every listener is "
                "on loopback (configure users, or pass --allow-anonymous to say so explicitly)"
            )
    if not allow_anonymous and authenticator is None:
        logger.warning(
            "no users, no client certificates and no anonymous access: every CONNECT will "
            "be refused (configure --users, --tls-ca or --allow-anonymous)"
        )
    security = Security(
        authenticator=authenticator,
        allow_anonymous=allow_anonymous,
        acl=users.acl if users is not None else None,
        backoff=FailureBackoff(
            base=config.auth_failure_delay, maximum=config.auth_failure_max_delay
        ),
        max_connections=config.max_connections,
        max_connections_per_address=config.max_connections_per_address,
        max_subscriptions=config.max_subscriptions,
        max_transactions=config.max_transactions,
        max_transaction_frames=config.max_transaction_frames,
        max_queue_depth=config.max_queue_depth,
        queue_full_policy=config.queue_full_policy,
        max_destinations=config.max_destinations,
    )
    return security, ssl_context
