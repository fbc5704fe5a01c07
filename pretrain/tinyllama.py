"""Pretrain TinyLlama-1.1B with its recipe: Lightning Fabric, FSDP or DDP, exact resume.

    python pretrain/tinyllama.py          # TinyLlama-1.1B on SlimPajama + StarCoder, on every local GPU
    python pretrain/demo.py               # a first run: a tiny model on a corpus built here, on the CPU

The defaults of `setup` are TinyLlama's recipe (its README): 1024 sequences of 2048 tokens per step, AdamW with
lr 4e-4 -> 4e-5 cosine after 2000 warmup steps, 1,430,512 steps (3T tokens). The loop is training.fit;
pretrain/amd_llama_135m.py and finetune/amd_llama_135m_code.py are this script with other defaults.

The global batch is the global batch: micro-batch x gradient accumulation x devices x nodes, whatever the number
of devices and nodes.
"""

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distillation import Divergence, build_teacher, check_teacher_flags
from packed_dataset import parse_data_mix, training_batches, validation_batches
from tokenizer import Tokenizer, has_tokenizer
from training import (
    Accelerator, FsdpSharding, MemoryOptions, Precision, Schedule, Strategy, TrainingSettings, build_model,
    build_optimizer, fit, interpolate_positions, launch_fabric, model_config, preflight,
)
from training_state import find_resume_checkpoint
from utils import UserError, cli

DEFAULT_MODEL = "tiny_LLaMA_1b"


def setup(
    model_name: Optional[str] = None,
    out_dir: Path = Path("out/tinyllama_1b"),
    train_data_dir: Path = Path("data/slim_star_combined"),
    val_data_dir: Optional[Path] = Path("data/slim_star_combined"),
    train_data_mix: str = "train_slimpajama:0.693584,train_starcoder:0.306416",
    tokenizer_dir: Optional[Path] = Path("checkpoints/TinyLlama-1.1B"),
    initial_checkpoint_dir: Optional[Path] = None,
    devices: str = "auto",
    num_nodes: int = 1,
    accelerator: Accelerator = "auto",
    strategy: Strategy = "fsdp",
    precision: Precision = "bf16-mixed",
    compile: bool = False,
    activation_checkpointing: bool = False,
    fsdp_cpu_offload: bool = False,
    fsdp_sharding: FsdpSharding = "full",
    rope_condense_ratio: Optional[int] = None,
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
    lr_schedule: Schedule = "cosine",
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
    teacher_checkpoint_dir: Optional[Path] = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 1.0,
    kd_divergence: Divergence = "forward",
) -> int:
    """Pretrain a model on packed shards (TinyLlama's recipe by default). Returns the step reached.

    For a first run there is the demo, `python pretrain/demo.py`: it builds a small corpus and trains a tiny model
    on the CPU in minutes.

    The run stops at the first of max_steps, max_tokens and epochs, and the learning rate decays over exactly that
    many steps; max_time only stops it early, after a checkpoint to resume from. The final weights of a complete run
    go to out_dir/final (lit_model.pth, model_config.json and the tokenizer), for generate/base.py.

    Args:
        model_name: a config of model.py; default tiny_LLaMA_1b, or the config of initial_checkpoint_dir (which a
            given name must match)
        out_dir: checkpoints (step-N), logs and the final weights (final/, once the run is complete) go here
        train_data_dir: directory of the packed training shards
        val_data_dir: directory of the validation* shards; none: no validation
        train_data_mix: 'prefix:weight,...' (the files train_data_dir/prefix*, drawn with those probabilities) or
            'prefix,...' (weighted by their sizes)
        tokenizer_dir: its tokenizer is copied into out_dir/final (an initial checkpoint's own tokenizer wins); none:
            leave it out
        initial_checkpoint_dir: start from its weights and model_config.json (a fresh optimizer and schedule)
        devices: processes per node: auto (every local GPU, or 1 on the CPU) or a number
        num_nodes: number of nodes (see the README for multi-node launching)
        accelerator: auto, cpu or cuda
        strategy: fsdp (FSDP2, every Block sharded) or ddp; a single process uses neither
        precision: bf16-mixed, bf16-true or 32-true
        compile: wrap the model in torch.compile
        activation_checkpointing: recompute each Block's activations in the backward instead of keeping them
        fsdp_cpu_offload: keep the parameters, gradients and optimizer state in CPU memory (FSDP2, also on one
            device), with the optimizer step on the CPU
        fsdp_sharding: full (ZeRO-3), grad_op (parameters kept gathered from forward to backward, ZeRO-2) or hybrid
            (full within a node, replicated across nodes)
        rope_condense_ratio: linear RoPE position interpolation: positions divided by this ratio and block_size
            multiplied by it, to train beyond the model's context (4: 2048 -> 8192); none: the config's own
        resume: auto (the highest out_dir/step-N that loads, if any) or a checkpoint path
        seed: seed of the initial weights and the data order
        seq_len: tokens per sequence; none: the model's block_size
        global_batch_size: sequences per optimizer step, over all devices and nodes
        micro_batch_size: sequences per device and forward pass
        max_steps: optimizer steps
        max_tokens: training tokens
        max_time: seconds of training in this run, then save and stop (resume with --resume auto)
        epochs: epochs of the training data (one source only)
        learning_rate: peak learning rate, after the linear warmup
        min_lr: final learning rate of the cosine or linear decay
        warmup_steps: steps of linear warmup
        lr_schedule: after the warmup: cosine or linear down to min_lr, or constant
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
        teacher_checkpoint_dir: distil from this frozen model (distillation.py): its tokenizer must be the student's,
            its vocabulary the student's or an extension of it
        kd_alpha: with a teacher, the data loss's weight; the divergence from the teacher gets 1 - kd_alpha
        kd_temperature: the temperature of both distributions in the divergence (scaled by its square)
        kd_divergence: forward (KL(teacher || student)), reverse (KL(student || teacher)) or symmetric (their mean)
    """
    hparams = {name: str(value) if isinstance(value, Path) else value for name, value in locals().items()}
    settings = TrainingSettings(
        out_dir=Path(out_dir), global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        seq_len=seq_len, max_steps=max_steps, max_tokens=max_tokens, epochs=epochs, max_time=max_time,
        learning_rate=learning_rate, min_lr=min_lr, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
        grad_clip=grad_clip, log_interval=log_interval, eval_interval=eval_interval, eval_iters=eval_iters,
        save_interval=save_interval, tokenizer_dir=tokenizer_dir,
    )
    memory = MemoryOptions(activation_checkpointing, fsdp_cpu_offload, fsdp_sharding)
    # everything that can be checked is checked before processes are launched
    preflight(settings, accelerator, strategy, precision, devices, num_nodes, weight_decay, (beta1, beta2), eps,
              memory)
    parse_data_mix(train_data_mix)
    check_teacher_flags(teacher_checkpoint_dir, kd_alpha, kd_temperature)
    if rope_condense_ratio is not None and rope_condense_ratio < 1:
        raise UserError(f"--rope_condense_ratio must be at least 1, got {rope_condense_ratio}")

    fabric = launch_fabric(devices, num_nodes, accelerator, strategy, precision, settings.out_dir, wandb_project,
                           memory)
    config = model_config(model_name or (None if initial_checkpoint_dir else DEFAULT_MODEL), initial_checkpoint_dir)
    if rope_condense_ratio is not None:
        config = interpolate_positions(config, rope_condense_ratio)
    seq_len = seq_len or config.block_size
    if seq_len > config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {config.block_size} of {config.name!r}")
    if initial_checkpoint_dir is not None and has_tokenizer(initial_checkpoint_dir):
        # the weights' own tokenizer goes with them, whatever --tokenizer_dir says (its default is TinyLlama's)
        fabric.print(f"The final weights get the tokenizer of --initial_checkpoint_dir {initial_checkpoint_dir}")
        tokenizer_dir = initial_checkpoint_dir
    settings = replace(settings, seq_len=seq_len, tokenizer_dir=tokenizer_dir)
    if tokenizer_dir is not None:
        check_tokenizer(Path(tokenizer_dir), config.vocab_size, initial_checkpoint_dir, config.name)

    ranks = dict(num_processes=fabric.world_size, process_rank=fabric.global_rank)
    train_data = training_batches(Path(train_data_dir), train_data_mix, seq_len + 1, micro_batch_size, seed, **ranks)
    val_data = (None if val_data_dir is None
                else validation_batches(Path(val_data_dir), seq_len + 1, micro_batch_size, **ranks))
    if val_data is not None:
        fabric.print(f"--val_data_dir {val_data_dir}: {val_data.dataset.summary()}")
    for batches in (train_data, val_data):  # an id beyond the embedding would fail inside the first forward pass
        if batches is not None:
            batches.check_vocabulary(config.vocab_size, f"the model {config.name!r}")
    resume_path = find_resume_checkpoint(fabric, resume, settings.out_dir)
    model = build_model(fabric, config, seed, initial_checkpoint_dir if resume_path is None else None, compile,
                        activation_checkpointing=activation_checkpointing)
    optimizer = build_optimizer(fabric, model, learning_rate, weight_decay, (beta1, beta2), eps, decay_all_params)
    teacher = build_teacher(fabric, teacher_checkpoint_dir, kd_alpha, kd_temperature, kd_divergence, config, seq_len,
                            tokenizer_dir)
    return fit(fabric, model, optimizer, config, train_data, val_data, settings, hparams, resume_path,
               teacher=teacher)


def check_tokenizer(tokenizer_dir: Path, vocab_size: int, initial_checkpoint_dir: Optional[Path],
                    model_name: str) -> None:
    try:
        tokenizer = Tokenizer(tokenizer_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--tokenizer_dir: {error}. Its tokenizer is copied next to the final weights for "
                                f"generate/base.py; pass --tokenizer_dir none to leave it out") from None
    source = (str(Path(initial_checkpoint_dir) / "model_config.json") if initial_checkpoint_dir is not None
              else f"the {model_name!r} config of model.py")
    tokenizer.check_fits(vocab_size, source)


if __name__ == "__main__":
    cli(setup)
