"""The OpenAI-compatible HTTP API of a serving.Engine, as a FastAPI app: `build_app(engine, template, name)`.

`POST /v1/chat/completions` (messages rendered with the chat template), `POST /v1/completions`, `GET /v1/models`,
`GET /health` and the chat page at `GET /` (generate/serve.html). Request bodies are checked here (OpenAI's error object
for each refusal); the engine's thread runs the model, and the handlers talk to it through asyncio queues. The app of
generate/serve.py, and of bench/serving.py and the tests, which run it in-process.
"""

import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chat_template import ChatTemplate
from serving import Engine, Event, Finished, QueueFull, RequestError, SamplingParams

PAGE = Path(__file__).resolve().parent / "generate" / "serve.html"  # the chat page at /
MAX_BODY_BYTES = 1 << 20  # a request body beyond 1 MiB gets 413: far more than any prompt the context can hold


class ApiError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def build_app(engine: Engine, template: Optional[ChatTemplate], model_name: str,
              api_key: Optional[str] = None) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`; it starts the engine's thread when the server starts
    and stops it (cancelling what runs) when the server stops."""

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="small-llama serve", lifespan=lifespan)
    app.state.engine = engine  # for Server, which cancels its requests on Ctrl-C / SIGTERM

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown routes and methods, in OpenAI's shape
        return ApiError(error.status_code, str(error.detail), code=None).response()

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").response()

    def authorize(request: HttpRequest) -> None:
        if api_key is not None and not secrets.compare_digest(request.headers.get("authorization", ""),
                                                              f"Bearer {api_key}"):
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/")
    async def page():  # no key needed for the page itself: it asks for one and sends it with each request
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.num_active(), "waiting": engine.num_waiting()}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        authorize(request)
        body = await read_body(request)
        check_common(body, model_name)
        if template is None:
            raise ApiError(400, f"{model_name} has no chat template: start the server with --chat_template, or use "
                                f"/v1/completions", "messages")
        messages = check_messages(body.get("messages"))
        try:
            prompt_ids = template.encode(engine.tokenizer, messages)
        except Exception as error:  # a template's raise_exception (roles out of order, ...)
            raise ApiError(400, f"the chat template cannot render these messages: {error}", "messages") from None
        params = sampling_params(body, template.stop_ids(engine.tokenizer))
        return await respond(engine, request, body, prompt_ids, params, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        authorize(request)
        body = await read_body(request)
        check_common(body, model_name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        tokenizer = engine.tokenizer
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
        elif isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
            prompt_ids = prompt
            if not all(0 <= i < engine.model.config.vocab_size for i in prompt_ids):
                raise ApiError(400, "a prompt token id is outside the vocabulary", "prompt")
        else:
            raise ApiError(400, "prompt must be a string, a list of one string or a list of token ids", "prompt")
        params = sampling_params(body, [] if tokenizer.eos_id is None else [tokenizer.eos_id])
        return await respond(engine, request, body, prompt_ids, params, model_name, chat=False)

    return app


async def read_body(request: HttpRequest) -> Dict[str, Any]:
    """The JSON object of the request body: 413 beyond MAX_BODY_BYTES, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {MAX_BODY_BYTES}",
                       code="request_too_large")
    raw = b""
    async for chunk in request.stream():  # read in pieces: a chunked body without a length is cut at the limit too
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes",
                           code="request_too_large")
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def check_common(body: Dict[str, Any], model_name: str) -> None:
    """The model's name, and the semantics we do not implement (400 rather than an answer that ignores them)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string: the name /v1/models lists", "model")
    if model != model_name:
        raise ApiError(404, f"The model {model!r} does not exist: this server has {model_name!r}", "model",
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n={body['n']!r}: only one choice per request is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools and function calling are not supported", "tools")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", "logprobs")


def check_messages(messages: Any) -> List[Dict[str, str]]:
    """messages: a non-empty list of {role, content}; a content may be a list of text parts, which are joined."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object whose role is system, user or assistant",
                           f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        checked.append({"role": message["role"], "content": content})
    return checked


def sampling_params(body: Dict[str, Any], stop_ids: List[int]) -> SamplingParams:
    """The request's sampling settings, each checked for its type (400 naming the field)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    checks: List[Tuple[str, Any, bool]] = [
        ("max_tokens", max_tokens, max_tokens is None or (type(max_tokens) is int and max_tokens >= 1)),
        ("temperature", body.get("temperature"), body.get("temperature") is None or number(body["temperature"])),
        ("top_p", body.get("top_p"), body.get("top_p") is None or number(body["top_p"])),
        ("seed", body.get("seed"), body.get("seed") is None or type(body["seed"]) is int),
        ("stop", stop, stop is None or (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop))),
        ("stream", body.get("stream"), body.get("stream") in (None, True, False)),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ApiError(400, f"{name}={value!r} is not a valid value", name)
    params = SamplingParams(max_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)), stop=tuple(stop or ()), stop_ids=tuple(stop_ids),
                            seed=body.get("seed"))
    try:
        params.check()
    except RequestError as error:
        raise ApiError(400, str(error), error.param) from None
    return params


def number(value: Any) -> bool:
    return type(value) in (int, float)


async def respond(engine: Engine, http_request: HttpRequest, body: Dict[str, Any], prompt_ids: List[int],
                  params: SamplingParams, model_name: str, chat: bool):
    """Submit the request to the engine and answer with the whole result or a stream of server-sent events."""
    loop = asyncio.get_running_loop()
    events: "asyncio.Queue[Event]" = asyncio.Queue()
    try:
        request = engine.submit(prompt_ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except RequestError as error:
        raise ApiError(400, str(error), error.param) from None
    except QueueFull as error:
        raise ApiError(429, str(error), code="rate_limit_exceeded", kind="rate_limit_error") from None
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": model_name}
    if not body.get("stream"):
        pieces = []
        try:
            while not isinstance(event := await events.get(), Finished):
                pieces.append(event)
        finally:  # the client went away (the handler was cancelled): free the row
            request.cancel()
        check_finished(event)
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": event.reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**head, "object": kind, "choices": [choice], "usage": usage(event)}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(stream(request, events, head, f"{kind}.chunk" if chat else kind, chat, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def check_finished(event: Finished) -> None:
    if event.reason == "error":
        raise ApiError(500, f"generation failed: {event.error}", kind="server_error")


def usage(event: Finished) -> Dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


async def stream(request, events: "asyncio.Queue[Event]", head: Dict[str, Any], kind: str, chat: bool,
                 include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text (the first chat delta carries the role), one with the finish
    reason, one with the usage if asked, then [DONE]. When the client disconnects, the server stops iterating this
    generator and the `finally` frees the request's row."""

    def chunk(text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> str:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if role else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        extra = {"usage": None} if include_usage else {}
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **extra})}\n\n"

    try:
        if chat:
            yield chunk("", role=True)
        while not isinstance(event := await events.get(), Finished):
            yield chunk(event)
        if event.reason == "error":
            error = {"message": f"generation failed: {event.error}", "type": "server_error", "param": None,
                     "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            yield chunk(None, event.reason)
            if include_usage:
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage(event)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()


class Server(uvicorn.Server):
    """uvicorn's server for an app of `build_app`. On Ctrl-C or SIGTERM it cancels the engine's requests at once (each
    stream ends with finish_reason "cancelled" and [DONE]) instead of letting them run until the graceful-shutdown
    timeout cuts them, and `run` then returns instead of re-raising the signal (uvicorn's own handler does, which ends
    the process with -15 or a KeyboardInterrupt traceback): generate/serve.py exits with status 0."""

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop without waiting for open connections
        self.should_exit = True
        self.config.app.state.engine.cancel_all()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` (of `build_app`) on host:port until Ctrl-C or SIGTERM."""
    Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5, log_level="warning")).run()


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 60) -> Iterator[str]:
    """Serve `app` (of `build_app`) in a daemon thread on a free port of `host` (127.0.0.1: this machine only); yields
    the base URL, and stops the server on exit as a signal would. For benches, tests and the docs' screenshot, which
    run the server beside its clients in one process."""
    server = Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host} within {start_timeout} s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=30)
