"""Inheritune's initialisation: a smaller model that inherits blocks of a pretrained reference.

    python inheritune/init_from.py --ref_checkpoint_dir checkpoints/TinyLlama-1.1B --n_layers 11 \\
        --out_dir checkpoints/inherit-11

Sanyal et al., "Inheritune: Training Smaller Yet More Attentive Language Models" (arXiv 2404.08634), Algorithm 1:
the token embedding `transformer.wte`, blocks 0..n-1, the final norm `transformer.ln_f` and the head `lm_head` of a
k-block reference are copied into an n-block model (n = k // 2 by default). What is not copied keeps this project's
init: model.py's `GPT(config)` of the n-block config after `torch.manual_seed(seed)`, the same draw for every
variant, so that variants with one seed differ only in what they copy.

The output is a normal checkpoint directory, written by `checkpoint.save_model_dir`: `lit_model.pth` (every tensor in
its dtype in the reference), `model_config.json` (the reference's with n_layer = n, named `{reference name}-inherit-n`,
e.g. `tiny_LLaMA_1b-inherit-11`) and the reference's tokenizer files, so `pretrain/tinyllama.py
--initial_checkpoint_dir`, `generate/base.py` and the converters take it unchanged. `inheritune.json` beside them
records its provenance: the reference directory and the sha256 of its lit_model.pth, the options, the copied tensors.

Variants:
- `--layer_ids 11 12 13 14 15 16 17 18 19 20 21`: which reference blocks become blocks 0..n-1, in order (here the last
  11 of 22: the lazy-layer control). `--n_layers` then defaults to their number.
- `--modules` chooses what of each inherited block is copied: `all`; `attn` (attn.qkv, attn.proj and norm_1); `mlp`
  (mlp.fc_1, mlp.fc_2, mlp.proj and norm_2); `attn_mlp` (the attention and MLP weights, not the norms); `none` (no
  block weight). Biases (config.bias) go with their weights.
- `--no-copy_embeddings`, `--no-copy_final_norm`, `--no-copy_head` leave wte, ln_f, lm_head at their init.
- The same-size random-init baseline, through the identical code path (and the same fresh weights):
  `--modules none --no-copy_embeddings --no-copy_final_norm --no-copy_head`. `--modules none` alone still copies
  wte, ln_f and lm_head.
- The official code's runs: its GPT-2 runs (behind the paper's tables) copied the blocks and the tied wte/lm_head
  (one tensor with tie_embeddings, two where they are untied) but not ln_f: `--no-copy_final_norm`. Its 1.5B lit-gpt
  run (OpenLLaMA-3B, 26 -> 13 blocks) also left wte random: `--no-copy_embeddings --no-copy_final_norm`.

The reference's weights are memory-mapped and only the inherited tensors are read; the reference model is not built.
"""

import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Literal, Mapping, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_state_dict, load_config, load_state_dict, refuse_quantized,
                        save_model_dir)
from model import GPT
from utils import UserError, cli

PROVENANCE_FILE = "inheritune.json"
Modules = Literal["all", "attn", "mlp", "attn_mlp", "none"]
# what each --modules choice copies of an inherited block: prefixes of the names inside `transformer.h.{i}.`
BLOCK_PARTS = {
    "all": ("norm_1.", "attn.", "norm_2.", "mlp."),
    "attn": ("norm_1.", "attn."),
    "mlp": ("norm_2.", "mlp."),
    "attn_mlp": ("attn.", "mlp."),
    "none": (),
}
BLOCK_PREFIX = "transformer.h."


def init_from(
    ref_checkpoint_dir: Path,
    out_dir: Path,
    n_layers: Optional[int] = None,
    layer_ids: Optional[List[int]] = None,
    modules: Modules = "all",
    copy_embeddings: bool = True,
    copy_final_norm: bool = True,
    copy_head: bool = True,
    seed: int = 1337,
    overwrite: bool = False,
) -> Path:
    """Write a model that inherits blocks of a reference checkpoint as a checkpoint directory; returns out_dir.

    Args:
        ref_checkpoint_dir: the reference checkpoint directory (lit_model.pth, model_config.json, tokenizer)
        out_dir: the checkpoint directory to write
        n_layers: blocks of the new model; default: the number of --layer_ids, else half the reference's (k // 2)
        layer_ids: the reference blocks that become blocks 0..n-1, in order; default: 0..n-1
        modules: what of each inherited block is copied: all, attn (+ norm_1), mlp (+ norm_2), attn_mlp (no norms),
            none
        copy_embeddings: copy transformer.wte
        copy_final_norm: copy transformer.ln_f
        copy_head: copy lm_head
        seed: torch seed of the init of everything that is not copied
        overwrite: replace an out_dir that already holds files (the whole directory)
    """
    ref_dir, out_dir = Path(ref_checkpoint_dir), Path(out_dir)
    if modules not in BLOCK_PARTS:
        raise UserError(f"--modules {modules!r} is not one of {', '.join(BLOCK_PARTS)}")
    refuse_quantized(ref_dir, "--ref_checkpoint_dir", "inheriting layers")
    ref_config = load_config(ref_dir)
    if ref_config.tie_embeddings and copy_head != copy_embeddings:
        raise UserError(f"{ref_dir}'s head is its token embedding (tie_embeddings): --copy_head and "
                        f"--copy_embeddings copy one tensor, give both or neither")
    layer_ids = inherited_layers(ref_config.n_layer, n_layers, layer_ids)
    check_out_dir(ref_dir, out_dir, overwrite)
    ref_weights = load_state_dict(ref_dir / WEIGHTS_FILE)
    try:
        with torch.device("meta"):
            check_state_dict(GPT(ref_config), ref_weights, str(ref_dir / WEIGHTS_FILE))
    except UserError as error:
        raise UserError(f"--ref_checkpoint_dir {ref_dir}: its weights do not match its {CONFIG_FILE}: "
                        f"{error.args[0]}") from None

    n = len(layer_ids)
    config = replace(ref_config, n_layer=n, name=f"{ref_config.name or ref_dir.resolve().name}-inherit-{n}")
    torch.manual_seed(seed)
    weights = GPT(config).state_dict()  # the model itself is dropped: each fresh tensor a copy replaces is freed
    copy = {"transformer.wte": copy_embeddings, "transformer.ln_f": copy_final_norm, "lm_head": copy_head}
    copied = []
    for key in weights:
        if config.tie_embeddings and key == "lm_head.weight":
            continue  # the embedding's tensor: copied once, below
        source = reference_key(key, layer_ids)
        if is_copied(key, modules, copy):
            weights[key] = ref_weights[source].clone()  # reads the memory-mapped tensor
            copied.append(key)
        else:  # the reference's dtype for every tensor: a bf16 reference gives a bf16 model
            weights[key] = weights[key].to(ref_weights[source].dtype)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]

    provenance = dict(
        reference_dir=str(ref_dir.resolve()), reference_sha256=file_sha256(ref_dir / WEIGHTS_FILE),
        reference_name=ref_config.name, reference_n_layer=ref_config.n_layer, n_layer=n, layer_ids=layer_ids,
        modules=modules, copy_embeddings=copy_embeddings, copy_final_norm=copy_final_norm, copy_head=copy_head,
        seed=seed, copied=copied,
    )
    save_model_dir(weights, config, ref_dir, out_dir, json_files={PROVENANCE_FILE: provenance})
    outside = [name for name, flag in copy.items() if flag]
    print(f"{out_dir} ({config.name}) inherits blocks {layer_ids} (modules: {modules}) of the {ref_config.n_layer} "
          f"of {ref_dir}, and {', '.join(outside) or 'nothing else'}")
    print(count_line(weights, copied, seed))
    return out_dir


def inherited_layers(k: int, n_layers: Optional[int], layer_ids: Optional[List[int]]) -> List[int]:
    """The reference blocks to inherit, in order, from --n_layers and --layer_ids; k: the reference's blocks."""
    if layer_ids is None:
        n = k // 2 if n_layers is None else n_layers
        if not 1 <= n <= k:
            given = f"--n_layers {n}" if n_layers is not None else f"the default --n_layers {k} // 2 = {n}"
            raise UserError(f"{given} is out of range: the reference has {k} blocks; choose 1 to {k}")
        return list(range(n))
    if n_layers is not None and n_layers != len(layer_ids):
        raise UserError(f"--n_layers {n_layers} disagrees with --layer_ids {layer_ids} ({len(layer_ids)} blocks): "
                        "give one of them, or make them agree")
    if not layer_ids:
        raise UserError("--layer_ids is empty: name at least one reference block")
    outside = [i for i in layer_ids if not 0 <= i < k]
    if outside:
        raise UserError(f"--layer_ids {layer_ids}: {outside} out of range; the reference's {k} blocks are "
                        f"numbered 0 to {k - 1}")
    repeated = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
    if repeated:
        raise UserError(f"--layer_ids {layer_ids} repeats {repeated}: each reference block can be inherited once")
    return list(layer_ids)


def check_out_dir(ref_dir: Path, out_dir: Path, overwrite: bool) -> None:
    # save_model_dir replaces out_dir whole: it must not be (or hold) the reference, nor silently replace files
    if out_dir.resolve() == ref_dir.resolve() or out_dir.resolve() in ref_dir.resolve().parents:
        raise UserError(f"--out_dir {out_dir} is the reference directory {ref_dir} or holds it, and would replace "
                        "it: choose another --out_dir")
    if overwrite or not out_dir.exists():
        return
    if (out_dir / WEIGHTS_FILE).exists():
        raise UserError(f"--out_dir {out_dir} already holds {WEIGHTS_FILE}: choose another --out_dir, or pass "
                        "--overwrite to replace that directory whole")
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise UserError(f"--out_dir {out_dir} exists and is not an empty directory: choose another --out_dir, "
                        "or pass --overwrite to replace it whole")


def reference_key(key: str, layer_ids: List[int]) -> str:
    """The reference's name of the new model's tensor `key`: block i is the reference's block layer_ids[i]."""
    if not key.startswith(BLOCK_PREFIX):
        return key
    index, rest = key[len(BLOCK_PREFIX):].split(".", 1)
    return f"{BLOCK_PREFIX}{layer_ids[int(index)]}.{rest}"


def is_copied(key: str, modules: str, copy: Mapping[str, bool]) -> bool:
    """Whether the new model's tensor `key` is inherited; copy: {module outside the blocks: copied}."""
    if key.startswith(BLOCK_PREFIX):
        return key[len(BLOCK_PREFIX):].split(".", 1)[1].startswith(BLOCK_PARTS[modules])
    return any(flag for module, flag in copy.items() if key.startswith(module + "."))


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB pieces (a reference's weights may be bigger than the memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def count_line(weights: Mapping[str, torch.Tensor], copied: List[str], seed: int) -> str:
    tied = weights["lm_head.weight"] is weights["transformer.wte.weight"]  # one tensor, counted once
    fresh = sorted(set(weights) - set(copied) - ({"lm_head.weight"} if tied else set()))
    copied_params = sum(weights[key].numel() for key in copied)
    fresh_params = sum(weights[key].numel() for key in fresh)
    return (f"  copied {len(copied)} tensors ({copied_params:,} parameters); freshly initialised with seed {seed}: "
            f"{len(fresh)} tensors ({fresh_params:,} parameters)")


if __name__ == "__main__":
    cli(init_from, description=__doc__)
