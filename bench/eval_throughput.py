r"""Evaluation throughput of lm_eval_model.py's SmallLlamaLM against lm-eval's own HF backend (HFLM) on the
same model (random weights, exported with scripts/convert_lit_checkpoint.py) and the same synthetic local tasks, side
by side in one run: requests/s, tokens computed, and whether both give the same answers.

On one GPU (bf16), the AMD-Llama-135m and TinyLlama-1.1B shapes:

    python bench/eval_throughput.py --model_name AMD-Llama-135m --precision bf16-true --batch_size 32 \
        --output out/bench/eval_cuda_135m.json
    python bench/eval_throughput.py --model_name tiny_LLaMA_1b --precision bf16-true --batch_size 32 \
        --tasks hellaswag --hellaswag_docs 500 --output out/bench/eval_cuda_tinyllama.json

On the CPU (fp32), fewer documents:

    python bench/eval_throughput.py --model_name AMD-Llama-135m --precision 32-true --device cpu --batch_size 8 \
        --hellaswag_docs 24 --mmlu_docs 24 --rolling_docs 2 --output out/bench/eval_cpu_135m.json

The tasks (lm-eval YAMLs written to a temporary directory, text drawn from the standard library's docstrings, a
sentencepiece tokenizer trained on them; the model's vocabulary keeps its size):
- hellaswag: 4 endings per question, scored by log-likelihood (acc, acc_norm), context and ending token lengths
  drawn around HellaSwag's (lm-eval's `hellaswag`, validation split) means. Derivation (the data set itself is not
  on these machines): evalscope's published statistics of the 10,042 validation questions give a mean prompt of
  767.6 characters, of which 213 are evalscope's fixed instruction and option labels, so context + 4 endings is
  ~555 characters; lm-eval prepends the activity label ("Label: ", ~15 characters) to the context; with the
  character ratio context : ending of ~3.4 : 1 seen in the data set's examples and ~4.3 characters per Llama-2
  token, that is a mean context of ~61 tokens (BOS included) and a mean ending of ~18 tokens. Lengths are drawn
  uniformly within +-50% of these means (--context_tokens, --ending_tokens change them). The token-count ceiling of
  the speedup is 4(c + e) / (c + 4e) for the mean lengths c, e: HFLM computes each ending's row in full, we compute
  the context once; it is reported with the speedup and its fraction. The speedup can pass it: ours also runs the
  head only at the scored positions, where HFLM computes and log-softmaxes logits at every position.
- mmlu: MMLU's format (a question, 4 lettered options, "Answer:"; answers " A" ... " D", one token each): HFLM already
  computes such a question once (its one-token continuation cache), so the tokens are the same: what ours saves is
  the head at every context position.
- rolling: loglikelihood_rolling over texts of 2.5 blocks (wikitext's kind of task): no shared contexts, ~1x.

Each task runs through lm-eval's simple_evaluate for each model in turn (ours first, then HFLM; each model first
runs an untimed warmup on a few documents). requests/s and the speedup count the time spent in the model's request
methods (`loglikelihood`, `loglikelihood_rolling`: tokenization and forward passes, the device synchronised); the
whole evaluation's wall time, lm-eval's own work (data loading, prompts, metrics: the same for both) included, is
recorded too.
Tokens computed: ours counts what it feeds its model; HFLM's is counted from its requests as it batches them (one
row of context + continuation - 1 tokens per distinct context + continuation[:-1], left-truncated to the block
size). "Same results": the largest difference between the two models' per-request log-likelihoods and whether the
accuracies are identical.
"""

import datetime
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model, versions  # noqa: E402
from checkpoint import named_config, save_model_dir  # noqa: E402
from eval_suites import write_local_task  # noqa: E402
from lm_eval_model import SmallLlamaLM  # noqa: E402
from model import GPT, Config  # noqa: E402
from scripts.convert_lit_checkpoint import convert_lit_checkpoint  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import UserError, cli, write_json  # noqa: E402

TASKS = ("hellaswag", "mmlu", "rolling")
MODELS = ("ours", "hf")
HF_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}
TOKENIZER_VOCAB = 4096
DOCSTRING_MODULES = ("argparse", "collections", "functools", "inspect", "itertools", "json", "pathlib", "re",
                     "dataclasses", "os", "subprocess", "threading", "email", "http.client", "logging")


def main(
    model_name: str = "AMD-Llama-135m",
    precision: Literal["32-true", "bf16-true", "16-true", "64-true"] = "bf16-true",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    batch_size: int = 32,
    tasks: List[str] = list(TASKS),
    models: List[str] = list(MODELS),
    hellaswag_docs: int = 200,
    mmlu_docs: int = 200,
    rolling_docs: int = 8,
    context_tokens: int = 61,
    ending_tokens: int = 18,
    seed: int = 1234,
    output: Optional[Path] = None,
) -> dict:
    """Time both models on the synthetic tasks; print a table, write --output and return the figures.

    Args:
        model_name: a config of model.py (random weights)
        precision: the weights' dtype for both models
        device: auto (CUDA if available), cpu or cuda
        batch_size: rows per forward pass, for both
        tasks: which of hellaswag, mmlu, rolling
        models: which of ours, hf (both for the ratios)
        hellaswag_docs: questions of the HellaSwag-shaped task
        mmlu_docs: questions of the MMLU-shaped task
        rolling_docs: texts of the rolling task
        context_tokens: mean context length of the HellaSwag-shaped task (tokens, BOS included)
        ending_tokens: mean ending length of the HellaSwag-shaped task (tokens)
        seed: seed of the weights and the synthetic text
        output: JSON file for the figures
    """
    if set(tasks) - set(TASKS) or set(models) - set(MODELS) or not tasks or not models:
        raise UserError(f"--tasks must be among {TASKS} and --models among {MODELS}, got {tasks} and {models}")
    config = named_config(model_name)
    device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    report = {
        "benchmark": "bench/eval_throughput.py",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if sys.argv[0].endswith("eval_throughput.py") else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores",
        "versions": versions(),
        "arguments": dict(model_name=model_name, precision=precision, device=device, batch_size=batch_size,
                          tasks=tasks, models=models, hellaswag_docs=hellaswag_docs, mmlu_docs=mmlu_docs,
                          rolling_docs=rolling_docs, context_tokens=context_tokens, ending_tokens=ending_tokens,
                          seed=seed),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        lit_dir, hf_dir, task_dir = (Path(tmp) / name for name in ("lit", "hf", "tasks"))
        build_checkpoints(config, seed, lit_dir, hf_dir)
        tokenizer = Tokenizer(lit_dir)
        documents = dict(hellaswag=hellaswag_docs, mmlu=mmlu_docs, rolling=rolling_docs)
        shapes = write_tasks(task_dir, tokenizer, config.block_size, {task: documents[task] for task in tasks},
                             context_tokens, ending_tokens, seed)
        lms = {}
        if "ours" in models:
            lms["ours"] = SmallLlamaLM(str(lit_dir), batch_size=batch_size, device=device, precision=precision)
        if "hf" in models:
            lms["hf"] = hflm(hf_dir, device, precision, batch_size)
        for name, lm in lms.items():  # warmup: kernels, allocator, lazy imports
            timed_requests(lm)
            run_task(lm, task_dir, tasks[0], limit=2)
        for task in tasks:
            report["results"][task] = {**shapes[task], **compare(lms, task_dir, task)}
            print_row(task, report["results"][task])
            if output is not None:
                write_json(output, report)
    report["complete"] = True
    if output is not None:
        write_json(output, report)
    return report


def build_checkpoints(config: Config, seed: int, lit_dir: Path, hf_dir: Path) -> None:
    """model.py's init from `seed`, saved as a checkpoint directory with a tokenizer trained on docstrings, and its
    Hugging Face export."""
    import sentencepiece as spm

    lit_dir.mkdir(parents=True)
    corpus = lit_dir / "corpus.txt"
    corpus.write_text("\n".join(docstrings()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(lit_dir / "tokenizer"), model_type="bpe",
        vocab_size=min(TOKENIZER_VOCAB, config.vocab_size), byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    corpus.unlink()
    torch.manual_seed(seed)
    save_model_dir(GPT(config).state_dict(), config, lit_dir, lit_dir)
    convert_lit_checkpoint(lit_dir, hf_dir)


def write_tasks(task_dir: Path, tokenizer: Tokenizer, block_size: int, documents: Dict[str, int],
                context_tokens: int, ending_tokens: int, seed: int) -> Dict[str, dict]:
    """The tasks' JSONL data and YAMLs; returns each task's measured shape (mean token lengths, requests)."""
    rng = random.Random(seed)
    words = [word for word in " ".join(docstrings()).split() if word.isalpha()]

    def text(n_tokens: int) -> str:  # words until the text has n_tokens tokens (BOS not counted)
        chosen: List[str] = []
        while len(tokenizer.encode(" ".join(chosen))) < n_tokens:
            chosen += rng.choices(words, k=max(1, (n_tokens - len(tokenizer.encode(" ".join(chosen)))) // 2))
        return " ".join(chosen)

    def around(mean: int) -> int:
        return max(1, round(mean * rng.uniform(0.5, 1.5)))

    task_dir.mkdir(parents=True)
    shapes, data = {}, {}
    if "hellaswag" in documents:
        docs = [{"context": text(around(context_tokens) - 1),
                 "endings": [text(around(ending_tokens)) for _ in range(4)], "label": rng.randrange(4)}
                for _ in range(documents["hellaswag"])]
        contexts = [len(tokenizer.encode(doc["context"], bos=True)) for doc in docs]
        endings = [len(tokenizer.encode(doc["context"] + " " + ending)) + 1 - c
                   for doc, c in zip(docs, contexts) for ending in doc["endings"]]
        c, e = sum(contexts) / len(contexts), sum(endings) / len(endings)
        shapes["hellaswag"] = dict(requests=4 * len(docs), mean_context_tokens=c, mean_ending_tokens=e,
                                   ceiling=4 * (c + e) / (c + 4 * e))
        data["hellaswag"] = (docs, "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                                   "doc_to_choice: \"{{endings}}\"\ndoc_to_target: label\n"
                                   "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    if "mmlu" in documents:
        docs = [{"question": text(around(40)), "options": [text(around(8)) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(documents["mmlu"])]
        shapes["mmlu"] = dict(requests=4 * len(docs))
        data["mmlu"] = (docs, "output_type: multiple_choice\n"
                              "doc_to_text: \"{{question}}\\nA. {{options[0]}}\\nB. {{options[1]}}\\n"
                              "C. {{options[2]}}\\nD. {{options[3]}}\\nAnswer:\"\n"
                              "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: answer\n"
                              "metric_list:\n  - metric: acc\n")
    if "rolling" in documents:
        docs = [{"text": text(block_size * 5 // 2)} for _ in range(documents["rolling"])]
        shapes["rolling"] = dict(requests=len(docs))
        data["rolling"] = (docs, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                                 "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    for name, (docs, body) in data.items():
        write_local_task(task_dir, f"synthetic_{name}", docs, body)
    return shapes


def docstrings() -> List[str]:
    """Real English prose on every machine: the docstrings of some standard library modules."""
    import importlib
    import inspect

    return [doc for name in DOCSTRING_MODULES for _, obj in inspect.getmembers(importlib.import_module(name))
            if (doc := inspect.getdoc(obj))]


def hflm(hf_dir: Path, device: str, precision: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM  # pip install transformers accelerate

    # its log-softmax in fp32 (at least), as ours: in bf16 both then differ only by the models' own rounding
    lm = HFLM(pretrained=str(hf_dir), device=device, dtype=HF_DTYPES[precision], batch_size=batch_size,
              softmax_dtype="float64" if precision == "64-true" else "float32")
    lm.tokens_computed = 0
    original = lm._loglikelihood_tokens

    def counting(requests, *args, **kwargs):
        # one row per distinct context + continuation[:-1] (its one-token-continuation cache), left-truncated
        rows = {tuple(context + continuation[:-1]) for _, context, continuation in requests}
        lm.tokens_computed += sum(min(len(row), lm.max_length) for row in rows)
        return original(requests, *args, **kwargs)

    lm._loglikelihood_tokens = counting
    return lm


def run_task(lm, task_dir: Path, task: str, limit: Optional[int] = None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=[f"synthetic_{task}"], num_fewshot=0, limit=limit, log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           bootstrap_iters=0)


def timed_requests(lm) -> None:
    """Count in lm.request_seconds the time spent in its request methods (tokenization and the model: what differs
    between the two), the device synchronised at both ends."""
    lm.request_seconds = 0.0
    for method in ("loglikelihood", "loglikelihood_rolling"):
        def timed(requests, *args, _inner=getattr(lm, method), **kwargs):
            synchronize(lm.device)
            start = time.perf_counter()
            answers = _inner(requests, *args, **kwargs)
            synchronize(lm.device)
            lm.request_seconds += time.perf_counter() - start
            return answers

        setattr(lm, method, timed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(lms: dict, task_dir: Path, task: str) -> dict:
    """Seconds in the request methods, requests/s and tokens computed of each model on `task` (and the whole
    evaluation's seconds, lm-eval's own work included); with both, the ratios and the agreement."""
    figures, answers, metrics = {}, {}, {}
    for name, lm in lms.items():
        tokens_before, seconds_before = lm.tokens_computed, lm.request_seconds
        start = time.perf_counter()
        results = run_task(lm, task_dir, task)
        total_seconds = time.perf_counter() - start
        seconds = lm.request_seconds - seconds_before
        samples = sorted(results["samples"][f"synthetic_{task}"], key=lambda sample: sample["doc_id"])
        answers[name] = [response[0] for sample in samples for response in sample["resps"]]
        metrics[name] = {key: value for key, value in results["results"][f"synthetic_{task}"].items()
                         if key != "alias" and "stderr" not in key}
        figures[name] = dict(seconds=seconds, total_seconds=total_seconds,
                             requests_per_sec=len(answers[name]) / seconds,
                             tokens_computed=lm.tokens_computed - tokens_before, metrics=metrics[name])
    if len(lms) == 2:
        values = [[answer[0] if isinstance(answer, (list, tuple)) else answer for answer in answers[name]]
                  for name in MODELS]
        figures["speedup"] = figures["hf"]["seconds"] / figures["ours"]["seconds"]
        figures["token_ratio"] = figures["hf"]["tokens_computed"] / figures["ours"]["tokens_computed"]
        figures["max_loglikelihood_difference"] = max(abs(a - b) for a, b in zip(*values))
        figures["same_accuracy"] = all(metrics["ours"][key] == metrics["hf"][key] for key in metrics["hf"]
                                       if key.startswith("acc"))
    return figures


def print_row(task: str, figures: dict) -> None:
    line = f"{task:>10}: {figures['requests']} requests"
    for name in MODELS:
        if name in figures:
            line += (f" | {name} {figures[name]['requests_per_sec']:.1f} req/s, "
                     f"{figures[name]['tokens_computed']:,} tokens")
    if "speedup" in figures:
        line += f" | speedup {figures['speedup']:.2f}x, tokens {figures['token_ratio']:.2f}x"
        if "ceiling" in figures:
            line += (f", ceiling {figures['ceiling']:.2f}x (c={figures['mean_context_tokens']:.1f}, "
                     f"e={figures['mean_ending_tokens']:.1f}): {figures['speedup'] / figures['ceiling']:.0%} of it")
        line += (f" | max |dlogL| {figures['max_loglikelihood_difference']:.2e}, "
                 f"same accuracy: {figures['same_accuracy']}")
    print(line, flush=True)


if __name__ == "__main__":
    cli(main)
