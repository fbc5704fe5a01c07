"""Supervised finetuning (instruction tuning) with prompt masking: the loop of training.py over prepared SFT data.

    python prepare_data/prepare_sft.py --source_path data/guanaco --checkpoint_dir checkpoints/TinyLlama-1.1B \
        --chat_template guanaco --max_seq_length 528 --destination_path data/guanaco_sft
    python finetune/sft.py --initial_checkpoint_dir checkpoints/TinyLlama-1.1B --data_dir data/guanaco_sft \
        --out_dir out/tinyllama-chat
    python finetune/lora.py ...      # the same with LoRA adapters (lora.py), merged into out_dir/final at the end

The defaults are TinyLlama-Chat v0.1's recipe (RECIPE below, from TinyLlama's sft/script.sh: openassistant-guanaco,
5 epochs, lr 1e-5 constant after 5% warmup, 4 GPUs x 4 sequences, AdamW beta2 0.999, no weight decay), with two
differences: the loss is taken on the assistant turns only (TinyLlama's collator trained on the whole guanaco text),
and the vocabulary stays as it is (TinyLlama added a [PAD] token, making 32001 tokens: padding here is a masked id).

Each step's loss is summed over its target tokens and divided by the step's target-token count (training.py), so
it does not depend on how examples fall into micro-batches or devices. Examples are right-padded to the longest of
their micro-batch or, with --packing, packed into rows of block_size tokens where each example attends only itself,
at positions from 0 (training.packed_documents): the same loss, less padding. The data's chat template (recorded by
prepare_sft.py) is written into out_dir/final, so generate/chat.py, the evaluation and the converters use it.
"""

import sys
from functools import partial
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import TEMPLATE_FILE, ChatTemplate
from checkpoint import save_model_dir
from distillation import Divergence, build_teacher, check_teacher_flags
from hf import generation_config
from lora import ADAPTERS_FILE, CONFIG_FILE, LoRAConfig, add_lora, lora_state_dict, merge_lora
from model import Config
from sft_batches import SFTBatches, padding_id
from sft_data import SFTSplit, read_metadata
from shard_format import file_sha256
from training import (
    Accelerator, Precision, Schedule, Strategy, TrainingSettings, build_model, build_optimizer, fit, launch_fabric,
    model_config, preflight,
)
from training_state import find_resume_checkpoint
from tokenizer import Tokenizer, has_tokenizer
from utils import UserError, cli, read_json

# TinyLlama-Chat v0.1 (TinyLlama's sft/script.sh, a Hugging Face Trainer run)
RECIPE = dict(
    global_batch_size=16,  # 4 GPUs x per_device_train_batch_size 4, no gradient accumulation
    micro_batch_size=4,
    epochs=5,
    learning_rate=1e-5,
    lr_schedule="constant",
    warmup_steps=150,  # warmup_ratio 0.05 of the ~3,000 steps of 5 epochs of guanaco's 9,846 examples
    weight_decay=0.0,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    grad_clip=1.0,
    seed=42,  # its data_seed
    precision="bf16-mixed",  # it trained in fp32; autocast over fp32 weights gives about the same updates, faster
    eval_iters=128,  # eval_dataset_size 512 = 128 micro-batches of 4
)


def setup(
    initial_checkpoint_dir: Path = Path("checkpoints/TinyLlama-1.1B"),
    data_dir: Path = Path("data/guanaco_sft"),
    out_dir: Path = Path("out/tinyllama-chat"),
    chat_template_override: bool = False,
    packing: bool = False,
    lora_r: Optional[int] = None,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_targets: List[str] = ("q", "v"),
    devices: str = "auto",
    num_nodes: int = 1,
    accelerator: Accelerator = "auto",
    strategy: Strategy = "fsdp",
    precision: Precision = RECIPE["precision"],
    compile: bool = False,
    resume: Optional[str] = None,
    seed: int = RECIPE["seed"],
    global_batch_size: int = RECIPE["global_batch_size"],
    micro_batch_size: int = RECIPE["micro_batch_size"],
    epochs: Optional[int] = RECIPE["epochs"],
    max_steps: Optional[int] = None,
    max_time: Optional[float] = None,
    learning_rate: float = RECIPE["learning_rate"],
    min_lr: float = 0.0,
    warmup_steps: int = RECIPE["warmup_steps"],
    lr_schedule: Schedule = RECIPE["lr_schedule"],
    weight_decay: float = RECIPE["weight_decay"],
    beta1: float = RECIPE["beta1"],
    beta2: float = RECIPE["beta2"],
    eps: float = RECIPE["eps"],
    grad_clip: float = RECIPE["grad_clip"],
    log_interval: int = 10,
    eval_interval: int = 500,
    eval_iters: int = RECIPE["eval_iters"],
    save_interval: int = 500,
    wandb_project: Optional[str] = None,
    teacher_checkpoint_dir: Optional[Path] = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 1.0,
    kd_divergence: Divergence = "forward",
) -> int:
    """Finetune a checkpoint on prepared SFT data (full finetuning, or LoRA with --lora_r). Returns the step reached.

    The run stops at the first of epochs and max_steps; max_time only stops it early, after a checkpoint to resume
    from (--resume auto). A complete run writes out_dir/final: a normal checkpoint directory (merged weights with
    LoRA, the adapters beside them) with the tokenizer and the data's chat template.

    Args:
        initial_checkpoint_dir: the model to finetune (lit_model.pth, model_config.json, its tokenizer)
        data_dir: instruction data prepared by prepare_data/prepare_sft.py with this checkpoint's tokenizer
        out_dir: checkpoints (step-N), logs and the final weights (final/, once the run is complete) go here
        chat_template_override: train on data rendered with another chat template than the checkpoint's own; the
            data's template then replaces it in out_dir/final
        packing: pack several examples into each row of block_size tokens (each attends only itself)
        lora_r: rank of LoRA adapters on --lora_targets, which then train alone; none: full finetuning
        lora_alpha: LoRA scaling: updates are multiplied by lora_alpha / lora_r
        lora_dropout: dropout on the adapters' input
        lora_targets: the Linears adapted, among q, k, v (separately, within the fused qkv), proj (attention
            output), fc_1, fc_2, mlp_proj (Hugging Face: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
            down_proj)
        devices: processes per node: auto (every local GPU, or 1 on the CPU) or a number
        num_nodes: number of nodes
        accelerator: auto, cpu or cuda
        strategy: fsdp (FSDP2, every Block sharded) or ddp; a single process uses neither
        precision: bf16-mixed, bf16-true or 32-true
        compile: wrap the model in torch.compile
        resume: auto (the highest out_dir/step-N that loads, if any) or a checkpoint path
        seed: seed of the data order, of LoRA's initial adapters and of dropout
        global_batch_size: examples (rows of examples with --packing) per optimizer step, over all processes
        micro_batch_size: examples (rows with --packing) per process and forward pass
        epochs: epochs of the training examples
        max_steps: optimizer steps, if fewer than the epochs make
        max_time: seconds of training in this run, then save and stop (resume with --resume auto)
        learning_rate: learning rate after the linear warmup
        min_lr: final learning rate of a cosine or linear decay
        warmup_steps: steps of linear warmup
        lr_schedule: after the warmup: constant, or cosine or linear down to min_lr
        weight_decay: AdamW weight decay, on matrices only
        beta1: AdamW beta1
        beta2: AdamW beta2
        eps: AdamW eps
        grad_clip: maximum gradient norm
        log_interval: steps between progress lines and logged metrics
        eval_interval: steps between validations on the val split
        eval_iters: validation micro-batches per process
        save_interval: steps between checkpoints
        wandb_project: also log to this Weights & Biases project (pip install wandb)
        teacher_checkpoint_dir: distil from this frozen model (distillation.py) on the same target positions (the
            assistant turns): its tokenizer must be the checkpoint's, its vocabulary the same or an extension of it
        kd_alpha: with a teacher, the data loss's weight; the divergence from the teacher gets 1 - kd_alpha
        kd_temperature: the temperature of both distributions in the divergence (scaled by its square)
        kd_divergence: forward (KL(teacher || student)), reverse (KL(student || teacher)) or symmetric (their mean)
    """
    initial_checkpoint_dir, data_dir = Path(initial_checkpoint_dir), Path(data_dir)
    hparams = {name: str(value) if isinstance(value, Path) else value for name, value in locals().items()}
    settings = TrainingSettings(
        out_dir=Path(out_dir), global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        seq_len=None, max_steps=max_steps, max_tokens=None, epochs=epochs, max_time=max_time,
        learning_rate=learning_rate, min_lr=min_lr, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
        grad_clip=grad_clip, log_interval=log_interval, eval_interval=eval_interval, eval_iters=eval_iters,
        save_interval=save_interval, tokenizer_dir=initial_checkpoint_dir,
    )
    # everything that can be checked is checked before processes are launched, the flags first
    preflight(settings, accelerator, strategy, precision, devices, num_nodes, weight_decay, (beta1, beta2), eps)
    check_teacher_flags(teacher_checkpoint_dir, kd_alpha, kd_temperature)
    lora = None if lora_r is None else LoRAConfig(lora_r, lora_alpha, lora_dropout, tuple(lora_targets))
    metadata = read_metadata(data_dir)
    hparams["chat_template"] = metadata["chat_template"]  # in every checkpoint, as in out_dir/final
    config = model_config(None, initial_checkpoint_dir)
    check_data(metadata, data_dir, initial_checkpoint_dir, config, chat_template_override)
    pad_id = padding_id(config)

    fabric = launch_fabric(devices, num_nodes, accelerator, strategy, precision, settings.out_dir, wandb_project)
    ranks = dict(num_processes=fabric.world_size, process_rank=fabric.global_rank)
    packing_length = config.block_size if packing else None
    train_data = SFTBatches(SFTSplit(data_dir, "train"), micro_batch_size, pad_id, **ranks, seed=seed, train=True,
                            rows_per_step=global_batch_size, packing_length=packing_length)
    if len(train_data) == 0:
        raise UserError(f"--data_dir {data_dir}: {train_data.n_rows} training {train_data.unit} make no step of "
                        f"--global_batch_size {global_batch_size}: lower it or add data")
    val_data = SFTBatches(SFTSplit(data_dir, "val"), micro_batch_size, pad_id, **ranks, seed=seed, train=False,
                          packing_length=packing_length)
    if len(val_data) == 0:
        fabric.print(f"No validation: the val split of {data_dir} is empty")
        val_data = None
    resume_path = find_resume_checkpoint(fabric, resume, settings.out_dir)
    # the initial weights even when resuming: a LoRA checkpoint holds only the adapters
    model = build_model(fabric, config, seed, initial_checkpoint_dir, compile,
                        None if lora is None else partial(add_lora, config=lora))
    optimizer = build_optimizer(fabric, model, learning_rate, weight_decay, (beta1, beta2), eps, False)
    teacher = build_teacher(fabric, teacher_checkpoint_dir, kd_alpha, kd_temperature, kd_divergence, config,
                            config.block_size, initial_checkpoint_dir)
    save_final = partial(save_finetuned, config=config, tokenizer_dir=initial_checkpoint_dir,
                         chat_template=metadata["chat_template"], lora=lora)
    return fit(fabric, model, optimizer, config, train_data, val_data, settings, hparams, resume_path, save_final,
               teacher)


def check_data(metadata: dict, data_dir: Path, checkpoint_dir: Path, config: Config, template_override: bool) -> None:
    """Refuse data that the checkpoint cannot learn from: tokenized by another tokenizer, of ids beyond its
    vocabulary, of examples longer than its block size, or rendered with another chat template than its own."""
    tokenizer = metadata.get("tokenizer", {})
    if tokenizer.get("vocab_size", 0) > config.vocab_size:
        raise UserError(f"--data_dir {data_dir} was tokenized with a {tokenizer['vocab_size']}-token vocabulary, more "
                        f"than the vocab_size={config.vocab_size} of {checkpoint_dir}: prepare it with the "
                        f"checkpoint's tokenizer (prepare_sft.py --checkpoint_dir {checkpoint_dir})")
    own_tokenizer = checkpoint_dir / tokenizer.get("file", "")
    if own_tokenizer.is_file() and file_sha256(own_tokenizer) != tokenizer.get("sha256"):
        raise UserError(f"--data_dir {data_dir} was tokenized with another {tokenizer['file']} than the one of "
                        f"{checkpoint_dir}: prepare it with prepare_sft.py --checkpoint_dir {checkpoint_dir}")
    for split in ("train", "val"):
        examples = SFTSplit(data_dir, split)
        if len(examples) and int(examples.lengths().max()) - 1 > config.block_size:
            raise UserError(f"--data_dir {data_dir}: the {split} split has examples of up to "
                            f"{int(examples.lengths().max())} tokens, but the model of {checkpoint_dir} takes "
                            f"{config.block_size + 1} at most (block_size {config.block_size}, and the last token, "
                            f"which it only predicts): prepare it with --max_seq_length {config.block_size + 1}")
        if len(examples.ids) and int(examples.ids.max()) >= config.vocab_size:
            raise UserError(f"--data_dir {data_dir}: the {split} split has token id {int(examples.ids.max())}, beyond "
                            f"the vocab_size={config.vocab_size} of {checkpoint_dir}: prepare it with the checkpoint's "
                            f"tokenizer")
    own = ChatTemplate.from_checkpoint(checkpoint_dir)
    if own is not None and own.sha256 != metadata["chat_template_sha256"] and not template_override:
        raise UserError(
            f"--data_dir {data_dir} was rendered with the chat template {metadata['chat_template_name']!r}, not with "
            f"the one of {checkpoint_dir}: prepare the data without --chat_template to use the checkpoint's, or pass "
            f"--chat_template_override to teach the model the data's (it then replaces the checkpoint's)")


def save_finetuned(state_dict: dict, directory: Path, config: Config, tokenizer_dir: Path, chat_template: str,
                   lora: Optional[LoRAConfig]) -> None:
    """out_dir/final: a normal checkpoint directory with the data's chat template; of a LoRA model, the merged
    weights, with the adapters (lora_adapters.pth) and their config (lora_config.json) beside them."""
    text_files = {TEMPLATE_FILE: chat_template}
    json_files = chat_configs(Path(tokenizer_dir), chat_template)
    if lora is None:
        save_model_dir(state_dict, config, tokenizer_dir, directory, json_files=json_files, text_files=text_files)
        return
    json_files[CONFIG_FILE] = {**lora.to_json(), "base_checkpoint": str(tokenizer_dir)}
    save_model_dir(merge_lora(state_dict, lora, config), config, tokenizer_dir, directory, json_files=json_files,
                   text_files=text_files, tensor_files={ADAPTERS_FILE: lora_state_dict(state_dict)})


def chat_configs(tokenizer_dir: Path, chat_template: str) -> dict:
    """The initial checkpoint's generation_config.json and tokenizer_config.json, where it has them, made to agree
    with the chat template the model was finetuned on: the template's end-of-turn ids among the EOS ids (as the
    exporter writes them), and the template itself where tokenizer_config.json carries one (an older transformers
    reads it there rather than chat_template.jinja)."""
    files = {}
    generation, tokenizer_config = tokenizer_dir / "generation_config.json", tokenizer_dir / "tokenizer_config.json"
    if generation.is_file() and has_tokenizer(tokenizer_dir):
        tokenizer = Tokenizer(tokenizer_dir)
        stop_ids = ChatTemplate(chat_template).stop_ids(tokenizer)
        own_generation = read_json(generation, "the checkpoint's generation settings (a JSON object)")
        files[generation.name] = generation_config(own_generation, tokenizer.bos_id, tokenizer.eos_id, stop_ids)
    own_config = (read_json(tokenizer_config, "the tokenizer's settings (a JSON object)") if tokenizer_config.is_file()
                  else {})
    if "chat_template" in own_config:
        files[tokenizer_config.name] = {**own_config, "chat_template": chat_template}
    return files


if __name__ == "__main__":
    cli(setup, description=__doc__)
