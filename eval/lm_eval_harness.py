"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness, run natively on our GPT (no conversion to Hugging
Face format, no transformers): `SmallLlamaLM` is an lm-eval model, registered as `small-llama`.

    python eval/lm_eval_harness.py --checkpoint_dir out/tinyllama_1b/final --tasks hellaswag,arc_easy \
        --num_fewshot 0 --batch_size 16
    python eval/lm_eval_harness.py --checkpoint_dir checkpoints/AMD-Llama-135m --tasks amd-llama-135m

--tasks takes lm-eval task names and the seeds' suite presets (eval_suites.py: amd-llama-135m,
tinyllama-commonsense, inheritune-zero-shot, inheritune-mmlu); real tasks download their data sets the first time.
--output_path gets lm-eval's results JSON (`<output_path>/<checkpoint>/results_<date>.json`, as `lm_eval
--output_path` writes it) and the markdown table beside it (`results_<date>.md`: value ± stderr per task and the
average, in the seed's column order). `--devices N` runs N processes (Fabric); lm-eval's evaluator splits the
documents among them and gathers the results through the model's collectives.

See lm_eval_model.py for how it computes (the same numbers as lm-eval's HF backend on the exported model, the
shared context of multiple-choice endings computed once).
"""

import sys
from pathlib import Path
from typing import List, Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval_suites import SUITES, expand_tasks, markdown_table  # noqa: E402
from lm_eval_model import SmallLlamaLM  # noqa: E402
from utils import UserError, cli  # noqa: E402
from quantize import QuantizeMode  # noqa: E402

Precision = Literal["32-true", "bf16-true", "16-true", "64-true"]


def main(
    checkpoint_dir: Path,
    tasks: List[str],
    num_fewshot: Optional[int] = None,
    batch_size: int = 16,
    limit: Optional[float] = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    precision: Optional[Precision] = None,
    output_path: Optional[Path] = None,
    include_path: Optional[Path] = None,
    seed: Optional[int] = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    add_bos_token: Optional[bool] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> Optional[dict]:
    """Run lm-eval tasks on a checkpoint; print lm-eval's table and the markdown table, and return the results
    (on rank 0; None on the others).

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        tasks: lm-eval task or group names, and suite presets (amd-llama-135m, tinyllama-commonsense,
            inheritune-zero-shot, inheritune-mmlu)
        num_fewshot: few-shot examples per question; default: the preset's count, else each task's own
        batch_size: rows per forward pass (a multiple-choice question is one row: its context and all its endings)
        limit: documents per task (a fraction of them if below 1), for a quick check
        device: auto (CUDA if available), cpu or cuda
        devices: processes (one per device); lm-eval splits the documents among them
        precision: 32-true, bf16-true, 16-true or 64-true; default bf16-true on CUDA, 32-true on CPU
        output_path: directory for lm-eval's results JSON and the markdown table (and the samples with
            --log_samples)
        include_path: directory of extra task YAMLs (local tasks)
        seed: seed of python, numpy, torch and the few-shot sampling; default lm-eval's (0, 1234, 1234, 1234)
        log_samples: write every document's requests and responses too (needs --output_path)
        apply_chat_template: render each prompt with the checkpoint's chat template
        fewshot_as_multiturn: with --apply_chat_template, give the few-shot examples as chat turns
        add_bos_token: BOS before every text; default: as the checkpoint's tokenizer does (HF's default)
        quantize: int8 or int4 weight-only quantization of the linear layers at load (quantize.py)
        group_size: int4's group of input channels: 32, 64 or 128
    """
    from lightning_fabric import Fabric
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "lit_model.pth").is_file():
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: no lit_model.pth there; give a checkpoint directory "
                        f"(pretraining's out_dir/final, or scripts/convert_hf_checkpoint.py's output)")
    for name, value in (("batch_size", batch_size), ("devices", devices)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num_fewshot must be at least 0, got {num_fewshot}")
    if limit is not None and not limit > 0:
        raise UserError(f"--limit must be positive (documents per task, or a share of them below 1), got {limit}")
    if log_samples and output_path is None:
        raise UserError("--log_samples writes the samples into --output_path: give one")
    if fewshot_as_multiturn and not apply_chat_template:
        raise UserError("--fewshot_as_multiturn needs --apply_chat_template")
    try:
        task_names, columns, preset_fewshot = expand_tasks(tasks)
    except ValueError as error:
        raise UserError(f"--tasks: {error}") from None
    if not task_names:
        raise UserError(f"--tasks is empty: give lm-eval task names or a preset ({', '.join(SUITES)})")
    task_manager = find_tasks(task_names, include_path)

    fabric = Fabric(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()
    lm = SmallLlamaLM(str(checkpoint_dir), batch_size=batch_size, precision=precision, add_bos_token=add_bos_token,
                      fabric=fabric, quantize=quantize, group_size=group_size)
    tracker = EvaluationTracker(output_path=str(output_path) if output_path is not None else None)
    seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
    results = simple_evaluate(
        model=lm, model_args={"pretrained": str(checkpoint_dir)}, tasks=task_names,
        num_fewshot=num_fewshot if num_fewshot is not None else preset_fewshot, batch_size=batch_size,
        device=str(fabric.device), limit=limit, log_samples=log_samples, evaluation_tracker=tracker,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        task_manager=task_manager, **seeds,
    )
    if results is None:  # not rank 0
        return None
    samples = results.pop("samples", None)
    table = markdown_table(results, columns, checkpoint_dir.name)
    print(make_table(results))
    print(table)
    if output_path is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if log_samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        results_json(Path(output_path), tracker).with_suffix(".md").write_text(table + "\n")
    return results


def results_json(output_path: Path, tracker) -> Path:
    """The results file EvaluationTracker.save_results_aggregated has just written."""
    if output_path.suffix == ".json":
        return output_path.with_name(f"{output_path.stem}_{tracker.date_id}.json")
    return output_path / tracker.general_config_tracker.model_name_sanitized / f"results_{tracker.date_id}.json"


def find_tasks(task_names: List[str], include_path: Optional[Path]):
    """lm-eval's TaskManager that knows every name: the local YAMLs of include_path alone when they suffice (indexing
    lm-eval's ~14,700 built-in tasks takes ~14 s), else with the built-in ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include_path {include_path} is not a directory of task YAMLs")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in task_names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in task_names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task names {unknown}: see `lm_eval ls tasks`, the presets "
                        f"({', '.join(SUITES)}), or add their YAMLs with --include_path")
    return manager


if __name__ == "__main__":
    cli(main)
