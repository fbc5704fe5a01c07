"""Inheritune's claim at a scale that runs here: one command, a results table beside the paper's numbers.

    python inheritune/reproduce.py --preset cpu     # about an hour on 2 CPU cores, on the built-in demo corpus
    python inheritune/reproduce.py --preset gpu     # a bigger model, minutes on one H100/H200

Sanyal et al., "Inheritune: Training Smaller Yet More Attentive Language Models" (arXiv 2404.08634): a small model
that inherits the first n = k/2 blocks (with the embedding, final norm and head) of a trained k-layer reference and
trains for the reference's T steps reaches the reference's validation loss, or gets there after growing by 2
blocks at a time. The experiments, all trained with pretrain/tinyllama.py's loop on the same data and schedule:
1. reference: k layers from random init, T steps;
2. Inheritune n = k/2 (all modules), T steps, and the grow loop (inheritune/grow.py) until parity;
3. the same n layers from random init, T and 2T steps;
4. the lazy-layer control (the paper's "initialize with lazy layers"): the reference's lazy blocks (the deepest n of
   them, inheritune/attention_rank.py's rule) inherited instead of the first n, or the LAST n blocks when the
   reference has no lazy layer; results.json's `lazy_control` says which;
5. sub-module ablations: only attention (+ norm_1), only MLP (+ norm_2), attention and MLP without norms;
6. the attention-rank analysis (inheritune/attention_rank.py) of the reference and of the inherited model;
7. the paper's baselines, at the same budget of T steps (widths, heads and parameters in the table):
   - teacher: the reference trained 2T steps (the KD runs' teacher: a teacher must beat the students, and the
     reference trained T steps does not beat the inherited model);
   - kd: n layers from random init (as 3.), distilled from the teacher (distillation.py: kd_alpha 0.5, forward KL,
     temperature 1), T steps;
   - inherit+kd: Inheritune's initialization (as 2.), distilled from the teacher, T steps;
   - stacking (Gong et al. 2019's progressive stacking): n/2 layers from random init for T/2 steps, its blocks
     duplicated in order to n layers (block i copied to i + n/2; embedding, final norm and head kept), then T/2 steps
     more with a fresh optimizer and schedule, on a new shuffle of the corpus (seed + 1: the same seed would read the
     first round's batches again);
   - half-width: the reference's k layers at half its width (n_embd, intermediate size, heads and query groups
     halved: the same head size), from random init, T steps.
   The authors' baseline logs (github.com/sanyalsunny111/LLM-Inheritune, GPT2-experiments/logs/OpenWebText_logs/
   Baselines/; validation losses every 1,000 steps, no configurations in them) give the split and the numbers beside
   ours: KD/distill_medium.txt (distilled from random init, 50k steps, last 3.019) and distill_medium_init.txt
   (inherited init, 50k steps, last 3.028); medium-baselines/medium_stacking.txt and medium_stacking_2rnd.txt (two
   rounds of 100k steps each, the second starting from the stacked model: 3.011 after round 1, 2.844 after round 2:
   hence our equal split T/2 + T/2) and medium_halfwdth.txt (100k steps, 3.049).
Every validation loss is measured the same way (inheritune.grow.validation_loss on the same validation blocks).
Results go to out_dir: results.md, results.json, validation_loss.png and the analysis' files. Rerunning the same
command continues: finished experiments are not trained again.
"""

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import WEIGHTS_FILE, load_state_dict, save_model_dir
from inheritune.attention_rank import attention_rank
from inheritune.grow import grow, logged_validation_losses, validation_loss
from inheritune.init_from import BLOCK_PREFIX, init_from
from model import GPT, Config, num_parameters
from pretrain.tinyllama import setup
from tokenizer import Tokenizer, has_tokenizer
from utils import UserError, atomic_write, cli, write_json

# Model and run sizes; every one can be overridden by its flag
PRESETS = {
    # seconds: what the tests run
    "tiny": dict(n_layer=4, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=176, seq_len=32,
                 global_batch_size=4, micro_batch_size=2, max_steps=4, learning_rate=3e-3, min_lr=3e-4,
                 warmup_steps=1, eval_iters=2, rank_sequences=4, precision="32-true"),
    # 27 minutes on 2 CPU cores before the baselines of 7., about 55 with them (measured 2026-12-04): twice the demo
    # model's depth, the demo's batch and schedule
    "cpu": dict(n_layer=8, n_embd=256, n_head=4, n_query_groups=2, intermediate_size=704, seq_len=256,
                global_batch_size=8, micro_batch_size=8, max_steps=300, learning_rate=2e-3, min_lr=2e-4,
                warmup_steps=20, eval_iters=16, rank_sequences=32, precision="32-true"),
    # meant for <= 5 minutes on one H100/H200 (an estimate, not yet measured): AMD-Llama-135m's shape with the demo
    # vocabulary, sequences of 512, 13M tokens per run of T steps
    "gpu": dict(n_layer=12, n_embd=768, n_head=12, n_query_groups=12, intermediate_size=2048, seq_len=512,
                global_batch_size=64, micro_batch_size=32, max_steps=400, learning_rate=1e-3, min_lr=1e-4,
                warmup_steps=50, eval_iters=32, rank_sequences=32, precision="bf16-mixed"),
}
# The paper's GPT-2 medium runs on OpenWebText (Table 1 and the sub-module ablation): validation loss
PAPER = {"reference": ("24L GPT-2 medium", 2.81), "random T": ("16L from scratch", 2.86),
         "inheritune": ("16L Inheritune", 2.81), "attn": ("16L, attention only", 2.84),
         "mlp": ("16L, MLP only", 2.85), "attn_mlp": ("16L, attention + MLP without norms", 2.80),
         # the authors' baseline logs (see the module docstring): the last validation loss of each
         "kd": ("log KD/distill_medium, 50k steps", 3.019),
         "inherit+kd": ("log KD/distill_medium_init, 50k steps", 3.028),
         "stacking": ("log medium_stacking_2rnd, 100k + 100k steps", 2.844),
         "half-width": ("log medium_halfwdth, 100k steps", 3.049)}
KD = dict(kd_alpha=0.5, kd_temperature=1.0, kd_divergence="forward")  # the KD baselines' loss


def reproduce(
    preset: Literal["tiny", "cpu", "gpu"] = "cpu",
    data_dir: Path = Path("data/demo"),
    out_dir: Optional[Path] = None,
    vocab_size: Optional[int] = None,
    n_layer: Optional[int] = None,
    n_embd: Optional[int] = None,
    max_steps: Optional[int] = None,
    seed: int = 3407,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
) -> dict:
    """Run the experiments of the preset (see the module docstring) and write the results table.

    Args:
        preset: tiny (seconds, for tests), cpu (about an hour on 2 cores) or gpu (minutes on one H100/H200)
        data_dir: the demo corpus (train/ and validation/ shards and its tokenizer), built here if missing
        out_dir: where every experiment and the results go; default out/inheritune-{preset}
        vocab_size: needed only when data_dir holds no tokenizer
        n_layer: the reference's layers k (default: the preset's)
        n_embd: the width (default: the preset's)
        max_steps: T, the steps of the reference and of every n-layer run (default: the preset's)
        seed: of every initial weight and data order
        accelerator: auto, cpu or cuda
    """
    settings = {**PRESETS[preset], **{name: value for name, value in
                                     dict(n_layer=n_layer, n_embd=n_embd, max_steps=max_steps).items()
                                     if value is not None}}
    check_settings(settings, vocab_size)
    out_dir = Path(out_dir or f"out/inheritune-{preset}")
    data_dir = Path(data_dir)
    if not (data_dir / "train").is_dir():
        from prepare_data.prepare_demo import prepare_demo

        prepare_demo(data_dir)
    tokenizer_dir = data_dir if has_tokenizer(data_dir) else None
    if tokenizer_dir is not None:
        vocab_size = vocab_size or Tokenizer(tokenizer_dir).vocab_size
    if vocab_size is None:
        raise UserError(f"--data_dir {data_dir} holds no tokenizer: give --vocab_size")
    k, T = settings["n_layer"], settings["max_steps"]
    n = k // 2
    config = Config(name=f"inheritune-{preset}-{k}L", block_size=settings["seq_len"], vocab_size=vocab_size,
                    n_layer=k, n_head=settings["n_head"], n_embd=settings["n_embd"],
                    n_query_groups=settings["n_query_groups"], intermediate_size=settings["intermediate_size"])
    training = dict(
        train_data_dir=data_dir / "train", val_data_dir=data_dir / "validation",
        train_data_mix="train_code,train_prose",
        tokenizer_dir=tokenizer_dir, accelerator=accelerator, devices="1", precision=settings["precision"],
        seed=seed, global_batch_size=settings["global_batch_size"], micro_batch_size=settings["micro_batch_size"],
        learning_rate=settings["learning_rate"], min_lr=settings["min_lr"], warmup_steps=settings["warmup_steps"],
        eval_iters=settings["eval_iters"], log_interval=max(1, T // 10), eval_interval=max(1, T // 10),
        save_interval=T,
    )
    device = "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"

    def measure(checkpoint_dir: Path) -> float:
        return validation_loss(checkpoint_dir, data_dir / "validation", settings["seq_len"],
                               settings["micro_batch_size"], settings["eval_iters"], device)

    results = {"preset": preset, "settings": settings, "config": asdict(config), "experiments": {}}

    def record(name: str, layers: int, steps: int, run_dir: Path, seconds: float, **notes) -> None:
        final = run_dir / "final"
        shape = Config.from_file(final)
        results["experiments"][name] = dict(layers=layers, width=shape.n_embd, heads=shape.n_head, steps=steps,
                                            parameters=parameters(final), validation_loss=measure(final),
                                            seconds=round(seconds, 1), run_dir=str(run_dir), **notes)
        write_json(out_dir / "results.json", results)

    def analyse(checkpoint_dir: Path, name: str) -> list:
        report = attention_rank(checkpoint_dir=checkpoint_dir, data_dir=data_dir, seq_len=settings["seq_len"],
                                num_sequences=settings["rank_sequences"], out_dir=out_dir / "attention_rank" / name,
                                device=device)
        return [dict(layer=layer["layer"], max_rank=layer["max_rank"], max_mass=layer["max_mass"], lazy=layer["lazy"])
                for layer in report["layers"]]

    def train(name: str, initial_dir: Path, steps: int, layers: int, run_dir: Optional[Path] = None,
              **options) -> float:
        """Train (unless finished) and record; `options` go to setup (a teacher, a seed). Returns the seconds
        spent."""
        run_dir = run_dir or out_dir / experiment_dir(name) / "train"
        start = time.perf_counter()
        if not (run_dir / "final").is_dir():
            setup(model_name=None, initial_checkpoint_dir=initial_dir, out_dir=run_dir, resume="auto",
                  **{**training, **options, "max_steps": steps, "eval_interval": max(1, steps // 10),
                     "save_interval": steps})
        seconds = time.perf_counter() - start
        if name:
            record(name, layers, steps, run_dir, seconds,
                   **({"teacher": "teacher"} if "teacher_checkpoint_dir" in options else {}))
        return seconds

    # 1. the reference, from model.py's init
    initial = random_init(config, out_dir / "reference" / "init", seed, tokenizer_dir)
    train("reference", initial, T, k)
    reference = out_dir / "reference" / "train" / "final"
    results["attention_rank"] = {"reference": analyse(reference, "reference")}
    results["lazy_control"] = lazy_control(results["attention_rank"]["reference"], n)
    control_ids = results["lazy_control"]["layer_ids"]
    print(f"Lazy-layer control: blocks {control_ids}, {results['lazy_control']['chosen_by']}")

    # 2. Inheritune and the grow loop (its first round is Inheritune at n = k/2)
    start = time.perf_counter()
    grown = grow(ref_checkpoint_dir=reference, out_dir=out_dir / "grow", max_steps=T, start_layers=n,
                 step_layers=2, tolerance=0.0, reference_loss=results["experiments"]["reference"]["validation_loss"],
                 seq_len=settings["seq_len"], **training)
    first = grown["rounds"][0]
    results["experiments"]["inheritune"] = dict(layers=n, steps=T, parameters=first["parameters"],
                                                validation_loss=first["validation_loss"],
                                                seconds=first["seconds"], run_dir=first["run_dir"])
    results["grow"] = {"rounds": [dict(layers=r["n"], validation_loss=r["validation_loss"]) for r in grown["rounds"]],
                       "matched_at": grown["matched_at"], "seconds": round(time.perf_counter() - start, 1)}

    # 3-5. the same n layers otherwise: random init (T and 2T), the last n blocks, sub-modules
    variants = {
        "random T": (dict(modules="none", copy_embeddings=False, copy_final_norm=False, copy_head=False), T),
        "random 2T": (dict(modules="none", copy_embeddings=False, copy_final_norm=False, copy_head=False), 2 * T),
        "lazy-layer control": (dict(layer_ids=control_ids), T),
        "attn": (dict(modules="attn"), T),
        "mlp": (dict(modules="mlp"), T),
        "attn_mlp": (dict(modules="attn_mlp"), T),
    }
    for name, (options, steps) in variants.items():
        initial = out_dir / experiment_dir(name) / "init"
        layers = len(options.get("layer_ids", range(n)))
        if not (initial / "lit_model.pth").is_file():
            init_from(ref_checkpoint_dir=reference, out_dir=initial, n_layers=layers, seed=seed, overwrite=True,
                      **options)
        train(name, initial, steps, layers)

    # 7. the baselines at T steps: the teacher (the reference at 2T), KD from random and from Inheritune's init,
    # stacking n/2 -> n layers, half width at k layers
    train("teacher", out_dir / "reference" / "init", 2 * T, k)
    distil = dict(teacher_checkpoint_dir=out_dir / "teacher" / "train" / "final", **KD)
    train("kd", out_dir / "random_T" / "init", T, n, **distil)
    train("inherit+kd", Path(first["run_dir"]).parent / "init", T, n, **distil)
    half_steps = T // 2
    shallow = out_dir / "stacking" / "init-shallow"
    if not (shallow / "lit_model.pth").is_file():
        init_from(ref_checkpoint_dir=reference, out_dir=shallow, n_layers=n // 2, seed=seed, overwrite=True,
                  **variants["random T"][0])
    seconds = train("", shallow, half_steps, n // 2, run_dir=out_dir / "stacking" / "train-shallow")
    stacked = out_dir / "stacking" / "init"
    if not (stacked / "lit_model.pth").is_file():
        stack_blocks(out_dir / "stacking" / "train-shallow" / "final", stacked)
    # the second round reads a new shuffle of the corpus: with the first round's seed it would read the first round's
    # batches again (a run restarts its data order), which no other experiment does
    seconds += train("", stacked, T - half_steps, n, run_dir=out_dir / "stacking" / "train", seed=seed + 1)
    record("stacking", n, T, out_dir / "stacking" / "train", seconds,
           growth=f"{n // 2} layers for {half_steps} steps, stacked to {n} for {T - half_steps}")
    half = half_width(config)
    train("half-width", random_init(half, out_dir / "half-width" / "init", seed, tokenizer_dir), T, k)

    # 6. the lazy-layer analysis of the inherited model (the reference's ran before the control)
    results["attention_rank"]["inheritune"] = analyse(Path(results["experiments"]["inheritune"]["run_dir"]) / "final",
                                                      "inheritune")
    write_json(out_dir / "results.json", results)
    with atomic_write(out_dir / "results.md") as tmp:
        tmp.write_text(results_table(results))
    plot_validation_losses(results, out_dir / "validation_loss.png")
    print(results_table(results))
    return results


def experiment_dir(name: str) -> str:
    return name.replace(" ", "_")


def random_init(config: Config, directory: Path, seed: int, tokenizer_dir: Optional[Path]) -> Path:
    """model.py's init of `config` from `seed`, as a checkpoint directory (kept if it exists)."""
    if not directory.is_dir():
        torch.manual_seed(seed)
        save_model_dir(GPT(config), config, tokenizer_dir, directory)
    return directory


def half_width(config: Config) -> Config:
    """The same depth at half the width: n_embd, the MLP's intermediate size, the heads and the query groups halved,
    so the head size stays (check_settings makes them even)."""
    return replace(config, name=f"{config.name}-half-width", n_embd=config.n_embd // 2,
                   intermediate_size=config.intermediate_size // 2, n_head=config.n_head // 2,
                   n_query_groups=config.n_query_groups // 2)


def stack_blocks(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Progressive stacking (Gong et al. 2019): the m blocks of `checkpoint_dir` duplicated in order into a 2m-block
    model (block i copied to i and i + m, so the model applies blocks 0..m-1 twice), its embedding, final norm and
    head kept; a checkpoint directory with its tokenizer, named `{name}-stacked-{2m}`."""
    config = Config.from_file(checkpoint_dir)
    m = config.n_layer
    weights = load_state_dict(checkpoint_dir / WEIGHTS_FILE)
    stacked = {}
    for key, tensor in weights.items():
        if key.startswith(BLOCK_PREFIX):
            index, rest = key[len(BLOCK_PREFIX):].split(".", 1)
            for copy in (int(index), int(index) + m):
                stacked[f"{BLOCK_PREFIX}{copy}.{rest}"] = tensor.clone()
        else:
            stacked[key] = tensor
    stacked_config = replace(config, name=f"{config.name}-stacked-{2 * m}", n_layer=2 * m)
    save_model_dir(stacked, stacked_config, checkpoint_dir if has_tokenizer(checkpoint_dir) else None, out_dir)
    return out_dir


def lazy_control(reference_layers: list, n: int) -> dict:
    """The blocks the lazy-layer control inherits: the reference's lazy layers (the deepest n of them), or the last n
    blocks when it has none; and which of the two."""
    lazy = [layer["layer"] for layer in reference_layers if layer["lazy"]]
    if lazy:
        return dict(layer_ids=lazy[-n:], chosen_by="the reference's lazy layers")
    k = len(reference_layers)
    return dict(layer_ids=list(range(k - n, k)), chosen_by="the last n blocks (the reference has no lazy layer)")


def check_settings(settings: dict, vocab_size: Optional[int]) -> None:
    """Refuse flags that make no experiment, before the corpus is built."""
    if settings["n_layer"] < 4 or settings["n_layer"] % 4:
        raise UserError(f"--n_layer must be a multiple of 4 (the small models have n_layer / 2 blocks, the stacking "
                        f"baseline's first stage n_layer / 4), got {settings['n_layer']}")
    if settings["n_head"] % 2 or settings["n_query_groups"] % 2:  # the presets' own values
        raise UserError(f"the half-width baseline halves the heads and query groups: {settings['n_head']} and "
                        f"{settings['n_query_groups']} must be even")
    for name, value in (("max_steps", settings["max_steps"]), ("vocab_size", vocab_size)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    pair_per_head = 2 * settings["n_head"]  # RoPE rotates pairs of channels: a head's size must be even
    if settings["n_embd"] < 1 or settings["n_embd"] % pair_per_head:
        raise UserError(f"--n_embd must be a positive multiple of {pair_per_head} (the preset's {settings['n_head']} "
                        f"heads of an even size; half of them at half the width), got {settings['n_embd']}")


def parameters(checkpoint_dir: Path) -> int:
    with torch.device("meta"):
        return num_parameters(GPT(Config.from_file(checkpoint_dir)))


def results_table(results: dict) -> str:
    """Markdown: every experiment's validation loss beside the paper's analogue, the grow loop and the analysis."""
    experiments = results["experiments"]
    reference = experiments["reference"]["validation_loss"]
    lines = [f"Inheritune reproduction, preset {results['preset']}: reference {results['config']['n_layer']} layers, "
             f"width {results['config']['n_embd']}, T = {results['settings']['max_steps']} steps of "
             f"{results['settings']['global_batch_size']} x {results['settings']['seq_len']} tokens.", "",
             "| experiment | layers | width | heads | parameters | steps | validation loss | vs reference | paper "
             "(GPT-2 medium, OpenWebText) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, run in experiments.items():
        paper = f"{PAPER[name][0]}: {PAPER[name][1]}" if name in PAPER else ""
        # results.json of a run before the baselines has no width or heads: the reference's
        width, heads = run.get("width", results["config"]["n_embd"]), run.get("heads", results["config"]["n_head"])
        notes = ([run["growth"]] if "growth" in run else []) + (
            [f"distilled from the {run['teacher']}"] if "teacher" in run else [])
        steps = f"{run['steps']} ({'; '.join(notes)})" if notes else run["steps"]
        lines.append(f"| {name} | {run['layers']} | {width} | {heads} | {run['parameters']:,} | {steps} | "
                     f"{run['validation_loss']:.4f} | {run['validation_loss'] - reference:+.4f} | {paper} |")
    if "teacher" in experiments:
        loss = {name: run["validation_loss"] for name, run in experiments.items()}
        beaten = [name for name in ("kd", "inherit+kd", "stacking", "half-width", "random 2T")
                  if loss[name] < loss["inheritune"]]
        below = {name: "below" if loss["teacher"] < loss[name] else "not below" for name in ("inheritune", "random 2T")}
        lines += ["", f"Teacher of the KD runs: the reference trained {experiments['teacher']['steps']} steps, "
                  f"{loss['teacher']:.4f} ({below['inheritune']} Inheritune's {loss['inheritune']:.4f}; "
                  f"{below['random 2T']} the same-size random model at 2T, {loss['random 2T']:.4f}). inherit+kd "
                  f"{loss['inherit+kd'] - loss['inheritune']:+.4f} against Inheritune at equal steps. Below "
                  f"Inheritune: {', '.join(beaten) or 'no baseline'}."]
    grown = results["grow"]
    rounds = ", ".join(f"{r['layers']} layers {r['validation_loss']:.4f}" for r in grown["rounds"])
    lines += ["", f"Grow loop (+2 layers a round until the reference's loss): {rounds}; "
              + (f"matched at {grown['matched_at']} layers." if grown["matched_at"] else "no round matched.")]
    control = results["lazy_control"]
    lines.append(f"Lazy-layer control: blocks {control['layer_ids']} of the reference, {control['chosen_by']}.")
    for name, layers in results["attention_rank"].items():
        lazy = [layer["layer"] for layer in layers if layer["lazy"]]
        lines.append(f"Attention of the {name}: max rank per layer {[layer['max_rank'] for layer in layers]}, "
                     f"columns holding 90% of the mass {[layer['max_mass'] for layer in layers]}; lazy layers: "
                     f"{lazy or 'none'}.")
    return "\n".join(lines) + "\n"


def plot_validation_losses(results: dict, path: Path) -> None:
    """Validation loss vs step of every experiment (from its CSV logs)."""
    import matplotlib  # pip install matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, run in results["experiments"].items():
        losses = {step: loss for step, loss in logged_validation_losses(Path(run["run_dir"])).items() if step > 0}
        ax.plot(list(losses), list(losses.values()), marker="o", markersize=3,
                linestyle="--" if name == "reference" else "-",
                label=f"{name} ({run['layers']} layers): {run['validation_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Inheritune, preset {results['preset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli(reproduce)
