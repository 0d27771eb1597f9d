"""The HTTP service, tested as users meet it: a real ``python -m prefrec.serve`` process on a
free local port serving the tiny model folder, spoken to over HTTP with httpx.

Checks: a good request gets the Python API's ranking; every class of bad request gets 422
with a message (never 500); 200 concurrent requests are all answered, each with its own
ranking, and the micro-batcher scored them in fewer batches than requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import test_recommender as shared
from prefrec.recommender import Limits, RankRequest, Recommender
from prefrec.serve import MicroBatcher

# The tiny model folder as test_recommender saves it.
HISTORY, CANDIDATES = shared.HISTORY, shared.CANDIDATES
LIMITS = Limits(max_history=10, max_candidates=6, max_title_chars=40)
STARTUP_TIMEOUT_S = 60


pytestmark = pytest.mark.usefixtures("single_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir) -> str:
    """Start the service in a subprocess; yield its base URL; stop it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "prefrec.serve", "--model", str(tiny_dir),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--max-history", str(LIMITS.max_history),
           "--max-candidates", str(LIMITS.max_candidates),
           "--max-title-chars", str(LIMITS.max_title_chars)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = Path(tiny_dir).parent / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def api(tiny_dir) -> Recommender:
    """The same model through the Python API, to compare answers with."""
    return Recommender.load(str(tiny_dir), limits=LIMITS)


def _assert_same_ranking(answer: list[dict], expected) -> None:
    """Same titles and scores (batching may move floats by rounding), sorted best first."""
    assert {r["title"] for r in answer} == {e.title for e in expected}
    want = {e.title: e for e in expected}
    for r in answer:
        assert r["logp"] == pytest.approx(want[r["title"]].logp, abs=1e-4)
        assert r["n_tokens"] == want[r["title"]].n_tokens
    logps = [r["logp"] for r in answer]
    assert logps == sorted(logps, reverse=True)
    assert [r["rank"] for r in answer] == list(range(1, len(answer) + 1))
    assert sum(r["probability"] for r in answer) == pytest.approx(1.0, abs=1e-9)


def test_health_names_the_model_and_limits(server, tiny_dir):
    body = httpx.get(f"{server}/health").json()
    assert body["status"] == "ok" and body["model"] == str(tiny_dir)
    assert body["adapters"] == [] and body["device"] == "cpu" and body["template"] == "alpaca"
    assert body["limits"] == {"max_history": 10, "max_candidates": 6, "max_title_chars": 40}


def test_openapi_documents_the_limits(server):
    assert httpx.get(f"{server}/docs").status_code == 200
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/rank" in spec["paths"]
    [schema] = [s for name, s in spec["components"]["schemas"].items() if name == "RankBody"]
    assert schema["properties"]["candidates"]["maxItems"] == 6
    assert schema["properties"]["history"]["items"]["maxLength"] == 40


@pytest.mark.parametrize("task", ["selection", "pairwise"])
def test_a_good_request_gets_the_api_ranking(server, api, task):
    candidates = CANDIDATES if task == "selection" else CANDIDATES[:2]
    response = httpx.post(f"{server}/rank", json={"history": HISTORY, "candidates": candidates,
                                                  "task": task})
    assert response.status_code == 200, response.text
    assert response.json()["task"] == task
    _assert_same_ranking(response.json()["ranking"], api.rank(HISTORY, candidates, task))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"history": HISTORY, "candidates": []}, "at least 1 item"),
        ({"history": HISTORY, "candidates": ["A", "B", "A"]},
         "duplicate candidate 'A' (positions 0 and 2)"),
        ({"history": HISTORY, "candidates": [f"c{i}" for i in range(7)]}, "at most 6 items"),
        ({"history": HISTORY, "candidates": ["A", "x" * 41]}, "at most 40 characters"),
        ({"history": HISTORY}, "Field required"),
        ({"history": HISTORY, "candidates": "A, B"}, "valid list"),
        ({"history": HISTORY, "candidates": ["A", 7]}, "valid string"),
        ({"history": HISTORY, "candidates": ["A", "B"], "task": "rank"},
         "'selection' or 'pairwise'"),
        ({"history": HISTORY, "candidates": ["A", "B", "C"], "task": "pairwise"},
         "exactly 2 candidates, got 3"),
        ({"history": [], "candidates": ["A"]}, "at least 1 item"),
        ({"history": ["A\nB"], "candidates": ["A"]}, "control character"),
        ({"history": HISTORY, "candidates": ["A"], "user": 3}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_request_gets_422_with_a_message(server, body, message):
    response = httpx.post(f"{server}/rank", json=body)
    assert response.status_code == 422, response.text
    assert message in response.text


def test_a_body_that_is_not_json_gets_422(server):
    response = httpx.post(f"{server}/rank", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(("kind", "message"), [
    ("NaN", "body: field 'x': NaN is not valid JSON"),
    ("lone surrogate", "body: field 'history': a string holds the lone surrogate \\\\udc80"),
    ("non-UTF-8 bytes", "body: not valid UTF-8: byte 0xe9 at byte offset 16"),
    ("nested 5000 deep", "body: nested deeper than Python's JSON decoder allows"),
    ("huge integer", "body: a number too long to read"),
    ("over the body size", "more than the limit 11840"),
])
def test_bodies_pythons_json_mishandles_get_422_naming_the_problem(server, kind, message):
    """Python's json accepts NaN and lone surrogates (FastAPI then answered 500) and
    raises on the others (400); prefrec's reader names each."""
    response = httpx.post(f"{server}/rank", content=MALFORMED[kind](random.Random(0)),
                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert message in response.text


def test_200_concurrent_requests_are_each_answered_correctly(server, api):
    # Distinct requests: rotate the history and the candidates, alternate the task.
    titles = HISTORY + CANDIDATES
    requests = []
    for i in range(200):
        history = tuple(titles[j % len(titles)] for j in range(i % 5, i % 5 + 1 + i % 4))
        start = i % len(CANDIDATES)
        rotated = CANDIDATES[start:] + CANDIDATES[:start]
        task = "pairwise" if i % 3 == 0 else "selection"
        candidates = tuple(rotated[:2] if task == "pairwise" else rotated[: 2 + i % 3])
        requests.append(RankRequest(history, candidates, task))
    before = httpx.get(f"{server}/health").json()["batching"]

    async def send_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(
                client.post("/rank", json={"history": list(r.history),
                                           "candidates": list(r.candidates), "task": r.task})
                for r in requests
            ))

    started = time.perf_counter()
    responses = asyncio.run(send_all())
    elapsed = time.perf_counter() - started
    expected = api.rank_many(requests)
    assert [r.status_code for r in responses] == [200] * 200
    for response, request, want in zip(responses, requests, expected, strict=True):
        assert response.json()["task"] == request.task
        _assert_same_ranking(response.json()["ranking"], want)
    after = httpx.get(f"{server}/health").json()["batching"]
    assert after["requests"] - before["requests"] == 200
    batches = after["batches"] - before["batches"]
    assert batches < 200 and after["largest_batch"] > 1  # the micro-batcher did batch
    print(f"200 concurrent requests: {elapsed:.2f} s, {batches} batches")


# --------------------------------------------------------------------------- batcher unit


def test_a_failing_request_does_not_fail_its_batch():
    """A batch that raises is retried one request at a time: only the bad one fails."""
    calls = []

    def rank_many(reqs):
        calls.append(len(reqs))
        if any(r.candidates == ("bad",) for r in reqs):
            raise RuntimeError("boom")
        return [[r.candidates[0]] for r in reqs]

    async def run():
        batcher = MicroBatcher(rank_many, max_wait_ms=50, max_batch=8)
        reqs = [RankRequest(("h",), (c,)) for c in ("a", "bad", "c")]
        results = await asyncio.gather(*(batcher.submit(r) for r in reqs),
                                       return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(run())
    assert results[0] == ["a"] and results[2] == ["c"]
    assert isinstance(results[1], RuntimeError)
    assert calls == [3, 1, 1, 1]


# --------------------------------------------------------------------------- fuzz

FUZZ_REQUESTS = 500
FUZZ_CONCURRENCY = 20
FUZZ_TIMEOUT_S = 180  # the bound on the whole run (about 15 s on the 2-core dev box)
POOL = [*HISTORY, *CANDIDATES, *(f"Movie {i} ({1950 + i})" for i in range(24)),
        "Amélie (2001)", "千と千尋の神隠し (2001)", 'Say "Anything..." (1989)', "Back\\slash (1999)",
        "Se7en (1995) \U0001f3ac"]


def _good_body(rng: random.Random) -> dict:
    """A request within LIMITS: 1-10 history titles, 1-6 distinct candidates (2 for
    pairwise), sometimes a domain."""
    task = rng.choice(["selection", "selection", "pairwise"])
    n = 2 if task == "pairwise" else rng.randint(1, LIMITS.max_candidates)
    body = {"history": rng.sample(POOL, rng.randint(1, LIMITS.max_history)),
            "candidates": rng.sample(POOL, n), "task": task}
    if rng.random() < 0.3:
        body["domain"] = rng.choice(["movie", "amazon_game", "music"])
    return body


def _changed(rng: random.Random, **changes) -> bytes:
    return json.dumps({**_good_body(rng), **changes}).encode()


# Every kind of malformed body, as bytes: the service must answer each with 422.
MALFORMED = {
    "not JSON": lambda rng: b"{not json",
    "truncated JSON": lambda rng: json.dumps(_good_body(rng)).encode()[:-7],
    "empty body": lambda rng: b"",
    "body an array": lambda rng: b'[["Heat (1995)"], ["Big (1988)"]]',
    "non-UTF-8 bytes": lambda rng: b'{"history": ["Am\xe9lie"], "candidates": ["Heat (1995)"]}',
    "NaN": lambda rng: b'{"history": ["Heat (1995)"], "candidates": ["Big (1988)"], "x": NaN}',
    "lone surrogate": lambda rng: b'{"history": ["\\udc80"], "candidates": ["Big (1988)"]}',
    "nested 5000 deep": lambda rng: b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "huge integer": lambda rng: _changed(rng)[:-1] + b', "n": ' + b"9" * 5000 + b"}",
    "over the body size": lambda rng: _changed(rng, padding="x" * 20_000),
    "candidates a string": lambda rng: _changed(rng, candidates="Heat (1995), Big (1988)"),
    "history item a number": lambda rng: _changed(rng, history=["Heat (1995)", 7]),
    "task a list": lambda rng: _changed(rng, task=["selection"]),
    "too many candidates": lambda rng: _changed(rng, candidates=POOL[:7], task="selection"),
    "too long a history": lambda rng: _changed(rng, history=POOL[:11]),
    "too long a title": lambda rng: _changed(rng, candidates=["A", "x" * 41]),
    "empty candidates": lambda rng: _changed(rng, candidates=[]),
    "empty history": lambda rng: _changed(rng, history=[]),
    "duplicate candidates": lambda rng: _changed(rng, candidates=["Heat (1995)"] * 2,
                                                 task="selection"),
    "blank title": lambda rng: _changed(rng, candidates=["Heat (1995)", "   "]),
    "control character": lambda rng: _changed(rng, history=["Heat\t(1995)"]),
    "missing candidates": lambda rng: json.dumps({"history": ["Heat (1995)"]}).encode(),
    "unknown task": lambda rng: _changed(rng, task="rank"),
    "pairwise with 3": lambda rng: _changed(rng, task="pairwise", candidates=POOL[:3]),
    "unknown domain": lambda rng: _changed(rng, domain="books"),
    "unknown field": lambda rng: _changed(rng, user=3),
}


def _fuzz_plan(seed: int = 21) -> list[tuple[str, bytes, dict | None]]:
    """(kind, body, parsed good body or None) for every request, malformed ones (10%,
    cycling through MALFORMED) at seeded random positions."""
    rng = random.Random(seed)
    n_bad = FUZZ_REQUESTS // 10
    kinds = list(MALFORMED)
    plan = [(kinds[i % len(kinds)], MALFORMED[kinds[i % len(kinds)]](rng), None)
            for i in range(n_bad)]
    for _ in range(FUZZ_REQUESTS - n_bad):
        body = _good_body(rng)
        plan.append(("good", json.dumps(body).encode(), body))
    rng.shuffle(plan)
    return plan


async def _send(client: httpx.AsyncClient, gate: asyncio.Semaphore,
                body: bytes) -> tuple[httpx.Response, float]:
    async with gate:
        started = time.perf_counter()
        response = await client.post("/rank", content=body,
                                     headers={"content-type": "application/json"})
        return response, time.perf_counter() - started


def test_fuzz_500_requests_20_at_a_time(server, api):
    """500 requests over HTTP, 10% malformed, 20 in flight: no 5xx, 422 for every bad
    one, the Python API's ranking for every good one, and /health fine after."""
    plan = _fuzz_plan()
    before = httpx.get(f"{server}/health").json()["batching"]

    async def run_all():
        gate = asyncio.Semaphore(FUZZ_CONCURRENCY)
        limits = httpx.Limits(max_connections=FUZZ_CONCURRENCY)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(_send(client, gate, body) for _, body, _ in plan)),
                FUZZ_TIMEOUT_S)

    started = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed = time.perf_counter() - started
    statuses = [r.status_code for r, _ in results]
    assert [s for s in statuses if s >= 500] == []
    for (kind, _, _), (response, _) in zip(plan, results, strict=True):
        if kind != "good":
            assert response.status_code == 422, (kind, response.text[:300])
            assert response.json()["detail"], kind
    good = [(body, r) for (_, _, body), (r, _) in zip(plan, results, strict=True) if body]
    assert [r.status_code for _, r in good] == [200] * len(good)
    expected = api.rank_many([RankRequest(tuple(b["history"]), tuple(b["candidates"]),
                                          b["task"], b.get("domain")) for b, _ in good])
    for (body, response), want in zip(good, expected, strict=True):
        assert response.json()["task"] == body["task"]
        _assert_same_ranking(response.json()["ranking"], want)

    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["batching"]["requests"] - before["requests"] == len(good)
    latencies = sorted(seconds for _, seconds in results)
    p50, p95 = (latencies[int(q * (len(latencies) - 1))] * 1000 for q in (0.50, 0.95))
    print(f"fuzz: {len(plan)} requests ({len(plan) - len(good)} malformed, "
          f"{FUZZ_CONCURRENCY} at a time) in {elapsed:.1f} s: "
          f"{sum(200 <= s < 300 for s in statuses)} 2xx, "
          f"{sum(400 <= s < 500 for s in statuses)} 4xx, "
          f"{sum(s >= 500 for s in statuses)} 5xx; latency p50 {p50:.0f} ms, p95 {p95:.0f} ms")
