"""Adaptive concurrency and the rate cap against `batchtts serve --rate-limit`."""

from __future__ import annotations

import json

from conftest import cli, start_batchtts, wait_for, write_csv
from test_run import rows, run_args


def events(stderr: str, name: str) -> list[dict]:
    found = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in found if e["event"] == name]


def test_a_rate_limit_is_learned_and_lifted_limits_are_found_again(serve, tmp_path):
    server = serve("--rate-limit", "40", "--latency", "0.02", "--rate-limit-headers", "reset")
    proc = start_batchtts(*run_args(write_csv(tmp_path / "m.csv", rows(240)), tmp_path / "out", server,
                                    "--concurrency", "16", "--log-format", "json"))
    wait_for(lambda: server.stats()["by_status"].get("429", 0) > 0)
    server.faults(rate_limit=0)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    cuts = [e for e in events(stderr, "throttle") if e["reason"] == "429: too fast"]
    assert cuts and cuts[0]["rate_per_s"] > 0
    stats = server.stats()
    assert stats["successes"] == 240
    assert stats["by_status"].get("429", 0) <= 0.1 * stats["requests"]


def test_the_rate_cap_is_respected_at_the_server(serve, tmp_path):
    server = serve()
    result = cli(*run_args(write_csv(tmp_path / "m.csv", rows(40)), tmp_path / "out", server,
                           "--concurrency", "16", "--rpm", "3000"))
    assert result.returncode == 0, result.stderr
    times = sorted(e["t"] for e in server.stats()["log"])
    assert times[-1] - times[0] >= 39 / 50 * 0.9  # 50 requests a second, the first one free
    for i in range(len(times)):
        in_a_second = [t for t in times[i:] if t < times[i] + 1.0]
        assert len(in_a_second) <= 50 + 1
