"""Book frames (marketstream.wire.books): the checksum against one written
here with zlib.crc32, the checksum added to a frame by bytes, and the
frames the server builds itself."""

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire.books import (
    DEFAULT_FIELDS,
    BookFields,
    book_checksum,
    book_frame,
    renamed,
    with_checksum,
)
from marketstream.wire.positions import FRAME_DATA, FRAME_END, FRAME_START
from tests.wire.strategies import FUZZ, JSON_VALUES

NUMBERS = st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,4})?\Z")
LEVELS = st.lists(st.lists(NUMBERS, min_size=2, max_size=2), max_size=25)


def okx_checksum(bids, asks):
    """OKX's definition, top 10: bid i, then ask i, price:qty, joined with ':'."""
    pieces = []
    for i in range(10):
        if i < len(bids):
            pieces.append("%s:%s" % (bids[i][0], bids[i][1]))
        if i < len(asks):
            pieces.append("%s:%s" % (asks[i][0], asks[i][1]))
    return zlib.crc32(":".join(pieces).encode("utf-8"))


@given(LEVELS, LEVELS)
def test_the_checksum_is_okxs_on_the_top_ten(bids, asks):
    assert book_checksum(bids, asks) == okx_checksum(bids, asks)
    assert book_checksum(bids, asks) == book_checksum(bids[:10], asks[:10])


def test_the_checksum_of_a_known_book():
    # Uneven sides: after the shorter one ends, the longer one goes on alone.
    bids = [["3", "1"], ["2", "1"], ["1", "1"]]
    asks = [["4", "0.5"]]
    assert book_checksum(bids, asks) == zlib.crc32(b"3:1:4:0.5:2:1:1:1")
    assert 0 <= book_checksum(bids, asks) < 2**32


#: Stream names as a Redis channel gives them (UTF-8), without what the
#: recovery script refuses in a name.
STREAMS = st.text(
    st.characters(blacklist_characters='"\\', blacklist_categories=("Cs",), min_codepoint=33),
    min_size=1,
)


@FUZZ
@given(
    STREAMS,
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5),
    st.integers(0, 2**53 - 1),
    st.integers(0, 2**32 - 1),
)
def test_a_frame_with_its_checksum_parses_with_checksum_last(stream, data, seq, checksum):
    frame = FRAME_START + stream.encode() + FRAME_DATA + json.dumps(data).encode() + FRAME_END % seq
    out = json.loads(with_checksum(frame, checksum))
    assert list(out) == ["stream", "data", "seq", "checksum"]
    assert (out["stream"], out["data"], out["seq"], out["checksum"]) == (
        stream,
        data,
        seq,
        checksum,
    )
    built = json.loads(book_frame(stream, data, seq, checksum))
    assert built == out and list(built) == list(out)


@pytest.mark.parametrize("frame", [b"", b"[]", b"{", b"}"])
def test_with_checksum_refuses_what_is_not_an_object(frame):
    with pytest.raises(ValueError):
        with_checksum(frame, 1)


def test_the_default_fields_are_the_seed_engines():
    assert BookFields("b", "a", "U", "u", "e", "depthSnapshot") == DEFAULT_FIELDS


@given(STREAMS, st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5), st.integers(0, 99))
def test_a_renamed_frame_is_the_same_frame_of_another_stream(stream, data, seq):
    frame = FRAME_START + stream.encode() + FRAME_DATA + json.dumps(data).encode() + FRAME_END % seq
    out = json.loads(renamed(frame, stream, stream + "@100ms"))
    assert out == {"stream": stream + "@100ms", "data": data, "seq": seq}
    assert renamed(with_checksum(frame, 5), stream, "x").endswith(b',"checksum":5}')


def test_renamed_refuses_a_frame_of_another_stream():
    with pytest.raises(ValueError, match="not a frame of"):
        renamed(b'{"stream":"a.B_C","data":{},"seq":1}', "a.B_D", "a.B_D@100ms")
