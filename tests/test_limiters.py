"""The gateway limiters of `batchtts serve`: each one driven instant by instant on an injected clock,
then the real server's 429s, their headers in every mode, the in-flight cap and the quota."""

from __future__ import annotations

import asyncio
import copy
import math
import random
import time

import httpx
import pytest
from conftest import Server, cli, http, wait_for

from batchtts.limiters import QUOTA_SPENT, FixedWindow, InFlightCap, Quota, SlidingWindow, TokenBucket
from batchtts.server import INJECTED_429_WAIT

T0 = 1_700_000_000.0  # an epoch instant: the server's clock is time.time(), whose floats are this coarse
SPEECH = {"model": "openai/gpt-4o-mini-tts", "input": "hello", "voice": "alloy"}


def test_a_token_bucket_admits_its_burst_then_one_per_interval_and_names_the_next_instant():
    bucket = TokenBucket(50, burst=5)
    assert [bucket.admit(T0) for _ in range(5)] == [None] * 5
    refusal = bucket.admit(T0)
    assert refusal is not None and refusal.limit == 5 and refusal.message is None
    assert refusal.retry_at == pytest.approx(T0 + 0.02, abs=1e-6)
    assert bucket.admit(T0 + 0.019).retry_at == pytest.approx(T0 + 0.02, abs=1e-6)
    for k in range(1, 20):
        now = T0 + 0.02 * k
        assert bucket.admit(now) is None
        assert bucket.admit(now).retry_at == pytest.approx(now + 0.02, abs=1e-6)
    after_a_minute = [bucket.admit(T0 + 60) for _ in range(6)]
    assert after_a_minute[:5] == [None] * 5 and after_a_minute[5] is not None  # refilled to the burst, no more
    assert bucket.nominal() == {"capacity_rps": 50, "burst": 5}


def test_a_fixed_window_counts_per_aligned_window_and_lets_a_double_burst_through_its_edge():
    window = FixedWindow(3, 2.0)
    assert [window.admit(T0 + t) for t in (0.5, 1.0, 1.99)] == [None] * 3
    refusal = window.admit(T0 + 1.999)
    assert refusal.retry_at == T0 + 2.0 and refusal.limit == 3
    assert [window.admit(T0 + 2.0) for _ in range(3)] == [None] * 3  # six within 10 ms
    assert window.admit(T0 + 3.9).retry_at == T0 + 4.0
    assert window.nominal() == {"capacity_rps": 1.5, "limit": 3, "window": 2.0}

    second = FixedWindow(2)  # the default: per calendar second, as --rate-limit has always meant
    assert second.admit(T0 + 0.7) is None and second.admit(T0 + 0.8) is None
    assert second.admit(T0 + 0.9).retry_at == T0 + 1.0
    assert second.admit(T0 + 1.0) is None


def test_a_sliding_window_allows_the_limit_in_any_span_and_names_when_the_oldest_leaves_it():
    window = SlidingWindow(3, 1.0)
    assert [window.admit(T0 + t) for t in (0.0, 0.4, 0.8)] == [None] * 3
    assert window.admit(T0 + 0.9).retry_at == T0 + 1.0
    assert window.admit(T0 + 1.0) is None
    assert window.admit(T0 + 1.1).retry_at == T0 + 1.4  # no fresh burst at the second's edge
    assert window.admit(T0 + 1.4) is None
    assert window.admit(T0 + 1.5).retry_at == T0 + 1.8
    assert window.nominal() == {"capacity_rps": 3.0, "limit": 3, "window": 1.0}


@pytest.mark.parametrize("make", [lambda: TokenBucket(20, 4), lambda: TokenBucket(0.5), lambda: FixedWindow(5, 0.3),
                                  lambda: FixedWindow(3), lambda: SlidingWindow(5, 0.3), lambda: SlidingWindow(2, 2.5)])
def test_every_refusal_names_the_exact_instant_the_next_request_passes(make):
    limiter, rng, now, admitted = make(), random.Random(7), T0, []
    for _ in range(2000):
        now += rng.expovariate(40)
        refusal = limiter.admit(now)
        if refusal is None:
            admitted.append(now)
            continue
        assert refusal.retry_at > now
        later = copy.deepcopy(limiter)
        assert later.admit(refusal.retry_at) is None
        if refusal.retry_at - 0.001 > now:
            assert copy.deepcopy(limiter).admit(refusal.retry_at - 0.001) is not None
    capacity = limiter.nominal()["capacity_rps"]
    assert len(admitted) <= capacity * (now - T0) + 5
    if isinstance(limiter, SlidingWindow):
        for i, t in enumerate(admitted):
            assert len([u for u in admitted[i:] if u < t + limiter.window]) <= limiter.limit


def test_the_in_flight_cap_refuses_beyond_its_limit_until_a_request_ends():
    cap = InFlightCap(2)
    assert cap.admit(T0) is None and cap.admit(T0) is None
    refusal = cap.admit(T0 + 0.5)
    assert refusal.retry_at == T0 + 1.5 and refusal.limit == 2  # "come back in a second", as gateways say
    cap.release(False)
    assert cap.admit(T0 + 0.6) is None
    assert cap.admit(T0 + 0.6) is not None
    cap.release(True)
    cap.release(True)
    assert cap.running == 0
    uncapped = InFlightCap(0)
    assert all(uncapped.admit(T0) is None for _ in range(1000)) and uncapped.running == 1000
    assert cap.nominal() == {"capacity_rps": None, "max_in_flight": 2}


def test_a_quota_counts_successes_holds_places_in_flight_and_starts_afresh_each_period():
    quota = Quota(2, 10.0, origin=T0)
    assert quota.admit(T0 + 1) is None
    quota.release(True)
    assert quota.admit(T0 + 2) is None  # in flight: it holds the last place
    refusal = quota.admit(T0 + 3)
    assert refusal.retry_at == T0 + 10 and refusal.limit == 2 and refusal.message == QUOTA_SPENT
    quota.release(False)  # failed: the place is free again
    assert quota.admit(T0 + 4) is None
    quota.release(True)
    assert quota.admit(T0 + 9.99).retry_at == T0 + 10
    assert quota.admit(T0 + 10) is None and quota.admit(T0 + 10) is None
    quota.release(True)
    quota.release(True)
    assert quota.admit(T0 + 15).retry_at == T0 + 20
    assert quota.nominal() == {"capacity_rps": None, "quota": 2, "quota_reset": 10.0}


def speak(server: Server, text: str = "hello", timeout: float = 5) -> httpx.Response:
    return http.post(f"{server.url}/audio/speech", json={**SPEECH, "input": text}, timeout=timeout)


def timed(server: Server, text: str = "hello") -> tuple[float, httpx.Response, float]:
    """A request with the instants before it was sent and after it was answered: the server decided
    between the two."""
    sent = time.time()
    response = speak(server, text)
    return sent, response, time.time()


def hints(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k == "retry-after" or k.startswith("x-ratelimit-")}


def wait_until(instant: float) -> None:
    time.sleep(max(instant - time.time(), 0))


@pytest.mark.parametrize("mode", ["retry-after", "reset", "both", "none"])
def test_each_header_mode_sends_exactly_its_hints(serve, mode):
    server = serve("--limiter", "bucket", "--rate-limit", "0.4", "--rate-limit-headers", mode)
    sent, first, answered = timed(server)
    assert first.status_code == 200 and hints(first) == {}
    refused_sent, refused, refused_answered = timed(server)
    assert refused.status_code == 429
    assert refused.json() == {"error": {"code": 429, "message": "Rate limit exceeded"}}  # the spec's 429 example
    expected = {}
    if mode in ("retry-after", "both"):
        # The next token comes 2.5 s after the first was taken, rounded up as gateways round it: "3",
        # or "2" if the refusal came over half a second later on a busy machine.
        soonest, latest = sent + 2.5 - refused_answered, answered + 2.5 - refused_sent
        assert math.ceil(soonest) <= int(refused.headers["retry-after"]) <= math.ceil(latest)
        expected["retry-after"] = refused.headers["retry-after"]
    if mode in ("reset", "both"):
        reset = int(refused.headers["x-ratelimit-reset"])
        admitted_at = server.stats()["log"][0]["t"]
        assert abs(reset - (admitted_at + 2.5) * 1000) < 50
        assert (sent + 2.5) * 1000 - 1 <= reset <= (answered + 2.5) * 1000 + 1
        expected |= {"x-ratelimit-limit": "1", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    assert hints(refused) == expected


def test_the_retry_after_override_and_injected_429s_keep_their_old_meaning(serve):
    server = serve("--limiter", "sliding", "--rate-limit", "1", "--window", "30", "--retry-after", "0.25")
    assert speak(server).status_code == 200
    refused = speak(server)
    assert refused.headers["retry-after"] == "0.25"  # the override, as sent
    assert int(refused.headers["x-ratelimit-reset"]) / 1000 - time.time() > 29  # the limiter's own reset
    server.faults(rate_limit=0, retry_after=None, fail_first=1, fail_statuses=[429])
    sent, injected, answered = timed(server, "again")
    assert injected.status_code == 429 and injected.headers["retry-after"] == str(math.ceil(INJECTED_429_WAIT))
    reset = int(injected.headers["x-ratelimit-reset"]) / 1000
    assert sent + INJECTED_429_WAIT - 0.001 <= reset <= answered + INJECTED_429_WAIT + 0.001


@pytest.mark.parametrize("limiter, args", [
    ("bucket", ["--rate-limit", "2"]),
    ("fixed", ["--rate-limit", "2", "--window", "0.5"]),
    ("sliding", ["--rate-limit", "2", "--window", "0.5"]),
])
def test_a_client_that_waits_until_the_reset_is_admitted(serve, limiter, args):
    server = serve("--limiter", limiter, *args, "--rate-limit-headers", "reset")
    for attempt in range(10):  # a fixed window may start afresh between two requests: go on until refused
        sent, response, answered = timed(server, f"r{attempt}")
        if response.status_code == 429:
            break
    else:
        pytest.fail("never refused")
    reset_ms = int(response.headers["x-ratelimit-reset"])
    reset = reset_ms / 1000
    log = server.stats()["log"]
    admitted = [e["t"] for e in log if e["status"] == 200]
    if limiter == "fixed":  # the end of the window, a multiple of 0.5 s
        assert reset_ms % 500 == 0 and sent < reset <= answered + 0.5
    else:  # 0.5 s after the last token was taken, or after the oldest request in the window
        true_next = (admitted[-1] if limiter == "bucket" else admitted[-2]) + 0.5
        assert abs(reset - true_next) < 0.05
    wait_until(reset)
    assert speak(server, "on time").status_code == 200

    stats = server.stats()["limiters"]
    assert set(stats) == {limiter}
    counts = stats[limiter]
    assert counts["capacity_rps"] == (2 if limiter == "bucket" else 4)
    assert counts["requests"] == len(log) + 1 and counts["refused"] == 1 and counts["successes"] == len(admitted) + 1
    assert counts["first_success"] <= counts["last_success"] <= time.time()


async def concurrently(server: Server, count: int, timeout: float = 5) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*(
            client.post(f"{server.url}/audio/speech", json={**SPEECH, "input": f"c{i}"}) for i in range(count)))


def test_the_in_flight_cap_refuses_one_request_too_many_until_one_ends(serve):
    server = serve("--max-in-flight", "2", "--latency", "0.3")
    responses = asyncio.run(concurrently(server, 3))
    assert sorted(r.status_code for r in responses) == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.headers["x-ratelimit-limit"] == "2"
    assert speak(server).status_code == 200  # the two that ran gave their places back
    stats = server.stats()["limiters"]["in_flight"]
    assert stats["max_in_flight"] == 2 and stats["capacity_rps"] is None
    assert (stats["requests"], stats["successes"], stats["refused"]) == (4, 3, 1)


def test_responses_cut_or_abandoned_give_their_place_in_flight_back(serve):
    server = serve("--max-in-flight", "1", "--latency", "0.2", "--drop-first", "1")
    with pytest.raises(httpx.RemoteProtocolError):
        speak(server, "cut")
    with pytest.raises(httpx.ReadTimeout):
        speak(server, "abandoned", timeout=httpx.Timeout(0.05, connect=5))
    wait_for(lambda: server.stats()["in_flight"] == 0, timeout=5)
    server.faults(drop_first=0)
    assert speak(server, "whole").status_code == 200
    assert server.stats()["limiters"]["in_flight"]["refused"] == 0


def test_the_quota_refuses_once_its_successes_are_spent_until_the_period_ends(serve):
    before = time.time()
    server = serve("--quota", "2", "--quota-reset", "1", "--fail-first", "1", "--fail-status", "503")
    after = time.time()
    for _ in range(12):  # spend the current period, however much of it the start-up used
        first = speak(server, "spend")
        if first.status_code == 429:
            break
    assert first.status_code == 429
    reset = int(first.headers["x-ratelimit-reset"]) / 1000
    offset = (reset - before) % 1.0  # periods count from the server's start, somewhere in [before, after]
    assert offset <= after - before + 0.01 or offset >= 1.0 - 0.01

    # A whole fresh period ahead: the exact sequence below takes milliseconds. A machine too busy to
    # fit it in one period is seen by the clock, and the sequence is played again in the next one.
    for attempt in range(3):
        wait_until(reset)
        counted = server.stats()["by_status"]
        texts = [f"{t}{attempt}" for t in ("a", "a", "b", "b", "c")]
        statuses = [speak(server, text).status_code for text in texts]
        refused = speak(server, texts[-1])
        if time.time() < reset + 1.0 - 0.05:
            break
        reset += math.ceil(time.time() - reset)
    # each input's first attempt fails: failures spend nothing
    assert statuses == [503, 200, 503, 200, 429]
    assert refused.status_code == 429 and refused.json()["error"]["message"] == QUOTA_SPENT
    assert int(refused.headers["x-ratelimit-reset"]) / 1000 == pytest.approx(reset + 1.0, abs=0.002)
    assert refused.headers["retry-after"] == "1" and refused.headers["x-ratelimit-limit"] == "2"
    by_status = server.stats()["by_status"]
    assert {code: by_status[code] - counted.get(code, 0) for code in by_status} == {"503": 2, "200": 2, "429": 2}
    stats = server.stats()["limiters"]["quota"]
    assert stats["quota"] == 2 and stats["quota_reset"] == 1.0


def test_limiters_change_at_runtime_and_bad_settings_are_refused(serve):
    server = serve()
    assert server.stats()["limiters"] == {}
    assert server.faults(limiter="bucket", rate_limit=1, burst=2)["limiter"] == "bucket"
    assert [speak(server, f"x{i}").status_code for i in range(3)] == [200, 200, 429]
    server.faults(rate_limit_headers="none")  # the bucket itself is unchanged: still empty
    bare = speak(server, "y")
    assert bare.status_code == 429 and hints(bare) == {}
    server.faults(burst=3)  # a new bucket, full, with fresh counts
    assert server.stats()["limiters"]["bucket"]["requests"] == 0
    assert [speak(server, f"z{i}").status_code for i in range(4)] == [200, 200, 200, 429]
    server.faults(rate_limit=0, max_in_flight=5)
    assert set(server.stats()["limiters"]) == {"in_flight"}

    for body, says in [({"limiter": "leaky"}, "limiter must be one of"), ({"burst": 0}, "burst must be at least 1"),
                       ({"window": 0}, "must be more than 0"), ({"quota_reset": 0}, "must be more than 0"),
                       ({"max_in_flight": -1}, "must not be negative"), ({"quota": 1.5}, "quota must be int"),
                       ({"limiter": "fixed", "rate_limit": 2.5}, "must be a whole number"),
                       ({"rate_limit_headers": "some"}, "rate_limit_headers must be one of")]:
        response = http.post(f"{server.admin}/faults", json=body, timeout=5)
        assert response.status_code == 400 and says in response.json()["error"]["message"], body
    assert server.faults()["limiter"] == "bucket"


@pytest.mark.parametrize("args, says", [
    (["--limiter", "sliding", "--rate-limit", "2.5"], "the rate limit must be a whole number, not 2.5"),
    (["--window", "0"], "'--window': 0.0 is not in the range x>0"),
    (["--burst", "0"], "'--burst': 0 is not in the range x>=1"),
    (["--rate-limit-headers", "some"], "'--rate-limit-headers'"),
])
def test_bad_limiter_options_are_usage_errors(args, says):
    result = cli("serve", "--port", "0", "--engine", "tone", *args, timeout=20)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr
