"""The fleet's Prometheus and Grafana files, checked offline: the scrape config and its file-based discovery
with Prometheus's own promtool, every dashboard query with promtool's PromQL parser and against the metric
names and labels a running supervisor really exports, and the dashboard model against Grafana's schema
(the dashboard and panel models of Grafana's foundation SDK)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import running, wait_for

from supervisor.host.gpu import GpuInfo
from supervisor.telemetry.metrics import BoxMetrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "llama-supervisor.json"
METRIC = re.compile(r"\b(llama_supervisor_[a-z_]+)\b")
# Grafana's own variables, replaced the way Grafana would before the query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: run scripts/setup.sh as root (it installs Debian's prometheus package)")
    return found


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every panel target."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_scrape_config_and_discovery_file_pass_promtool(tmp_path: Path) -> None:
    for f in PROMETHEUS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cp = subprocess.run([_promtool(), "check", "config", str(tmp_path / "prometheus.yml")], check=False,
                        capture_output=True, text=True)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0 and "SUCCESS" in out and "WARNING" not in out, out
    jobs = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    assert {j["metrics_path"] for j in jobs} == {"/metrics", "/child/metrics"}
    assert all(j["file_sd_configs"][0]["files"] == ["llama-boxes.yml"] for j in jobs)


def test_a_broken_discovery_file_fails_promtool(tmp_path: Path) -> None:
    shutil.copy(PROMETHEUS / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "llama-boxes.yml").write_text("- targets: [box1:8080\n")
    cp = subprocess.run([_promtool(), "check", "config", str(tmp_path / "prometheus.yml")], check=False,
                        capture_output=True, text=True)
    assert cp.returncode != 0, cp.stdout + cp.stderr


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    queries = _queries()
    assert len(queries) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    cp = subprocess.run([_promtool(), "check", "rules", str(path)], check=False, capture_output=True, text=True)
    assert cp.returncode == 0 and f"SUCCESS: {len(queries)} rules found" in cp.stdout, cp.stdout + cp.stderr
    # and the parser does catch a broken one
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[1m])"}]}]}))
    assert subprocess.run([_promtool(), "check", "rules", str(path)], check=False, capture_output=True).returncode


def _exported(text: str) -> dict[str, set[str]]:
    """Sample name (with _bucket, _total, ...) → label names, from Prometheus text."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _labels_used(expr: str, metric: str) -> set[str]:
    """Label names a query needs from `metric`: its matchers, and the `by (...)` of the aggregation around it."""
    used: set[str] = set()
    for m in re.finditer(re.escape(metric) + r"\{([^}]*)\}", expr):
        used |= {kv.split("=")[0].strip().rstrip("!~") for kv in m.group(1).split(",") if kv.strip()}
    for m in re.finditer(r"\bby \(([^)]*)\)", expr):
        used |= {x.strip() for x in m.group(1).split(",")} - {"le", "instance"}  # both added by Prometheus/histograms
    return used - {"instance"}  # the target's label, added by Prometheus


@pytest.mark.integration
async def test_dashboard_uses_only_metrics_a_supervisor_exports(tmp_path: Path, write_profile) -> None:
    async with running(tmp_path, write_profile()) as d:
        await wait_for(lambda: d.default.runner.ready, what="ready")
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{d.url}/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.status_code == 200
            child = d.default.runner.child
            assert child is not None
            os.kill(child.pid, signal.SIGKILL)  # so that restarts_total{cause} has a series
            await wait_for(lambda: not d.default.runner.ready, what="the exit noticed")
            await wait_for(lambda: d.default.runner.ready, what="ready again")
            text = (await c.get(f"{d.url}/metrics")).text
    exported = _exported(text)
    # GPU series exist only with NVML: take them from the same collector, fed one GPU's figures.
    gpu_metrics = BoxMetrics()
    gpu_metrics.attach_sampler(lambda: {"gpus": [GpuInfo(0, "NVIDIA H100", 81559, 4882, 76677, 12, 40).as_dict()]})
    for name, labels in _exported(generate_latest(gpu_metrics.registry).decode()).items():
        if "gpu_" in name:
            exported.setdefault(name, set()).update(labels)
    problems = []
    for title, expr in _queries():
        for metric in set(METRIC.findall(expr)):
            if metric not in exported:
                problems.append(f"{title}: {metric} is not exported")
            elif missing := _labels_used(expr, metric) - exported[metric]:
                problems.append(f"{title}: {metric} has no label {sorted(missing)}")
    variable = _dashboard()["templating"]["list"][1]["query"]["query"]
    assert METRIC.findall(variable) == ["llama_supervisor_state"] and "llama_supervisor_state" in exported
    assert not problems, "\n".join(problems)


def test_dashboard_fits_grafanas_dashboard_schema() -> None:
    """Every field the dashboard sets is one Grafana's dashboard model knows (a decode/encode round trip with
    the models of Grafana's foundation SDK drops unknown fields), and every panel type has its plugin model."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    original = _dashboard()
    encoded = json.loads(json.dumps(Dashboard.from_json(original).to_json(),
                                    default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))
    dropped: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            for k, v in a.items():
                if not isinstance(b, dict) or k not in b:
                    dropped.append(f"{path}.{k}")
                else:
                    walk(v, b[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert isinstance(b, list) and len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        else:
            assert a == b, (path, a, b)

    walk(original, encoded, "")
    assert not dropped, f"fields Grafana's dashboard schema does not know: {dropped}"
    known = {"stat", "table", "state-timeline", "timeseries"}
    assert {p["type"] for p in original["panels"]} <= known
    # The datasource is a variable, so the file imports as is into any Grafana with a Prometheus data source.
    assert original["templating"]["list"][0] == {**original["templating"]["list"][0], "type": "datasource",
                                                 "query": "prometheus"}
    assert all(t["datasource"]["uid"] == "${datasource}" for p in original["panels"] for t in p["targets"])
    ids = [p["id"] for p in original["panels"]]
    assert len(ids) == len(set(ids))


def test_shipped_haproxy_config_passes_haproxy_check_as_is() -> None:
    """Copied as it is (example box names that do not resolve), HAProxy accepts it: such boxes stay out."""
    from fleet_support import HAPROXY_CFG, haproxy_binary

    cp = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], check=False, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
