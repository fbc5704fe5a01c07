"""generate/serve.py: the official `openai` client against a real server on 127.0.0.1 (uvicorn in a thread, a free
port), serving the demo shape with random weights in float64 (its greedy text varies from token to token; the
session's trained checkpoint soon repeats one) with that checkpoint's tokenizer and zephyr's template; greedy answers
are compared with generate/chat.py's `Chat` and generation.generate on a copy of the model; the error cases run
in-process through FastAPI's TestClient."""

import copy
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from chat_template import BUILTIN_TEMPLATES, ChatTemplate
from checkpoint import load_model
from generate.chat import Chat
from generation import generate
from model import GPT
from openai_api import MAX_BODY_BYTES, build_app
from serving import Engine, SamplingParams
from tests.documented import ROOT, documented, run_script
from tokenizer import Tokenizer

NAME = "tiny-chat"


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """A server on a free port of 127.0.0.1; yields (its base url, its engine, the chat template)."""
    checkpoint_dir = tmp_path_factory.mktemp("serve") / NAME
    shutil.copytree(trained.checkpoint_dir, checkpoint_dir)
    template = ChatTemplate(BUILTIN_TEMPLATES["zephyr"])
    template.save(checkpoint_dir)
    torch.manual_seed(0)
    model = GPT(load_model(checkpoint_dir).config).double()
    engine = Engine(model, Tokenizer(checkpoint_dir), max_batch_size=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, template, NAME), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", engine, template
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def test_chat_greedy_answer_equals_generate_chat_py_and_its_stream(served, client):
    _, engine, template = served
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What does len do?"}]
    chat = Chat(copy.deepcopy(engine.model), engine.tokenizer, template, "You are brief.",
                dict(max_new_tokens=24, temperature=0, top_k=None, top_p=1.0))
    expected = chat.answer("What does len do?", io.StringIO())

    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    usage = answer.usage
    prompt_tokens = len(template.encode(engine.tokenizer, messages))
    assert usage.prompt_tokens == prompt_tokens and usage.total_tokens == prompt_tokens + usage.completion_tokens
    assert answer.choices[0].finish_reason == ("length" if usage.completion_tokens == 24 else "stop")

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_completions_and_models(served, client):
    _, engine, _ = served
    tokenizer = engine.tokenizer
    ids = tokenizer.encode("import os", bos=True)
    out = generate(copy.deepcopy(engine.model), torch.tensor(ids), 12, temperature=0,
                   stop_ids=[tokenizer.eos_id])[len(ids):].tolist()
    expected = tokenizer.decode([i for i in out if i != tokenizer.eos_id])
    completion = client.completions.create(model=NAME, prompt="import os", max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected and completion.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=NAME, prompt="import os", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert [m.id for m in client.models.list()] == [NAME]


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    url, engine, _ = served
    slow = engine.model.transformer.ln_f.register_forward_hook(lambda *_: time.sleep(0.02))  # 200 tokens: >= 4 s
    try:
        body = {"model": NAME, "prompt": "def main():", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ") and engine.num_active() == 1
            t0 = time.monotonic()
            while engine.num_active() and time.monotonic() - t0 < 10:
                time.sleep(0.02)
            assert engine.num_active() == 0 and time.monotonic() - t0 < 2  # cancelled, not run to its end
    finally:
        slow.remove()
    assert httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}).status_code == 200


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_get_their_status_and_openai_error_objects(served):
    _, engine, template = served
    # not started (no lifespan): requests stay queued, so a full queue is deterministic
    idle = Engine(copy.deepcopy(engine.model), engine.tokenizer, max_batch_size=1, max_queue=0)  # its own cache
    http = TestClient(build_app(idle, template, NAME, api_key="secret"))
    auth = {"Authorization": "Bearer secret"}
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert error_of(http.post("/v1/chat/completions", json=chat), 401)["code"] == "invalid_api_key"
    assert error_of(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert http.get("/health").json()["status"] == "ok"
    assert error_of(http.post("/v1/chat/completions", json={**chat, "model": "gpt-4"}, headers=auth),
                    404)["code"] == "model_not_found"
    bad = [({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"),
           ({"response_format": {"type": "json_object"}}, "response_format"), ({"temperature": "hot"}, "temperature"),
           ({"max_tokens": 1000}, "max_tokens"),
           ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
           ({"messages": [{"role": "user", "content": "x " * 300}]}, "messages"), ({"stop": [""]}, "stop")]
    for change, param in bad:
        assert error_of(http.post("/v1/chat/completions", json={**chat, **change}, headers=auth), 400)["param"] == param
    ignored = {"frequency_penalty": 0.5, "presence_penalty": 0.1, "user": "me", "logit_bias": {}, "logprobs": False}
    error_of(http.post("/v1/completions", content=b"{not json", headers=auth), 400)
    error_of(http.post("/v1/completions", content=b" " * (MAX_BODY_BYTES + 1), headers=auth), 413)
    idle.submit([1, 2], SamplingParams(max_tokens=1))  # takes the only place
    error_of(http.post("/v1/chat/completions", json={**chat, **ignored}, headers=auth), 429)
    error_of(http.get("/v1/nothing", headers=auth), 404)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# without the background-networking flags Chromium floods a closed network with refused connections
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


class WebDriver:
    """The few W3C WebDriver commands the page's test needs, sent to Debian's chromedriver over HTTP (so nothing
    is downloaded and no driver manager runs)."""

    def __init__(self, url: str, user_data_dir: Path) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        options = {"binary": str(CHROMIUM), "args": CHROMIUM_ARGS + [f"--user-data-dir={user_data_dir}"]}
        self.session = self.command("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]

    def command(self, method: str, path: str, body: Optional[dict] = None):
        response = self.http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()["value"]

    def __call__(self, method: str, path: str, body: Optional[dict] = None):
        return self.command(method, f"/session/{self.session}{path}", body)

    def element(self, css: str) -> str:
        return self("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        element = self.element(css)
        self("POST", f"/element/{element}/clear", {})
        self("POST", f"/element/{element}/value", {"text": text})

    def script(self, source: str):
        return self("POST", "/execute/sync", {"script": source, "args": []})

    def close(self) -> None:
        self("DELETE", "")
        self.http.close()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/status", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.05)
        session = WebDriver(f"http://127.0.0.1:{port}", tmp_path / "chromium-profile")
        yield session
        session.close()
    finally:
        driver.terminate()
        driver.wait(timeout=30)


def test_the_chat_page_streams_the_apis_answer_in_a_real_browser(served, client, browser):
    url = served[0]
    browser("POST", "/url", {"url": url + "/"})
    wait_for(lambda: browser.script("return document.getElementById('model').textContent") == NAME)
    browser.type("#temperature", "0")
    browser.type("#max_tokens", "20")
    browser.type("#message", "Tell me about lists.")
    browser("POST", f"/element/{browser.element('#send')}/click", {})
    wait_for(lambda: browser.script("return document.getElementById('status').textContent") == "done")
    shown = browser.script("return document.querySelector('.assistant:last-child').textContent")
    messages = [{"role": "user", "content": "Tell me about lists."}]
    expected = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20,
                                              temperature=0).choices[0].message.content
    assert expected and shown == expected
    assert browser.script("return document.getElementById('speed').textContent").endswith(" tokens/s")


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_documented_command_serves_until_stopped(trained, tmp_path, monkeypatch):
    """docs/serving.md's command through the script's command line; uvicorn.run is replaced by a server on a free
    port that the test stops, and the request body the page shows is sent to it, whole and streamed."""
    checkpoint_dir = tmp_path / "final"
    shutil.copytree(trained.checkpoint_dir, checkpoint_dir)
    ChatTemplate(BUILTIN_TEMPLATES["zephyr"]).save(checkpoint_dir)
    servers = []

    def run(app, host, port, **settings):
        assert (host, port) == ("127.0.0.1", 8000)  # the documented defaults
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        servers.append(uvicorn.Server(uvicorn.Config(app, host=host, port=free, log_level="warning")))
        servers[0].run()

    monkeypatch.setattr(uvicorn, "run", run)
    argv = documented("python generate/serve.py --checkpoint_dir out/sft_demo/final",
                      replace={"--checkpoint_dir": checkpoint_dir})
    thread = threading.Thread(target=run_script, args=(argv,), daemon=True)
    thread.start()
    wait_for(lambda: servers and servers[0].started, timeout=60)
    url = f"http://127.0.0.1:{servers[0].config.port}"
    try:
        (body,) = re.findall(r"```json\n(.*?)```", (ROOT / "docs/serving.md").read_text(), re.S)
        chat = json.loads(body)  # the request body the page shows
        answer = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] <= 64
        streamed = httpx.post(url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60).text
        assert streamed.startswith("data: ") and streamed.endswith("data: [DONE]\n\n")
        assert "<html" in httpx.get(url + "/").text
    finally:
        servers[0].should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_sixteen_concurrent_streaming_clients_lose_nothing_and_memory_stays_flat(served):
    """A bounded load test: 3 rounds of 16 concurrent streamed chats (4 rows, so most wait in the queue); every
    response is complete and well-formed, each seeded answer is the same in every round (float64: whatever ran
    beside it), and resident memory after the last round is within 10% of the first's."""
    url, engine, _ = served

    def client_request(i: int, results: dict) -> None:
        body = {"model": NAME, "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 12,
                "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=url, timeout=60) as http:
            results[i] = http.post("/v1/chat/completions", json=body).text

    def answers() -> dict:
        results: dict = {}
        threads = [threading.Thread(target=client_request, args=(i, results)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(results) == list(range(16))
        contents = {}
        for i, text in results.items():
            events = text.split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
            assert chunks[-1]["choices"] == [] and 1 <= chunks[-1]["usage"]["completion_tokens"] <= 12
            contents[i] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        return contents

    first = answers()
    rss = [resident_bytes()]
    for _ in range(2):
        assert answers() == first
        rss.append(resident_bytes())
    assert engine.num_active() == 0 and engine.num_waiting() == 0
    assert rss[-1] <= 1.1 * rss[0], rss


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
