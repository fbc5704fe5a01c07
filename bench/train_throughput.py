r"""Training throughput of our model against Hugging Face's LlamaForCausalLM on the same config, side by side in one
run: tokens/s, MFU and peak memory of the very same training step.

On the CPU (2 cores), fp32; on a quiet machine about 1, 2, 3 and 6 minutes:

    python bench/train_throughput.py --model_name demo --micro_batch_size 8 --seq_len 256 --precision 32-true \
        --steps 20 --output out/bench/train_cpu_demo.json
    python bench/train_throughput.py --model_name demo --micro_batch_size 8 --seq_len 256 --precision 32-true \
        --steps 20 --compile --output out/bench/train_cpu_demo_compiled.json
    python bench/train_throughput.py --model_name AMD-Llama-135m --micro_batch_size 1 --seq_len 512 \
        --precision 32-true --steps 10 --output out/bench/train_cpu_135m.json
    python bench/train_throughput.py --model_name AMD-Llama-135m --micro_batch_size 1 --seq_len 512 \
        --precision 32-true --steps 10 --compile --output out/bench/train_cpu_135m_compiled.json

On one GPU, bf16 autocast, sequences of the config's block_size (2048), 20 timed steps per model:

    python bench/train_throughput.py --model_name tiny_LLaMA_1b --micro_batch_size 8 --precision bf16-mixed \
        --output out/bench/train_cuda_tinyllama.json
    python bench/train_throughput.py --model_name tiny_LLaMA_1b --micro_batch_size 8 --precision bf16-mixed \
        --compile --output out/bench/train_cuda_tinyllama_compiled.json
    python bench/train_throughput.py --model_name AMD-Llama-135m --micro_batch_size 16 --precision bf16-mixed \
        --output out/bench/train_cuda_135m.json
    python bench/train_throughput.py --model_name AMD-Llama-135m --micro_batch_size 16 --precision bf16-mixed \
        --compile --output out/bench/train_cuda_135m_compiled.json

Each prints a table and rewrites its --output JSON (device, versions, date, command, arguments, figures) as each
result comes in: after the first step, after every round of timed steps, and complete after the attention report.

Both models are built on the device from the same weights (ours, model.py's init, copied into HF's layout by
hf.hf_state_dict) and trained on the same random tokens by one function, `training_step`: Fabric's precision,
forward, training.loss_sum over the targets / their count (HF: on `.logits`), fabric.backward, gradient clipping,
AdamW (fused on CUDA) and zero_grad, as training.train takes a step of one micro-batch on one process. The first
warmup step checks that the two compute the same thing: their losses and gradient norms must agree. Each timed step
has the device synchronised before and after (training has one host sync per step too), the models take turns
step by step (ABAB: a busy moment of the machine slows both), and the median step time gives tokens/s.

MFU counts training.training_flops_per_token of our parameter count against training.peak_flops of the device
(known GPUs in bf16 only: "n/a" on the CPU and in fp32). Peak memory is the model's own resident state (weights,
buffers, AdamW moments: exact) plus the growth during its step (activations, gradients, temporaries): on CUDA the
growth of max_memory_allocated, so the figure is what the model would peak at alone although both are resident; on
the CPU the growth of the process's peak RSS within the step (reset through /proc/self/clear_refs), a lower bound,
as memory freed in earlier steps is reused without growing the RSS. Both models live on the device at once: if
they do not fit, run `--models ours` and `--models hf` one after the other (then the ratio is not side by side).
Then which attention kernel runs: on CUDA, each SDPA backend is tried alone on one attention call of our shapes
(with `enable_gqa` where the config groups its keys), and one profiled step of each model shows the backend that
SDPA picks by default.
"""

import datetime
import math
import os
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ATTENTION_OPS, cpu_model, versions  # noqa: E402
from generation import synchronize  # noqa: E402
from checkpoint import named_config  # noqa: E402
from hf import hf_config, hf_state_dict  # noqa: E402
from model import GPT, Config, num_parameters  # noqa: E402
from training import (  # noqa: E402
    Accelerator, Precision, build_optimizer, loss_sum, peak_flops, peak_memory_gb, training_flops_per_token,
)
from utils import UserError, cli, write_json  # noqa: E402

MODELS = ("ours", "hf")
# TinyLlama's AdamW and clipping: the values do not change the cost of a step
LEARNING_RATE, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 4e-4, 0.1, (0.9, 0.95), 1e-8, 1.0
# the first step's loss and gradient norm of the two models must agree this closely (relative). Measured on the
# CPU (demo config): fp32 0, bf16-mixed 6e-5, bf16-true 3e-5 and one bf16 step (8e-3) of the norm; a wrong weight
# mapping (gate/up or k/v swapped) makes 5e-3 in the loss and 3e-2 in the norm. The margins leave room for CUDA's
# TF32 (fp32 matmuls there) and its shape-dependent bf16 kernels (our fused qkv against three matmuls)
TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 2e-3, "bf16-true": 1.6e-2}
PROBE_REPEATS = 5  # timed calls of each SDPA backend
# substrings of the profiler's op names -> the SDPA backend they are; the first that a name contains wins
ATTENTION_WORDS = ("attention", "attn", "flash", "fmha", "sdpa")  # in the names of attention kernels


def main(
    model_name: str = "AMD-Llama-135m",
    micro_batch_size: int = 1,
    seq_len: Optional[int] = None,
    precision: Optional[Precision] = None,
    compile: bool = False,
    steps: Optional[int] = None,
    warmup_steps: int = 2,
    device: Accelerator = "auto",
    models: Sequence[str] = MODELS,
    output: Optional[Path] = None,
    seed: int = 1337,
) -> dict:
    """Time the training step of our model and of HF's LlamaForCausalLM with the same config and weights, taking
    turns; print a table and return (and write) the figures.

    Args:
        model_name: a config of model.py
        micro_batch_size: sequences per step
        seq_len: tokens per sequence; none: the config's block_size
        precision: bf16-mixed, bf16-true or 32-true; none: bf16-mixed on CUDA, 32-true on the CPU
        compile: torch.compile each model
        steps: timed steps per model; none: 20 on CUDA, 5 on the CPU (where a step of a 135M model takes seconds)
        warmup_steps: untimed steps per model first (compilation, allocations); the first checks ours against HF
        device: auto (CUDA if there is one), cpu or cuda
        models: ours, hf or both (one alone: no ratio and no check)
        output: write the figures here as JSON, rewritten as each result comes in
        seed: seed of the weights and the tokens
    """
    config = named_config(model_name)
    seq_len = config.block_size if seq_len is None else seq_len
    accelerator = resolve_device(device)
    precision = precision or ("bf16-mixed" if accelerator == "cuda" else "32-true")
    steps = steps or (20 if accelerator == "cuda" else 5)
    check_arguments(config, micro_batch_size, seq_len, precision, steps, warmup_steps, models)
    models = [name for name in MODELS if name in models]

    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    fabric.launch()
    if accelerator == "cuda":
        torch.set_float32_matmul_precision("high")  # as training.launch_fabric: TF32 matmuls in fp32 training
    ours = build_ours(fabric, config, seed)
    n_params = num_parameters(ours)
    flops_per_token = training_flops_per_token(config, n_params, seq_len)
    device_name = torch.cuda.get_device_name(fabric.device) if accelerator == "cuda" else None
    peak = peak_flops(device_name, precision)
    report = {
        "benchmark": "bench/train_throughput.py",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if sys.argv[0].endswith("train_throughput.py") else None,
        "device": device_name or f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "versions": versions(),
        "arguments": dict(model_name=model_name, micro_batch_size=micro_batch_size, seq_len=seq_len,
                          precision=precision, compile=compile, steps=steps, warmup_steps=warmup_steps,
                          device=accelerator, models=models, seed=seed),
        "parameters": n_params,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "complete": False,
    }
    print(f"{report['device']}; torch {torch.__version__}. {model_name}: {n_params:,} parameters, "
          f"{flops_per_token / 1e9:.3f} GFLOPs per token; {micro_batch_size} x {seq_len} tokens per step, "
          f"{precision}, {'compiled' if compile else 'eager'}; {warmup_steps} warmup + {steps} timed steps per model")
    save(output, report)

    trainees = build_trainees(fabric, config, ours, models, precision, compile)
    del ours  # not benchmarked unless in trainees: it only lent its weights to HF's
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(config.vocab_size, (micro_batch_size, seq_len + 1), generator=generator)
    input_ids, targets = (t.contiguous().to(fabric.device) for t in (tokens[:, :-1], tokens[:, 1:]))
    batch = (input_ids, targets)

    if compile:
        print("The first step compiles each model (with inductor on the CPU, a minute or more)")
    report["first_step"], last = warm_up(fabric, trainees, batch, warmup_steps)
    if len(trainees) == 2:
        report["same_computation"] = check_same_computation(report["first_step"], TOLERANCE[precision])
    save(output, report)
    # the timed steps, then one profiled step of each model
    print(f"Timing {steps} steps of each model, taking turns: about {(steps + 1) * sum(last.values()):.0f} s to go "
          f"by the last warmup step")

    state = {name: state_bytes(model, optimizer) for name, (model, optimizer) in trainees.items()}
    for seconds, growth in timed_steps(fabric, trainees, batch, steps):
        report["results"] = results(seconds, state, growth, micro_batch_size * seq_len, flops_per_token, peak,
                                    fabric.device)
        save(output, report)
    print_table(report["results"], fabric.device)

    report["attention"] = attention_report(fabric, config, trainees, batch, precision)
    report["process_peak_rss_gb"] = peak_memory_gb(torch.device("cpu"))
    report["complete"] = True
    save(output, report)
    if output is not None:
        print(f"Wrote {output}")
    return report


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                        "use --device cpu")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def check_arguments(config: Config, micro_batch_size: int, seq_len: int, precision: str, steps: int,
                    warmup_steps: int, models: Sequence[str]) -> None:
    for name, value in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("steps", steps),
                        ("warmup_steps", warmup_steps)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}"
                            + (": the first step compiles, allocates AdamW's state and checks ours against HF"
                                if name == "warmup_steps" else ""))
    if seq_len > config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {config.block_size} of {config.name!r}")
    if precision not in TOLERANCE:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(TOLERANCE)}")
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise UserError(f"--models {','.join(models)!r}: expected ours, hf or ours,hf")


def build_ours(fabric: Fabric, config: Config, seed: int) -> GPT:
    """GPT(config) with model.py's init from `seed`, on the device, as training.build_model builds it."""
    fabric.seed_everything(seed, verbose=False)
    with fabric.init_module(empty_init=False), torch.device(fabric.device):
        return GPT(config).train()


def save(output: Optional[Path], report: dict) -> None:
    if output is not None:
        write_json(output, report)


def build_trainees(fabric: Fabric, config: Config, ours: GPT, models: Sequence[str], precision: str,
                   compile: bool) -> Dict[str, Tuple[nn.Module, torch.optim.Optimizer]]:
    """name -> (model, AdamW), compiled if asked and set up by Fabric, as training.build_model and build_optimizer
    set them up."""
    built = {"ours": ours} if "ours" in models else {}
    if "hf" in models:
        built["hf"] = build_hf(fabric, config, ours, precision)
    trainees = {}
    for name, model in built.items():
        model = fabric.setup(torch.compile(model) if compile else model)
        trainees[name] = (model, build_optimizer(fabric, model, LEARNING_RATE, WEIGHT_DECAY, BETAS, EPS, False))
    return trainees


def build_hf(fabric: Fabric, config: Config, ours: GPT, precision: str) -> nn.Module:
    """HF's LlamaForCausalLM of the same shapes, on the device, with a copy of `ours`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM  # pip install transformers

    # no KV cache in training; SDPA as ours (transformers passes enable_gqa and is_causal, as we do)
    values = {**hf_config(config, "bfloat16" if precision == "bf16-true" else "float32", None, None),
              "use_cache": False}
    with fabric.init_module(empty_init=False), torch.device(fabric.device):
        model = LlamaForCausalLM(LlamaConfig(**values, attn_implementation="sdpa"))
    model.load_state_dict(hf_state_dict(ours.state_dict(), config))
    return model.train()


def warm_up(fabric: Fabric, trainees: dict, batch: Tuple[torch.Tensor, torch.Tensor],
            warmup_steps: int) -> Tuple[dict, Dict[str, float]]:
    """Untimed steps, each model in turn. Returns each model's loss and gradient norm of the first step (before any
    update: the same weights), and the seconds of its last step."""
    first, seconds = {}, {}
    for step in range(warmup_steps):
        for name, (model, optimizer) in trainees.items():
            start = time.perf_counter()
            loss, grad_norm = training_step(fabric, model, optimizer, *batch)
            if step == 0:
                first[name] = {"loss": loss.item(), "grad_norm": grad_norm.item()}  # a host sync, untimed
            synchronize(fabric.device)
            seconds[name] = time.perf_counter() - start
        print(f"warmup step {step + 1}/{warmup_steps}: "
              + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
    return first, seconds


def training_step(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                  targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one micro-batch as training.train takes it; input_ids and targets (B, T) on the
    device. Returns the loss and the gradient norm before clipping, on the device (no host sync)."""
    output = model(input_ids)
    logits = output if isinstance(output, torch.Tensor) else output.logits  # HF returns a CausalLMOutputWithPast
    loss = loss_sum(logits, targets) / targets.numel()
    fabric.backward(loss)
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=GRAD_CLIP, error_if_nonfinite=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def check_same_computation(first: dict, tolerance: float) -> dict:
    """Raise unless the two models' first losses and gradient norms agree within `tolerance` (relative)."""
    differences = {key: abs(first["ours"][key] - first["hf"][key]) / abs(first["hf"][key])
                   for key in ("loss", "grad_norm")}
    ours, hf = first["ours"], first["hf"]
    print(f"same weights, same tokens, first step: loss ours {ours['loss']:.6f}, HF {hf['loss']:.6f}; gradient "
          f"norm ours {ours['grad_norm']:.6f}, HF {hf['grad_norm']:.6f} (relative differences "
          f"{differences['loss']:.1e} and {differences['grad_norm']:.1e}, tolerance {tolerance:.0e})")
    if max(differences.values()) > tolerance:
        raise RuntimeError(f"Ours and HF's LlamaForCausalLM do not compute the same thing: relative differences "
                           f"{differences} exceed {tolerance} with the same weights and tokens")
    return {"relative_differences": differences, "tolerance": tolerance}


def state_bytes(model: nn.Module, optimizer) -> int:
    """Bytes that the model holds between steps: weights, buffers and the optimizer's state (its gradients are
    freed by zero_grad), each storage counted once."""
    optimizer_state = optimizer.optimizer.state.values()  # fabric's wrapper does not forward `.state`
    tensors = [*model.parameters(), *model.buffers(),
               *(t for values in optimizer_state for t in values.values() if isinstance(t, torch.Tensor))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def timed_steps(fabric: Fabric, trainees: dict, batch: Tuple[torch.Tensor, torch.Tensor],
                steps: int) -> Iterator[Tuple[Dict[str, List[float]], Dict[str, int]]]:
    """Time `steps` steps of each model, taking turns (ABAB), each between two device synchronisations. Yields after
    every round the seconds of each model's steps so far and the largest memory growth of one of its steps."""
    seconds: Dict[str, List[float]] = {name: [] for name in trainees}
    growth = {name: 0 for name in trainees}
    for _ in range(steps):
        for name, (model, optimizer) in trainees.items():
            base = memory_mark(fabric.device)
            synchronize(fabric.device)
            start = time.perf_counter()
            training_step(fabric, model, optimizer, *batch)
            synchronize(fabric.device)
            seconds[name].append(time.perf_counter() - start)
            growth[name] = max(growth[name], memory_growth(fabric.device, base))
        yield seconds, growth


def memory_mark(device: torch.device) -> Optional[int]:
    """Start measuring the memory growth of a step: the bytes in use now, the peak reset to them. None on a CPU
    where the peak RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) := the current RSS
    except OSError:
        return None
    return proc_status_bytes("VmRSS")


def memory_growth(device: torch.device, base: Optional[int]) -> int:
    """Peak bytes in use since memory_mark, less its count (0 where it could not measure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    return 0 if base is None else max(proc_status_bytes("VmHWM") - base, 0)


def proc_status_bytes(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) * 1024


def results(seconds: Dict[str, List[float]], state: Dict[str, int], growth: Dict[str, int], tokens_per_step: int,
            flops_per_token: int, peak: Optional[float], device: torch.device) -> dict:
    """Per model: the median step time, tokens/s, MFU and memory; with both, ours over HF."""
    figures = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        tokens_per_sec = tokens_per_step / median
        figures[name] = {
            "tokens_per_sec": tokens_per_sec,
            "median_step_seconds": median,
            "step_seconds": times,
            "mfu": None if peak is None else tokens_per_sec * flops_per_token / peak,
            "state_gb": state[name] / 1e9,
            "step_growth_gb": growth[name] / 1e9,
            "peak_memory_gb": (state[name] + growth[name]) / 1e9,
            "peak_memory": ("state + growth of max_memory_allocated in its step" if device.type == "cuda" else
                            "state + growth of the process's peak RSS in its step: a lower bound"),
        }
    if len(figures) == 2:
        figures["ours_over_hf"] = figures["ours"]["tokens_per_sec"] / figures["hf"]["tokens_per_sec"]
    return figures


def print_table(figures: dict, device: torch.device) -> None:
    memory = "peak GB" if device.type == "cuda" else "peak GB (>=)"
    print(f"{'model':<6} {'tokens/s':>11} {'vs HF':>6} {'step ms':>9} {'MFU':>6} {'state GB':>9} {memory:>13}")
    for name in MODELS:
        if name in figures:
            row = figures[name]
            ratio = row["tokens_per_sec"] / figures["hf"]["tokens_per_sec"] if "hf" in figures else None
            ratio = "" if ratio is None else f"{ratio:.2f}x"
            mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print(f"{name:<6} {row['tokens_per_sec']:>11,.0f} {ratio:>6} {row['median_step_seconds'] * 1e3:>9.1f} "
                  f"{mfu:>6} {row['state_gb']:>9.3f} {row['peak_memory_gb']:>13.3f}")
    print(f"peak memory: {figures[next(iter(figures))]['peak_memory']}")


def attention_report(fabric: Fabric, config: Config, trainees: dict, batch: Tuple[torch.Tensor, torch.Tensor],
                     precision: str) -> dict:
    """Which SDPA backends can run our attention (CUDA), and which one each model's step runs (a profiled step)."""
    report = {}
    if fabric.device.type == "cuda":
        B, T = batch[0].shape
        dtype = torch.float32 if precision == "32-true" else torch.bfloat16  # what autocast hands SDPA
        report["backends"] = probe_sdpa_backends(config, B, T, dtype, fabric.device)
        for backend, outcome in report["backends"].items():
            print(f"SDPA {backend} alone, ({B}, {config.n_head}/{config.n_query_groups} heads, {T}, "
                  f"{config.head_size}) {str(dtype).removeprefix('torch.')}, causal: "
                  + (f"works, {outcome['ms']:.2f} ms forward + backward" if outcome["works"]
                     else f"fails: {outcome['error']}"))
    for name, (model, optimizer) in trainees.items():
        report[name] = profiled_attention(fabric, model, optimizer, batch)
        kernels = report[name]["kernels"]
        print(f"{name}: attention ran as {', '.join(report[name]['backends']) or 'no fused SDPA op (decomposed?)'}"
              + (f"; kernels: {'; '.join(kernels[:4])}" if kernels else ""))
    return report


def probe_sdpa_backends(config: Config, B: int, T: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Try each SDPA backend alone on one causal attention call of our shapes, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(B, config.n_head, T, config.head_size, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, config.n_query_groups, T, config.head_size, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(2))

    def attention() -> None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(config.head_size),
                                           enable_gqa=config.n_query_groups != config.n_head)
        y.sum().backward()

    outcomes = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        # SDPA says why a backend refuses in warnings, then raises "No available kernel"
        with sdpa_kernel([backend]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                attention()  # the first call may pick and build a kernel: untimed
                times = []
                for _ in range(PROBE_REPEATS):
                    synchronize(device)
                    start = time.perf_counter()
                    attention()
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                outcomes[backend.name] = {"works": True, "ms": statistics.median(times) * 1e3}
            except RuntimeError as error:
                reasons = [" ".join(str(w.message).split()) for w in caught] or [str(error).splitlines()[0]]
                outcomes[backend.name] = {"works": False, "error": " | ".join(reasons)[:500]}
    return outcomes


def profiled_attention(fabric: Fabric, model: nn.Module, optimizer, batch: Tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The SDPA backends that one step runs, by the ops the profiler records, and its attention kernels (CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if fabric.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        training_step(fabric, model, optimizer, *batch)
        synchronize(fabric.device)
    events = profiler.key_averages()
    ops = {}  # op name -> its backend
    for name in {event.key for event in events if event.device_type == DeviceType.CPU}:
        ops[name] = next((backend for op, backend in ATTENTION_OPS if op in name), None)
    kernels = {event.key[:120] for event in events if event.device_type == DeviceType.CUDA
               and any(word in event.key.lower() for word in ATTENTION_WORDS)}
    return {"backends": sorted({backend for backend in ops.values() if backend}),
            "ops": sorted(name for name, backend in ops.items() if backend), "kernels": sorted(kernels)}


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also through a pipe
    cli(main)
