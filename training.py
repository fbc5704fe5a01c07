"""The training loop every recipe runs (pretraining, the AMD recipes, finetuning, Inheritune), as a library.

    fabric = launch_fabric(devices, num_nodes, accelerator, strategy, precision, out_dir, wandb_project)
    resume_path = find_resume_checkpoint(fabric, resume, out_dir)
    model = build_model(fabric, config, seed, initial_checkpoint_dir if resume_path is None else None, compile)
    optimizer = build_optimizer(fabric, model, ...)
    fit(fabric, model, optimizer, config, train_batches, val_batches, settings, hparams, resume_path)

A batch source (`BatchSource`) yields `(input_ids, targets)` micro-batches of this process, with -100 at target
positions that carry no loss, or `(input_ids, targets, document_ids)` for rows that pack several examples, each
attending only itself at positions restarting from 0 (training.packed_documents); packed shards
(packed_dataset.PackedBatches) and sft_batches.SFTBatches are batch sources. `fit` does the rest, in nanoGPT's
order: learning rate -> micro-steps (gradient accumulation, no gradient sync but on the last) -> clipping -> the one
host sync per step (non-finite loss or gradient, time limit) -> optimizer step -> logging -> validation -> atomic
checkpoint (only of finite weights and optimizer state). A checkpoint holds the parameters that train (all of them,
or only the adapters of a LoRA model, whose frozen weights come from its initial checkpoint), the optimizer, the step
and token counters, every rank's data position and RNG states, so a run resumed from it continues exactly as if it had
never stopped; `--resume auto` takes the newest one that loads, skipping broken ones with a warning.

The loss of a step is summed over its target tokens and divided by the count of target tokens of the whole step
(all micro-batches, all ranks), so it does not depend on how sequences fall into micro-batches or ranks; for packed
blocks, where every position is a target, it is the mean cross-entropy. The count is known before the first
backward: the step's micro-batches are fetched first, their target tokens counted on the host (they are still on
the CPU: no device sync) and all-reduced as one small device tensor.
"""

import importlib.util
import itertools
import math
import resource
import time
import typing
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Literal, Optional, Protocol, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from lightning_fabric.strategies import DDPStrategy, ModelParallelStrategy

from checkpoint import load_checkpoint, load_config, named_config, refuse_quantized, save_model_dir
from distillation import Teacher
from model import GPT, Block, Config, num_parameters
from training_state import (
    SaveFinal, checkpoint_path, last_checkpoint_hint, load_training_state, save_checkpoint, save_final_weights,
)
from utils import UserError, write_json

IGNORE_INDEX = -100  # targets that carry no loss (padding, prompts), as F.cross_entropy's default ignore_index
# Dense bf16 peak of one device, for MFU; other devices and precisions report tokens/s only
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
Schedule = Literal["cosine", "linear", "constant"]
Strategy = Literal["fsdp", "ddp"]
FsdpSharding = Literal["full", "hybrid", "grad_op"]
Precision = Literal["bf16-mixed", "bf16-true", "32-true"]
Accelerator = Literal["auto", "cpu", "cuda"]


class BatchSource(Protocol):
    """This process's micro-batches: `(input_ids, targets)`, both (micro_batch_size, T) int64 on the CPU, targets
    -100 where no loss is taken; or `(input_ids, targets, document_ids)`, document_ids (micro_batch_size, T) equal
    within each packed example (see packed_documents). `iter()` continues from the position of the last
    `load_state_dict` (or the start); `len()` is the number of micro-batches per process in one epoch, the same on
    every process."""

    pad_id: Optional[int]  # the input id of padding, which costs no FLOPs and is not counted as a token; None: none

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class TrainingSettings:
    """How long and how to train; what `fit` needs beyond the model, the optimizer and the data."""

    out_dir: Path
    global_batch_size: int  # sequences per optimizer step, over all processes
    micro_batch_size: int  # sequences per process and forward pass
    seq_len: Optional[int]  # tokens per sequence when fixed (packed blocks), which --max_tokens needs
    max_steps: Optional[int]
    max_tokens: Optional[int]
    epochs: Optional[int]
    max_time: Optional[float]  # seconds of training in this run, then save and stop
    learning_rate: float
    min_lr: float
    warmup_steps: int
    lr_schedule: Schedule
    grad_clip: float
    log_interval: int
    eval_interval: int
    eval_iters: int
    save_interval: int
    tokenizer_dir: Optional[Path]  # copied next to the final weights


@dataclass(frozen=True)
class MemoryOptions:
    """What trades computation or communication for memory (docs/pretraining.md says how much each saves)."""

    activation_checkpointing: bool = False  # each Block's activations recomputed in the backward, not kept
    fsdp_cpu_offload: bool = False  # FSDP2 keeps the parameters, gradients and optimizer state in CPU memory
    # full: parameters gathered for each Block's forward and backward and resharded between (ZeRO-3); grad_op: kept
    # gathered from the forward to the backward (ZeRO-2); hybrid: full within a node, replicated across nodes
    fsdp_sharding: FsdpSharding = "full"


# ---- setting up --------------------------------------------------------------------------------------------------


def launch_fabric(devices: str, num_nodes: int, accelerator: str, strategy: str, precision: str, out_dir: Path,
                  wandb_project: Optional[str], memory: MemoryOptions = MemoryOptions()) -> Fabric:
    """Fabric with FSDP2 (every Block sharded, as `memory` says) or DDP over devices x num_nodes processes, and the
    loggers; starts the other local processes (unless torchrun or SLURM did), each of which runs the calling script.
    A single process uses neither, unless it offloads to the CPU (FSDP2 over one process)."""
    if accelerator in ("auto", "cuda") and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    n_local = resolve_devices(devices, accelerator)
    world_size = n_local * num_nodes
    if world_size == 1 and not memory.fsdp_cpu_offload:
        fabric_strategy = "auto"
    elif strategy == "fsdp":
        fabric_strategy = ModelParallelStrategy(
            parallelize_fn=partial(shard_blocks, memory=memory, num_nodes=num_nodes), data_parallel_size=world_size,
            tensor_parallel_size=1,
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
    fabric.launch()
    return fabric


def logged_metrics(out_dir: Path) -> Dict[int, Dict[str, float]]:
    """{step: {metric: value}} from the CSV logs of every run that wrote to out_dir (a resumed run has several
    versions), the later run's value where they overlap."""
    import csv

    rows: Dict[int, Dict[str, float]] = {}
    versions = sorted((out_dir / "logs").glob("version_*"), key=lambda path: int(path.name.split("_")[1]))
    for version in versions:
        if not (version / "metrics.csv").is_file():
            continue
        with open(version / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(row["step"]), {}).update(
                    {key: float(value) for key, value in row.items() if value and key != "step"})
    return dict(sorted(rows.items()))


def resolve_devices(devices: str, accelerator: str) -> int:
    if str(devices) != "auto":
        return int(devices)
    use_cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    return torch.cuda.device_count() if use_cuda else 1


def shard_blocks(model: GPT, device_mesh, memory: MemoryOptions = MemoryOptions(), num_nodes: int = 1) -> GPT:
    """FSDP2: every Block is one all-gather unit, the root (embedding, final norm, head) another, sharded over every
    process (over each node's with hybrid sharding, whose 2-D mesh replicates across the nodes), with the offload
    and resharding of `memory`. bf16-mixed stays Fabric's autocast over fp32 parameters, as with DDP: the same
    numerics whatever the strategy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = device_mesh["data_parallel"]
    if memory.fsdp_sharding == "hybrid":
        mesh = init_device_mesh(mesh.device_type, (num_nodes, mesh.size() // num_nodes),
                                mesh_dim_names=("replicate", "shard"))
    # pinned host memory speeds the copies to an accelerator; pinning needs one, so a CPU mesh pins nothing
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if memory.fsdp_cpu_offload else OffloadPolicy()
    settings = dict(mesh=mesh, reshard_after_forward=memory.fsdp_sharding != "grad_op", offload_policy=offload)
    for block in model.transformer.h:
        fully_shard(block, **settings)
    fully_shard(model, **settings)
    return model


def model_config(model_name: Optional[str], initial_checkpoint_dir: Optional[Path]) -> Config:
    """The config of `initial_checkpoint_dir` when given (`model_name`, if given too, must be its name), else the
    named config."""
    if initial_checkpoint_dir is None:
        if model_name is None:
            raise UserError("Give --model_name (a config of model.py) or --initial_checkpoint_dir")
        return named_config(model_name)
    refuse_quantized(initial_checkpoint_dir, "--initial_checkpoint_dir", "training")
    config = load_config(initial_checkpoint_dir)
    if not config.name:  # a converted model that matches no named config: the logs call it by its directory
        directory = Path(initial_checkpoint_dir).resolve()
        config = replace(config, name=directory.parent.name if directory.name == "final" else directory.name)
    if model_name is not None and config.name != model_name:
        raise UserError(f"{initial_checkpoint_dir}/model_config.json is a {config.name!r} model, but --model_name "
                        f"is {model_name!r}")
    return config


def interpolate_positions(config: Config, ratio: int) -> Config:
    """`config` with linear RoPE position interpolation by `ratio` (Chen et al. 2023; TinyLlama's code_tiny_LLaMA_1b
    divides positions by 4): position p takes the angles p / ratio, so `ratio` x the trained context maps onto the
    angles the weights were trained with. block_size grows in proportion (from the config's own ratio, so a config
    already at `ratio` is returned as it is); named as the named config it then equals (tiny_LLaMA_1b at 4 is
    code_tiny_LLaMA_1b), else by its name and ratio."""
    if ratio < 1:
        raise UserError(f"--rope_condense_ratio must be at least 1, got {ratio}")
    if ratio == config.rope_condense_ratio:
        return config
    extended = replace(config, block_size=config.block_size * ratio // config.rope_condense_ratio,
                       rope_condense_ratio=ratio)
    named = [name for name in Config.names() if Config.from_name(name) == replace(extended, name=name)]
    return replace(extended, name=named[0] if named else f"{config.name}-rope{ratio}")


def build_model(fabric: Fabric, config: Config, seed: int, initial_checkpoint_dir: Optional[Path],
                compile: bool, adapt: Optional[Callable[[GPT], None]] = None,
                activation_checkpointing: bool = False) -> nn.Module:
    """GPT(config) with model.py's init from `seed` (the same on every rank, whatever the strategy), or the weights
    of `initial_checkpoint_dir`; then changed by `adapt` if given (e.g. lora.add_lora, under the same seed), its
    Blocks checkpointed if asked (checkpoint_blocks), compiled if asked, and set up (sharded, wrapped) by Fabric."""
    fabric.seed_everything(seed)
    # built whole on the device by every rank, then sharded (ModelParallelStrategy does not place it itself)
    with fabric.init_module(empty_init=False), torch.device(fabric.device):
        model = GPT(config)
    if initial_checkpoint_dir is not None:
        load_checkpoint(model, Path(initial_checkpoint_dir) / "lit_model.pth")
    if adapt is not None:
        adapt(model)
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        model = torch.compile(model)
    return fabric.setup(model)


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing per Block, with the wrapper torch's FSDP provides (torch.utils.checkpoint,
    non-reentrant): the forward keeps each Block's input only, and the backward recomputes the Block's activations
    from it, one Block at a time. The same gradients (tested in float64) for about a third more computation; the
    wrapper's state-dict hooks keep the checkpoint keys unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


def build_optimizer(fabric: Fabric, model: nn.Module, learning_rate: float, weight_decay: float,
                    betas: Tuple[float, float], eps: float, decay_all_params: bool) -> torch.optim.Optimizer:
    check_optimizer_settings(weight_decay, betas, eps)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, weight_decay, decay_all_params), lr=learning_rate, betas=betas, eps=eps,
        fused=next(model.parameters()).device.type == "cuda",  # not with FSDP's CPU offload: the step runs there
    )
    return fabric.setup_optimizers(optimizer)


def parameter_groups(model: nn.Module, weight_decay: float, decay_all_params: bool) -> list:
    """The parameters that train (requires_grad), with weight decay on matrices only: not on norms, biases or
    embeddings (unless decay_all_params, as TinyLlama)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = param.ndim >= 2 and not isinstance(module, nn.Embedding)
            (decay if decay_all_params or is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per process and step, so that all processes together make exactly one global batch."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        hint = (f"choose a --micro_batch_size that divides {global_batch_size // world_size}"
                if global_batch_size % world_size == 0 else "it must be a multiple of the number of processes")
        raise UserError(f"--global_batch_size {global_batch_size} is not a multiple of --micro_batch_size "
                        f"{micro_batch_size} x {world_size} processes (devices x num_nodes) = {per_step}: {hint}")
    return global_batch_size // per_step


def preflight(settings: TrainingSettings, accelerator: str, strategy: str, precision: str, devices: str,
              num_nodes: int, weight_decay: float, betas: Tuple[float, float], eps: float,
              memory: MemoryOptions = MemoryOptions()) -> None:
    """Every check of a recipe's flags that needs no process, run by each recipe before it launches them, so that a
    bad flag fails at once with one line rather than in every process after the start-up."""
    for name, value, kind in (("accelerator", accelerator, Accelerator), ("strategy", strategy, Strategy),
                              ("precision", precision, Precision), ("lr_schedule", settings.lr_schedule, Schedule),
                              ("fsdp_sharding", memory.fsdp_sharding, FsdpSharding)):
        if value not in typing.get_args(kind):  # the CLI checks its choices itself; calls from Python do not
            raise UserError(f"--{name} {value!r}: expected one of {', '.join(typing.get_args(kind))}")
    fsdp_only = ["--fsdp_cpu_offload"] * memory.fsdp_cpu_offload + [f"--fsdp_sharding {memory.fsdp_sharding}"] * (
        memory.fsdp_sharding != "full")
    if fsdp_only and strategy != "fsdp":
        raise UserError(f"{fsdp_only[0]} needs --strategy fsdp, got --strategy {strategy}")
    if memory.fsdp_sharding == "hybrid" and num_nodes < 2:
        raise UserError(f"--fsdp_sharding hybrid shards within a node and replicates across nodes: it needs "
                        f"--num_nodes of at least 2, got {num_nodes} (on one node, use full)")
    check_settings(settings)
    check_optimizer_settings(weight_decay, betas, eps)
    if num_nodes < 1:
        raise UserError(f"--num_nodes must be at least 1, got {num_nodes}")
    if str(devices) != "auto" and not (str(devices).isdigit() and int(devices) >= 1):
        raise UserError(f"--devices must be auto or a number of at least 1, got {devices!r}")
    gradient_accumulation_steps(settings.global_batch_size, settings.micro_batch_size,
                                resolve_devices(devices, accelerator) * num_nodes)


def check_optimizer_settings(weight_decay: float, betas: Tuple[float, float], eps: float) -> None:
    """Refuse AdamW settings that make inf or NaN weights (eps 0 divides 0 by 0 where a gradient is 0), naming the
    flag. The comparisons are written so that NaN fails them."""
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"--weight_decay must be a finite number of at least 0, got {weight_decay}")
    for name, beta in zip(("beta1", "beta2"), betas):
        if not 0 <= beta < 1:
            raise UserError(f"--{name} must be in [0, 1), got {beta}")
    if not (math.isfinite(eps) and eps > 0):
        raise UserError(f"--eps must be a finite positive number, got {eps}")


def check_settings(settings: TrainingSettings) -> None:
    """Refuse settings that cannot make a run, naming the flag, before anything starts."""
    for name in ("learning_rate", "min_lr", "grad_clip", "max_time"):  # NaN would pass every comparison below
        value = getattr(settings, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_iters",
                 "save_interval"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(settings, name)}")
    for name in ("max_steps", "max_tokens", "max_time", "epochs", "seq_len"):  # none of them may make an empty run
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if settings.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be at least 0, got {settings.warmup_steps}")
    if settings.grad_clip <= 0:
        raise UserError(f"--grad_clip must be positive, got {settings.grad_clip}")
    if not 0 <= settings.min_lr <= settings.learning_rate:
        raise UserError(f"--min_lr {settings.min_lr} must be in [0, --learning_rate {settings.learning_rate}]")


def run_length(fabric: Fabric, settings: TrainingSettings, train_data: BatchSource, accumulation: int) -> int:
    """Steps of this run: the first of max_steps, max_tokens and epochs that is reached."""
    limits = []
    if settings.max_steps is not None:
        limits.append(settings.max_steps)
    if settings.max_tokens is not None:
        if settings.seq_len is None:
            raise UserError("--max_tokens needs sequences of a fixed length; give --max_steps or --epochs")
        tokens_per_step = settings.global_batch_size * settings.seq_len
        if settings.max_tokens < tokens_per_step:
            raise UserError(f"--max_tokens {settings.max_tokens:,} is less than one step of {tokens_per_step:,} "
                            f"tokens (--global_batch_size {settings.global_batch_size} sequences of "
                            f"{settings.seq_len} tokens): it would train nothing")
        limits.append(settings.max_tokens // tokens_per_step)
    if settings.epochs is not None:
        # every process reads len(train_data) micro-batches per epoch, `accumulation` of them per step: floor(floor(
        # n / P) / m) / a) = floor(n / G) steps of the n sequences of an epoch stay within it
        steps_per_epoch = len(train_data) // accumulation
        if steps_per_epoch == 0:
            raise UserError(f"One epoch of the training data ({len(train_data)} micro-batches of "
                            f"{settings.micro_batch_size} per process) makes no full global batch of "
                            f"{settings.global_batch_size}")
        left_out = len(train_data) - steps_per_epoch * accumulation
        fabric.print(f"One epoch: {steps_per_epoch:,} steps of {settings.global_batch_size} sequences; the last "
                     f"{left_out} micro-batches per process make no full global batch and start the next epoch")
        limits.append(settings.epochs * steps_per_epoch)
    if not limits:
        raise UserError("Give at least one of --max_steps, --max_tokens and --epochs")
    return min(limits)


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What `fit` derived from its arguments, for the loop."""

    accumulation: int
    max_steps: int
    eval_batches: int
    flops_per_token: int
    peak_flops: Optional[float]


def fit(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config,
        train_data: BatchSource, val_data: Optional[BatchSource], settings: TrainingSettings, hparams: dict,
        resume_path: Optional[Path] = None, save_final: Optional[SaveFinal] = None,
        teacher: Optional[Teacher] = None) -> int:
    """Train to the end of the run (or `max_time`), then write the final weights to out_dir/final when the run is
    complete: by `save_final(full state dict, out_dir/final)` on rank 0 if given (e.g. LoRA's merged weights), else
    checkpoint.save_model_dir (lit_model.pth, model_config.json and the tokenizer of `settings.tokenizer_dir`).
    `hparams` are written to out_dir/hyperparameters.json and into every checkpoint. Returns the step reached.
    With a `teacher` (distillation.py), the training loss mixes the data loss with the divergence from its
    distribution; validation stays the data loss."""
    check_settings(settings)
    out_dir = Path(settings.out_dir)
    accumulation = gradient_accumulation_steps(settings.global_batch_size, settings.micro_batch_size,
                                               fabric.world_size)
    max_steps = run_length(fabric, settings, train_data, accumulation)
    eval_batches = 0 if val_data is None else eval_batch_count(fabric, val_data, settings.eval_iters)
    n_params = num_parameters(model)
    n_trained = sum(param.numel() for param in model.parameters() if param.requires_grad)
    flops_per_token = training_flops_per_token(config, n_params, settings.seq_len or config.block_size)
    device_name = torch.cuda.get_device_name(fabric.device) if fabric.device.type == "cuda" else None
    run = Run(accumulation, max_steps, eval_batches, flops_per_token,
              peak_flops(device_name, fabric.strategy.precision.precision))
    trained = "" if n_trained == n_params else f" ({n_trained:,} trained)"
    fabric.print(f"{config.name}: {n_params:,} parameters{trained}, {flops_per_token / 1e9:.3f} GFLOPs per token; "
                 f"{fabric.world_size} processes x {settings.micro_batch_size} sequences x {accumulation} "
                 f"accumulation = {settings.global_batch_size} sequences per step; {max_steps:,} steps")

    state = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0, "target_tokens": 0}
    if resume_path is not None:
        fabric.print(f"Resuming from {resume_path}")
        load_training_state(fabric, resume_path, state, train_data, config)
    elif fabric.global_rank == 0:
        write_json(out_dir / "hyperparameters.json", hparams)
    try:
        train(fabric, settings, run, state, train_data, val_data, hparams, config, teacher)
    finally:
        for logger in fabric.loggers:
            logger.finalize("success")
    final = out_dir / "final"
    if state["step"] < max_steps:  # stopped by --max_time: unfinished weights must not pass for the final ones
        earlier = f" (the {final} there now is from an earlier run)" if final.exists() else ""
        fabric.print(f"Stopped at step {state['step']} of {max_steps} (--max_time {settings.max_time} s): the run is "
                     f"in {checkpoint_path(out_dir, state['step'])}. Continue it with the same command and --resume "
                     f"auto; the final weights go to {final} when it reaches step {max_steps}{earlier}.")
    else:
        save_final_weights(fabric, model, final, save_final or (
            lambda state_dict, directory: save_model_dir(state_dict, config, settings.tokenizer_dir, directory)))
    return state["step"]


def train(fabric: Fabric, settings: TrainingSettings, run: Run, state: dict, train_data: BatchSource,
          val_data: Optional[BatchSource], hparams: dict, config: Config, teacher: Optional[Teacher] = None) -> None:
    model, optimizer = state["model"], state["optimizer"]
    out_dir = Path(settings.out_dir)
    val_losses = {}
    if val_data is not None and state["step"] == 0:
        val_losses[0] = validate_and_log(fabric, model, val_data, run.eval_batches, step=0)

    train_iterator = iter(train_data)
    # on the device, read at log intervals and checkpoints only: [input tokens, target tokens] since the start, and
    # [input tokens, target tokens, this rank's summed loss] since the last log (the counts are over all ranks)
    totals = torch.tensor([state["tokens"], state["target_tokens"]], dtype=torch.int64, device=fabric.device)
    interval = torch.zeros(3, dtype=torch.float64, device=fabric.device)
    start = log_start = time.perf_counter()
    start_step = state["step"]
    # step N + 1 -> its loss, for each checkpoint N: computed with N's weights, it tells whether they are sane
    step_losses: Dict[int, float] = {}
    while state["step"] < run.max_steps:
        lr = get_lr(state["step"], settings.learning_rate, settings.min_lr, settings.warmup_steps, run.max_steps,
                    settings.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [next(train_iterator) for _ in range(run.accumulation)]
        counts = fabric.all_reduce(token_counts(micro_batches, train_data.pad_id, fabric.device), reduce_op="sum")
        # each rank's gradients are averaged over the ranks: x world_size makes them sum(losses) / all targets
        scale = fabric.world_size / counts[1].clamp(min=1)
        step_loss = accumulate_gradients(fabric, model, micro_batches, scale, teacher)
        grad_norm = clip_gradients(fabric, model, optimizer, settings.grad_clip)
        out_of_time = settings.max_time is not None and time.perf_counter() - start > settings.max_time
        # the one host sync per step: every rank learns whether any rank's loss is bad or any rank is out of time
        non_finite, out_of_time, grad_norm, loss = step_checks(fabric, step_loss, grad_norm, scale, out_of_time)
        if state["step"] == start_step or state["step"] % settings.save_interval == 0:  # a checkpoint's weights
            step_losses[state["step"] + 1] = loss
        if non_finite:
            raise divergence_error(state["step"] + 1, step_loss, grad_norm, out_dir, step_losses, config.vocab_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        totals += counts
        interval += torch.cat([counts.double(), step_loss.view(1)])
        step = state["step"]

        if step % settings.log_interval == 0 or step == run.max_steps or out_of_time:
            state["tokens"], state["target_tokens"] = totals.tolist()
            log_step(fabric, run, state, interval, lr, grad_norm, log_start, start, start_step)
            interval.zero_()
            log_start = time.perf_counter()
        pause = time.perf_counter()
        if val_data is not None and (step % settings.eval_interval == 0 or step == run.max_steps or out_of_time):
            val_losses[step] = validate_and_log(fabric, model, val_data, run.eval_batches, step)
        if step % settings.save_interval == 0 or step == run.max_steps or out_of_time:
            state["tokens"], state["target_tokens"] = totals.tolist()
            save_checkpoint(fabric, out_dir, state, train_data, hparams, config, step_losses)
        log_start += time.perf_counter() - pause  # tokens/s counts training only, not validation or checkpoints
        if out_of_time:
            break
    if val_data is not None:
        report_validation(fabric, model, val_data, run.eval_batches, state["step"], val_losses)


def validate_and_log(fabric: Fabric, model: nn.Module, val_data: BatchSource, eval_batches: int, step: int) -> float:
    """The validation loss of the weights of `step`, printed and logged."""
    val_loss = validate(fabric, model, val_data, eval_batches)
    fabric.print(f"step {step}: validation loss {val_loss:.4f}")
    fabric.log_dict({"val_loss": val_loss}, step=step)
    return val_loss


def get_lr(step: int, learning_rate: float, min_lr: float, warmup_steps: int, max_steps: int,
           schedule: Schedule = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from learning_rate / warmup_steps, then
    cosine or linear down to min_lr at max_steps (flat after), or constant."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "constant":
        return learning_rate
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    if schedule == "linear":
        return learning_rate - progress * (learning_rate - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def token_counts(micro_batches: list, pad_id: Optional[int], device: torch.device) -> torch.Tensor:
    """[non-padding input tokens, target tokens] of a step's micro-batches, counted on the host (they are CPU
    tensors: no device sync), as an int64 tensor on `device` for the all-reduce."""
    inputs = sum(input_ids.numel() if pad_id is None else int((input_ids != pad_id).sum())
                 for input_ids, *_ in micro_batches)
    targets = sum(int((targets != IGNORE_INDEX).sum()) for _, targets, *_ in micro_batches)
    return torch.tensor([inputs, targets], dtype=torch.int64).to(device, non_blocking=True)


def accumulate_gradients(fabric: Fabric, model: nn.Module, micro_batches: list, scale: torch.Tensor,
                         teacher: Optional[Teacher] = None) -> torch.Tensor:
    """Forward, and backward of the loss x `scale`, of each micro-batch of a step, syncing the gradients between
    ranks on the last only; with a teacher, its logits of the same micro-batch (no gradients) enter the loss.
    Returns this rank's loss summed over the step's target tokens: float64 on the device, not read (no host sync)."""
    step_loss = torch.zeros((), dtype=torch.float64, device=fabric.device)
    for micro_step, micro_batch in enumerate(micro_batches):
        targets = to_device(micro_batch[1], fabric.device)
        with fabric.no_backward_sync(model, enabled=micro_step < len(micro_batches) - 1):
            logits = forward(model, micro_batch, fabric.device)
            if teacher is None:
                loss = loss_sum(logits, targets)
            else:
                with torch.no_grad(), fabric.autocast():  # bf16-mixed: autocast as the student's forward
                    teacher_logits = forward(teacher.model, micro_batch, fabric.device)
                loss = teacher.loss_sum(logits, teacher_logits, targets)
            fabric.backward(loss * scale)
        step_loss += loss.detach()
    return step_loss


def forward(model: nn.Module, micro_batch: tuple, device: torch.device) -> torch.Tensor:
    """The logits (B, T, vocab) of a micro-batch `(input_ids, targets)`, or `(input_ids, targets, document_ids)` of
    packed examples (block-diagonal causal attention, positions restarting at each example)."""
    input_ids = to_device(micro_batch[0], device)
    if len(micro_batch) == 2:
        return model(input_ids)
    input_pos, attention_mask = packed_documents(to_device(micro_batch[2], device))
    return model(input_ids, input_pos, attention_mask)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the target tokens (targets -100 carry none); logits (B, T, V), targets (B, T)."""
    # log-softmax in fp32: bf16 log-probabilities keep only about 3 significant digits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def clip_gradients(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer,
                   max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of `max_norm`, leaving inf and NaN for step_checks to find. Returns the
    norm before clipping, a plain tensor on the device (not read: no host sync)."""
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
    return grad_norm.to(fabric.device)  # computed on the CPU where FSDP offloads the gradients there


def step_checks(fabric: Fabric, step_loss: torch.Tensor, grad_norm: torch.Tensor, scale: torch.Tensor,
                out_of_time: bool) -> Tuple[bool, bool, float, float]:
    """The one host sync per step, so that every rank learns the same: whether any rank's loss or gradient is not
    finite, whether any rank is out of time, the gradient norm (the same on every rank) and the highest rank's loss
    per target, as if each rank had its share (1 rank: the loss)."""
    checks = torch.stack([
        (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).double(),
        torch.full_like(step_loss, float(out_of_time)),  # a fill, not a host-to-device copy
        grad_norm.double(),
        step_loss * scale,
    ])
    non_finite, out_of_time, grad_norm, loss = fabric.all_reduce(checks, reduce_op="max").tolist()
    return bool(non_finite), bool(out_of_time), grad_norm, loss


def divergence_error(step: int, step_loss: torch.Tensor, grad_norm: float, out_dir: Path,
                     step_losses: Dict[int, float], vocab_size: int) -> FloatingPointError:
    """The error of a step whose loss or gradient is not finite, raised before its optimizer step, naming the
    checkpoint to resume from (see last_checkpoint_hint)."""
    return FloatingPointError(
        f"Non-finite loss or gradient at step {step} (this rank's summed loss {step_loss.item()}, gradient norm "
        f"{grad_norm}): stopping before the optimizer step. " + last_checkpoint_hint(out_dir, step_losses, vocab_size)
    )


def log_step(fabric: Fabric, run: Run, state: dict, interval: torch.Tensor, lr: float, grad_norm: float,
             log_start: float, start: float, start_step: int) -> None:
    """Print and log the loss and throughput of the steps since the last log (`interval`, timed from `log_start`)
    and the token counters of `state`; the time to go is estimated from the steps since `start_step` at `start`."""
    step = state["step"]
    loss_total = fabric.all_reduce(interval[2], reduce_op="sum")
    tokens, target_tokens, loss_total = torch.cat([interval[:2], loss_total.view(1)]).tolist()
    tokens_per_sec = tokens / (time.perf_counter() - log_start)
    metrics = {"loss": loss_total / max(target_tokens, 1), "learning_rate": lr, "grad_norm": grad_norm,
               "tokens": state["tokens"], "target_tokens": state["target_tokens"],
               "tokens_per_sec": tokens_per_sec, "peak_memory_gb": peak_memory_gb(fabric.device)}
    mfu = ""
    if run.peak_flops is not None:
        metrics["mfu"] = tokens_per_sec * run.flops_per_token / (run.peak_flops * fabric.world_size)
        mfu = f", MFU {metrics['mfu']:.1%}"
    fabric.log_dict(metrics, step=step)
    remaining = (time.perf_counter() - start) / (step - start_step) * (run.max_steps - step)
    fabric.print(f"step {step}/{run.max_steps}: loss {metrics['loss']:.4f}, lr {lr:.2e}, grad norm "
                 f"{grad_norm:.3f}, {tokens_per_sec:,.0f} tokens/s{mfu}, {state['tokens']:,} tokens, "
                 f"{metrics['peak_memory_gb']:.2f} GB peak, about {remaining / 3600:.2f} h to go")


def report_validation(fabric: Fabric, model: nn.Module, val_data: BatchSource, eval_batches: int, step: int,
                      val_losses: Dict[int, float]) -> None:
    """At the end of a run: the validation loss of the weights of `step` if no validation gave it (e.g. a run
    resumed from its last checkpoint), and the initial and final ones when the run validated both."""
    if step not in val_losses:
        val_losses[step] = validate(fabric, model, val_data, eval_batches)
        fabric.print(f"step {step}: validation loss {val_losses[step]:.4f}")
    if len(val_losses) > 1 and 0 in val_losses:
        fabric.print(f"validation loss: initial {val_losses[0]:.4f}, final {val_losses[max(val_losses)]:.4f}")


def eval_batch_count(fabric: Fabric, val_data: BatchSource, eval_iters: int) -> int:
    """Micro-batches per process and validation: eval_iters, or fewer if not every process has that many."""
    if len(val_data) == 0:
        raise UserError(f"The validation data make no micro-batch on each of the {fabric.world_size} processes")
    return min(eval_iters, len(val_data))


def validate(fabric: Fabric, model: nn.Module, val_data: BatchSource, eval_batches: int) -> float:
    """Loss over the target tokens of the first `eval_batches` micro-batches of every process."""
    model.eval()
    totals = summed_loss(model, val_data, eval_batches, fabric.device)
    model.train()
    loss_total, target_tokens = fabric.all_reduce(totals, reduce_op="sum").tolist()
    return loss_total / max(target_tokens, 1)


@torch.no_grad()
def summed_loss(model: nn.Module, batches: Iterable[tuple], n_batches: Optional[int],
                device: torch.device) -> torch.Tensor:
    """[cross-entropy summed over the target tokens, target tokens] of the first `n_batches` micro-batches of
    `batches` (a fresh iteration; None: all of them), float64 on `device`: no host sync."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for micro_batch in itertools.islice(batches, n_batches):
        targets = to_device(micro_batch[1], device)
        loss = loss_sum(forward(model, micro_batch, device), targets)
        totals += torch.stack([loss.double(), (targets != IGNORE_INDEX).sum().double()])
    return totals


# ---- measuring ---------------------------------------------------------------------------------------------------


def training_flops_per_token(config: Config, n_params: int, seq_len: int) -> int:
    """6 x the parameters of every matmul (forward + backward) + 6 x n_layer x n_embd x seq_len (causal attention
    scores and values: 2 matmuls of n_embd per query-key pair, half the pairs, x3 for the backward). The embedding
    is a lookup, not a matmul, and is left out, unless it is also the head (tie_embeddings), counted once in
    n_params, whose matmul costs as an untied head's."""
    lookup_only = 0 if config.tie_embeddings else config.padded_vocab_size * config.n_embd
    return 6 * (n_params - lookup_only) + 6 * config.n_layer * config.n_embd * seq_len


def peak_flops(device_name: Optional[str], precision: str) -> Optional[float]:
    """Dense bf16 peak of a known GPU (by name); None for others, and for fp32 (whose peak is another)."""
    if device_name is None or not precision.startswith("bf16"):
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # the process's peak RSS, in KB on Linux


def packed_documents(document_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """input_pos (B, T) and attention_mask (B, T, T) for rows that pack several documents, for a forward without
    a KV cache: each token attends the earlier tokens of its own document only (block-diagonal causal), at
    positions that restart at 0, so each document gets exactly what it would get alone.

    document_ids: (B, T) integers, equal within a document (e.g. the running count of BOS tokens).
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (B, T), got shape {tuple(document_ids.shape)}")
    mask = (document_ids[:, :, None] == document_ids[:, None, :]).tril()
    # a token's position is the number of earlier tokens of its document
    return mask.sum(-1) - 1, mask
