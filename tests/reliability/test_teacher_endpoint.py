"""The teacher endpoint (teach.backend=openai) misbehaving, against real local HTTP servers: down
(connection refused), slow (timeouts), garbage bodies, HTTP 429/5xx, 4xx. Each row retries with
backoff up to `teach.max_retries`, then becomes a failure row with its reason: never a hang, never
a lost row. The API key reaches the server and nothing else: every file the run wrote and Ray's
session logs are searched for it."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cft_ray import arms, store
from cft_ray.config import load_config
from cft_ray.generate import RateLimiter
from test_teach import make_split, read_dir, samples_of

KEY = "sk-test-PLANTED-7f3a9c"


def grep_tree(root, needle: str) -> list[str]:
    """Files under root whose bytes contain needle."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if needle.encode() in Path(p).read_bytes():
                    hits.append(p)
            except OSError:
                pass
    return hits


class FakeOpenAI(BaseHTTPRequestHandler):
    """Chat completions whose behaviour is chosen by a keyword in the question (per-question attempt
    counts are kept, so 'fails twice then answers' is deterministic)."""
    attempts: dict = {}
    auth: list = []
    times: list = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def _send(self, code, body, ctype="application/json", headers=()):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        try:
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client timed out first (the 'slow' kind): expected
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        kind = user.split("Question: ", 1)[1].split(" ", 1)[0]
        with self.lock:
            n = self.attempts[kind] = self.attempts.get(kind, 0) + 1
            self.auth.append(self.headers.get("Authorization"))
            self.times.append(time.monotonic())
        ok = {"choices": [{"message": {"role": "assistant", "content": "Because. [[2]]"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 50, "completion_tokens": 7}}
        if kind == "ok" or (kind == "flaky429" and n > 2) or (kind == "flaky500" and n > 2):
            return self._send(200, ok)
        if kind == "flaky429":
            return self._send(429, {"error": "rate limited"}, headers=[("Retry-After", "0")])
        if kind == "flaky500":
            return self._send(500, "oops", "text/plain") if n == 1 else self._send(200, "{not json", "text/plain")
        if kind == "dead":
            return self._send(503, {"error": "overloaded"})
        if kind == "garbage":
            return self._send(200, {"choices": []})
        if kind == "bad":
            return self._send(400, {"error": "bad request"})
        if kind == "slow":
            time.sleep(2.0)
            return self._send(200, ok)
        if kind == "wrong":
            return self._send(200, {**ok, "choices": [{"message": {"content": "[[1]]"}, "finish_reason": "stop"}]})


@pytest.fixture
def fake_server():
    FakeOpenAI.attempts, FakeOpenAI.auth, FakeOpenAI.times = {}, [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_retries_then_failure_rows_no_hang(ray_local, tmp_path, fake_server, monkeypatch):
    kinds = ["ok", "flaky429", "flaky500", "dead", "garbage", "bad", "slow", "wrong"]
    items = [{"item_id": k, "question": f"{k} question", "options": ["a", "b", "c", "d"], "answer": 1,
              "subject": "test", "category": "t", "source": "t"} for k in kinds]
    monkeypatch.setenv("CFT_TEST_TEACHER_KEY", KEY)
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "teach.backend=openai", f"teach.base_url={fake_server}",
                             "teach.api_model=fake", "teach.api_key_env=CFT_TEST_TEACHER_KEY", "teach.policy=keep_correct",
                             "teach.max_retries=3", "teach.timeout_s=0.5", "teach.concurrency=4",
                             "teach.pool.batch_size=8"])
    make_split(cfg, items, set(kinds))
    t0 = time.time()
    out = arms.teach_for_arms(cfg)
    assert time.time() - t0 < 300  # generous: Ray start-up on a loaded box; the bound is the attempts below
    s = {r["item_id"]: r for r in samples_of(out)}
    assert set(s) == set(kinds)
    assert {k for k, r in s.items() if r["correct"]} == {"ok", "flaky429", "flaky500"}
    assert s["ok"]["prompt_tokens"] == 50 and s["ok"]["completion_tokens"] == 7
    assert FakeOpenAI.attempts["flaky429"] == 3 and FakeOpenAI.attempts["flaky500"] == 3
    assert FakeOpenAI.attempts["dead"] == 4 and FakeOpenAI.attempts["garbage"] == 4   # 1 + max_retries
    assert FakeOpenAI.attempts["bad"] == 1                                            # 4xx: no retry
    assert FakeOpenAI.attempts["slow"] == 4                                           # timed out, retried, gave up
    assert s["dead"]["error"].startswith("engine error: HTTP 503")
    assert "malformed" in s["garbage"]["error"] and "Timeout" in s["slow"]["error"]
    fails = {r["item_id"]: r["reason"] for r in read_dir(store.join(out, "failures"))}
    assert fails == {"dead": "engine error", "garbage": "engine error", "bad": "engine error",
                     "slow": "engine error", "wrong": "wrong answer"}
    assert set(FakeOpenAI.auth) == {f"Bearer {KEY}"}
    assert json.loads(open(store.join(out, "manifest.json")).read())["teacher"]["model"] == "fake"
    # the key went to the server and nowhere else: not in any output, not in Ray's logs
    session = ray_local._private.worker.global_worker.node.get_session_dir_path()
    assert grep_tree(tmp_path, KEY) == [] and grep_tree(session, KEY) == []


def test_openai_endpoint_down_gives_failure_rows(ray_local, tmp_path, monkeypatch, items):
    with socket.socket() as s:  # a port nothing listens on: connection refused, at once, every time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CFT_TEST_TEACHER_KEY", KEY)
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "teach.backend=openai", f"teach.base_url=http://127.0.0.1:{port}/v1",
                             "teach.api_model=fake", "teach.api_key_env=CFT_TEST_TEACHER_KEY", "teach.max_retries=2", "teach.policy=keep_correct",
                             "teach.timeout_s=1"])
    make_split(cfg, items, {it["item_id"] for it in items})
    out = arms.teach_for_arms(cfg)
    s = samples_of(out)
    assert sorted(r["item_id"] for r in s) == sorted(it["item_id"] for it in items)
    assert all(r["error"].startswith("engine error") and "Connect" in r["error"] for r in s), s[0]["error"]
    fails = read_dir(store.join(out, "failures"))
    assert len(fails) == len(items) and {r["reason"] for r in fails} == {"engine error"}
    m = store.read_json(store.join(out, "manifest.json"))["counts"]
    assert m["requested"] == len(items) and m["kept"] == 0 and sum(m["failed"].values()) == len(items)
    assert grep_tree(tmp_path, KEY) == []




def test_requests_per_minute_hold_across_two_actors(ray_local, tmp_path, fake_server):
    """24 instant replies, 2 actors x 8 requests in flight: unthrottled they all arrive within a second; at rpm=240
    (4 a second, a burst of 4) the arrivals span >= (24 - 4) / 4 s, and no second holds more than burst + rate."""
    items = [{"item_id": f"r{k:02d}", "question": f"ok question {k}", "options": ["a", "b", "c", "d"], "answer": 1,
              "subject": "test", "category": "t", "source": "t"} for k in range(24)]
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "teach.backend=openai", f"teach.base_url={fake_server}",
                             "teach.api_model=fake", "teach.policy=keep_correct", "teach.concurrency=8", "teach.rpm=240",
                             "teach.pool.size=2", "teach.pool.num_cpus=0.5", "teach.pool.batch_size=6"])
    make_split(cfg, items, {it["item_id"] for it in items})
    out = arms.teach_for_arms(cfg)
    assert sum(r["correct"] for r in samples_of(out)) == 24
    t = sorted(FakeOpenAI.times)
    assert len(t) == 24 and t[-1] - t[0] >= 0.9 * (24 - 4) / 4, t[-1] - t[0]
    assert max(sum(1 for x in t if a <= x < a + 1.0) for a in t) <= 4 + 4 + 1


def test_rate_limiter_budgets_wait_and_refund():
    lim = RateLimiter(rpm=None, tpm=600)  # 10 tokens a second, one second of burst
    assert lim.reserve(10) == 0
    assert lim.reserve(10) == pytest.approx(1.0, abs=0.05)  # the bucket is 10 tokens in debt
    lim.refund(10)  # the reply used none of its estimate
    assert lim.reserve(5) == pytest.approx(0.5, abs=0.05)
    both = RateLimiter(rpm=60, tpm=6000)  # 1 request and 100 tokens a second
    assert both.reserve(1) == 0 and both.reserve(1) == pytest.approx(1.0, abs=0.05)  # the request budget binds
    assert both.reserve(400) == pytest.approx(3.0, abs=0.05)  # the token budget binds: 98 left, 400 asked, 100 a second
