"""The seeds' benchmark suites as presets for eval/lm_eval_harness.py, the markdown table of a results JSON, and
local task files.

Pure Python (no torch, no lm-eval): each preset is the seed's lm-eval tasks in the column order of its published
table, the metric it reports for each, and its few-shot count.

- amd-llama-135m: the table of AMD-Llama-135m's model card (github.com/AMD-AIG-AIMA/AMD-LLM README, "Evaluation";
  scripts/run_lm_eval.sh runs `lm_eval --model hf --tasks $task` one task at a time with no --num_fewshot, so
  zero-shot), accuracy (`acc`) everywhere: its HellaSwag 0.3048 is acc, not acc_norm, and WSC's stderr 0.0474
  is SuperGLUE WSC's 104 validation questions (lm-eval's `wsc`).
- tinyllama-commonsense: TinyLlama's "commonsense average" (github.com/jzhang38/TinyLlama EVAL.md, the GPT4All
  suite), zero-shot, "acc_norm by default": acc_norm where the task has one, acc for WinoGrande and BoolQ.
- inheritune-zero-shot: Inheritune's zero-shot downstream set (Sanyal et al., 2024), accuracy, zero-shot.
- inheritune-mmlu: Inheritune's MMLU for the 1.5B model, 5-shot (LLM-Inheritune lit-gpt/README.md: `--num_fewshot 5`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Column:
    task: str  # lm-eval's task (or group) name
    metric: str  # the metric the seed reports, without lm-eval's ",none" filter suffix
    title: str  # the column title of the seed's table


@dataclass(frozen=True)
class Suite:
    columns: Tuple[Column, ...]
    num_fewshot: int

    @property
    def tasks(self) -> List[str]:
        return [column.task for column in self.columns]


SUITES: Dict[str, Suite] = {
    "amd-llama-135m": Suite((
        Column("sciq", "acc", "SciQ"), Column("winogrande", "acc", "WinoGrande"), Column("piqa", "acc", "PIQA"),
        Column("wsc", "acc", "WSC"), Column("mmlu", "acc", "MMLU"), Column("lambada_openai", "acc", "Lambada (OpenAI)"),
        Column("arc_easy", "acc", "ARC-Easy"), Column("arc_challenge", "acc", "ARC-Challenge"),
        Column("logiqa", "acc", "LogiQA"), Column("hellaswag", "acc", "HellaSwag"),
    ), num_fewshot=0),
    "tinyllama-commonsense": Suite((
        Column("hellaswag", "acc_norm", "HellaSwag"), Column("openbookqa", "acc_norm", "Obqa"),
        Column("winogrande", "acc", "WinoGrande"), Column("arc_challenge", "acc_norm", "ARC_c"),
        Column("arc_easy", "acc_norm", "ARC_e"), Column("boolq", "acc", "boolq"), Column("piqa", "acc_norm", "piqa"),
    ), num_fewshot=0),
    "inheritune-zero-shot": Suite((
        Column("arc_easy", "acc", "ARC-Easy"), Column("lambada_openai", "acc", "LAMBADA"),
        Column("sciq", "acc", "SciQ"), Column("hellaswag", "acc", "HellaSwag"), Column("piqa", "acc", "PIQA"),
    ), num_fewshot=0),
    "inheritune-mmlu": Suite((Column("mmlu", "acc", "MMLU"),), num_fewshot=5),
}
# metrics reported in percent in the table (the seeds' tables show accuracies); others (perplexities) as they are
FRACTION_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "brier_score")


def expand_tasks(names: Sequence[str]) -> Tuple[List[str], List[Column], Optional[int]]:
    """Task names with every preset name replaced by its tasks (duplicates dropped, first kept); the table's columns
    (the presets' own, a column per other task with its metric left to the results); the presets' few-shot count
    (None without a preset; presets of different counts cannot be mixed)."""
    tasks: List[str] = []
    columns: List[Column] = []
    fewshot = set()
    for name in names:
        suite = SUITES.get(name)
        entries = suite.columns if suite else (Column(name, "", name),)
        if suite:
            fewshot.add(suite.num_fewshot)
        for column in entries:
            if column.task not in tasks:
                tasks.append(column.task)
            if column not in columns:
                columns.append(column)
    if len(fewshot) > 1:
        raise ValueError(f"The presets {[n for n in names if n in SUITES]} use different few-shot counts "
                         f"{sorted(fewshot)}: run them separately")
    return tasks, columns, fewshot.pop() if fewshot else None


def markdown_table(results: dict, columns: Sequence[Column], model_name: str) -> str:
    """One row: value ± stderr per column (percent for accuracies, as the seeds' tables), then the average of the
    accuracy columns. `results`: lm-eval's results JSON (its "results" and "groups" sections are searched)."""
    sections = {**results.get("results", {}), **results.get("groups", {})}
    titles, cells, averaged = [], [], []
    for column in columns:
        task_results = sections.get(column.task, {})
        metric = column.metric or first_metric(task_results)
        value = task_results.get(f"{metric},none")
        stderr = task_results.get(f"{metric}_stderr,none")
        scale = 100.0 if metric in FRACTION_METRICS else 1.0
        titles.append(column.title if column.metric else f"{column.title} ({metric})")
        if not isinstance(value, (int, float)):
            cells.append("n/a")
            continue
        cell = f"{value * scale:.2f}"
        if isinstance(stderr, (int, float)):
            cell += f" ± {stderr * scale:.2f}"
        cells.append(cell)
        if scale == 100.0:
            averaged.append(value * scale)
    average = f"{sum(averaged) / len(averaged):.2f}" if averaged else "n/a"
    header = "| Model | " + " | ".join(titles) + " | Avg |"
    rule = "|" + "---|" * (len(titles) + 2)
    row = f"| {model_name} | " + " | ".join(cells) + f" | {average} |"
    return "\n".join((header, rule, row))


def first_metric(task_results: dict) -> str:
    """The first metric lm-eval reports for a task (e.g. acc; word_perplexity for wikitext)."""
    for key in task_results:
        name, _, _ = key.partition(",")
        if "," in key and not name.endswith("_stderr"):
            return name
    return "acc"


def write_local_task(directory: Path, name: str, documents: Sequence[dict], body: str) -> Path:
    """A local lm-eval task (for --include_path): `directory/name.jsonl` holding `documents` and `directory/name.yaml`
    reading it as its test split, `body` being the rest of the YAML (output_type, doc_to_text, ...)."""
    data = Path(directory) / f"{name}.jsonl"
    data.write_text("".join(json.dumps(document) + "\n" for document in documents))
    yaml = Path(directory) / f"{name}.yaml"
    yaml.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{body}")
    return yaml
