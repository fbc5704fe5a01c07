"""bench/eval_throughput.py: its documented commands run end to end on a tiny stand-in model, and both models give
the same answers."""

import json
import shlex

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from bench import eval_throughput  # noqa: E402
from utils import cli  # noqa: E402

# the docstring's flags on the CPU in seconds: model.py's "demo" config, a handful of documents
STAND_IN = {"--model_name": "demo", "--precision": "32-true", "--device": "cpu", "--batch_size": "4",
            "--hellaswag_docs": "5", "--mmlu_docs": "3", "--rolling_docs": "1"}


def documented_flags() -> list:
    """The flags of each `python bench/eval_throughput.py ...` command of the docstring, without --output."""
    commands = []
    for line in eval_throughput.__doc__.replace("\\\n", "").splitlines():
        if line.strip().startswith("python bench/eval_throughput.py "):
            words = shlex.split(line)[2:]
            commands.append({flag: value for flag, value in zip(words[::2], words[1::2]) if flag != "--output"})
    return commands


def test_documented_commands_parse_and_a_tiny_run_reports_the_same_answers_faster_in_tokens(tmp_path, capsys):
    commands = documented_flags()
    assert len(commands) == 3 and all("--model_name" in flags for flags in commands)
    output = tmp_path / "figures.json"
    argv = [word for pair in {**commands[0], **STAND_IN, "--output": str(output)}.items() for word in pair]
    returned = cli(eval_throughput.main, argv)

    report = json.loads(output.read_text())
    assert report == json.loads(json.dumps(returned)) and report["complete"]
    hellaswag, mmlu, rolling = (report["results"][task] for task in ("hellaswag", "mmlu", "rolling"))
    for figures in (hellaswag, mmlu, rolling):
        assert figures["max_loglikelihood_difference"] < 1e-3
        assert figures["ours"]["requests_per_sec"] > 0 and figures["hf"]["requests_per_sec"] > 0
    assert hellaswag["same_accuracy"] and mmlu["same_accuracy"]
    # the context once instead of four times: the token ratio is about the ceiling (rows of c + e - 1 tokens vs
    # c + 4(e - 1); the ceiling counts c + e and c + 4e)
    c, e = hellaswag["mean_context_tokens"], hellaswag["mean_ending_tokens"]
    assert hellaswag["token_ratio"] == pytest.approx(4 * (c + e - 1) / (c + 4 * (e - 1)), rel=1e-6)
    assert mmlu["token_ratio"] == pytest.approx(1.0) and rolling["token_ratio"] == pytest.approx(1.0)
    assert "ceiling" in capsys.readouterr().out
