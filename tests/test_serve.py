"""generate/serve.py: the official `openai` client against a real server on 127.0.0.1 (uvicorn in a thread, a free
port), serving the demo shape with random weights in float64 (its greedy text varies from token to token; the
session's trained checkpoint soon repeats one) with that checkpoint's tokenizer and zephyr's template; greedy answers
are compared with generate/chat.py's `Chat` and generation.generate on a copy of the model; the error cases run
in-process through FastAPI's TestClient."""

import copy
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

import headless_chromium
import openai_api
from chat_template import BUILTIN_TEMPLATES, ChatTemplate
from checkpoint import load_model
from generate.chat import Chat
from generation import generate, load_for_generation
from headless_chromium import wait_for
from model import GPT
from openai_api import MAX_BODY_BYTES, background_server, build_app
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
    with background_server(build_app(engine, template, NAME)) as url:
        yield url, engine, template


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


@pytest.fixture
def browser(tmp_path):
    if not headless_chromium.installed():
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does)")
    with headless_chromium.chromium(tmp_path / "chromium-profile") as session:
        yield session


def test_the_chat_page_streams_the_apis_answer_in_a_real_browser(served, client, browser):
    url = served[0]
    browser.open(url + "/")
    wait_for(lambda: browser.script("return document.getElementById('model').textContent") == NAME)
    browser.type("#temperature", "0")
    browser.type("#max_tokens", "20")
    browser.type("#message", "Tell me about lists.")
    browser.click("#send")
    wait_for(lambda: browser.script("return document.getElementById('status').textContent") == "done")
    shown = browser.script("return document.querySelector('.assistant:last-child').textContent")
    messages = [{"role": "user", "content": "Tell me about lists."}]
    expected = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20,
                                              temperature=0).choices[0].message.content
    assert expected and shown == expected
    assert browser.script("return document.getElementById('speed').textContent").endswith(" tokens/s")


def test_the_docs_screenshot_script_shows_the_greedy_answer_of_generate_chat_py(trained, tmp_path, capsys):
    """docs/serving.md's screenshot command on the session's checkpoint (with zephyr's template): the page's answer,
    which the script prints, is generate/chat.py's greedy answer on the same model, and the PNG is the window."""
    if not headless_chromium.installed():
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does)")
    checkpoint_dir = tmp_path / "final"
    shutil.copytree(trained.checkpoint_dir, checkpoint_dir)
    template = ChatTemplate(BUILTIN_TEMPLATES["zephyr"])
    template.save(checkpoint_dir)
    output = tmp_path / "serve.png"
    run_script(documented("python docs/serve_screenshot.py --checkpoint_dir out/sft_demo/final --output docs/serve.png",
                          replace={"--checkpoint_dir": checkpoint_dir, "--output": output},
                          add={"--max_new_tokens": "12"}))
    shown = capsys.readouterr().out.removesuffix("\n")
    model, tokenizer = load_for_generation(checkpoint_dir, torch.device("cpu"))
    chat = Chat(model, tokenizer, template, None, dict(max_new_tokens=12, temperature=0, top_k=None, top_p=1.0))
    assert shown == chat.answer("How do I read a file line by line?", io.StringIO())
    png = output.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", png[16:24]) == (900, 560)


def test_the_documented_command_serves_until_stopped(trained, tmp_path, monkeypatch):
    """docs/serving.md's command through the script's command line; openai_api.serve is replaced by a server on a free
    port that the test stops, and the request body the page shows is sent to it, whole and streamed."""
    checkpoint_dir = tmp_path / "final"
    shutil.copytree(trained.checkpoint_dir, checkpoint_dir)
    ChatTemplate(BUILTIN_TEMPLATES["zephyr"]).save(checkpoint_dir)
    urls, stop = [], threading.Event()

    def serve(app, host, port):
        assert (host, port) == ("127.0.0.1", 8000)  # the documented defaults
        with background_server(app) as url:
            urls.append(url)
            stop.wait()

    monkeypatch.setattr(openai_api, "serve", serve)
    argv = documented("python generate/serve.py --checkpoint_dir out/sft_demo/final",
                      replace={"--checkpoint_dir": checkpoint_dir})
    thread = threading.Thread(target=run_script, args=(argv,), daemon=True)
    thread.start()
    wait_for(lambda: urls, timeout=60)
    try:
        (body,) = re.findall(r"```json\n(.*?)```", (ROOT / "docs/serving.md").read_text(), re.S)
        chat = json.loads(body)  # the request body the page shows
        answer = httpx.post(urls[0] + "/v1/chat/completions", json=chat, timeout=60).json()
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] <= 64
        streamed = httpx.post(urls[0] + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60).text
        assert streamed.startswith("data: ") and streamed.endswith("data: [DONE]\n\n")
        assert "<html" in httpx.get(urls[0] + "/").text
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_sigterm_cancels_the_running_and_waiting_requests_and_the_server_exits_0(trained):
    """generate/serve.py as a process (one row): a streamed request that would generate until the context is full and
    one waiting behind it; SIGTERM after the first token ends both streams at once, with finish_reason "cancelled"
    and [DONE], and the process exits 0 well before the 5 s the server gives open streams."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "generate/serve.py"), "--checkpoint_dir",
                               str(trained.checkpoint_dir), "--port", str(port), "--max_batch_size", "1"],
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.poll() is None and reachable(url + "/health"), timeout=60)
        body = {"model": trained.checkpoint_dir.name, "prompt": "def main():", "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        first_token, events = threading.Event(), {}

        def stream(name: str) -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
                events[name] = []
                for line in response.iter_lines():
                    if line:
                        events[name].append(line)
                        first_token.set()

        clients = [threading.Thread(target=stream, args=(name,)) for name in ("running", "waiting")]
        for client in clients:
            client.start()
            time.sleep(0.2)  # the first takes the only row
        assert first_token.wait(timeout=30)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.wait(timeout=30) == 0, server.stderr.read()
        assert time.monotonic() - signalled < 4
        for client in clients:
            client.join(timeout=5)
            assert not client.is_alive()
        for name in ("running", "waiting"):
            assert events[name][-1] == "data: [DONE]"
            chunks = [json.loads(line.removeprefix("data: ")) for line in events[name][:-1]]
            assert chunks[-2]["choices"][0]["finish_reason"] == "cancelled"
            generated = chunks[-1]["usage"]["completion_tokens"]
            # "cancelled", not "length": stopped before the context (~250 tokens) was full, however fast it decoded
            assert (generated > 0) == (name == "running")
        assert "Stopped" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_ctrl_c_cancels_the_stream_and_serve_returns_without_a_keyboard_interrupt(served):
    """Ctrl-C (SIGINT to this process) while openai_api.serve runs in the main thread, as generate/serve.py runs it:
    the stream, which would run until the context is full, ends at once with finish_reason "cancelled", and serve
    returns (uvicorn's own handler re-raises the signal once stopped: a KeyboardInterrupt here). In-process, where
    SIGTERM's test needs a process: the same handler, without a second start-up."""
    _, engine, template = served
    app = build_app(Engine(copy.deepcopy(engine.model), engine.tokenizer, max_batch_size=1), template, NAME)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, lines = f"http://127.0.0.1:{port}", []

    def client() -> None:
        wait_for(lambda: reachable(url + "/health"))
        body = {"model": NAME, "prompt": "def main():", "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            for line in filter(None, response.iter_lines()):
                lines.append(line)
                if len(lines) == 1:
                    os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=client)
    thread.start()
    watchdog = threading.Timer(30, os.kill, (os.getpid(), signal.SIGINT))  # a second Ctrl-C forces the exit
    watchdog.start()
    try:
        openai_api.serve(app, "127.0.0.1", port)
    finally:
        watchdog.cancel()
    thread.join(timeout=10)
    assert not thread.is_alive() and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "cancelled" and chunks[-1]["usage"]["completion_tokens"] < 100


def reachable(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


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
