"""``marketstream.publisher``: the public name of ``upstream.publisher``."""

from marketstream import publisher
from marketstream.upstream import publisher as upstream_publisher


def test_the_public_names_are_the_upstream_classes() -> None:
    assert publisher.Publisher is upstream_publisher.Publisher
    assert publisher.AsyncPublisher is upstream_publisher.AsyncPublisher
