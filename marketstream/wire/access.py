"""Who may subscribe to what: user streams, protected streams and the
``channels`` claim; which algorithms may be configured, and why a token
is refused (:class:`Failure`).  No I/O, and no PyJWT here either (tokens
are :mod:`marketstream.wire.tokens`'; a server without ``[auth]`` never
loads PyJWT and cryptography, about 10 MB a process).

A *user stream* is ``<name>#<user>``: it goes only to connections whose
token's ``sub`` is ``<user>``.  ``<name>`` follows the usual stream rules;
``<user>`` is printable ASCII without whitespace, ``#``, ``{``, ``}``,
``"``, ``\\`` or ``/``, at most :data:`MAX_USER` characters (braces would
break the ``{<stream>}`` hash tag of the history keys, ``/`` separates the
streams of a ``/stream?streams=`` URL and the recovery script refuses it):

>>> split_user_stream("account.orders#42")
('account.orders', '42')
>>> split_user_stream("trade.SOL_USDC")
('trade.SOL_USDC', None)
>>> valid_user("42"), valid_user("a b"), valid_user("x" * 65)
(True, False, False)

:class:`Access` decides per stream, given the stream rules' own verdict on
the name and who the connection is (a :class:`Grant`, or None when
anonymous)::

    access = Access(rules, protected=("depth.full.*", "raw.*"))
    access.refusal("account.orders#42", None)      # ('user_stream', ...)
    access.refusal("account.orders#42", Grant("42"))  # None: subscribed

What a token may do (the README's "Private streams" says the same):

* any authenticated connection may subscribe the ``[auth] protected``
  streams (patterns), which anonymous ones may not;
* a connection whose token ``sub`` is ``<user>`` may subscribe
  ``<name>#<user>``, whatever ``<name>`` is as long as it is a valid
  channel name (:func:`valid_name`): the allow-lists of ``[protocol]``
  (which keep anonymous clients from making up public channels) do not
  apply to a user's own namespace, so ``account.orders#42`` needs no
  ``account`` stream type; nobody else may subscribe it, whatever their
  claims;
* a token's ``channels`` claim (a list of patterns) grants the streams it
  matches *beyond the allow-lists*: names of a type or market that
  ``[protocol] stream_types`` / ``markets`` / ``market_pattern`` would
  refuse (``raw.*``, ``depth.full.*``), as long as the name itself is a
  valid channel name (:func:`valid_name`).  It never grants another
  user's stream.

Patterns are shell-style (:func:`fnmatch.fnmatchcase`): ``*`` any run of
characters, ``?`` one, ``[...]`` a set; matched against the whole name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from marketstream.wire.derived import Derived, DerivedRules

__all__ = [
    "FAILURE_CAUSES",
    "HMAC_ALGORITHMS",
    "PUBLIC_KEY_ALGORITHMS",
    "check_algorithms",
    "Failure",
    "MAX_USER",
    "MAX_PATTERNS",
    "ACCESS_CAUSES",
    "Grant",
    "Access",
    "split_user_stream",
    "valid_user",
    "valid_name",
    "compile_patterns",
]

#: The longest ``<user>`` part (and token ``sub`` that may own user streams).
MAX_USER = 64
#: The most patterns a token's ``channels`` claim may hold.
MAX_PATTERNS = 64
#: The longest pattern (in ``channels`` or ``[auth] protected``).
MAX_PATTERN = 200
#: The longest name the ``channels`` claim may grant (as the stream rules).
MAX_NAME = 200

#: Why a stream was refused here (counted in ``rejected_streams_total``).
ACCESS_CAUSES = ("user_stream", "protected")

# Printable ASCII (0x21-0x7e) but " # / \\ { }.
_CHARS = r"[!$-.0-\[\]-z|~]"
_USER = re.compile(r"%s{1,%d}" % (_CHARS, MAX_USER))
_NAME = re.compile(r"%s{1,%d}" % (_CHARS, MAX_NAME))


def valid_user(user: str) -> bool:
    """Whether ``user`` may be the ``<user>`` of ``<name>#<user>``: 1 to
    :data:`MAX_USER` printable ASCII characters but whitespace, ``#``,
    ``{``, ``}``, ``"``, ``\\`` and ``/``.

    >>> valid_user("user-42@example.com"), valid_user("a{b}"), valid_user("a/b")
    (True, False, False)
    """
    return _USER.fullmatch(user) is not None


def valid_name(name: str) -> bool:
    """Whether ``name`` may be a channel at all (the same characters as a
    user, up to :data:`MAX_NAME`): what a ``channels`` grant still needs.

    >>> valid_name("raw.SOL_USDC"), valid_name("raw SOL")
    (True, False)
    """
    return _NAME.fullmatch(name) is not None


def split_user_stream(name: str) -> tuple[str, str | None]:
    """``(<name>, <user>)`` of a user stream, ``(name, None)`` of any other."""
    base, sep, user = name.partition("#")
    return (base, user) if sep else (name, None)


def compile_patterns(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression matching any of the shell-style ``patterns``
    (None for none).  Raises ValueError for a pattern that is not a
    string of 1 to 200 characters.

    >>> compile_patterns(["raw.*", "depth.full.?TC_*"]).fullmatch("raw.X") is not None
    True
    """
    parts = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN:
            raise ValueError("a pattern is a string of 1 to %d characters" % MAX_PATTERN)
        parts.append(fnmatch.translate(pattern))
    if not parts:
        return None
    return re.compile("|".join("(?:%s)" % part for part in parts))


#: The algorithms ``[auth] jwt_algorithms`` may name (never ``none``).
HMAC_ALGORITHMS = frozenset(("HS256", "HS384", "HS512"))
PUBLIC_KEY_ALGORITHMS = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
)


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    """The configured algorithms, or ValueError: known ones only (never
    ``none``), at least one, and not HMAC and public-key ones together.

    >>> check_algorithms(["HS256", "HS512"])
    ('HS256', 'HS512')
    >>> check_algorithms(["HS256", "RS256"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: HMAC (HS*) and public-key algorithms cannot be mixed ...
    """
    chosen = tuple(dict.fromkeys(algorithms))
    if not chosen:
        raise ValueError("at least one algorithm is needed")
    for name in chosen:
        if name not in HMAC_ALGORITHMS and name not in PUBLIC_KEY_ALGORITHMS:
            raise ValueError(
                "unknown or unsafe algorithm %r (allowed: %s)"
                % (name, ", ".join(sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS)))
            )
    hmac = [name for name in chosen if name in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(chosen):
        raise ValueError(
            "HMAC (HS*) and public-key algorithms cannot be mixed (the public key "
            "would be accepted as an HMAC secret)"
        )
    return chosen


#: Why a token was refused, as counted in ``marketstream_auth_failures_total``:
#: ``missing`` (``[auth] required`` and none given), ``malformed`` (not a
#: JWT, or too long), ``bad_signature``, ``expired``, ``not_yet_valid``
#: (``nbf``/``iat`` in the future), ``audience``, ``issuer``, ``algorithm``
#: (not one of ``jwt_algorithms``, ``none`` included), ``bad_claims``
#: (``sub`` missing or not a string, ``channels`` not a list of patterns),
#: ``wrong_sub`` (an ``AUTH`` for another ``sub`` than the connection's),
#: ``disabled`` (an ``AUTH`` with no ``[auth] jwt_key``).
FAILURE_CAUSES = (
    "missing",
    "malformed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "algorithm",
    "bad_claims",
    "wrong_sub",
    "disabled",
)


class Failure(NamedTuple):
    """A refused token: the cause (one of :data:`FAILURE_CAUSES`) and a
    reason for the client."""

    cause: str
    reason: str


class Grant(NamedTuple):
    """What a verified token lets a connection do: its ``sub``, whether that
    may own user streams (``user``: the sub, or None), the token's expiry
    (seconds since the epoch, None if it has none) and its ``channels``
    (a compiled pattern, or None)."""

    sub: str
    exp: float | None = None
    channels: re.Pattern[str] | None = None

    @property
    def user(self) -> str | None:
        """The ``sub`` if it can own user streams (:func:`valid_user`), else None."""
        return self.sub if valid_user(self.sub) else None


class _Rules(Protocol):
    """What :class:`Access` asks of the stream rules
    (:class:`marketstream.wire.requests.StreamRules`)."""

    @property
    def derived(self) -> DerivedRules | None: ...

    def refusal(self, name: str) -> tuple[str, str] | None: ...


class Access:
    """Per-stream access: the stream rules, then user streams, ``channels``
    grants and ``[auth] protected`` (see the module's docstring)."""

    def __init__(self, rules: _Rules, protected: Iterable[str] = ()) -> None:
        self.rules = rules
        self.protected = compile_patterns(protected)

    def refusal(self, name: str, grant: Grant | None) -> tuple[str, str] | None:
        """None if a connection with ``grant`` (None: anonymous) may
        subscribe ``name``, else ``(cause, reason)`` as
        :meth:`~marketstream.wire.requests.StreamRules.refusal` gives it.

        >>> from marketstream.wire.requests import StreamRules
        >>> access = Access(StreamRules(), protected=["trade.RAW_*"])
        >>> access.refusal("account.orders#42", Grant("42")) is None
        True
        >>> access.refusal("account.orders#42", Grant("7"))
        ('user_stream', 'account.orders#42 belongs to another user')
        >>> access.refusal("trade.RAW_USDC", None)
        ('protected', 'trade.RAW_USDC needs an authenticated connection')
        >>> access.refusal("raw.SOL_USDC", Grant("7", channels=compile_patterns(["raw.*"]))) is None
        True
        """
        base, user = split_user_stream(name)
        if user is not None:
            if not valid_user(user) or not valid_name(base):
                return "invalid_name", "invalid user stream name %.100r" % name
            if grant is None:
                return "user_stream", "%.100s needs an authenticated connection" % name
            if grant.sub != user:
                return "user_stream", "%.100s belongs to another user" % name
            return None  # the owner's own namespace: no allow-lists, never protected
        refusal = self.rules.refusal(base)
        if refusal is not None:
            channels = grant.channels if grant is not None else None
            if (
                channels is None
                or refusal[0] not in ("unknown_type", "unknown_market")
                or not valid_name(base)
                or channels.fullmatch(base) is None
            ):
                return refusal
        if grant is None and self.protected is not None and self._protected(base):
            return "protected", "%.100s needs an authenticated connection" % name
        return None

    def _protected(self, name: str) -> bool:
        """Whether ``name``, or the stream it derives from, is protected."""
        assert self.protected is not None
        if self.protected.fullmatch(name):
            return True
        derived = self.rules.derived
        spec = derived.parse(name) if derived is not None else None
        return isinstance(spec, Derived) and self.protected.fullmatch(spec.base) is not None
