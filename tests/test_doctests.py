"""Every ``>>>`` example in the package's docstrings runs, as a test per module.

Examples that need a live server or Redis are written as ``::`` literal
blocks (not run), or carry ``# doctest: +SKIP`` with the reason beside them.
"""

import doctest
import importlib
import pkgutil

import pytest

import marketstream

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(marketstream.__path__, marketstream.__name__ + ".")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(module):
    return [test for test in doctest.DocTestFinder().find(module, module.__name__) if test.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _examples(module):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, "%d of %d docstring examples of %s failed (see above)" % (
        failed,
        attempted,
        name,
    )


def test_the_documented_modules_have_examples():
    """The modules whose docstrings promise examples keep them (a rename of
    a module or a ``>>>`` turned into ``::`` would otherwise pass silently)."""
    documented = {name for name in MODULES if _examples(importlib.import_module(name))}
    assert {
        "marketstream.wire.requests",
        "marketstream.wire.payloads",
        "marketstream.wire.positions",
        "marketstream.wire.replies",
        "marketstream.wire.frames",
        "marketstream.server.config",
        "marketstream.upstream.urls",
        "marketstream.upstream.publisher",
        "marketstream.upstream.history",
        "marketstream.server.net.upgrade",
        "marketstream.client.book",
        "marketstream.fanout.counters",
        "marketstream.fanout.records",
        "marketstream.fanout.catchup",
        "marketstream.fanout.budgets",
        "marketstream.fanout.wanted",
        "marketstream.wire.streams",
        "marketstream.wire.rates",
        "marketstream.server.admission",
        "marketstream.demo.simulator",
        "marketstream.server.net.tornado_compat",
        "marketstream.server.net.listen",
        "marketstream.testing",
    } <= documented
