"""The streaming clients of bench/serving.py, in a module of their own: the bench runs them in a second process,
which imports httpx and not torch."""

import asyncio
import json
import time
from typing import List, Optional, Tuple

import httpx  # the tests' client (FastAPI's TestClient uses it too); bench/ runs with the tests' requirements


def client_round(url: str, model: str, prompts: List[str], n_clients: int,
                 max_new_tokens: int) -> Tuple[List[dict], float]:
    """Stream every prompt's greedy completion, `n_clients` at a time: each answer (in prompt order) with its text,
    token count, time to first text and the gaps between text chunks; and the seconds from the first request sent
    to the last answer's end."""
    start = time.perf_counter()
    answers = asyncio.run(run_round(url, model, prompts, n_clients, max_new_tokens))
    return answers, time.perf_counter() - start


async def run_round(url: str, model: str, prompts: List[str], n_clients: int, max_new_tokens: int) -> List[dict]:
    answers: List[Optional[dict]] = [None] * len(prompts)
    pending = iter(range(len(prompts)))

    async def client(http: "httpx.AsyncClient") -> None:
        for i in pending:  # one iterator shared by the clients: each takes the next request when it is free
            body = {"model": model, "prompt": prompts[i], "max_tokens": max_new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            answers[i] = await stream_completion(http, body)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n_clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(n_clients)))
    return answers


async def stream_completion(http, body: dict) -> dict:
    start = time.perf_counter()
    times, pieces, usage = [], [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                pieces.append(chunk["choices"][0]["text"])
    if usage is None:
        raise RuntimeError(f"a stream ended without its usage chunk: {''.join(pieces)!r}")
    return dict(text="".join(pieces), completion_tokens=usage["completion_tokens"],
                ttft=(times[0] if times else time.perf_counter()) - start,
                gaps=[b - a for a, b in zip(times, times[1:])])
