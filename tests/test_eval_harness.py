"""lm_eval_model.py (via eval/lm_eval_harness.py) against lm-eval's own HF backend (HFLM) on the same tiny random
model, exported with scripts/convert_lit_checkpoint.py, on local tasks (offline): multiple choice, rolling
perplexity, generate_until."""

import functools
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

pytest.importorskip("lm_eval")

from chat_template import ChatTemplate  # noqa: E402
from checkpoint import save_model_dir  # noqa: E402
from eval_suites import write_local_task  # noqa: E402
from model import GPT, Config  # noqa: E402
from scripts.convert_lit_checkpoint import convert_lit_checkpoint  # noqa: E402
from test_pretrain import command_line, finish, launched  # noqa: E402
from tests.documented import documented, run_script  # noqa: E402

# Llama-2's sentencepiece options but byte fallback (a random model emits invalid UTF-8 bytes, which sentencepiece and
# transformers decode differently); a vocabulary that is a multiple of 64, so the exported model has no padding rows
SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe", vocab_size=256, byte_fallback=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
)
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches and every "
         "scientist measures bright planets near distant galaxies before lunch").split()
BLOCK_SIZE = 48
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sentence(seed: int, length: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(length))


@pytest.fixture(scope="module", autouse=True)
def builtin_task_names() -> Iterator[Callable[[], set]]:
    """The names of lm-eval's built-in task index, TaskManager().all_tasks, indexed in another process from this
    module's first test on: indexing its ~14,700 YAMLs takes ~10 s of one core, which the tests here (one thread)
    leave free. Returns the function that waits for them."""
    code = "import json\nfrom lm_eval.tasks import TaskManager\nprint(json.dumps(sorted(TaskManager().all_tasks)))"
    errors = tempfile.TemporaryFile("w+")  # not a pipe, which its warnings could fill while no one reads it
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})

    @functools.cache
    def names() -> set:
        output, _ = process.communicate(timeout=600)
        errors.seek(0)
        assert process.returncode == 0, errors.read()[-3000:]
        return set(json.loads(output))

    yield names
    if process.poll() is None:  # no test asked for them
        process.kill()
        process.communicate()
    errors.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(our checkpoint directory, its HF export): a 2-layer random model whose block size some contexts exceed."""
    import sentencepiece as spm

    lit_dir, hf_dir = tmp_path_factory.mktemp("lit"), tmp_path_factory.mktemp("hf")
    corpus = lit_dir / "corpus.txt"
    # real English prose (standard library docstrings), so the tasks' words are several tokens each
    modules = ("argparse", "collections", "functools", "json", "pathlib", "re")
    docs = [inspect.getdoc(obj) for name in modules for _, obj in inspect.getmembers(importlib.import_module(name))]
    corpus.write_text("\n".join(doc for doc in docs if doc))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(lit_dir / "tokenizer"), **SENTENCEPIECE_OPTIONS)
    corpus.unlink()
    (lit_dir / "tokenizer.vocab").unlink()
    config = Config(block_size=BLOCK_SIZE, vocab_size=256, n_layer=2, n_head=4, n_embd=32, n_query_groups=2,
                    intermediate_size=64)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # large enough weights that the model prefers some tokens (not a near-uniform output)
        for name, param in model.named_parameters():
            if "norm" not in name and "ln_f" not in name:
                param.copy_(0.3 * torch.randn_like(param))
    # a chat template for --apply_chat_template, exported with the tokenizer files; without newlines, which this
    # tokenizer (no byte fallback) does not have and sentencepiece and transformers handle differently
    ChatTemplate(CHAT_TEMPLATE).save(lit_dir)
    save_model_dir(model.state_dict(), config, lit_dir, lit_dir)
    convert_lit_checkpoint(lit_dir, hf_dir)
    return lit_dir, hf_dir


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Local task YAMLs and their data: multiple choice (contexts longer than the block size, multi-token endings
    that start with a space), rolling log-likelihood over texts of several windows, generation with stop sequences."""
    directory = tmp_path_factory.mktemp("tasks")
    questions = [{"question": sentence(seed, 3 + (seed * 5) % 40),
                  "choices": [sentence(seed + k, 1 + (seed + k) % 5) for k in range(4)], "answer": seed % 4}
                 for seed in range(11)]
    texts = [{"text": sentence(seed, 8 + seed * 9)} for seed in range(5)]
    prompts = [{"prompt": sentence(seed, 2 + seed % 9), "answer": sentence(seed + 1, 2)} for seed in range(7)]
    tasks = {
        "tiny_mc": (questions, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                               "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
                               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "tiny_rolling": (texts, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                                "  - metric: bits_per_byte\n"),
        "tiny_generate": (prompts, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
                                   "doc_to_target: \"{{answer}}\"\n"
                                   "generation_kwargs:\n  until: [\"s\", \".\"]\n  max_gen_toks: 10\n"
                                   "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
    }
    for name, (docs, body) in tasks.items():
        write_local_task(directory, name, docs, body)
    return directory


def evaluate(lm, task_dir: Path, tasks, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), **kwargs)


def responses(results: dict, task: str) -> list:
    """Every request's response, document by document."""
    return [response[0] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
            for response in sample["resps"]]


def ours(checkpoint_dir: Path, precision: str, batch_size: int):
    from lm_eval_model import SmallLlamaLM

    return SmallLlamaLM(str(checkpoint_dir), batch_size=batch_size, device="cpu", precision=precision)


def hflm(hf_dir: Path, dtype: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype=dtype, batch_size=batch_size)


TASKS = ("tiny_mc", "tiny_rolling", "tiny_generate")


def test_fp32_loglikelihoods_match_hflm_within_1e_4_and_accuracies_are_identical(checkpoints, task_dir):
    lit_dir, hf_dir = checkpoints
    # batch sizes that divide neither the 44 multiple-choice requests nor the rolling windows
    mine = evaluate(ours(lit_dir, "32-true", batch_size=3), task_dir, TASKS[:2])
    theirs = evaluate(hflm(hf_dir, "float32", batch_size=5), task_dir, TASKS[:2])
    for task in TASKS[:2]:
        got, expected = responses(mine, task), responses(theirs, task)
        assert len(got) == len(expected) > 0
        got_values = [r[0] if isinstance(r, (tuple, list)) else r for r in got]
        expected_values = [r[0] if isinstance(r, (tuple, list)) else r for r in expected]
        assert got_values == pytest.approx(expected_values, abs=1e-4, rel=0)
        assert_same_results(mine["results"][task], theirs["results"][task], rel=1e-5, compare_stderr=False)
    assert mine["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert mine["results"]["tiny_mc"]["acc_norm,none"] == theirs["results"]["tiny_mc"]["acc_norm,none"]


def assert_same_results(got: dict, expected: dict, rel: float, compare_stderr: bool = True) -> None:
    """One task's entries of lm-eval's results: the same keys, every number within `rel` (the standard errors too,
    unless not `compare_stderr`), and every other entry (alias, name, an "N/A" stderr) equal."""
    assert got.keys() == expected.keys()
    for metric, value in expected.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if compare_stderr or "stderr" not in metric:
                assert got[metric] == pytest.approx(value, rel=rel), metric
        else:
            assert got[metric] == value, metric


def test_float64_is_greedy_and_greedy_generations_are_identical_to_hflm(checkpoints, task_dir):
    from lm_eval.api.instance import Instance

    lit_dir, hf_dir = checkpoints
    mine_lm, theirs_lm = ours(lit_dir, "64-true", batch_size=4), hflm(hf_dir, "float64", batch_size=3)
    mine = evaluate(mine_lm, task_dir, ("tiny_mc", "tiny_generate"))
    theirs = evaluate(theirs_lm, task_dir, ("tiny_mc", "tiny_generate"))
    got, expected = responses(mine, "tiny_mc"), responses(theirs, "tiny_mc")
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    # RoPE's angles are fp32 on both sides (not float64), hence a tolerance
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], abs=1e-4, rel=0)
    generations = responses(mine, "tiny_generate")
    assert generations == responses(theirs, "tiny_generate")
    assert sum(len(text) > 0 for text in generations) >= 3

    # the generations are greedy continuations: is_greedy must be true for (most of) them, in both
    prompts = [sample["arguments"][0][0] for sample in sorted(mine["samples"]["tiny_generate"],
                                                                key=lambda s: s["doc_id"])]
    requests = [Instance("loglikelihood", {}, (prompt, text), idx) for idx, (prompt, text)
                in enumerate(zip(prompts, generations)) if text]
    got, expected = mine_lm.loglikelihood(requests), theirs_lm.loglikelihood(requests)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert any(greedy for _, greedy in got)

    # the checkpoint's chat template, rendered by chat_template.py and by transformers
    mine = evaluate(mine_lm, task_dir, ["tiny_generate"], apply_chat_template=True)
    theirs = evaluate(theirs_lm, task_dir, ["tiny_generate"], apply_chat_template=True)
    prompts = [sample["arguments"][0][0] for sample in mine["samples"]["tiny_generate"]]
    assert prompts == [sample["arguments"][0][0] for sample in theirs["samples"]["tiny_generate"]]
    assert all(prompt.startswith("<|user|> ") and prompt.endswith("<|assistant|>") for prompt in prompts)
    assert responses(mine, "tiny_generate") == responses(theirs, "tiny_generate")


def test_chat_prompts_continue_a_begun_answer_and_drop_a_refused_system_message_as_hflm(checkpoints, tmp_path):
    """lm-eval's gen_prefix (no generation prompt: the last message is continued) and a template that refuses
    system messages (rendered without them): the same prompts as HFLM's apply_chat_template."""
    refusing = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "<|{{ message['role'] }}|> {{ message['content'] | trim }} </s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    lit_dir, hf_dir = (shutil.copytree(directory, tmp_path / directory.name) for directory in checkpoints)
    for directory in (lit_dir, hf_dir):
        (directory / "chat_template.jinja").write_text(refusing)
    mine_lm, theirs_lm = ours(lit_dir, "32-true", batch_size=1), hflm(hf_dir, "float32", batch_size=1)
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": sentence(2, 5)}
    for history, add_generation_prompt in (([system, user], True), ([user], True),
                                           ([system, user, {"role": "assistant", "content": "Answer: "}], False)):
        mine = mine_lm.apply_chat_template(history, add_generation_prompt)
        assert mine == theirs_lm.apply_chat_template(history, add_generation_prompt)
        assert "Be brief" not in mine
        assert mine.rstrip().endswith("<|assistant|>" if add_generation_prompt else "Answer:")


def test_empty_context_is_scored_after_bos_and_an_empty_continuation_has_probability_one(checkpoints):
    """An empty context: the continuation (tokenized alone, without BOS) after the prefix token BOS, as HFLM. (Not
    compared with HFLM itself: transformers 5's LlamaTokenizer drops the leading space of " word" tokenized alone,
    where sentencepiece and Llama-2's tokenizer.json keep it.) An empty continuation: log 1 = 0, and greedy."""
    from lm_eval.api.instance import Instance

    from checkpoint import load_model
    from tokenizer import Tokenizer

    lit_dir, _ = checkpoints
    lm = ours(lit_dir, "64-true", batch_size=2)
    continuation = " " + sentence(5, 6)
    got = lm.loglikelihood([Instance("loglikelihood", {}, ("", continuation), 0),
                            Instance("loglikelihood", {}, (sentence(1, 4), ""), 1)])
    tokens = Tokenizer(lit_dir).encode(continuation)
    model = load_model(lit_dir, dtype=torch.float64)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([[1] + tokens[:-1]]))[0], dim=-1)
    expected = log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()
    assert got[0][0] == pytest.approx(expected, abs=1e-9)
    assert got[1] == (0.0, True)


def run_cli(argv) -> dict:
    from eval.lm_eval_harness import main
    from utils import cli

    return cli(main, argv)


def saved_results(output_path: Path) -> dict:
    (path,) = output_path.glob("*/results_*.json")
    return json.loads(path.read_text())


def test_documented_commands_on_local_tasks_write_lm_evals_json_and_the_table(checkpoints, task_dir, tmp_path,
                                                                             capsys, monkeypatch):
    """The README's commands with the flags they show, on local stand-in tasks (a preset whose columns are the local
    tasks); then 2 gloo processes (launched by Fabric, lm-eval splitting the documents) give the same results. (The
    two processes run while this one evaluates: the launch spends most of its seconds importing.)"""
    import eval_suites as suites

    lit_dir, _ = checkpoints
    columns = (suites.Column("tiny_rolling", "word_perplexity", "Rolling"), suites.Column("tiny_mc", "acc", "MC"),
               suites.Column("tiny_generate", "exact_match", "Gen"))
    monkeypatch.setitem(suites.SUITES, "amd-llama-135m", suites.Suite(columns, num_fewshot=0))
    flags = dict(checkpoint_dir=lit_dir, num_fewshot=0, batch_size=3, include_path=task_dir, device="cpu",
                 precision="64-true", seed=7)
    with launched(("eval/lm_eval_harness.py", dict(flags, tasks=",".join(TASKS), devices=2,
                                                   output_path=tmp_path / "two"))) as (two_processes,):
        argv = command_line("eval/lm_eval_harness.py", flags)[2:]
        returned = run_cli(argv + ["--tasks", "amd-llama-135m", "--output_path", str(tmp_path / "one"),
                                   "--log_samples"])
        one = saved_results(tmp_path / "one")
        assert one["results"] == json.loads(json.dumps(returned["results"]))
        assert one["config"]["model_args"] == {"pretrained": str(lit_dir)}
        assert set(one["results"]) == set(TASKS) and one["n-shot"] == {task: 0 for task in TASKS}
        assert len(list((tmp_path / "one").glob("*/samples_tiny_mc_*.jsonl"))) == 1
        (table_path,) = (tmp_path / "one").glob("*/results_*.md")
        table = table_path.read_text()
        header, _, row = table.splitlines()
        assert header == "| Model | Rolling | MC | Gen | Avg |"  # the preset's column order
        mc, gen = one["results"]["tiny_mc"], one["results"]["tiny_generate"]
        assert f"| {mc['acc,none'] * 100:.2f} ± {mc['acc_stderr,none'] * 100:.2f} |" in row
        assert row.endswith(f"| {(mc['acc,none'] + gen['exact_match,none']) * 50:.2f} |")  # the accuracies' average
        assert table in capsys.readouterr().out

        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in finish(two_processes, timeout=600)
    two = saved_results(tmp_path / "two")
    for task in TASKS:
        assert_same_results(two["results"][task], one["results"][task], rel=1e-9)
    assert two["n-samples"] == one["n-samples"]


def test_the_documented_commands_run_on_local_tasks(checkpoints, task_dir, tmp_path, capsys, monkeypatch):
    """docs/evaluation.md's two commands, the tasks that a download would bring replaced by the local ones: by name in
    the first, as the seed preset's columns in the second."""
    import eval_suites as suites

    lit_dir, _ = checkpoints
    local = {"--include_path": task_dir, "--device": "cpu"}
    run_script(documented(
        "python eval/lm_eval_harness.py --checkpoint_dir out/tinyllama_1b/final --tasks hellaswag,arc_easy "
        "--num_fewshot 0 --batch_size 16",
        replace={"--checkpoint_dir": lit_dir, "--tasks": "tiny_mc,tiny_rolling", "--batch_size": 3}, add=local))
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "tiny_rolling" in printed
    columns = (suites.Column("tiny_mc", "acc", "MC"), suites.Column("tiny_generate", "exact_match", "Gen"))
    monkeypatch.setitem(suites.SUITES, "amd-llama-135m", suites.Suite(columns, num_fewshot=0))
    run_script(documented(
        "python eval/lm_eval_harness.py --checkpoint_dir checkpoints/AMD-Llama-135m --tasks amd-llama-135m "
        "--output_path out/eval", replace={"--checkpoint_dir": lit_dir, "--output_path": tmp_path / "eval"}, add=local))
    assert set(saved_results(tmp_path / "eval")["results"]) == {"tiny_mc", "tiny_generate"}
    (table,) = (tmp_path / "eval").glob("*/results_*.md")
    assert table.read_text().splitlines()[0] == "| Model | MC | Gen | Avg |"


def test_a_model_quantized_at_load_evaluates_close_to_the_float_one(checkpoints, task_dir, capsys):
    lit_dir, _ = checkpoints
    flags = ["--checkpoint_dir", str(lit_dir), "--tasks", "tiny_rolling", "--include_path", str(task_dir), "--device",
             "cpu", "--batch_size", "3"]
    float_results = run_cli(flags)["results"]["tiny_rolling"]
    quantized = run_cli(flags + ["--quantize", "int8"])["results"]["tiny_rolling"]
    assert "int8 linear layers run" in capsys.readouterr().err
    assert quantized["bits_per_byte,none"] == pytest.approx(float_results["bits_per_byte,none"], rel=0.02)


def test_suite_presets_name_tasks_of_lm_evals_default_index(builtin_task_names):
    """Every preset's tasks exist in lm-eval's built-in task index (indexing it takes ~10-14 s: once, meanwhile)."""
    from eval_suites import SUITES, expand_tasks

    known = builtin_task_names()
    for name, suite in SUITES.items():
        assert set(suite.tasks) <= known, name
    tasks, columns, fewshot = expand_tasks(["tinyllama-commonsense", "arc_easy", "amd-llama-135m"])
    assert tasks[:7] == ["hellaswag", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "boolq", "piqa"]
    assert tasks[7:] == ["sciq", "wsc", "mmlu", "lambada_openai", "logiqa"] and fewshot == 0
    with pytest.raises(ValueError, match="different few-shot counts"):
        expand_tasks(["inheritune-zero-shot", "inheritune-mmlu"])


def test_sampled_generation_follows_the_seed_and_stops_and_the_model_is_registered(checkpoints):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from lm_eval_model import SmallLlamaLM

    assert get_model("small-llama") is SmallLlamaLM
    lm = ours(checkpoints[0], "32-true", batch_size=2)
    sampled = dict(until=["e"], max_gen_toks=6, do_sample=True, temperature=1.0, top_k=20)
    requests = [Instance("generate_until", {}, (sentence(seed, 3), sampled), seed) for seed in range(3)]

    def generate(seed: int) -> list:
        torch.manual_seed(seed)
        return lm.generate_until(requests)

    first, again, other = generate(0), generate(0), generate(1)
    assert first == again and first != other
    assert all("e" not in text for text in first + other)  # cut before the stop sequence
    greedy = [Instance("generate_until", {}, (sentence(seed, 3), dict(until=["zzz"], max_gen_toks=6)), seed)
              for seed in range(3)]
    assert lm.generate_until(greedy) == lm.generate_until(greedy)
