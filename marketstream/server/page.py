"""The live market page, which ships inside the package (``static/``).

:class:`~marketstream.server.handlers.StreamHandler` serves it on a plain
``GET /`` with ``[server] demo_page`` on; ``/static/...`` serves the files
it loads (see :mod:`marketstream.server.http`)::

    body = page()   # the bytes of static/index.html, read once
"""

from __future__ import annotations

import os

__all__ = ["STATIC_DIR", "page"]

#: The page's files and the JavaScript client.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def page() -> bytes:
    """The live market page (read once; it ships inside the package)."""
    global _PAGE
    if _PAGE is None:
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as handle:
            _PAGE = handle.read()
    return _PAGE


_PAGE: bytes | None = None
