"""Prometheus scrapes the port the server listens on, and every query of the alerts and the Grafana
dashboard uses only metrics the service exports."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.artefacts import COMPOSE_REPLICAS, K8S, PORT, REPO, SERVICE_METRICS, base_objects, load_yaml


def test_prometheus_scrapes_the_service_metrics_endpoint():
    config = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    compose = load_yaml(REPO / "docker-compose.yml")["services"]
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    for replica in COMPOSE_REPLICAS:
        assert ("/metrics", f"{replica}:{PORT}") in targets
        assert replica in compose
    for rule_file in config.get("rule_files", []):
        assert (REPO / "deploy" / "prometheus" / rule_file).is_file(), rule_file
    prometheus = compose["prometheus"]
    assert any(v.startswith("./deploy/prometheus:/etc/prometheus") for v in prometheus["volumes"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_pod_annotations_and_service_monitor_point_at_metrics():
    objects = base_objects()
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = load_yaml(K8S / "optional" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = objects["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def promql_expressions() -> dict[str, str]:
    exprs = {}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "effnet.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard: {panel['title']} {target['refId']}"] = target["expr"]
    for group in load_yaml(REPO / "deploy" / "prometheus" / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def test_queries_use_only_metrics_the_service_exports():
    for where, expr in promql_expressions().items():
        for name in re.findall(r"\b(effnet_[a-z_]+)", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in SERVICE_METRICS or family in SERVICE_METRICS, f"{where}: unknown metric {name}"


def test_exported_metric_names_match_the_service():
    """SERVICE_METRICS above is what the queries are checked against; hold it to service/core/metrics.py."""
    metrics_module = pytest.importorskip("service.core.metrics")
    registry = metrics_module.Metrics(8, process_metrics=False).registry
    exported = {metric.name + ("_total" if metric.type == "counter" else "") for metric in registry.collect()}
    assert SERVICE_METRICS <= exported, SERVICE_METRICS - exported


def test_dashboard_shows_what_an_operator_needs():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "effnet.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for quantile in ("0.5", "0.95", "0.99"):
        latency = rf"histogram_quantile\({re.escape(quantile)},\s*sum by \(le, endpoint\)\s*"
        latency += r"\(rate\(effnet_request_duration_seconds_bucket"
        assert re.search(latency, exprs), f"no p{quantile} request latency panel"
    assert "rate(effnet_requests_total" in exprs
    assert 'code=~"5.."' in exprs
    assert "effnet_batch_size_bucket" in exprs and "effnet_queue_depth" in exprs
    datasource = load_yaml(REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {d["uid"] for d in datasource["datasources"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def per_model_metrics() -> set[str]:
    """The metric families that carry a ``model`` label, as the service exports them."""
    metrics_module = pytest.importorskip("service.core.metrics")
    metrics = metrics_module.Metrics(8, process_metrics=False)
    observer = metrics.for_model("probe")
    observer.batch_started(1, [0.0])
    observer.batch_finished(1, 0.01, ok=False)
    metrics.set_model("probe", "cpu", "float32", "torch")
    families = set()
    for family in metrics.registry.collect():
        if any("model" in sample.labels for sample in family.samples):
            families.add(family.name + ("_total" if family.type == "counter" else ""))
    assert {"effnet_queue_depth", "effnet_images_total", "effnet_model_info"} <= families, families
    return families


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric family, its label matchers) for each metric an expression reads."""
    return [(re.sub(r"_(bucket|sum|count)$", "", name), matchers or "")
            for name, matchers in re.findall(r"\b(effnet_[a-z_]+)(\{[^}]*\})?", expr)]


def aggregations(expr: str) -> list[str | None]:
    """The grouping labels of each aggregation (``sum by (le, model) (...)`` -> "le, model"; None without by)."""
    pattern = r"\b(?:sum|max|min|avg|count|topk|bottomk|quantile|stddev)\s*(?:by\s*\(([^)]*)\))?\s*\("
    return [m.group(1) for m in re.finditer(pattern, expr)]


def test_dashboard_selects_models_with_a_model_variable():
    """Several models per server: a "model" variable (multi, with All) fills from effnet_model_info, every
    per-model series is filtered by it, and the graphs keep one line per model instead of summing them."""
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "effnet.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    query = model["query"] if isinstance(model["query"], str) else model["query"]["query"]
    assert re.fullmatch(r"label_values\(\s*effnet_model_info\s*,\s*model\s*\)", query), query
    assert model["type"] == "query" and model["multi"] is True and model["includeAll"] is True
    assert model["datasource"]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
    per_model = per_model_metrics()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            reads = [(family, matchers) for family, matchers in selectors(expr) if family in per_model]
            for family, matchers in reads:
                used.add(family)
                assert 'model=~"$model"' in matchers, f"{panel['title']}: {family} not filtered by $model"
            if reads and panel["type"] != "stat":  # a stat is one number: it may sum the selected models
                for grouping in aggregations(expr):
                    labels = {label.strip() for label in (grouping or "").split(",")}
                    assert "model" in labels, f"{panel['title']}: {expr} sums the models together"
                legend = target.get("legendFormat")
                assert panel["type"] == "table" or "{{model}}" in (legend or ""), panel["title"]
    for family in ("effnet_images_total", "effnet_batch_size", "effnet_inference_duration_seconds",
                   "effnet_queue_wait_seconds", "effnet_queue_depth"):
        assert family in used, f"no per-model panel for {family}"


def test_alerts_on_per_model_metrics_keep_the_model_label():
    """An alert over a per-model metric must say which model, and one model's trouble must not be averaged
    away by the others: every aggregation in it groups by model."""
    per_model = per_model_metrics()
    checked = 0
    for group in load_yaml(REPO / "deploy" / "prometheus" / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            if not any(family in per_model for family, _ in selectors(rule["expr"])):
                continue
            checked += 1
            for grouping in aggregations(rule["expr"]):
                labels = {label.strip() for label in (grouping or "").split(",")}
                assert "model" in labels, f"{rule['alert']}: aggregates over models: {rule['expr']}"
            assert "$labels.model" in rule["annotations"]["summary"], rule["alert"]
    assert checked >= 2
