"""Inheritune's grow loop: the fewest inherited blocks that, trained for the reference's T steps, match its loss.

    python inheritune/grow.py --ref_checkpoint_dir out/reference/final --max_steps 300 --out_dir out/grow \\
        --train_data_dir data/demo/train --val_data_dir data/demo/validation --train_data_mix train_code,train_prose \\
        --seq_len 256 --global_batch_size 8 --micro_batch_size 8 --learning_rate 2e-3 --min_lr 2e-4 \\
        --warmup_steps 20 --eval_iters 16 --precision 32-true

Sanyal et al., "Inheritune" (arXiv 2404.08634), Algorithm 1. The reference's validation loss is measured first
(`validation_loss`). Then for n = --start_layers (default k // 2 of the reference's k blocks), n + --step_layers,
... < k: inheritune/init_from.py copies the reference's embedding, blocks 0..n-1, final norm and head into
out_dir/round-NN/init; pretrain/tinyllama.py's `setup` trains that with the reference's recipe (the training flags
here: the same schedule and T; weights only, a fresh optimizer) into out_dir/round-NN/train; its final weights are
measured like the reference's. The loop stops at the first n whose loss is at most the reference's + --tolerance. If
no n < k gets there, the reference itself is the answer, and grow.json says so.

Every loss compared is `validation_loss`: the first --eval_iters micro-batches of the validation shards as a single
process reads them (the blocks the training validates on with one process), cross-entropy summed over the targets /
their count, in fp32 whatever the training precision.

out_dir/grow.json, rewritten after every round: the settings, the reference (layers, parameters, validation loss),
every round (n, parameters, steps, tokens, validation loss, seconds, matched) and the result. out_dir/grow.png: the
validation loss vs step of every round (from its CSV logs) with the reference's as a line.

Rerunning the same command continues: rounds that grow.json records and whose final weights exist are not trained
again, an interrupted round resumes exactly from its last checkpoint (the training core's --resume auto), a complete
init directory is reused. A rerun with other settings than grow.json records is refused, naming the setting. With
--devices > 1 every process runs this script (Fabric starts them, as for pretrain/tinyllama.py); only rank 0 writes
and measures, and it tells the others when to stop.
"""

import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_model
from inheritune.init_from import init_from
from model import GPT, Config, num_parameters
from packed_dataset import validation_batches
from pretrain.tinyllama import setup
from tokenizer import TOKENIZER_FILES
from training import Accelerator, Precision, Schedule, Strategy, logged_metrics, summed_loss
from training_state import latest_checkpoint
from utils import UserError, atomic_write, cli, launched_as_rank_zero, read_json, write_json

RESULTS_FILE = "grow.json"
PLOT_FILE = "grow.png"
# flags that change how the rounds run or are logged, not what they compute: a rerun may change them
NOT_COMPARED = ("out_dir", "tokenizer_dir", "devices", "accelerator", "strategy", "log_interval", "eval_interval",
                "save_interval", "reference_loss")
RECORD_WAIT_S = 3600  # how long a rank > 0 waits for rank 0 to record a round that was complete before this run


def grow(
    ref_checkpoint_dir: Path,
    train_data_dir: Path,
    val_data_dir: Path,
    max_steps: int,
    out_dir: Path = Path("out/grow"),
    start_layers: Optional[int] = None,
    step_layers: int = 2,
    tolerance: float = 0.0,
    reference_loss: Optional[float] = None,
    train_data_mix: str = "train_slimpajama:0.693584,train_starcoder:0.306416",
    tokenizer_dir: Optional[Path] = None,
    devices: str = "auto",
    accelerator: Accelerator = "auto",
    strategy: Strategy = "fsdp",
    precision: Precision = "bf16-mixed",
    seed: int = 3407,
    seq_len: Optional[int] = None,
    global_batch_size: int = 1024,
    micro_batch_size: int = 8,
    learning_rate: float = 4e-4,
    min_lr: float = 4e-5,
    warmup_steps: int = 2000,
    lr_schedule: Schedule = "cosine",
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    log_interval: int = 10,
    eval_interval: int = 5000,
    eval_iters: int = 100,
    save_interval: int = 5000,
) -> Optional[dict]:
    """Grow an inherited model --step_layers blocks at a time until it matches the reference's validation loss;
    returns the record written to out_dir/grow.json (on rank 0; None on the other ranks). The training flags default
    to pretrain/tinyllama.py's (TinyLlama's recipe): give the reference's own.

    Args:
        ref_checkpoint_dir: the trained reference: a checkpoint directory of k blocks
        train_data_dir: directory of the packed training shards (pretrain/tinyllama.py --train_data_dir)
        val_data_dir: directory of the validation* shards, on which the reference and every round are measured
        max_steps: T, the steps of every round: the reference's
        out_dir: grow.json, grow.png and round-NN/{init,train} go here; rerunning the command continues from them
        start_layers: the first round's n; default: half the reference's blocks (k // 2)
        step_layers: blocks added per round
        tolerance: a round matches when its validation loss is at most the reference's + tolerance
        reference_loss: the reference's validation_loss when already measured (same blocks); default: measured here
        train_data_mix: 'prefix:weight,...' or 'prefix,...' of the training shards (pretrain/tinyllama.py's)
        tokenizer_dir: its tokenizer is copied next to each round's final weights; default: the reference's, if its
            directory holds one
        devices: processes per node: auto (every local GPU, or 1 on the CPU) or a number
        accelerator: auto, cpu or cuda
        strategy: fsdp or ddp, with more than one process
        precision: training precision: bf16-mixed, bf16-true or 32-true (validation_loss is fp32 anyway)
        seed: seed of the data order (the inherited weights are the reference's)
        seq_len: tokens per sequence; default: the reference's block_size
        global_batch_size: sequences per optimizer step
        micro_batch_size: sequences per device and forward pass; also the validation micro-batch
        learning_rate: peak learning rate, after the linear warmup
        min_lr: final learning rate of the decay
        warmup_steps: steps of linear warmup
        lr_schedule: after the warmup: cosine or linear down to min_lr, or constant
        weight_decay: AdamW weight decay, on matrices only
        grad_clip: maximum gradient norm
        log_interval: steps between progress lines and logged metrics
        eval_interval: steps between validations of a round (its curve in grow.png)
        eval_iters: validation micro-batches, of the reference's and every round's measure too
        save_interval: steps between checkpoints, from which an interrupted round resumes
    """
    settings = {name: str(Path(value).resolve()) if isinstance(value, Path) else value
                for name, value in locals().items() if name not in NOT_COMPARED}
    ref_dir, out_dir = Path(ref_checkpoint_dir), Path(out_dir)
    ref_config = load_config(ref_dir)
    k = ref_config.n_layer
    start = k // 2 if start_layers is None else start_layers
    check_arguments(ref_dir, k, start, step_layers, max_steps, seq_len)
    seq_len = seq_len or ref_config.block_size
    settings.update(start_layers=start, seq_len=seq_len)
    if tokenizer_dir is None and any((ref_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer_dir = ref_dir
    main = is_main_process()
    results_path = out_dir / RESULTS_FILE
    device = "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"

    def measure(checkpoint_dir: Path) -> float:
        return validation_loss(checkpoint_dir, val_data_dir, seq_len, micro_batch_size, eval_iters, device)

    record = None
    if main:
        if importlib.util.find_spec("matplotlib") is None:  # before hours of training, not after the first round
            raise ImportError("inheritune/grow.py draws out_dir/grow.png with matplotlib: pip install matplotlib")
        record = load_record(results_path, settings, reference_loss)
        if record["reference"] is None:
            record["reference"] = measure_reference(ref_dir, ref_config, reference_loss, measure)
            write_json(results_path, record)
        target = record["reference"]["validation_loss"] + tolerance
        print(f"Reference {ref_dir}: {k} layers, validation loss {record['reference']['validation_loss']:.4f}; "
              f"a round matches at {target:.4f} or less")

    training = dict(
        train_data_dir=train_data_dir, val_data_dir=val_data_dir, train_data_mix=train_data_mix,
        tokenizer_dir=tokenizer_dir, devices=devices, accelerator=accelerator, strategy=strategy,
        precision=precision, seed=seed, seq_len=seq_len, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, max_steps=max_steps, learning_rate=learning_rate, min_lr=min_lr,
        warmup_steps=warmup_steps, lr_schedule=lr_schedule, weight_decay=weight_decay, grad_clip=grad_clip,
        log_interval=log_interval, eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval,
    )
    matched_at = None
    for index, n in enumerate(range(start, k, step_layers), start=1):
        train_dir = round_dir(out_dir, index) / "train"
        entry = recorded_round(record, index, n, train_dir) if main else None
        if entry is None:
            began = time.perf_counter()
            resumed_from = latest_checkpoint(train_dir)
            if not has_weights(train_dir / "final"):
                init_dir = prepare_round(ref_dir, round_dir(out_dir, index) / "init", n, main)
                setup(model_name=None, initial_checkpoint_dir=init_dir, out_dir=train_dir, resume="auto", **training)
                gc.collect()  # the round's model and optimizer, before the next round's or the measure
            if main:
                loss = measure(train_dir / "final")
                entry = dict(
                    round=index, n=n, parameters=count_parameters(train_dir / "final"), steps=max_steps,
                    tokens=max_steps * global_batch_size * seq_len, validation_loss=loss, matched=loss <= target,
                    seconds=round(time.perf_counter() - began, 1),
                    resumed_from_step=None if resumed_from is None else int(resumed_from.name.split("-")[1]),
                    run_dir=str(train_dir),
                )
                record["rounds"] = record["rounds"][:index - 1] + [entry]
                write_json(results_path, record)
                plot_rounds(record, out_dir)
        if main:
            print(f"Round {index}: {n} layers, {entry['parameters']:,} parameters, validation loss "
                  f"{entry['validation_loss']:.4f} after {entry['steps']} steps: "
                  + ("matches the reference" if entry["matched"] else "above the reference"))
        if agreed(entry["matched"] if main else None, results_path, index):
            matched_at = n
            break

    if main:
        if matched_at is not None:  # an earlier run's later rounds, if a retrained round now matches
            del record["rounds"][index:]
        record["matched_at"] = matched_at
        record["result"] = result_text(record, ref_dir, k, tolerance)
        write_json(results_path, record)
        plot_rounds(record, out_dir)
        print(record["result"])
        print(f"Wrote {results_path} and {out_dir / PLOT_FILE}")
    return record


def check_arguments(ref_dir: Path, k: int, start: int, step_layers: int, max_steps: int,
                    seq_len: Optional[int]) -> None:
    if not 1 <= start < k:
        raise UserError(f"--start_layers {start} is out of range: the reference {ref_dir} has {k} blocks and the grow "
                        f"loop tries n < {k}; choose 1 to {k - 1}")
    if step_layers < 1:
        raise UserError(f"--step_layers must be at least 1, got {step_layers}")
    if max_steps < 1:
        raise UserError(f"--max_steps must be at least 1, got {max_steps}")
    if seq_len is not None and seq_len < 1:
        raise UserError(f"--seq_len must be at least 1 (or none: the reference's block size), got {seq_len}")


@torch.no_grad()
def validation_loss(checkpoint_dir: Path, val_data_dir: Path, seq_len: int, micro_batch_size: int, eval_iters: int,
                    device: str = "cpu") -> float:
    """The validation loss of a checkpoint directory: cross-entropy summed over the targets of the first
    `eval_iters` micro-batches of `micro_batch_size` blocks of seq_len + 1 tokens of val_data_dir/validation*, read
    as a single process reads them, divided by their count (training.validate's loss with one process). In fp32
    with full-precision matmuls, whatever the checkpoint's dtype: one measure for every checkpoint compared."""
    model = load_model(checkpoint_dir, device=device, dtype=torch.float32)
    if seq_len > model.config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds the block_size {model.config.block_size} of {checkpoint_dir}")
    batches = validation_batches(Path(val_data_dir), seq_len + 1, micro_batch_size, num_processes=1, process_rank=0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # training sets TF32 ("high") for the whole process
    try:
        loss_total, target_tokens = summed_loss(model, batches, eval_iters, torch.device(device)).tolist()
    finally:
        torch.set_float32_matmul_precision(previous)
    if target_tokens == 0:
        raise UserError(f"--val_data_dir {val_data_dir} makes no micro-batch of {micro_batch_size} blocks of "
                        f"{seq_len + 1} tokens with a target")
    return loss_total / target_tokens


def is_main_process() -> bool:
    """Rank 0: the process that writes and measures."""
    if distributed():
        return torch.distributed.get_rank() == 0
    return launched_as_rank_zero()  # before this run's first training sets up the process group


def distributed() -> bool:
    """Whether a round's training set up a process group (it outlives the round: the next rounds reuse it)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def load_record(path: Path, settings: dict, reference_loss: Optional[float]) -> dict:
    """grow.json of an earlier run of the same settings (refusing other settings), or a new record."""
    if not path.exists():
        return dict(settings=settings, reference=None, rounds=[], matched_at=None, result=None)
    record = read_json(path, "the record of a grow run that inheritune/grow.py wrote")
    for name, value in settings.items():
        if record["settings"].get(name) != value:
            raise UserError(f"{path} records a run with --{name} {record['settings'].get(name)!r}, not {value!r}: "
                            f"rerun with the same settings to continue it, or choose another --out_dir")
    recorded = (record["reference"] or {}).get("validation_loss")
    if reference_loss is not None and recorded is not None and reference_loss != recorded:
        raise UserError(f"--reference_loss {reference_loss} differs from the {recorded} that {path} records: leave "
                        f"it out to continue that run, or choose another --out_dir")
    return record


def measure_reference(ref_dir: Path, config: Config, reference_loss: Optional[float],
                      measure: Callable[[Path], float]) -> dict:
    began = time.perf_counter()
    loss = measure(ref_dir) if reference_loss is None else reference_loss
    return dict(checkpoint_dir=str(ref_dir), layers=config.n_layer, parameters=count_parameters(ref_dir),
                validation_loss=loss, measured_here=reference_loss is None,
                seconds=round(time.perf_counter() - began, 1))


def count_parameters(checkpoint_dir: Path) -> int:
    with torch.device("meta"):
        return num_parameters(GPT(load_config(checkpoint_dir)))


def round_dir(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"round-{index:02d}"


def recorded_round(record: dict, index: int, n: int, train_dir: Path) -> Optional[dict]:
    """The round's entry in grow.json if it is complete: recorded, and its final weights still there."""
    rounds = record["rounds"]
    if len(rounds) < index or not has_weights(train_dir / "final"):
        return None
    entry = rounds[index - 1]
    return entry if entry["n"] == n else None


def has_weights(checkpoint_dir: Path) -> bool:
    # save_model_dir writes the config last, and a new directory under a temporary name
    return (checkpoint_dir / WEIGHTS_FILE).is_file() and (checkpoint_dir / CONFIG_FILE).is_file()


def prepare_round(ref_dir: Path, init_dir: Path, n: int, main: bool) -> Path:
    """The inherited n-block model in init_dir: made by rank 0, or reused when complete; every rank returns once it
    is there."""
    if main:
        if not has_weights(init_dir):
            init_from(ref_dir, init_dir, n_layers=n, overwrite=True)  # overwrite: what a crash left of it
        elif load_config(init_dir).n_layer != n:
            raise UserError(f"{init_dir} holds a {load_config(init_dir).n_layer}-block model, not {n}: it is not this "
                            f"run's; remove it or choose another --out_dir")
    if distributed():
        # the other ranks read init_dir in setup; in a run's first round the process group's set-up in setup waits
        torch.distributed.barrier()
    return init_dir


def agreed(matched: Optional[bool], results_path: Path, index: int) -> bool:
    """Rank 0's `matched` of round `index`, on every rank, so that all stop at the same round."""
    if distributed() and torch.distributed.get_world_size() > 1:
        box = [matched]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])
    if matched is not None:
        return matched
    # a rank > 0 before any training of this run: the round was complete before the run, and rank 0 records it
    deadline = time.monotonic() + RECORD_WAIT_S
    while time.monotonic() < deadline:
        rounds = json.loads(results_path.read_text())["rounds"] if results_path.exists() else []
        if len(rounds) >= index:
            return rounds[index - 1]["matched"]
        time.sleep(1)
    raise TimeoutError(f"Rank 0 did not record round {index} in {results_path} within {RECORD_WAIT_S} s")


def result_text(record: dict, ref_dir: Path, k: int, tolerance: float) -> str:
    reference = record["reference"]["validation_loss"]
    within = f" + tolerance {tolerance}" if tolerance else ""
    if record["matched_at"] is not None:
        entry = record["rounds"][-1]
        return (f"{entry['n']} of the reference's {k} blocks match it: validation loss {entry['validation_loss']:.4f} "
                f"<= {reference:.4f}{within}, with {entry['parameters']:,} parameters instead of "
                f"{record['reference']['parameters']:,}; the weights are in {entry['run_dir']}/final")
    tried = ", ".join(str(entry["n"]) for entry in record["rounds"])
    return (f"No inherited model with fewer than {k} blocks (tried n = {tried}) reached the reference's validation "
            f"loss {reference:.4f}{within}: the reference itself, {ref_dir}, is the answer")


def logged_validation_losses(train_dir: Path) -> Dict[int, float]:
    """{step: val_loss} from the CSV logs of every run that wrote to train_dir (a resumed round has several), the
    later run's value where they overlap."""
    return {step: row["val_loss"] for step, row in logged_metrics(train_dir).items() if "val_loss" in row}


def plot_rounds(record: dict, out_dir: Path) -> None:
    """out_dir/grow.png: validation loss vs step of every round, and the reference's loss (and the match target)
    as lines."""
    import matplotlib  # pip install matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    reference, tolerance = record["reference"], record["settings"]["tolerance"]
    framed = [reference["validation_loss"], reference["validation_loss"] + tolerance]
    for entry in record["rounds"]:
        # the curve: the run's own validations; the star: validation_loss of its final weights, the loss compared
        # (the same as the curve's last point with one process, on other blocks with several)
        losses = logged_validation_losses(round_dir(out_dir, entry["round"]) / "train")
        (line,) = ax.plot(list(losses), list(losses.values()), marker="o", markersize=3,
                          label=f"round {entry['round']}: {entry['n']} layers, final (star) "
                                f"{entry['validation_loss']:.4f}")
        ax.plot([entry["steps"]], [entry["validation_loss"]], marker="*", markersize=12, color=line.get_color())
        framed += [loss for step, loss in losses.items() if step > 0] + [entry["validation_loss"]]
    # the axis frames the trained points and the reference, where the rounds meet it: an inherited model's loss
    # before training can be far above them and would flatten the rest (its segment enters from the top)
    low, high = min(framed), max(framed)
    pad = 0.1 * (high - low) or 0.05
    ax.set_ylim(low - pad, high + pad)
    ax.axhline(reference["validation_loss"], color="black", linestyle="--",
               label=f"reference: {reference['layers']} layers, {reference['validation_loss']:.4f}")
    if tolerance:
        ax.axhline(reference["validation_loss"] + tolerance, color="gray", linestyle=":",
                   label=f"reference + tolerance {tolerance}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Inheritune grow loop: validation loss per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(out_dir / PLOT_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli(grow)
