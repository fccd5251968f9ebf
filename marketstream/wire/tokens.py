"""JWT verification, without any I/O: PyJWT (with ``cryptography`` for
RS256, ES256 and EdDSA) checks a token; this module says which keys and
algorithms, and what each failure is counted as.

>>> import jwt, time
>>> verifier = Verifier("a-secret-of-at-least-32-bytes-for-hs256", ["HS256"])
>>> token = jwt.encode({"sub": "42", "exp": int(time.time()) + 60},
...                    "a-secret-of-at-least-32-bytes-for-hs256", algorithm="HS256")
>>> verifier.verify(token).sub
'42'
>>> verifier.verify("not.a.token")
Failure(cause='malformed', reason='malformed token')

The algorithms always come from the configuration (``[auth]
jwt_algorithms``), never from the token's header; ``none`` is never
accepted; HMAC and public-key algorithms are never mixed (a public key
must never serve as an HMAC secret: the "algorithm confusion" attack).
``exp``, ``nbf`` and ``iat`` are checked when the token has them, ``aud``
and ``iss`` when configured, each with ``leeway`` seconds for clock skew.

``[auth] jwt_key`` is the HMAC secret itself for the ``HS*`` algorithms,
and for the others the path of a PEM public key file (or the PEM text,
starting ``-----BEGIN``): the configured algorithms decide, never the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import jwt
import jwt.utils
from jwt.algorithms import HMACAlgorithm

if TYPE_CHECKING:
    from jwt.algorithms import AllowedPublicKeys

from marketstream.wire.access import (
    FAILURE_CAUSES,
    HMAC_ALGORITHMS,
    PUBLIC_KEY_ALGORITHMS,
    check_algorithms,
    MAX_PATTERNS,
    Failure,
    Grant,
    compile_patterns,
)

__all__ = [
    "HMAC_ALGORITHMS",
    "PUBLIC_KEY_ALGORITHMS",
    "FAILURE_CAUSES",
    "MAX_TOKEN_BYTES",
    "Failure",
    "Verifier",
    "check_algorithms",
    "load_key",
]

#: The longest token looked at; longer ones are refused as ``malformed``
#: before any parsing.
MAX_TOKEN_BYTES = 8192


# PyJWT's exceptions, most specific first, to causes.
_CAUSES: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token not yet valid"),
    (jwt.InvalidAudienceError, "audience", "wrong token audience"),
    (jwt.InvalidIssuerError, "issuer", "wrong token issuer"),
    (jwt.InvalidAlgorithmError, "algorithm", "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad_signature", "bad token signature"),
    (jwt.DecodeError, "malformed", "malformed token"),
)
_INVALID_SUBJECT = getattr(jwt.exceptions, "InvalidSubjectError", None)  # PyJWT >= 2.10
if _INVALID_SUBJECT is not None:
    _CAUSES = ((_INVALID_SUBJECT, "bad_claims", "the token has no sub"),) + _CAUSES


def load_key(key: str, algorithms: Sequence[str]) -> bytes | AllowedPublicKeys:
    """The key material for ``algorithms``: the secret (bytes) for HMAC,
    else the public key read from the PEM file ``key`` (or the PEM text).
    Raises ValueError saying what is wrong (an unreadable file, not a
    public key, a key of another kind than the algorithms)."""
    algorithms = check_algorithms(algorithms)
    if not key:
        raise ValueError("no key")
    if algorithms[0] in HMAC_ALGORITHMS:
        secret = key.encode()
        try:  # what PyJWT would otherwise find on every token
            jwt.get_algorithm_by_name(algorithms[0]).prepare_key(secret)
        except jwt.InvalidKeyError as exc:
            raise ValueError("the key is no HMAC secret: %s" % exc) from None
        return secret
    if key.lstrip().startswith("-----BEGIN"):
        pem = key.encode()
    else:
        try:
            with open(key, "rb") as handle:
                pem = handle.read(1 << 20)
        except OSError as exc:
            raise ValueError(
                "cannot read the public key file %r: %s" % (key, exc.strerror)
            ) from None
    algorithm = jwt.get_algorithm_by_name(algorithms[0])
    loaded: AllowedPublicKeys  # PyJWT's Algorithm.prepare_key says Any
    try:
        loaded = algorithm.prepare_key(pem)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(
            "%r is not a PEM public key for %s: %s" % (key, algorithms[0], exc)
        ) from None
    for name in algorithms[1:]:
        try:
            jwt.get_algorithm_by_name(name).prepare_key(pem)
        except (jwt.InvalidKeyError, ValueError, TypeError):
            raise ValueError("the key %r does not fit algorithm %s" % (key, name)) from None
    if hasattr(loaded, "private_bytes"):
        raise ValueError("%r is a private key: give the server the public key only" % key)
    return loaded


#: ``jwt.decode``'s options.  Any: PyJWT types them as its ``Options``
#: TypedDict in recent releases and as ``dict[str, Any]`` in older ones
#: (both supported), and no one annotation fits both.
_DecodeOptions: TypeAlias = Any


class _PreparedHMAC(HMACAlgorithm):
    """PyJWT's HMAC algorithm with the configured secret prepared once.

    PyJWT prepares the key again on every decode (it checks that the secret
    is no PEM, SSH, DER or JWK key: about a fifth of a decode).  This one
    answers the configured secret (the same object) with what PyJWT
    prepared from it at start-up, and prepares any other key as PyJWT
    does; signing and verifying are PyJWT's own.
    """

    def __init__(self, name: str, secret: bytes) -> None:
        pyjwt_own = cast(HMACAlgorithm, jwt.get_algorithm_by_name(name))
        super().__init__(pyjwt_own.hash_alg)
        self.secret = secret
        self.prepared = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self.secret:
            return self.prepared
        return super().prepare_key(key)


#: PyJWT's strict decoding of a token's segment (2.14 and later; older ones
#: have none and decode leniently in ``_load``): it rejects '=' padding out
#: of place, any byte outside the base64url alphabet (looked at one by one,
#: a Python generator step each: about a fifth of an HS256 check) and
#: non-canonical trailing bits.
_PYJWT_SEGMENT: Callable[[bytes, str], bytes] | None = getattr(
    jwt.PyJWS, "_decode_base64url_segment", None
)
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_-]*")


def decode_segment(segment: bytes, name: str) -> bytes:
    """PyJWT's ``_decode_base64url_segment``, the usual segment looked at by
    one regular expression: one without '=' of only base64url characters
    whose length is no 4n+1 decodes to what PyJWT gives (after its round
    trip, which stays); any other is PyJWT's to accept or refuse.

    >>> decode_segment(b"eyJhbGciOiJIUzI1NiJ9", "header")
    b'{"alg":"HS256"}'
    """
    if len(segment) % 4 != 1 and _PLAIN_SEGMENT.fullmatch(segment) is not None:
        decoded = jwt.utils.base64url_decode(segment)
        if jwt.utils.base64url_encode(decoded) == segment:
            return decoded
    assert _PYJWT_SEGMENT is not None  # only installed where PyJWT has it
    return _PYJWT_SEGMENT(segment, name)


def _decoder(options: _DecodeOptions, key: object, algorithms: Sequence[str]) -> jwt.PyJWT:
    """A PyJWT of its own with ``options``; its signature layer (where PyJWT
    has one per instance, 2.11 and later) decodes segments with
    :func:`decode_segment`, and with an HMAC secret each algorithm reuses
    the secret PyJWT prepared once (:class:`_PreparedHMAC`)."""
    decoder = jwt.PyJWT(options)
    signatures = getattr(decoder, "_jws", None)  # older PyJWT: a global one, left alone
    if _PYJWT_SEGMENT is not None and isinstance(signatures, jwt.PyJWS):
        # An instance attribute: this PyJWS only (a plain function, not bound).
        signatures._decode_base64url_segment = decode_segment  # type: ignore[method-assign]
    if not isinstance(key, bytes):
        return decoder  # a public key object: PyJWT's prepare_key returns it as it is
    prepared = [_PreparedHMAC(name, key) for name in algorithms]  # a bad secret raises here
    if isinstance(signatures, jwt.PyJWS):
        for name, algorithm in zip(algorithms, prepared):
            signatures.unregister_algorithm(name)
            signatures.register_algorithm(name, algorithm)
    return decoder


class Verifier:
    """Checks tokens against one key and the configured algorithms,
    audience and issuer."""

    def __init__(
        self,
        key: str | bytes | AllowedPublicKeys,
        algorithms: Sequence[str],
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
    ) -> None:
        self.algorithms = list(check_algorithms(algorithms))
        self.key = load_key(key, self.algorithms) if isinstance(key, str) else key
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway
        options: _DecodeOptions = {"verify_aud": self.audience is not None}
        try:
            self._decoder = _decoder(options, self.key, self.algorithms)
        except jwt.InvalidKeyError as exc:
            raise ValueError("the key is no HMAC secret: %s" % exc) from None

    def verify(self, token: str) -> Grant | Failure:
        """The token's :class:`~marketstream.wire.access.Grant`, or why it
        is refused.  Never raises."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            return Failure("malformed", "malformed token")
        try:
            claims = self._decoder.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.MissingRequiredClaimError as exc:
            cause = {"aud": "audience", "iss": "issuer"}.get(exc.claim, "bad_claims")
            return Failure(cause, "the token has no %s" % exc.claim)
        except jwt.PyJWTError as exc:
            for kind, cause, reason in _CAUSES:
                if isinstance(exc, kind):
                    return Failure(cause, reason)
            return Failure("malformed", "invalid token")
        except (ValueError, TypeError):  # a key or header PyJWT could not use
            return Failure("malformed", "invalid token")
        return grant_of(claims)


def grant_of(claims: dict[str, object]) -> Grant | Failure:
    """The :class:`~marketstream.wire.access.Grant` of verified claims, or
    ``bad_claims``: ``sub`` must be a non-empty string, ``exp`` (if any) a
    number, ``channels`` (if any) a list of at most 64 patterns.

    >>> grant_of({"sub": "42", "exp": 1700000000}).exp
    1700000000.0
    >>> grant_of({"exp": 1})
    Failure(cause='bad_claims', reason='the token has no sub')
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        return Failure("bad_claims", "the token has no sub")
    exp = claims.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))):
        return Failure("bad_claims", "exp must be a number")
    channels = claims.get("channels")
    pattern = None
    if channels is not None:
        if not isinstance(channels, list) or len(channels) > MAX_PATTERNS:
            return Failure(
                "bad_claims", "channels must be a list of at most %d patterns" % MAX_PATTERNS
            )
        try:
            pattern = compile_patterns(channels)
        except ValueError as exc:
            return Failure("bad_claims", "channels: %s" % exc)
    return Grant(sub, None if exp is None else float(exp), pattern)
