r"""Serving throughput and latency: generate/serve.py's app (openai_api.py on serving.py's engine) on 127.0.0.1, with
1, 4, 8 and 16 concurrent streaming clients, against generation.generate (generate/base.py's path) on the same model.

On the CPU (2 cores, fp32; run it alone), the AMD-Llama-135m shape and the demo model, random weights, with the demo
corpus's tokenizer (prepare_data/prepare_demo.py):

    python bench/serving.py --model_name AMD-Llama-135m --tokenizer_dir data/demo \
        --output out/bench/serving_cpu_135m.json
    python bench/serving.py --model_name demo --tokenizer_dir data/demo --output out/bench/serving_cpu_demo.json

The model's vocabulary is the tokenizer's (4096 tokens for the demo corpus), so the 135m shape's head is 4096 wide
instead of 32000 (3.1M weights instead of 24.6M; the transformer is AMD-Llama-135m's). The server runs in this process
(uvicorn in a thread on a free port of 127.0.0.1, the model in the engine's thread) with --max_batch_size rows, default
the most clients; the clients (httpx on asyncio) run in a second process on the same cores. For each number of
clients, --num_requests greedy completions (prompts of different lengths, each --max_new_tokens long unless it meets
EOS) are streamed by that many clients at once, each client sending its next request when its last one has ended.
The figures: generated tokens per second of wall time over the round; time to first token and the gaps between
streamed text chunks (p50 and p95; a chunk is one token unless the detokenizer holds back an incomplete character).
Every answer is checked to be the text generation.generate gives for its prompt alone, and the single client's
tokens/s is put beside generate's on the same prompts, one after another (each prompt's prefill included in both).
Goals (issue 20): 8 clients >= 3x the tokens/s of 1; 1 client within 10% of generate.
"""

import copy
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report_header  # noqa: E402
from bench.serving_clients import client_round  # noqa: E402
from checkpoint import named_config  # noqa: E402
from generation import generate  # noqa: E402
from model import GPT  # noqa: E402
from openai_api import background_server, build_app  # noqa: E402
from serving import Engine  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

# prompts of different lengths (3 to ~30 tokens), taken in turn by the requests
PROMPTS = [
    "def main():",
    "import os\nimport sys\n\n",
    "The quick brown fox",
    "class Reader:\n    def __init__(self, path):\n        self.path = path\n",
    "# Return the n-th Fibonacci number\ndef fibonacci(n):",
    "for i in range(10):",
    "SELECT name, count(*) FROM users WHERE",
    "Once upon a time, in a small village by the sea, there lived",
]
NAME = "bench"


def main(
    model_name: str = "AMD-Llama-135m",
    tokenizer_dir: Path = Path("data/demo"),
    clients: Sequence[int] = (1, 4, 8, 16),
    num_requests: int = 16,
    max_new_tokens: int = 32,
    max_batch_size: Optional[int] = None,
    max_seq_length: Optional[int] = None,
    output: Optional[Path] = None,
    seed: int = 1337,
) -> dict:
    """Time streamed greedy completions at each number of concurrent clients and generate on the same prompts.

    Args:
        model_name: a config of model.py (random weights; its vocabulary is the tokenizer's)
        tokenizer_dir: a directory with tokenizer.model or tokenizer.json (prepare_data/prepare_demo.py writes one)
        clients: the numbers of concurrent streaming clients, one round each
        num_requests: requests per round, shared out among the clients
        max_new_tokens: tokens generated per request (fewer at EOS)
        max_batch_size: the engine's rows; default the largest number of clients
        max_seq_length: the engine's KV cache length; default the longest prompt plus max_new_tokens, the cache
            generate/base.py gives the longest prompt
        output: write the figures here as JSON
        seed: seed of the weights
    """
    if not clients or min(clients) < 1:
        raise UserError(f"--clients {list(clients)}: give numbers of clients, each at least 1")
    if num_requests < 1 or max_new_tokens < 1:
        raise UserError(f"--num_requests {num_requests} and --max_new_tokens {max_new_tokens} must be at least 1")
    if max_batch_size is not None and max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    config = named_config(model_name)
    tokenizer = Tokenizer(tokenizer_dir)
    config = replace(config, vocab_size=tokenizer.vocab_size, padded_vocab_size=None)  # re-padded for this head
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
    prompt_ids = [tokenizer.encode(p, bos=tokenizer.bos_id is not None) for p in prompts]
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens
    max_seq_length = max_seq_length or longest
    if not longest <= max_seq_length <= config.block_size:
        raise UserError(f"--max_seq_length {max_seq_length}: the longest prompt plus --max_new_tokens needs {longest} "
                        f"and {model_name}'s block_size is {config.block_size}")
    max_batch_size = max_batch_size or max(clients)

    torch.manual_seed(seed)
    model = GPT(config).eval()
    device = torch.device("cpu")
    report = {
        **report_header("bench/serving.py", device),
        "arguments": dict(model_name=model_name, tokenizer_dir=str(tokenizer_dir), clients=list(clients),
                          num_requests=num_requests, max_new_tokens=max_new_tokens, max_batch_size=max_batch_size,
                          max_seq_length=max_seq_length, seed=seed),
        "vocab_size": f"{config.vocab_size} (the tokenizer's; {named_config(model_name).vocab_size} in model.py)",
        "results": {},
    }
    print(f"{report['device']}; torch {torch.__version__}. {model_name} with a {config.vocab_size}-token head "
          f"(model.py: {named_config(model_name).vocab_size}), random weights, fp32; {num_requests} requests of "
          f"{max_new_tokens} tokens, {max_batch_size} rows of {max_seq_length} slots")

    reference = copy.deepcopy(model)  # generate sets its own cache; the engine owns the model's
    alone, generate_seconds, generate_tokens = generate_alone(reference, tokenizer, prompt_ids, max_new_tokens)
    report["generate"] = dict(tokens=generate_tokens, seconds=generate_seconds,
                              tokens_per_s=generate_tokens / generate_seconds)
    print(f"generation.generate, one prompt after another: {generate_tokens / generate_seconds:.1f} tokens/s")
    del reference

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_length=max_seq_length)
    # the clients run in a process of their own, as they would elsewhere: in this one they would hold the GIL that
    # the engine's thread needs between its ops
    spawn = multiprocessing.get_context("spawn")
    with background_server(build_app(engine, None, NAME)) as url, ProcessPoolExecutor(1, mp_context=spawn) as pool:
        pool.submit(client_round, url, NAME, prompts[:1], 1, 2).result()  # warm-up: the first request's one-time costs
        print(f"{'clients':>7} | {'tokens/s':>8} | {'TTFT p50':>8} | {'TTFT p95':>8} | {'ITL p50':>8} | "
              f"{'ITL p95':>8} | same as alone")
        for n in clients:
            answers, wall = pool.submit(client_round, url, NAME, prompts, n, max_new_tokens).result()
            tokens = sum(a["completion_tokens"] for a in answers)
            first = [a["ttft"] for a in answers]
            gaps = [gap for a in answers for gap in a["gaps"]]
            same = sum(a["text"] == expected for a, expected in zip(answers, alone))
            row = dict(tokens=tokens, seconds=wall, tokens_per_s=tokens / wall, ttft_p50=percentile(first, 50),
                       ttft_p95=percentile(first, 95), itl_p50=percentile(gaps, 50), itl_p95=percentile(gaps, 95),
                       identical_to_alone=same, requests=len(answers))
            report["results"][str(n)] = row
            ms = {key: f"{row[key] * 1e3:6.0f}ms" for key in ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95")}
            print(f"{n:>7} | {row['tokens_per_s']:8.1f} | {' | '.join(ms.values())} | {same}/{len(answers)}")
            if output is not None:
                write_json(output, report)
    report["goals"] = goals(report)
    for goal, value in report["goals"].items():
        print(f"{goal}: {value}")
    if output is not None:
        write_json(output, report)
        print(f"Wrote {output}")
    return report


def generate_alone(model: GPT, tokenizer: Tokenizer, prompt_ids: List[List[int]], max_new_tokens: int):
    """Each prompt through generation.generate as generate/base.py calls it (greedy, EOS stops, a cache of the prompt
    plus max_new_tokens), one after another after an untimed warm-up: (texts, seconds, tokens generated)."""
    stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    generate(model, torch.tensor(prompt_ids[0]), 2, temperature=0, stop_ids=stop_ids)
    texts, seconds, tokens = [], 0.0, 0
    for ids in prompt_ids:
        start = time.perf_counter()
        out = generate(model, torch.tensor(ids), max_new_tokens, temperature=0, stop_ids=stop_ids)
        seconds += time.perf_counter() - start
        new = out[len(ids):].tolist()
        tokens += len(new)
        texts.append(tokenizer.decode([i for i in new if i not in stop_ids]))
    return texts, seconds, tokens


def percentile(values: List[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def goals(report: dict) -> Dict[str, str]:
    results, found = report["results"], {}
    if "1" in results and "8" in results:
        ratio = results["8"]["tokens_per_s"] / results["1"]["tokens_per_s"]
        found["8 clients / 1 client (goal >= 3x)"] = f"{ratio:.2f}x: {'met' if ratio >= 3 else 'missed'}"
    if "1" in results:
        ratio = results["1"]["tokens_per_s"] / report["generate"]["tokens_per_s"]
        found["1 client / generate (goal >= 0.9)"] = f"{ratio:.2f}: {'met' if ratio >= 0.9 else 'missed'}"
    same = all(row["identical_to_alone"] == row["requests"] for row in results.values())
    found["greedy answers identical to each alone"] = "all" if same else "not all: see identical_to_alone"
    return found


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    cli(main)
