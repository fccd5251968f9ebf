"""The package's layers, as marketstream/__init__.py states them: every
module's imports are read (ast, without importing it) and checked against
the layer rules, for cycles, and for third-party libraries a layer must not
pull in; and importing the lower layers for real loads no Tornado or
redis-py where they must not."""

import ast
import os
import subprocess
import sys

import pytest

import marketstream
from tests.helpers import ROOT

PACKAGE = os.path.dirname(os.path.abspath(marketstream.__file__))

#: What each layer may import of marketstream, besides itself, the package
#: root (``__version__``) and :mod:`marketstream.loglimit`, which every
#: layer may use.
ALLOWED = {
    "marketstream.loglimit": set(),
    "marketstream.wire": set(),
    "marketstream.fanout": {"marketstream.wire"},
    "marketstream.upstream": {"marketstream.wire"},
    "marketstream.client": {"marketstream.wire"},
    "marketstream.demo": {"marketstream.wire", "marketstream.upstream"},
    "marketstream.server": {
        "marketstream.wire",
        "marketstream.fanout",
        "marketstream.upstream",
        "marketstream.demo",
    },
    # Below Tornado: what a connection may do (admission), never the
    # handlers, the manager or the app.
    "marketstream.server.net": {
        "marketstream.wire",
        "marketstream.server.admission",
        "marketstream.server.config",
        "marketstream.fanout",
    },
    "marketstream.publisher": {"marketstream.upstream"},
    "marketstream.__main__": {"marketstream.server"},
    "marketstream.testing": {"marketstream.wire", "marketstream.server"},
}

#: Third-party libraries a layer must not import.
FORBIDDEN = {
    "marketstream.loglimit": {"tornado", "redis", "prometheus_client", "orjson", "ujson"},
    "marketstream.wire": {"tornado", "redis", "prometheus_client"},
    "marketstream.fanout": {"tornado", "redis", "prometheus_client"},
    "marketstream.upstream": {"tornado", "prometheus_client"},
    "marketstream.client": {"redis", "prometheus_client"},
    # The client's sans-I/O parts (its Client is a Tornado WebSocket client).
    "marketstream.client.book": {"tornado"},
    "marketstream.client.messages": {"tornado"},
    "marketstream.client.resync": {"tornado"},
    "marketstream.demo": {"tornado", "prometheus_client"},
}


def module_names():
    """Every module of the package: name -> path."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


MODULES = module_names()


def parse(path):
    with open(path, encoding="utf-8") as source:
        return ast.parse(source.read(), path)


def imports_of(name, path):
    """The modules ``name`` imports (absolute names; ``from a import b``
    gives ``a.b`` when that is a module, else ``a``), anywhere in it
    (functions and ``TYPE_CHECKING`` blocks too), and the names given to
    ``importlib.import_module`` / ``__import__`` as literals."""
    tree = parse(path)
    found = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = "%s.%s" % (base, alias.name)
                found.add(full if full in MODULES else base)
        elif isinstance(node, ast.Call):
            func = node.func
            called = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if (
                called in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer_of(name):
    """The most specific layer of ``ALLOWED`` that holds ``name``."""
    best = None
    for layer in ALLOWED:
        if within(name, [layer]) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def within(name, prefixes):
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_only_what_its_layer_may(name):
    layer = layer_of(name)
    if name == "marketstream":
        layer = "marketstream.loglimit"  # the root imports nothing of marketstream
    assert layer is not None, "%s belongs to no layer: add it to ALLOWED" % name
    allowed = ALLOWED[layer] | {layer, "marketstream.loglimit"}
    wrong = sorted(
        target
        for target in GRAPH[name]
        if target.startswith("marketstream.") and not within(target, allowed)
    )
    assert not wrong, "%s (layer %s) imports %s" % (name, layer, wrong)
    banned = set().union(
        *(libraries for prefix, libraries in FORBIDDEN.items() if within(name, [prefix]))
    )
    bad = sorted(target for target in GRAPH[name] if target.split(".")[0] in banned)
    assert not bad, "%s (layer %s) imports %s" % (name, layer, bad)


def test_nothing_in_the_package_imports_the_test_toolkit():
    users = sorted(
        name
        for name, targets in GRAPH.items()
        if "marketstream.testing" in targets and name != "marketstream.testing"
    )
    assert not users


def cycles():
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in GRAPH[node]:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles() == []


def test_the_checks_catch_a_cycle_and_a_layer_breach(monkeypatch):
    """The checks above are not vacuous: a cycle and an upward import,
    planted in the graph, are found."""
    monkeypatch.setitem(
        GRAPH,
        "marketstream.wire.frames",
        GRAPH["marketstream.wire.frames"] | {"marketstream.wire.requests"},
    )
    monkeypatch.setitem(
        GRAPH,
        "marketstream.wire.requests",
        GRAPH["marketstream.wire.requests"]
        | {"marketstream.wire.frames", "marketstream.fanout.core"},
    )
    assert any(
        {"marketstream.wire.frames", "marketstream.wire.requests"} <= set(component)
        for component in cycles()
    )
    with pytest.raises(AssertionError, match="imports"):
        test_every_module_imports_only_what_its_layer_may("marketstream.wire.requests")


def test_the_module_map_names_every_module():
    """marketstream/__init__.py's map names each subpackage, and each
    subpackage's docstring says what it may import."""
    doc = marketstream.__doc__
    for layer in ALLOWED:
        short = layer.removeprefix("marketstream.").replace(".", "/")
        assert short in doc, layer
    for name, path in MODULES.items():
        if path.endswith("__init__.py") and name != "marketstream":
            text = ast.get_docstring(parse(path))
            assert text and "Imports:" in text, name


@pytest.mark.parametrize(
    "module, absent",
    [
        ("marketstream.wire", ("tornado", "redis", "prometheus_client")),
        ("marketstream.wire.positions", ("tornado", "redis", "prometheus_client")),
        ("marketstream.fanout", ("tornado", "redis", "prometheus_client")),
        ("marketstream.fanout.core", ("tornado", "redis", "prometheus_client")),
        ("marketstream.upstream.urls", ("tornado", "redis", "prometheus_client")),
        ("marketstream.upstream.link", ("tornado", "prometheus_client")),
        ("marketstream.client", ("redis", "prometheus_client")),
        ("marketstream.demo.simulator", ("tornado", "redis", "prometheus_client")),
        ("marketstream.publisher", ("tornado", "prometheus_client")),
    ],
)
def test_importing_a_layer_loads_only_what_it_may(module, absent):
    """For real, in a fresh interpreter: what importing ``module`` loads.
    (``marketstream.client`` loads Tornado: its Client is a Tornado
    WebSocket client; its book and messages import none themselves.)"""
    code = (
        "import sys, %s; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))" % module
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert not set(absent) & set(loaded), sorted(set(absent) & set(loaded))


def test_every_name_a_module_exports_exists():
    import importlib

    for name in sorted(MODULES):
        module = importlib.import_module(name)
        for exported in getattr(module, "__all__", ()):
            assert hasattr(module, exported), (name, exported)
