"""conf/grafana-dashboard.json: an importable Grafana dashboard whose every
query names only metrics (and labels) a running server really exports.

The names come from a scrape of a live server's ``/metrics``, so the check
stays true as metrics are added, renamed or removed.  Queries are parsed
with a real PromQL parser (promql-parser), not with regular expressions.
"""

import json
import os
import re

import promql_parser
import pytest
import tornado.httpclient
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT

DASHBOARD = os.path.join(ROOT, "conf", "grafana-dashboard.json")
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
# What Grafana puts in place of its variables before it sends a query.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "${instance}": ".*",
}
# What the dashboard must show (the operator's first look).
REQUIRED = {
    "marketstream_connections",
    "marketstream_deliveries_total",
    "marketstream_bytes_sent_total",
    "marketstream_dropped_total",
    "marketstream_refused_handshakes_total",
    "marketstream_redis_link_up",
    "marketstream_redis_reconnects_total",
    "marketstream_gap_notices_total",
    "marketstream_batch_latency_seconds_bucket",
    "marketstream_publish_latency_seconds_bucket",
    "marketstream_batch_size_bucket",
}


def load():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def panels(dashboard):
    """Every panel, rows' nested panels included, rows excluded."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(dashboard):
    """(where, PromQL) of every query: panel targets and query variables."""
    for panel in panels(dashboard):
        for target in panel["targets"]:
            yield "panel %r target %s" % (panel["title"], target["refId"]), target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # label_values(<selector>, <label>) is Grafana's, not PromQL: its
            # selector is.
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, "variable %s: %r" % (variable["name"], query)
            yield "variable %s" % variable["name"], match.group(1)


def substitute(expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, "a Grafana variable this test does not know: %r" % expr
    return expr


def names_and_labels(expr):
    """The metric names an expression selects, and the label names it uses
    (in matchers, ``by``/``without``, ``on``/``ignoring`` and
    ``group_left``/``group_right`` lists)."""
    names, labels = set(), set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, "a selector without a metric name: %s" % node
            names.add(node.name)
            for matchers in [node.matchers.matchers, *node.matchers.or_matchers]:
                labels.update(m.name for m in matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            labels.update(node.modifier.group_labels)
            if node.modifier.matching is not None:
                labels.update(node.modifier.matching.labels)

    promql_parser.walk(promql_parser.parse(substitute(expr)), visit)
    return names, labels


def unknown(expr, exported):
    """What ``expr`` names that ``exported`` (metric name -> its label
    names, as scraped) does not have: metric names, then label names."""
    names, labels = names_and_labels(expr)
    missing = sorted(names - exported.keys())
    known = set(TARGET_LABELS)
    for name in names & exported.keys():
        known |= exported[name]
    return missing, sorted(labels - known)


async def scrape(port):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        "http://127.0.0.1:%d/metrics" % port
    )
    exported = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:  # with _total, _bucket, _sum, _count
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard.get("id") is None  # a fresh import, not an export of one instance's id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    uses = {"${datasource}", "$datasource"}
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert isinstance(panel["id"], int) and panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, "panel %r overlaps another" % panel["title"]
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table", "heatmap")
        assert panel["title"] and panel["datasource"]["uid"] in uses, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert (
                target["expr"] and target.get("datasource", {"uid": "$datasource"})["uid"] in uses
            )
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] in uses


def test_the_check_finds_what_a_server_does_not_export():
    exported = {"marketstream_dropped_total": {"cause"}}
    assert unknown(
        'sum by (cause) (rate(marketstream_dropped_total{instance=~"$instance"}'
        "[$__rate_interval]))",
        exported,
    ) == ([], [])
    assert unknown("rate(marketstream_droped_total[1m])", exported) == (
        ["marketstream_droped_total"],
        [],
    )
    assert unknown("sum by (reason) (rate(marketstream_dropped_total[1m]))", exported) == (
        [],
        ["reason"],
    )
    with pytest.raises(ValueError):
        names_and_labels("rate(marketstream_dropped_total)")  # not a range vector


@pytest.mark.gen_test(timeout=60)
async def test_every_dashboard_query_names_what_the_server_exports(server):
    exported = await scrape(server.settings.port)
    used = set()
    problems = []
    for where, expr in queries(load()):
        names, _ = names_and_labels(expr)
        used |= names
        missing, labels = unknown(expr, exported)
        if missing or labels:
            problems.append(
                "%s: metrics %s, labels %s not exported: %s" % (where, missing, labels, expr)
            )
    assert not problems, "\n".join(problems)
    assert not REQUIRED - used, sorted(REQUIRED - used)
