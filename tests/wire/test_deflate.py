"""permessage-deflate, sans-I/O (marketstream.wire.deflate): negotiation
of every offer shape, and compressed frames that independent inflaters
(zlib, python-websockets' extension) read back."""

import os
import zlib

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from marketstream.wire.deflate import (
    Deflater,
    deflated_frame,
    inflate_frame,
    negotiate,
    parse_offers,
)
from marketstream.wire.frames import text_frame

ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
SNAPSHOT = (
    b'{"stream":"depth.BTC_USDT","data":{"e":"depth","bids":['
    + b",".join(b'["%d.25","0.%03d"]' % (60000 - i, i) for i in range(200))
    + b'],"asks":[]}}'
)


# --- negotiation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "offer, answer",
    [
        # RFC 7692 8.2.3 and what clients send
        ("permessage-deflate", ANSWER),
        ("permessage-deflate; client_max_window_bits", ANSWER),  # browsers, websockets
        ("permessage-deflate; client_max_window_bits=10", ANSWER),
        ("permessage-deflate; client_no_context_takeover", ANSWER),
        ("permessage-deflate; server_no_context_takeover", ANSWER),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "client_max_window_bits=15",
            ANSWER,
        ),
        ("permessage-deflate; server_max_window_bits=15", ANSWER + "; server_max_window_bits=15"),
        ('permessage-deflate; client_max_window_bits="12"', ANSWER),  # quoted (RFC 7692 7.1)
        ("Permessage-Deflate", ANSWER),  # names are case-insensitive
        ("  permessage-deflate ;\tclient_max_window_bits  ", ANSWER),
        # several offers: the first acceptable one (RFC 7692 5, example 8.2.3.4)
        ("permessage-deflate; server_max_window_bits=10, permessage-deflate", ANSWER),
        ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits", ANSWER),
        ("foo, bar; baz=1, permessage-deflate", ANSWER),
    ],
)
def test_offers_the_server_accepts(offer, answer):
    agreement = negotiate(offer)
    assert agreement is not None
    assert agreement.response == answer
    assert "server_no_context_takeover" in agreement.parameters
    assert "client_no_context_takeover" in agreement.parameters


@pytest.mark.parametrize(
    "offer",
    [
        None,
        "",
        "x-webkit-deflate-frame",
        "deflate-frame",
        # the server's window is 15 bits for everyone
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; server_max_window_bits=8",
        # invalid parameters (RFC 7692 7: the offer is declined)
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=015",
        "permessage-deflate; client_max_window_bits=+9",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=true",
        "permessage-deflate; unknown_parameter",
        "permessage-deflate; client_max_window_bits; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_max_window_bits=9, permessage-deflate; mystery",
        # not the grammar: declined whole
        "permessage-deflate;;",
        "permessage-deflate; =15",
        'permessage-deflate; client_max_window_bits="15',
        "permessage-deflate, , permessage-deflate",
        ",permessage-deflate",
        "permessage-deflate; a b",
        "permessage-deflate" + ", x" * 3000,
    ],
)
def test_offers_the_server_declines(offer):
    assert negotiate(offer) is None


def test_parse_offers_keeps_order_and_parameters():
    assert parse_offers('a; x=1; y="2", b, c; z') == [
        ("a", [("x", "1"), ("y", "2")]),
        ("b", []),
        ("c", [("z", None)]),
    ]


def test_the_answer_is_what_python_websockets_accepts():
    """An independent client implementation takes the answer for its
    default offer (and then inflates without context)."""
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    factory = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    offer = ", ".join(
        "; ".join([factory.name] + [k if v is None else "%s=%s" % (k, v) for k, v in params])
        for params in [factory.get_request_params()]
    )
    answer = negotiate(offer)
    assert answer is not None
    name, params = parse_offers(answer.response)[0]
    extension = factory.process_response_params(params, [])
    assert extension.remote_no_context_takeover and extension.local_no_context_takeover


# --- frames ------------------------------------------------------------------------


def test_a_deflated_frame_is_a_final_text_frame_with_rsv1_that_zlib_inflates():
    frame = deflated_frame(SNAPSHOT)
    assert frame[0] == 0xC1  # FIN, RSV1, text
    assert len(frame) < len(SNAPSHOT) // 3
    assert inflate_frame(frame) == SNAPSHOT
    # RFC 7692 7.2.2: the receiver appends 00 00 ff ff and inflates
    body = frame[4:] if frame[1] & 0x7F == 126 else frame[2:]
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == SNAPSHOT


def test_python_websockets_inflates_each_frame_on_its_own():
    """Frames made one after another by one Deflater carry no history: an
    inflater that starts at any of them reads it (no context takeover)."""
    deflater = Deflater(min_bytes=0)
    messages = [SNAPSHOT, SNAPSHOT.replace(b"60000", b"60001"), b'{"e":"x"}' * 100]
    frames = [deflater.frame(m) for m in messages]
    for message, frame in zip(messages, frames):
        assert frame[0] & 0x40
        body = frame[4:] if frame[1] & 0x7F == 126 else frame[2:]
        fresh = PerMessageDeflate(True, True, 15, 15)
        decoded = fresh.decode(Frame(Opcode.TEXT, body, rsv1=True))
        assert decoded.data == message and not decoded.rsv1


def test_the_same_message_deflates_to_the_same_bytes():
    deflater = Deflater(min_bytes=0)
    first = deflater.frame(SNAPSHOT)
    deflater.frame(b'{"other":"message"}' * 40)
    assert deflater.frame(SNAPSHOT) == first == deflated_frame(SNAPSHOT)


def test_small_and_incompressible_messages_stay_plain():
    deflater = Deflater(min_bytes=512)
    small = b'{"e":"trade","p":"1.0"}'
    plain = text_frame(small)
    assert deflater.frame(small, plain) is plain
    noise = os.urandom(2000)  # not JSON, but incompressible
    plain = text_frame(noise)
    assert deflater.frame(noise, plain) is plain
    assert deflater.frame(SNAPSHOT)[0] == 0xC1


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_reframe_takes_the_payload_of_a_plain_frame_of_any_length(length):
    payload = (b'{"a":"' + b"x" * length + b'"}')[: max(length, 2)]
    deflater = Deflater(min_bytes=0)
    frame = deflater.reframe(text_frame(payload))
    assert inflate_frame(frame) == payload
