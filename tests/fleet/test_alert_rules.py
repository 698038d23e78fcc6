"""The Prometheus alert rules (``monitoring/alerts.yml``): valid for Prometheus, unit-tested with
promtool on synthetic series, those unit tests able to catch a wrong rule, and every metric the
rules read really exported by a worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool") or str(ROOT / ".cache" / "promtool" / "promtool")
    if not os.access(path, os.X_OK):
        pytest.fail("promtool not found: scripts/promtool fetches Debian's (scripts/test runs it)", pytrace=False)
    return path


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _alert_names(rules: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)", rules, re.M)


def test_prometheus_config_loads_every_rule(promtool: str) -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    done = _promtool(promtool, "check", "config", "prometheus.yml", cwd=MONITORING)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_names(rules))} rules found" in done.stdout, done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say(promtool: str) -> None:
    done = _promtool(promtool, "test", "rules", "alerts.test.yml", cwd=MONITORING)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts.test.yml").read_text()))
    assert tested == set(_alert_names((MONITORING / "alerts.yml").read_text()))


#: (alert, text in its rule, replacement): rules that would be wrong in ways that matter.
MUTANTS = [
    # A CPU-only fleet would be told its GPU workers are gone.
    ("PPBGpuWorkersGone", '\n          and max(max_over_time(ppb_workers_alive{role="gpu"}[6h])) > 0', ""),
    # Every worker reports the same queue depth: summing over workers multiplies it.
    ("PPBQueueStalled", "sum(max by (queue) (ppb_queue_depth)) > 0", "sum(ppb_queue_depth) > 0"),
    # A fresh fleet that has never finished a job has no job counter: `and` would stay quiet.
    ("PPBQueueStalled", "unless sum(rate(ppb_jobs_total[10m])) > 0", "and sum(rate(ppb_jobs_total[10m])) == 0"),
    ("PPBBacklogGrowing", "/ sum(rate(ppb_jobs_total[10m])) > 900", "/ sum(rate(ppb_jobs_total[10m])) > 9000"),
    ("PPBSlowReplies", "histogram_quantile(0.95,", "histogram_quantile(0.5,"),
    ("PPBRedisUnreachable", "ppb_redis_up == 0", "max(ppb_redis_up) == 0"),
    # Platform retries are not device failures.
    ("PPBGpuHandsJobsOver", 'ppb_job_failures_total{reason="device"}', "ppb_job_failures_total"),
    # Only refused DMs count, not every finished job.
    ("PPBDirectMessagesRefused", 'ppb_jobs_total{outcome="dm_refused"}', "ppb_jobs_total"),
    # Checks that agreed are no alarm.
    ("PPBReducedPrecisionFailsCheck", 'ppb_precision_checks_total{result="failed"}', "ppb_precision_checks_total"),
    # A backlog must last: one overdue check (a listener restarting) is no alarm.
    ("PPBWithdrawalChecksBehind", "min_over_time((max by (platform) (ppb_withdrawal_checks_overdue))[1h:5m]) > 0",
     "max by (platform) (ppb_withdrawal_checks_overdue) > 0"),
]


@pytest.mark.parametrize("alert, old, new", MUTANTS, ids=[f"{m[0]}-{k}" for k, m in enumerate(MUTANTS)])
def test_unit_tests_catch_a_wrong_rule(promtool: str, tmp_path: Path, alert: str, old: str, new: str) -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    assert rules.count(old) == 1, f"mutant out of date: {old!r}"
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    shutil.copy(MONITORING / "alerts.test.yml", tmp_path)
    done = _promtool(promtool, "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0, f"the unit tests did not notice the change to {alert}"
    assert f"alertname: {alert}," in done.stdout + done.stderr


def test_rules_read_only_metrics_a_worker_exports(redis_server) -> None:
    """Names in the rules and in their test series are those of ``bot/metrics.py`` (its own
    metrics, and the fleet gauges its collector reads from a real Redis), or Prometheus's ``up``."""
    from prometheus_client.metrics import MetricWrapperBase

    from bot import metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {"up"}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            family = obj.describe()[0]
            exported |= {family.name + suffix for suffix in suffixes[family.type]}
    collector = metrics.FleetCollector(redis_server.client, "w1", "cpu")
    exported |= {sample.name for family in collector.collect() for sample in family.samples}
    assert {"ppb_queue_depth", "ppb_workers_alive", "ppb_redis_up", "ppb_jobs_total"} <= exported

    used = set()
    for name in ("alerts.yml", "alerts.test.yml"):
        text = (MONITORING / name).read_text()
        used |= set(re.findall(r"\b(ppb_[a-z_]+?)(?:\{|\[|\)|\s|$)", text))
        if re.search(r"\bup\{", text):
            used.add("up")
    assert used - exported == set(), f"the rules read metrics nobody exports: {sorted(used - exported)}"
    assert len(used) >= 8, used  # the pattern really finds the names


def test_overdue_withdrawal_checks_are_counted_per_platform(redis_server) -> None:
    """Only checks due more than an hour ago count: one due ten minutes ago is a sweep away."""
    import time

    from bot import metrics

    client = redis_server.client
    client.delete("ppb:watch:mastodon", "ppb:watch:x")
    now = time.time()
    client.zadd("ppb:watch:mastodon", {"late": now - 7200, "soon-done": now - 600, "later": now + 60})
    samples = {sample.labels["platform"]: sample.value
               for family in metrics.FleetCollector(client, "w1", "cpu").collect()
               if family.name == "ppb_withdrawal_checks_overdue" for sample in family.samples}
    assert samples == {"mastodon": 1, "x": 0}
    client.delete("ppb:watch:mastodon")
