"""JWT verification (wire/tokens.py), called directly: every refusal cause,
the algorithm rules and the bounds on what a token may carry."""

import re
import time

import jwt
import jwt.api_jws
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from marketstream.wire import tokens
from marketstream.wire.access import Grant
from marketstream.wire.tokens import (
    MAX_TOKEN_BYTES,
    Failure,
    Verifier,
    check_algorithms,
    load_key,
)

SECRET = "unit-test-secret-of-at-least-32-bytes"


def b64url(data):
    return jwt.utils.base64url_encode(data)


def sign(claims, key=SECRET, algorithm="HS256"):
    return jwt.encode(claims, key, algorithm=algorithm)


def test_causes():
    verifier = Verifier(SECRET, ["HS256"], audience="ex", issuer="auth", leeway=5)
    now = int(time.time())
    base = {"sub": "1", "aud": "ex", "iss": "auth"}
    assert verifier.verify(sign(base)) == Grant("1")
    cases = {
        "expired": {**base, "exp": now - 60},
        "not_yet_valid": {**base, "nbf": now + 60},
        "audience": {**base, "aud": "other"},
        "issuer": {**base, "iss": "other"},
        "bad_claims": {"aud": "ex", "iss": "auth"},
    }
    for cause, claims in cases.items():
        result = verifier.verify(sign(claims))
        assert isinstance(result, Failure) and result.cause == cause, (cause, result)
    assert verifier.verify(sign({"sub": "1", "iss": "auth"})).cause == "audience"  # no aud
    assert verifier.verify(sign(base, key="x" * 40)).cause == "bad_signature"
    assert verifier.verify(sign(base, algorithm="HS512")).cause == "algorithm"
    assert verifier.verify(jwt.encode(base, None, algorithm="none")).cause == "algorithm"
    assert verifier.verify("a.b.c").cause == "malformed"
    assert verifier.verify("x" * (MAX_TOKEN_BYTES + 1)).cause == "malformed"
    # Within the leeway: accepted (clock skew).
    assert verifier.verify(sign({**base, "exp": now - 2})).exp == now - 2


def test_claims_are_bounded():
    verifier = Verifier(SECRET, ["HS256"])
    for claims in (
        {"sub": 42},
        {"sub": ""},
        {"sub": "1", "channels": "raw.*"},
        {"sub": "1", "channels": ["raw.*"] * 65},
        {"sub": "1", "channels": [""]},
        {"sub": "1", "channels": [7]},
    ):
        result = verifier.verify(sign(claims))
        assert isinstance(result, Failure) and result.cause == "bad_claims", claims
    grant = verifier.verify(sign({"sub": "1", "channels": ["raw.*", "x.?"]}))
    assert grant.channels.fullmatch("raw.BTC_USDT") and not grant.channels.fullmatch("x.ab")


def test_algorithm_rules(tmp_path):
    with pytest.raises(ValueError, match="none"):
        check_algorithms(["none"])
    with pytest.raises(ValueError, match="mixed"):
        check_algorithms(["HS256", "ES256"])
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem)
    verifier = Verifier(str(path), ["ES256"])
    assert verifier.verify(sign({"sub": "k"}, private, "ES256")).sub == "k"
    # Algorithm confusion: an HS256 token whose secret is the public key's PEM.
    forged = jwt.encode({"sub": "k"}, "x" * 32, algorithm="HS256")
    assert verifier.verify(forged).cause == "algorithm"
    # Keys that cannot serve: missing, not a key, a private key, the wrong kind.
    with pytest.raises(ValueError, match="cannot read"):
        load_key(str(tmp_path / "missing.pem"), ["ES256"])
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_key(str(tmp_path / "junk.pem"), ["ES256"])
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "private.pem").write_bytes(private_pem)
    with pytest.raises(ValueError):
        load_key(str(tmp_path / "private.pem"), ["ES256"])
    with pytest.raises(ValueError):
        load_key(str(path), ["RS256"])


def test_a_public_key_is_no_hmac_secret():
    """PyJWT refuses a PEM public key as an HMAC secret; the verifier
    prepares its secret once, so such a key stops start-up instead of
    refusing every token as invalid."""
    public_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="no HMAC secret"):
        load_key(public_pem.decode(), ["HS256"])
    with pytest.raises(ValueError, match="no HMAC secret"):
        Verifier(public_pem, ["HS256", "HS512"])


def test_verifiers_with_different_secrets_keep_their_own():
    """Each verifier's secret is prepared once for it alone: another
    verifier, and PyJWT's own functions, are unaffected."""
    other = "another-secret-long-enough-for-hs512-" + "x" * 32
    first, second = Verifier(SECRET, ["HS256"]), Verifier(other, ["HS256", "HS512"])
    mine, theirs = sign({"sub": "1"}), sign({"sub": "2"}, key=other, algorithm="HS512")
    assert first.verify(mine) == Grant("1") and second.verify(theirs) == Grant("2")
    assert first.verify(sign({"sub": "2"}, key=other)).cause == "bad_signature"
    assert second.verify(mine).cause == "bad_signature"
    assert jwt.decode(theirs, other, algorithms=["HS512"])["sub"] == "2"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(mine, other, algorithms=["HS256"])


_SEGMENT_BYTES = st.sampled_from(list(b"AQgwBz09-_=!+/ .") + [0xFF])


@given(st.lists(_SEGMENT_BYTES, max_size=24).map(bytes) | st.binary(max_size=12).map(b64url))
@hsettings(max_examples=500)
def test_segments_decode_exactly_as_pyjwt_decodes_them(segment):
    """decode_segment gives what PyJWT's own strict decoding gives, or the
    same refusal: padding, bytes outside the alphabet, 4n+1 lengths and
    non-canonical trailing bits among the examples."""
    own = jwt.PyJWS._decode_base64url_segment
    try:
        expected = own(segment, "payload")
    except jwt.DecodeError as exc:
        with pytest.raises(jwt.DecodeError, match=re.escape(str(exc))):
            tokens.decode_segment(segment, "payload")
    else:
        assert tokens.decode_segment(segment, "payload") == expected


def test_a_usual_token_is_not_walked_byte_by_byte(monkeypatch):
    """PyJWT's strict decoding looks at every byte of a token in a Python
    generator (about a fifth of an HS256 check); the verifier's takes a
    usual token's segments with one regular expression each.  With PyJWT's
    alphabet emptied, only a segment PyJWT itself looks at is refused."""
    verifier = Verifier(SECRET, ["HS256"])
    exp = int(time.time()) + 60
    token = sign({"sub": "7", "exp": exp})
    monkeypatch.setattr(jwt.api_jws, "_BASE64URL_ALPHABET", b"")
    assert verifier.verify(token) == Grant("7", float(exp))
    monkeypatch.undo()
    # Junk after the signature (GHSA-hxm8-2xgr-2p9m) is still refused.
    assert verifier.verify(token + "!!!!").cause in ("malformed", "bad_signature")
