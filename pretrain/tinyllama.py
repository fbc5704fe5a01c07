"""Pretrain a Llama-family model with TinyLlama's recipe: Lightning Fabric, FSDP or DDP, exact resume.

    python pretrain/tinyllama.py --demo   # builds a small corpus and trains a tiny model on the CPU in minutes
    python pretrain/tinyllama.py          # TinyLlama-1.1B on SlimPajama + StarCoder, on every local GPU

The defaults of `setup` are TinyLlama's recipe (its README): 1024 sequences of 2048 tokens per step, AdamW with
lr 4e-4 -> 4e-5 cosine after 2000 warmup steps, 1,430,512 steps (3T tokens). pretrain/amd_llama_135m.py and
finetune/amd_llama_135m_code.py run this same loop with other defaults.

The global batch is the global batch: micro-batch x gradient accumulation x devices x nodes, whatever the number
of devices and nodes. A checkpoint holds the model, the optimizer, the step, every rank's data position and RNG
states, so a run resumed from it continues exactly as if it had never stopped.
"""

import functools
import importlib.util
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from lightning_fabric.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import GPT, Config
from packed_dataset import CombinedDataset, PackedDataset
from tokenizer import TOKENIZER_FILES, Tokenizer
from checkpoint import load_checkpoint, load_model, save_model_dir
from model import num_parameters
from utils import cli

SHUFFLE_BUFFER_FILES = 8  # files whose blocks are shuffled together (TinyLlama's n_chunks)
# Dense bf16 peak of one device, for MFU; other devices and precisions report tokens/s only
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

# The demo: the 4-layer "demo" model on the corpus of prepare_data/prepare_demo.py, on the CPU, in about 5 minutes
DEMO = dict(
    model_name="demo",
    out_dir=Path("out/demo"),
    train_data_mix="train_code,train_prose",
    accelerator="cpu",
    devices=1,
    precision="32-true",
    global_batch_size=8,  # small batches, many steps: what learns fastest early in training
    micro_batch_size=8,
    max_steps=500,  # 1M tokens, about 4 minutes on 2 CPU cores
    learning_rate=2e-3,
    min_lr=2e-4,
    warmup_steps=20,
    log_interval=20,
    eval_interval=100,
    eval_iters=16,
    save_interval=250,  # each checkpoint holds the optimizer too: about 60 MB
    resume="auto",  # running the demo again continues it (or, if it is complete, samples again)
    seed=3407,  # of the initial weights, the data order and the sample
)
DEMO_PROMPT = "class Parser:"


def setup(
    model_name: str = "tiny_LLaMA_1b",
    out_dir: Path = Path("out/tinyllama_1b"),
    train_data_dir: Path = Path("data/slim_star_combined"),
    val_data_dir: Optional[Path] = Path("data/slim_star_combined"),
    train_data_mix: str = "train_slimpajama:0.693584,train_starcoder:0.306416",
    tokenizer_dir: Optional[Path] = Path("checkpoints/TinyLlama-1.1B"),
    initial_checkpoint_dir: Optional[Path] = None,
    devices: str = "auto",
    num_nodes: int = 1,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    strategy: Literal["fsdp", "ddp"] = "fsdp",
    precision: Literal["bf16-mixed", "bf16-true", "32-true"] = "bf16-mixed",
    compile: bool = False,
    resume: Optional[str] = None,
    seed: int = 3407,
    seq_len: Optional[int] = None,
    global_batch_size: int = 1024,
    micro_batch_size: int = 8,
    max_steps: Optional[int] = 1_430_512,
    max_tokens: Optional[int] = None,
    max_time: Optional[float] = None,
    epochs: Optional[int] = None,
    learning_rate: float = 4e-4,
    min_lr: float = 4e-5,
    warmup_steps: int = 2000,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    decay_all_params: bool = False,
    log_interval: int = 10,
    eval_interval: int = 5000,
    eval_iters: int = 100,
    save_interval: int = 5000,
    wandb_project: Optional[str] = None,
) -> Fabric:
    """Pretrain `model_name` on packed shards (TinyLlama's recipe by default). Returns the Fabric object.

    For a first run there is the demo, `python pretrain/tinyllama.py --demo`: it builds a small corpus and trains a
    tiny model on the CPU in minutes (its flags: `--demo --help`).

    The run stops at the first of max_steps, max_tokens and epochs, and the learning rate decays over exactly that
    many steps; max_time only stops it early, after a checkpoint to resume from. The final weights of a complete run
    go to out_dir/final (lit_model.pth, model_config.json and the tokenizer), for generate/base.py.

    Args:
        model_name: a config of model.py
        out_dir: checkpoints (step-N), logs and the final weights (final/, once the run is complete) go here
        train_data_dir: directory of the packed training shards
        val_data_dir: directory of the validation* shards; none: no validation
        train_data_mix: 'prefix:weight,...' (the files train_data_dir/prefix*, drawn with those probabilities) or 'prefix,...' (weighted by their sizes)
        tokenizer_dir: its tokenizer is copied into out_dir/final; none: leave it out
        initial_checkpoint_dir: start from its lit_model.pth and model_config.json (weights only: a fresh optimizer and schedule)
        devices: processes per node: auto (every local GPU, or 1 on the CPU) or a number
        num_nodes: number of nodes (see the README for multi-node launching)
        accelerator: auto, cpu or cuda
        strategy: fsdp (FSDP2, every Block sharded) or ddp; a single process uses neither
        precision: bf16-mixed, bf16-true or 32-true
        compile: wrap the model in torch.compile
        resume: auto (the highest out_dir/step-N, if any) or a checkpoint path
        seed: seed of the initial weights and the data order
        seq_len: tokens per sequence; none: the model's block_size
        global_batch_size: sequences per optimizer step, over all devices and nodes
        micro_batch_size: sequences per device and forward pass
        max_steps: optimizer steps
        max_tokens: training tokens
        max_time: seconds of training in this run, then save and stop (resume with --resume auto)
        epochs: epochs of the training data (one source only)
        learning_rate: peak learning rate, after the linear warmup
        min_lr: final learning rate of the cosine decay
        warmup_steps: steps of linear warmup
        weight_decay: AdamW weight decay, on matrices only unless decay_all_params
        beta1: AdamW beta1
        beta2: AdamW beta2
        eps: AdamW eps
        grad_clip: maximum gradient norm
        decay_all_params: weight decay on norms, biases and embeddings too, as the original TinyLlama
        log_interval: steps between progress lines and logged metrics
        eval_interval: steps between validations
        eval_iters: validation micro-batches per process
        save_interval: steps between checkpoints
        wandb_project: also log to this Weights & Biases project (pip install wandb)
    """
    args = SimpleNamespace(**locals())
    check_args(args)
    if accelerator in ("auto", "cuda") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    n_local = resolve_devices(devices, accelerator)
    world_size = n_local * num_nodes
    gradient_accumulation_steps(global_batch_size, micro_batch_size, world_size)  # fail before launching

    if world_size == 1:
        fabric_strategy = "auto"
    elif strategy == "fsdp":
        fabric_strategy = ModelParallelStrategy(
            parallelize_fn=shard_blocks, data_parallel_size=world_size, tensor_parallel_size=1
        )
    else:
        fabric_strategy = DDPStrategy()
    loggers = [CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=1)]  # rows written as logged
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard"))
    if wandb_project is not None:
        from wandb.integration.lightning.fabric import WandbLogger  # pip install wandb

        loggers.append(WandbLogger(project=wandb_project))
    fabric = Fabric(accelerator=accelerator, devices=n_local, num_nodes=num_nodes, strategy=fabric_strategy,
                    precision=precision, loggers=loggers)
    fabric.launch()  # starts the other local processes (unless torchrun or SLURM did), each runs this script
    main(fabric, args)
    return fabric


def main(fabric: Fabric, args: SimpleNamespace) -> None:
    out_dir = Path(args.out_dir)
    config = model_config(args.model_name, args.initial_checkpoint_dir)
    seq_len = args.seq_len or config.block_size
    if seq_len > config.block_size:
        raise ValueError(f"--seq_len {seq_len} exceeds the block_size {config.block_size} of {config.name!r}")
    if args.tokenizer_dir is not None:
        check_tokenizer(Path(args.tokenizer_dir), config, args.initial_checkpoint_dir)
    accumulation = gradient_accumulation_steps(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    tokens_per_step = args.global_batch_size * seq_len

    train_data = training_data(fabric, Path(args.train_data_dir), args.train_data_mix, seq_len + 1, args.seed)
    val_data = None if args.val_data_dir is None else validation_data(fabric, Path(args.val_data_dir), seq_len + 1)
    max_steps = run_length(fabric, args, train_data, tokens_per_step)
    eval_batches = 0 if val_data is None else validation_batches(fabric, val_data, args)

    resume_path = find_resume_checkpoint(fabric, args.resume, out_dir)
    fabric.seed_everything(args.seed)  # the same initial weights on every rank, whatever the strategy
    # built whole on the device by every rank, then sharded (ModelParallelStrategy does not place it itself)
    with fabric.init_module(empty_init=False), torch.device(fabric.device):
        model = GPT(config)
    if args.initial_checkpoint_dir is not None and resume_path is None:
        load_checkpoint(model, Path(args.initial_checkpoint_dir) / "lit_model.pth")
    n_params = num_parameters(model)
    flops_per_token = training_flops_per_token(config, n_params, seq_len)
    fabric.print(f"{config.name}: {n_params:,} parameters, {flops_per_token / 1e9:.3f} GFLOPs per token; "
                 f"{fabric.world_size} processes x {args.micro_batch_size} sequences x {accumulation} accumulation "
                 f"= {args.global_batch_size} sequences of {seq_len} tokens per step; {max_steps:,} steps")
    if args.compile:
        model = torch.compile(model)
    model = fabric.setup(model)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay, args.decay_all_params), lr=args.learning_rate,
        betas=(args.beta1, args.beta2), eps=args.eps, fused=fabric.device.type == "cuda",
    )
    optimizer = fabric.setup_optimizers(optimizer)

    hparams = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    state = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0}
    if resume_path is not None:
        fabric.print(f"Resuming from {resume_path}")
        load_training_state(fabric, resume_path, state, train_data, config)
    elif fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "hyperparameters.json").write_text(json.dumps(hparams, indent=2) + "\n")

    device_name = torch.cuda.get_device_name(fabric.device) if fabric.device.type == "cuda" else None
    run = SimpleNamespace(  # what this run derived from its arguments
        config=config, hparams=hparams, accumulation=accumulation, tokens_per_step=tokens_per_step,
        max_steps=max_steps, eval_batches=eval_batches, flops_per_token=flops_per_token,
        peak_flops=peak_flops(device_name, args.precision),
    )
    try:
        train(fabric, args, run, state, train_data, val_data)
    finally:
        for logger in fabric.loggers:
            logger.finalize("success")
    final = out_dir / "final"
    if state["step"] < max_steps:  # stopped by --max_time: unfinished weights must not pass for the final ones
        earlier = f" (the {final} there now is from an earlier run)" if final.exists() else ""
        fabric.print(f"Stopped at step {state['step']} of {max_steps} (--max_time {args.max_time} s): the run is in "
                     f"{checkpoint_path(out_dir, state['step'])}. Continue it with the same command and --resume "
                     f"auto; the final weights go to {final} when it reaches step {max_steps}{earlier}.")
        return
    export_for_generate(fabric, model, config, args.tokenizer_dir, final)


def train(fabric: Fabric, args: SimpleNamespace, run: SimpleNamespace, state: dict,
          train_data: CombinedDataset, val_data: Optional[PackedDataset]) -> None:
    model, optimizer = state["model"], state["optimizer"]
    out_dir = Path(args.out_dir)
    val_losses = {}
    if val_data is not None and state["step"] == 0:
        val_losses[0] = validate(fabric, model, val_data, args.micro_batch_size, run.eval_batches)
        fabric.print(f"step 0: validation loss {val_losses[0]:.4f}")
        fabric.log_dict({"val_loss": val_losses[0]}, step=0)

    train_iterator = iter(train_data)
    loss_sum = torch.zeros((), device=fabric.device)  # summed on the device, read at log intervals only
    start = log_start = time.perf_counter()
    start_step = log_step = state["step"]
    while state["step"] < run.max_steps:
        lr = get_lr(state["step"], args.learning_rate, args.min_lr, args.warmup_steps, run.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=fabric.device)
        for micro_step in range(run.accumulation):
            batch = next_batch(train_iterator, args.micro_batch_size, fabric.device)
            input_ids, targets = batch[:, :-1], batch[:, 1:]
            is_accumulating = micro_step < run.accumulation - 1
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = loss_fn(model(input_ids), targets)
                fabric.backward(loss / run.accumulation)
            step_loss += loss.detach()
        step_loss /= run.accumulation
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip, error_if_nonfinite=False)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        out_of_time = args.max_time is not None and time.perf_counter() - start > args.max_time
        # the one host sync per step: every rank learns whether any rank's loss is bad or any rank is out of time
        checks = torch.stack([
            (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).float(),
            torch.full_like(step_loss, float(out_of_time)),  # a fill, not a host-to-device copy
            grad_norm.float(),  # the same on every rank
        ])
        non_finite, out_of_time, grad_norm = fabric.all_reduce(checks, reduce_op="max").tolist()
        if non_finite:
            last = latest_checkpoint(out_dir)
            raise FloatingPointError(
                f"Non-finite loss or gradient at step {state['step'] + 1} (this rank's loss {step_loss.item()}, "
                f"gradient norm {grad_norm}): stopping before the optimizer step. The last checkpoint "
                + (f"{last} is intact: resume from it (--resume auto) with a lower --learning_rate or a "
                   f"different --seed." if last else "does not exist: nothing was saved.")
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += run.tokens_per_step
        loss_sum += step_loss
        step = state["step"]

        if step % args.log_interval == 0 or step == run.max_steps or out_of_time:
            train_loss = fabric.all_reduce(loss_sum / (step - log_step), reduce_op="mean").item()
            elapsed = time.perf_counter() - log_start
            tokens_per_sec = (step - log_step) * run.tokens_per_step / elapsed
            metrics = {"loss": train_loss, "learning_rate": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                       "tokens_per_sec": tokens_per_sec, "peak_memory_gb": peak_memory_gb(fabric.device)}
            mfu = ""
            if run.peak_flops is not None:
                metrics["mfu"] = tokens_per_sec * run.flops_per_token / (run.peak_flops * fabric.world_size)
                mfu = f", MFU {metrics['mfu']:.1%}"
            fabric.log_dict(metrics, step=step)
            remaining = (time.perf_counter() - start) / (step - start_step) * (run.max_steps - step)
            fabric.print(f"step {step}/{run.max_steps}: loss {train_loss:.4f}, lr {lr:.2e}, grad norm "
                         f"{grad_norm:.3f}, {tokens_per_sec:,.0f} tokens/s{mfu}, {state['tokens']:,} tokens, "
                         f"{metrics['peak_memory_gb']:.2f} GB peak, about {remaining / 3600:.2f} h to go")
            loss_sum.zero_()
            log_step, log_start = step, time.perf_counter()
        pause = time.perf_counter()
        if val_data is not None and (step % args.eval_interval == 0 or step == run.max_steps or out_of_time):
            val_losses[step] = validate(fabric, model, val_data, args.micro_batch_size, run.eval_batches)
            fabric.print(f"step {step}: validation loss {val_losses[step]:.4f}")
            fabric.log_dict({"val_loss": val_losses[step]}, step=step)
        if step % args.save_interval == 0 or step == run.max_steps or out_of_time:
            save_checkpoint(fabric, out_dir, state, train_data, run.hparams, run.config)
        log_start += time.perf_counter() - pause  # tokens/s counts training only, not validation or checkpoints
        if out_of_time:
            break
    if val_data is not None and state["step"] not in val_losses:  # e.g. resumed from the last checkpoint
        val_losses[state["step"]] = validate(fabric, model, val_data, args.micro_batch_size, run.eval_batches)
        fabric.print(f"step {state['step']}: validation loss {val_losses[state['step']]:.4f}")
    if len(val_losses) > 1 and 0 in val_losses:
        fabric.print(f"validation loss: initial {val_losses[0]:.4f}, final {val_losses[max(val_losses)]:.4f}")


@torch.no_grad()
def validate(fabric: Fabric, model: nn.Module, val_data: PackedDataset, micro_batch_size: int,
             eval_batches: int) -> float:
    """Mean loss of the first `eval_batches` micro-batches of every rank (the same count on all ranks)."""
    model.eval()
    iterator = iter(val_data)
    total = torch.zeros((), device=fabric.device)
    for _ in range(eval_batches):
        batch = next_batch(iterator, micro_batch_size, fabric.device)
        total += loss_fn(model(batch[:, :-1]), batch[:, 1:])
    model.train()
    return fabric.all_reduce(total / eval_batches, reduce_op="mean").item()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log-softmax in fp32: bf16 log-probabilities keep only about 3 significant digits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def next_batch(iterator, micro_batch_size: int, device: torch.device) -> torch.Tensor:
    batch = torch.stack([next(iterator) for _ in range(micro_batch_size)])
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch


def get_lr(step: int, learning_rate: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine down to min_lr at max_steps, then flat."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per process and step, so that all processes together make exactly one global batch."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        hint = (f"choose a --micro_batch_size that divides {global_batch_size // world_size}"
                if global_batch_size % world_size == 0 else "it must be a multiple of the number of processes")
        raise ValueError(f"--global_batch_size {global_batch_size} is not a multiple of --micro_batch_size "
                         f"{micro_batch_size} x {world_size} processes (devices x num_nodes) = {per_step}: {hint}")
    return global_batch_size // per_step


def parameter_groups(model: nn.Module, weight_decay: float, decay_all_params: bool) -> list:
    """Weight decay on matrices only: not on norms, biases or embeddings (unless decay_all_params, as TinyLlama)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            is_matrix = param.ndim >= 2 and not isinstance(module, nn.Embedding)
            (decay if decay_all_params or is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def training_flops_per_token(config: Config, n_params: int, seq_len: int) -> int:
    """6 x non-embedding parameters (forward + backward of every matmul) + 6 x n_layer x n_embd x seq_len (causal
    attention scores and values: 2 matmuls of n_embd per query-key pair, half the pairs, x3 for the backward)."""
    embedding = config.padded_vocab_size * config.n_embd
    return 6 * (n_params - embedding) + 6 * config.n_layer * config.n_embd * seq_len


def peak_flops(device_name: Optional[str], precision: str) -> Optional[float]:
    """Dense bf16 peak of a known GPU (by name); None for others, and for fp32 (whose peak is another)."""
    if device_name is None or not precision.startswith("bf16"):
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # the process's peak RSS, in KB on Linux


def shard_blocks(model: GPT, device_mesh) -> GPT:
    """FSDP2: every Block is one all-gather unit, the root (embedding, final norm, head) another. bf16-mixed stays
    Fabric's autocast over fp32 parameters, as with DDP: the same numerics whatever the strategy."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_tokenizer(tokenizer_dir: Path, config: Config, initial_checkpoint_dir: Optional[Path]) -> None:
    try:
        tokenizer = Tokenizer(tokenizer_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--tokenizer_dir: {error}. Its tokenizer is copied next to the final weights for "
                                f"generate/base.py; pass --tokenizer_dir none to leave it out") from None
    source = (str(Path(initial_checkpoint_dir) / "model_config.json") if initial_checkpoint_dir is not None
              else f"the {config.name!r} config of model.py")
    tokenizer.check_fits(config, source)


def model_config(model_name: str, initial_checkpoint_dir: Optional[Path]) -> Config:
    if initial_checkpoint_dir is None:
        return Config.from_name(model_name)
    config = Config.from_file(Path(initial_checkpoint_dir) / "model_config.json")
    if config.name != model_name:
        raise ValueError(f"{initial_checkpoint_dir}/model_config.json is a {config.name!r} model, but --model_name "
                         f"is {model_name!r}")
    return config


def parse_data_mix(mix: str) -> list:
    """"prefix:weight,prefix:weight" or "prefix,prefix" -> [(prefix, weight or None)]."""
    entries = []
    for item in mix.split(","):
        prefix, _, weight = item.strip().partition(":")
        if not prefix:
            raise ValueError(f"--train_data_mix {mix!r}: expected 'prefix:weight,...' or 'prefix,...'")
        try:
            entries.append((prefix, float(weight) if weight else None))
        except ValueError:
            raise ValueError(f"--train_data_mix {mix!r}: the weight {weight!r} of {prefix!r} is not a number") from None
    if len({weight is None for _, weight in entries}) > 1:
        raise ValueError(f"--train_data_mix {mix!r}: give a weight to every prefix or to none (then by size)")
    if any(weight is not None and weight <= 0 for _, weight in entries):
        raise ValueError(f"--train_data_mix {mix!r}: weights must be positive")
    return entries


def data_files(data_dir: Path, prefix: str, flag: str) -> list:
    files = sorted(str(path) for path in data_dir.glob(f"{prefix}*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"No data files {str(data_dir / prefix)}* (from {flag}): prepare the data with a "
                                f"script of prepare_data/ first")
    return files


def training_data(fabric: Fabric, data_dir: Path, mix: str, block_size: int, seed: int) -> CombinedDataset:
    sources = parse_data_mix(mix)
    datasets = [
        PackedDataset(data_files(data_dir, prefix, "--train_data_dir/--train_data_mix"), n_chunks=SHUFFLE_BUFFER_FILES,
                      block_size=block_size, seed=seed, shuffle=True, wrap=True, num_processes=fabric.world_size,
                      process_rank=fabric.global_rank)
        for prefix, _ in sources
    ]
    weights = [weight for _, weight in sources]
    if weights[0] is None:  # every block of every source equally likely
        weights = [dataset.n_blocks_total for dataset in datasets]
    return CombinedDataset(datasets, seed=seed, weights=weights)


def validation_batches(fabric: Fabric, val_data: PackedDataset, args: SimpleNamespace) -> int:
    """Micro-batches per rank and validation: eval_iters, or fewer if every rank cannot have that many."""
    available = val_data.n_blocks_total // fabric.world_size // args.micro_batch_size
    if available == 0:
        raise ValueError(f"{args.val_data_dir}: {val_data.n_blocks_total} validation blocks of "
                         f"{val_data.block_size} tokens are fewer than one micro-batch on each of the "
                         f"{fabric.world_size} processes")
    return min(args.eval_iters, available)


def validation_data(fabric: Fabric, data_dir: Path, block_size: int) -> PackedDataset:
    return PackedDataset(data_files(data_dir, "validation", "--val_data_dir"), n_chunks=SHUFFLE_BUFFER_FILES,
                         block_size=block_size, shuffle=False, num_processes=fabric.world_size,
                         process_rank=fabric.global_rank)


def run_length(fabric: Fabric, args: SimpleNamespace, train_data: CombinedDataset, tokens_per_step: int) -> int:
    """Steps of this run: the first of max_steps, max_tokens and epochs that is reached."""
    limits = []
    if args.max_steps is not None:
        limits.append(args.max_steps)
    if args.max_tokens is not None:
        if args.max_tokens < tokens_per_step:
            raise ValueError(f"--max_tokens {args.max_tokens:,} is less than one step of {tokens_per_step:,} tokens "
                             f"(--global_batch_size {args.global_batch_size} sequences of "
                             f"{tokens_per_step // args.global_batch_size} tokens): it would train nothing")
        limits.append(args.max_tokens // tokens_per_step)
    if args.epochs is not None:
        if len(train_data.datasets) != 1:
            raise ValueError(f"--epochs needs a single training source, --train_data_mix is {args.train_data_mix!r}")
        blocks = train_data.datasets[0].n_blocks_total
        # rank r reads the blocks r, r + P, ... of the epoch's order (P processes), G / P of them per step: after
        # s steps the ranks together have read exactly the first s * G blocks, so s * G <= blocks stays in the epoch
        steps_per_epoch = blocks // args.global_batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"{args.train_data_dir}: {blocks} blocks make no full global batch of "
                             f"{args.global_batch_size}")
        left_out = blocks - steps_per_epoch * args.global_batch_size
        fabric.print(f"One epoch: {steps_per_epoch:,} steps of {args.global_batch_size} blocks; the last {left_out} "
                     f"of its {blocks:,} blocks make no full global batch and are left out of it")
        limits.append(args.epochs * steps_per_epoch)  # with epochs > 1, the left-out blocks start the next one
    if not limits:
        raise ValueError("Give at least one of --max_steps, --max_tokens and --epochs")
    return min(limits)


# ---- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"step-{step:08d}"


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest step number (not the last by string order), or None."""
    found = [(int(match.group(1)), path) for path in Path(out_dir).glob("step-*")
             if (match := re.fullmatch(r"step-(\d+)", path.name))]
    return max(found)[1] if found else None


def find_resume_checkpoint(fabric: Fabric, resume: Optional[str], out_dir: Path) -> Optional[Path]:
    latest = fabric.broadcast(latest_checkpoint(out_dir) if fabric.global_rank == 0 else None)
    if resume is None:
        if latest is not None:
            raise FileExistsError(f"{out_dir} holds checkpoints of an earlier run (the latest is {latest}): pass "
                                  f"--resume auto to continue it, or choose another --out_dir")
        return None
    if str(resume) == "auto":
        if latest is None:
            fabric.print(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
        return latest
    if not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return Path(resume)


def rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain ints: loadable with weights_only
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def gather_objects(fabric: Fabric, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if fabric.world_size == 1:
        return [obj]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` (a file or a directory) to `path`. A `path` already there (the same step saved by an
    earlier run, an earlier export) is kept, renamed, until the new one is in place."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        remove_path(old)
        os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def save_checkpoint(fabric: Fabric, out_dir: Path, state: dict, train_data: CombinedDataset, hparams: dict,
                    config: Config) -> None:
    """Write `step-N` under a temporary name, then rename it: a crash never leaves a partial `step-N`. It is a file
    (one process, DDP) or a directory of shards (FSDP), as fabric.save writes it."""
    path = checkpoint_path(out_dir, state["step"])
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)  # left by a crash
    fabric.barrier()
    checkpoint = {
        **state,
        "train_data": gather_objects(fabric, train_data.state_dict()),  # index: rank
        "rng": gather_objects(fabric, rng_states()),
        "hparams": hparams,
        "model_config": vars(config).copy(),
    }
    fabric.save(tmp, checkpoint)
    fabric.barrier()
    if fabric.global_rank == 0:
        move_into_place(tmp, path)
    fabric.barrier()
    fabric.print(f"Saved {path}")


def load_training_state(fabric: Fabric, path: Path, state: dict, train_data: CombinedDataset,
                        config: Config) -> None:
    if Path(path).is_dir() and not isinstance(fabric.strategy, ModelParallelStrategy):
        raise ValueError(f"{path} is a sharded checkpoint written by FSDP: resume it with --strategy fsdp on as many "
                         f"processes (devices x num_nodes) as wrote it")
    checkpoint = {**state, "train_data": None, "rng": None, "hparams": None, "model_config": None}
    fabric.load(path, checkpoint, weights_only=True)
    if checkpoint["model_config"] != vars(config):
        raise ValueError(f"{path} holds a model {checkpoint['model_config']}, not {vars(config)}")
    if len(checkpoint["train_data"]) != fabric.world_size:
        raise ValueError(f"{path} was written by {len(checkpoint['train_data'])} processes; resume it with as many "
                         f"(devices x num_nodes), not {fabric.world_size}: each holds its own data position")
    train_data.load_state_dict(checkpoint["train_data"][fabric.global_rank])
    set_rng_states(checkpoint["rng"][fabric.global_rank])
    state["step"], state["tokens"] = checkpoint["step"], checkpoint["tokens"]


def export_for_generate(fabric: Fabric, model: nn.Module, config: Config, tokenizer_dir: Optional[Path],
                        export_dir: Path) -> None:
    """lit_model.pth (full, unsharded), model_config.json and the tokenizer files: what generate/base.py loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathers FSDP shards; with cpu_offload only rank 0 receives the full tensors
    state_dict = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fabric.global_rank == 0:
        save_model_dir(state_dict, config, tokenizer_dir, export_dir)
        fabric.print(f"Saved the final weights for generate/base.py to {export_dir}")
    fabric.barrier()


# ---- arguments ---------------------------------------------------------------------------------------------------


def resolve_devices(devices: str, accelerator: str) -> int:
    if str(devices) != "auto":
        return int(devices)
    use_cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    return torch.cuda.device_count() if use_cuda else 1


def check_args(args: SimpleNamespace) -> None:
    hints = typing.get_type_hints(setup)
    for name in ("strategy", "precision", "accelerator"):
        allowed = typing.get_args(hints[name])
        if getattr(args, name) not in allowed:
            raise ValueError(f"--{name} {getattr(args, name)!r}: expected one of {', '.join(allowed)}")
    positive = ["global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_iters",
                "save_interval", "num_nodes"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_tokens", "max_time", "epochs", "seq_len"):  # none of them may make an empty run
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if str(args.devices) != "auto" and not (str(args.devices).isdigit() and int(args.devices) >= 1):
        raise ValueError(f"--devices must be auto or a number of at least 1, got {args.devices!r}")
    if args.grad_clip <= 0:
        raise ValueError(f"--grad_clip must be positive, got {args.grad_clip}")
    if not 0 <= args.min_lr <= args.learning_rate:
        raise ValueError(f"--min_lr {args.min_lr} must be in [0, --learning_rate {args.learning_rate}]")
    parse_data_mix(args.train_data_mix)


def recipe(description: str, **defaults) -> Callable:
    """`setup` with other defaults, for utils.cli: a recipe script is this loop with its own defaults."""
    signature = inspect.signature(setup)
    unknown = sorted(set(defaults) - set(signature.parameters))
    if unknown:
        raise TypeError(f"setup() has no parameters {unknown}")

    @functools.wraps(setup)
    def recipe_setup(**kwargs) -> Fabric:
        return setup(**kwargs)

    recipe_setup.__signature__ = signature.replace(parameters=[
        parameter.replace(default=defaults.get(name, parameter.default))
        for name, parameter in signature.parameters.items()
    ])
    recipe_setup.__doc__ = description + "\n\nArgs:" + inspect.getdoc(setup).split("Args:", 1)[1]
    return recipe_setup


def demo(data_dir: Path = Path("data/demo"), out_dir: Path = Path("out/demo"), max_steps: int = DEMO["max_steps"],
         eval_interval: int = DEMO["eval_interval"], eval_iters: int = DEMO["eval_iters"]) -> None:
    """The demo, `python pretrain/tinyllama.py --demo`: build the corpus of prepare_data/prepare_demo.py and its
    tokenizer if missing, train the 'demo' model of model.py on the CPU with this loop (DEMO's settings), print the
    validation loss and a sample.

    Args:
        data_dir: the demo corpus (built here if missing)
        out_dir: checkpoints, logs and the final weights; running the demo again continues from them
        max_steps: optimizer steps of 8 sequences of 256 tokens
        eval_interval: steps between validations
        eval_iters: validation micro-batches
    """
    from generate.base import generate
    from prepare_data.prepare_demo import prepare_demo

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    prepare_demo(data_dir)  # returns at once if the corpus is complete
    fabric = setup(**{**DEMO, "train_data_dir": data_dir / "train", "val_data_dir": data_dir / "validation",
                      "tokenizer_dir": data_dir, "out_dir": out_dir, "max_steps": max_steps,
                      "eval_interval": eval_interval, "eval_iters": eval_iters})
    if fabric.global_rank == 0:
        final = out_dir / "final"
        tokenizer = Tokenizer(final)
        model = load_model(final)
        torch.manual_seed(DEMO["seed"])
        prompt = tokenizer.encode(DEMO_PROMPT, bos=tokenizer.bos_id is not None)
        output = generate(model, prompt, max_new_tokens=100, temperature=0.8, top_k=50, eos_id=tokenizer.eos_id)
        print(f"\nSample from {final}:\n{tokenizer.decode(output)}\n")
        print(f"More: python generate/base.py --checkpoint_dir {final} --prompt 'import os'")


if __name__ == "__main__":
    # `--demo` runs the demo (its own few flags), anything else is a pretraining run
    if "--demo" in sys.argv[1:]:
        cli(demo, [arg for arg in sys.argv[1:] if arg != "--demo"])
    else:
        cli(setup)
