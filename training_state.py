"""Training checkpoints: the `step-N` directories of a run's out_dir, written atomically with everything an exact
resume needs (weights, optimizer, step, data position, RNG states; sharded under FSDP), found and checked for
`--resume auto` (broken ones are skipped with a warning), loaded back, and the final weights. training.fit calls it.
"""

import math
import random
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.nn as nn
from lightning_fabric import Fabric
from lightning_fabric.strategies import ModelParallelStrategy

from checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_file, load_shards, read_shard_index, save_atomic
from model import Config
from utils import UserError, move_into_place, remove_path

SaveFinal = Callable[[Mapping[str, torch.Tensor], Path], None]  # writes (the full state dict) into (out_dir/final)


class DataPosition(Protocol):
    """What a checkpoint keeps of a batch source (training.BatchSource): its position, for an exact resume."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / f"step-{step:08d}"


def step_checkpoints(out_dir: Path) -> list:
    """The `step-N` of out_dir, highest step number first (not by string order)."""
    found = [(int(match.group(1)), path) for path in Path(out_dir).glob("step-*")
             if (match := re.fullmatch(r"step-(\d+)", path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The checkpoint with the highest step number, or None."""
    checkpoints = step_checkpoints(out_dir)
    return checkpoints[0] if checkpoints else None


def last_checkpoint_hint(out_dir: Path, step_losses: Mapping[int, float], vocab_size: int) -> str:
    """Where to resume after a failure. save_checkpoint writes only finite weights, but a diverging run writes finite,
    useless ones: checkpoint N is sane when step N + 1, computed with its weights, had a finite loss at most one nat
    above the lower of this process's first loss and uniform guessing (ln vocab_size). The losses are this process's
    (`step_losses`: step N + 1 -> its loss, for each checkpoint N)."""
    first = step_losses[min(step_losses)] if step_losses else math.inf
    bound = min(math.log(vocab_size), first if math.isfinite(first) else math.inf) + 1
    passed = []
    for path in step_checkpoints(out_dir):
        step = int(path.name.split("-")[1])
        loss = step_losses.get(step + 1)
        if loss is not None and math.isfinite(loss) and loss <= bound:
            newer = f" (not the newer {', '.join(passed)})" if passed else ""
            return (f"The last checkpoint whose weights gave a sane loss is {path}: step {step + 1} had loss "
                    f"{loss:.4f}{newer}. Resume from it with --resume {path} and a lower --learning_rate or another "
                    f"--seed.")
        passed.append(f"{path.name}: " + ("its weights were not run in this process" if loss is None
                                          else f"step {step + 1} had loss {loss:.4g}"))
    if not passed:
        return "No checkpoint was saved: start again with a lower --learning_rate."
    return (f"No checkpoint is known to be sane (a loss at most {bound:.2f} with its weights): "
            f"{'; '.join(passed)}. Start again with a lower --learning_rate, or resume one of them with --resume PATH "
            f"at your own judgement.")


def find_resume_checkpoint(fabric: Fabric, resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """The checkpoint that `--resume` (auto, a path or none) names; none with checkpoints in out_dir is an error."""
    latest = fabric.broadcast(latest_checkpoint(out_dir) if fabric.global_rank == 0 else None)
    if resume is None:
        if latest is not None:
            raise UserError(f"{out_dir} holds checkpoints of an earlier run (the latest is {latest}): pass "
                            f"--resume auto to continue it, or choose another --out_dir")
        return None
    if str(resume) == "auto":
        if latest is None:
            fabric.print(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
            return None
        # checked on rank 0, which prints the warnings; every rank raises or resumes alike
        newest, problems = fabric.broadcast(newest_loadable_checkpoint(fabric, out_dir) if fabric.global_rank == 0
                                            else None)
        if newest is None:
            raise UserError(f"--resume auto: no checkpoint in {out_dir} can be resumed: " + " ".join(problems))
        return newest
    if not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    problem = fabric.broadcast(checkpoint_problem(Path(resume)) if fabric.global_rank == 0 else None)
    if problem is not None:
        raise UserError(f"--resume {resume}: {problem}")
    return Path(resume)


def newest_loadable_checkpoint(fabric: Fabric, out_dir: Path) -> Tuple[Optional[Path], list]:
    """The highest step-N that can be resumed (or None), and the problems of the higher ones. Each of those is
    skipped with a printed warning: a copy cut short or an emptied directory must not stop a run that has a sound
    checkpoint."""
    problems = []
    for path in step_checkpoints(out_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, problems
        fabric.print(f"Warning: --resume auto skips {path.name}: {problem}")
        problems.append(problem)
    return None, problems


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` is not a training checkpoint that save_checkpoint wrote, in one sentence naming it; None when it
    is one. Reads a file's index only (memory-mapped), not its tensors; of a sharded directory, its .metadata index."""
    expected = "expected a step-N file, or a step-N directory of FSDP shards with a .metadata file"
    if path.is_dir():
        if (path / ".metadata").is_file():
            try:
                read_shard_index(path)  # refuses an index that would run code, before any rank unpickles it
            except ValueError as error:
                return str(error)
            return None
        if (path / WEIGHTS_FILE).exists() or (path / CONFIG_FILE).exists():
            return (f"{path} is a directory of final weights ({WEIGHTS_FILE}, {CONFIG_FILE}) without the optimizer "
                    f"and data position: start from them with --initial_checkpoint_dir {path} instead")
        what = "an empty directory" if not any(path.iterdir()) else "a directory without .metadata"
        return f"{path} is {what}: {expected}"
    try:
        checkpoint = load_file(path)
    except ValueError as error:
        return str(error)
    if not isinstance(checkpoint, dict):
        return f"{path} holds a {type(checkpoint).__name__}: {expected}"
    missing = [key for key in ("model", "optimizer", "step", "train_data", "rng") if key not in checkpoint]
    if missing and checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return (f"{path} holds model weights only (a {WEIGHTS_FILE}), without the optimizer and data position: "
                f"start from them with --initial_checkpoint_dir {path.parent} instead")
    if missing:
        return f"{path} lacks {', '.join(missing)}: expected a training checkpoint as save_checkpoint writes it"
    return None


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


def save_checkpoint(fabric: Fabric, out_dir: Path, state: dict, train_data: DataPosition, hparams: dict,
                    config: Config, step_losses: Mapping[int, float]) -> None:
    """Write `step-N` under a temporary name, then rename it: a crash never leaves a partial `step-N`. It is a file
    (one process, DDP; written by rank 0, fsynced) or a directory of shards (FSDP, written by fabric.save)."""
    path = checkpoint_path(out_dir, state["step"])
    if not all_finite(fabric, state["model"], state["optimizer"]):
        raise FloatingPointError(
            f"The weights or the optimizer state hold inf or NaN after step {state['step']} (the loss and gradient "
            f"were finite): not saving {path}. " + last_checkpoint_hint(out_dir, step_losses, config.vocab_size)
        )
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".step-*.tmp"):  # left by a kill during an earlier save
            remove_path(stale)
    fabric.barrier()
    checkpoint = {
        **state,
        "train_data": gather_objects(fabric, train_data.state_dict()),  # index: rank
        "rng": gather_objects(fabric, rng_states()),
        "hparams": hparams,
        "model_config": vars(config).copy(),
    }
    with failed_write_named(path, out_dir):
        if isinstance(fabric.strategy, ModelParallelStrategy):  # every rank writes its own shard file
            tmp = path.with_name(f".{path.name}.tmp")
            save_sharded_training_state(fabric, tmp, checkpoint)
            fabric.barrier()
            if fabric.global_rank == 0:
                move_into_place(tmp, path)
        else:
            # what fabric.save gathers, written by torch.save straight into .step-N.<random>.tmp beside the
            # destination: fabric.save would serialise all of it into memory first and stage it in $TMPDIR
            checkpoint.update(model=saved_model_state(state["model"].module),
                              optimizer=state["optimizer"].state_dict())
            if fabric.global_rank == 0:
                save_atomic(checkpoint, path)
    fabric.barrier()
    fabric.print(f"Saved {path}")


@contextmanager
def failed_write_named(path: Path, out_dir: Path) -> Iterator[None]:
    """A failed write (a full disk: torch's "[enforce fail at inline_container.cc] unexpected pos", or an OSError)
    as one line naming the checkpoint and the one kept; the temporary file is already gone (save_atomic)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        kept = latest_checkpoint(out_dir)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"Writing {path} failed ({reason}): is the disk full? The previous checkpoint "
                        + (f"{kept} is kept" if kept else "does not exist")
                        + ": make room and rerun the same command with --resume auto") from error


def save_sharded_training_state(fabric: Fabric, path: Path, checkpoint: dict) -> None:
    """What fabric.save writes for a directory under ModelParallelStrategy (the model's and the optimizer's shards by
    torch.distributed.checkpoint, the other keys in meta.pt by rank 0), but without the frozen parameters, which
    fabric.save cannot leave out of a sharded checkpoint. Called by every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    module, optimizer = checkpoint["model"].module, checkpoint["optimizer"].optimizer
    options = StateDictOptions(cpu_offload=True)
    frozen = frozen_parameter_names(module)
    model_state = get_model_state_dict(module, options=options)
    dcp.save({"model": {name: tensor for name, tensor in model_state.items() if unprefixed(name) not in frozen},
              "optimizer": get_optimizer_state_dict(module, optimizer, options=options)}, checkpoint_id=path)
    if fabric.global_rank == 0:
        torch.save({key: value for key, value in checkpoint.items() if key not in ("model", "optimizer")},
                   path / "meta.pt")


def frozen_parameter_names(model: nn.Module) -> set:
    """The parameters that do not train (a LoRA model's base weights), by unprefixed name: a training checkpoint
    leaves them out, they come from the initial checkpoint."""
    return {unprefixed(name) for name, param in model.named_parameters() if not param.requires_grad}


def unprefixed(name: str) -> str:
    """A state-dict name without torch.compile's `_orig_mod.` and activation checkpointing's
    `_checkpoint_wrapped_module.` (training.checkpoint_blocks), which state dicts and torch's state-dict functions
    drop."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def saved_model_state(module: nn.Module) -> dict:
    """What a training checkpoint holds of the model: its state dict less the frozen parameters."""
    frozen = frozen_parameter_names(module)
    return {name: tensor for name, tensor in module.state_dict().items() if unprefixed(name) not in frozen}


def all_finite(fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every rank's weights and optimizer state are finite: one all-reduced flag, the one sync of a save."""
    tensors = [*model.parameters(), *(value for param_state in optimizer.state.values()
                                      for value in param_state.values() if isinstance(value, torch.Tensor))]
    local = [tensor.to_local() if hasattr(tensor, "to_local") else tensor for tensor in tensors]  # FSDP: this shard
    bad = torch.zeros((), dtype=torch.float32, device=fabric.device)
    for tensor in local:
        bad += (~torch.isfinite(tensor)).any()
    return fabric.all_reduce(bad, reduce_op="max").item() == 0


def load_training_state(fabric: Fabric, path: Path, state: dict, train_data: DataPosition, config: Config) -> None:
    if Path(path).is_dir() and not isinstance(fabric.strategy, ModelParallelStrategy):
        raise UserError(f"{path} is a sharded checkpoint written by FSDP: resume it with --strategy fsdp on as many "
                        f"processes (devices x num_nodes) as wrote it")
    saved = load_file(Path(path) / "meta.pt" if Path(path).is_dir() else path)  # memory-mapped: no tensor is read
    if not isinstance(saved, dict) or saved.get("model_config") != vars(config):
        recorded = saved.get("model_config") if isinstance(saved, dict) else None
        differing = ("no model config" if not isinstance(recorded, dict) else ", ".join(
            f"{key} {recorded.get(key)!r} (this run: {value!r})" for key, value in vars(config).items()
            if recorded.get(key) != value))
        raise UserError(f"{path} is a checkpoint of another model than this run's {config.name!r}: {differing}. "
                        f"Resume it with the --model_name or --initial_checkpoint_dir that wrote it, or train into "
                        f"another --out_dir")
    checkpoint = {**state, "train_data": None, "rng": None, "hparams": None, "model_config": None}
    if Path(path).is_dir():
        load_sharded_training_state(fabric, Path(path), checkpoint)
    else:
        checkpoint["model"] = None  # Fabric puts the saved state dict here, loaded below: it lacks frozen weights
        fabric.load(path, checkpoint, weights_only=True)
        module = state["model"].module
        expected, saved = set(saved_model_state(module)), checkpoint["model"]
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved))[:5], sorted(set(saved) - expected)[:5]
            raise UserError(f"{path} holds other weights than this model trains (missing {missing}, unexpected "
                            f"{unexpected}): resume it with the settings that wrote it (e.g. the same --lora_* flags)")
        module.load_state_dict(saved, strict=False)
    if len(checkpoint["train_data"]) != fabric.world_size:
        raise UserError(f"{path} was written by {len(checkpoint['train_data'])} processes; resume it with as many "
                        f"(devices x num_nodes), not {fabric.world_size}: each holds its own data position")
    try:
        train_data.load_state_dict(checkpoint["train_data"][fabric.global_rank])
    except UserError as error:  # another --seed or data mix, or other data
        raise UserError(f"{path}: {error}") from None
    set_rng_states(checkpoint["rng"][fabric.global_rank])
    for key in ("step", "tokens", "target_tokens"):
        state[key] = checkpoint[key]


def load_sharded_training_state(fabric: Fabric, path: Path, checkpoint: dict) -> None:
    """What fabric.load does for a directory under ModelParallelStrategy, but through checkpoint.load_shards, whose
    reads cannot run code: the model's and the optimizer's shards into `checkpoint["model"]` and
    `checkpoint["optimizer"]` (in place), and the other keys from meta.pt (weights_only)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    module, optimizer = checkpoint["model"].module, checkpoint["optimizer"].optimizer
    frozen = frozen_parameter_names(module)
    model_state = {"model": {name: tensor for name, tensor in get_model_state_dict(module).items()
                             if unprefixed(name) not in frozen}}
    load_shards(path, model_state)
    module.load_state_dict(model_state["model"], strict=not frozen)  # frozen weights: the initial checkpoint's
    optimizer_state = {"optimizer": get_optimizer_state_dict(module, optimizer)}  # loaded apart, as Fabric does
    load_shards(path, optimizer_state)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state["optimizer"],
                             options=StateDictOptions(cpu_offload=True))
    others = load_file(path / "meta.pt")  # fabric.save's file of everything but the model and the optimizer
    keys = [key for key in checkpoint if key not in ("model", "optimizer")]
    missing = [key for key in keys if key not in others]
    if missing:
        raise UserError(f"{path / 'meta.pt'} lacks {', '.join(missing)}: expected the non-tensor state of a "
                        f"training checkpoint as save_checkpoint writes it")
    checkpoint.update({key: others[key] for key in keys})
    fabric.barrier()


def save_final_weights(fabric: Fabric, model: nn.Module, out_dir: Path, save: SaveFinal) -> None:
    """The full (unsharded) weights, saved by rank 0 as a checkpoint directory (`save`: checkpoint.save_model_dir or
    a wrapper of it), for generate/base.py, the converters and finetuning."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathers FSDP shards; with cpu_offload only rank 0 receives the full tensors
    state_dict = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fabric.global_rank == 0:
        save(state_dict, out_dir)
        fabric.print(f"Saved the final weights to {out_dir}")
    fabric.barrier()
