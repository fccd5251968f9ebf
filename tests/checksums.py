"""The book checksum, written for the tests on their own (never the
server's or the clients' code): OKX's definition on the top 10 levels."""

import zlib


def crc_of(bids, asks):
    """CRC-32 of, for i in 0..9, bid i then ask i as price:qty, ':'-joined
    (``bids`` and ``asks`` best first, strings as published)."""
    pieces = []
    for i in range(10):
        for side in (bids, asks):
            if i < len(side):
                pieces.append(side[i][0] + ":" + side[i][1])
    return zlib.crc32(":".join(pieces).encode())
