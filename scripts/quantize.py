"""Write a quantized checkpoint directory: int8 or int4 weight-only codes and scales of every linear layer
(quantize.py), device-independent, packed for the device when it is loaded; the tokenizer and chat template go along.

    python scripts/quantize.py --checkpoint_dir out/demo/final --mode int4 --group_size 64 --out_dir out/demo/int4

Prints the quality gates on held-out text: the quantized model's perplexity against the original's, and how often
their next-token predictions (top-1) agree. generate/base.py, chat.py, speculative.py and eval/ load the directory
like any other; training, LoRA, Inheritune's init_from and the exports refuse it (they need float weights).
"""

import copy
import math
import sys
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import TEMPLATE_FILE  # noqa: E402
from checkpoint import load_model, refuse_quantized, save_model_dir  # noqa: E402
from model import GPT  # noqa: E402
from quantize import (QUANTIZATION_FILE, Quantization, QuantizeMode, activation_dtype, describe,  # noqa: E402
                      prepare_model, quantize_model, to_json, weight_bytes)
from tokenizer import Tokenizer  # noqa: E402
from utils import UserError, cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(checkpoint_dir: Path, out_dir: Path, mode: QuantizeMode = "int8", group_size: int = 64,
         exclude: List[str] = (), text_files: List[Path] = (ROOT / "README.md",), max_tokens: int = 4096) -> dict:
    """Quantize a checkpoint directory's linear layers into out_dir; print the quality gates.

    Args:
        checkpoint_dir: the float checkpoint directory (lit_model.pth, model_config.json, tokenizer)
        out_dir: the quantized checkpoint directory to write
        mode: int8 (symmetric, a scale per output channel) or int4 (asymmetric, groups of group_size inputs)
        group_size: int4's group of input channels: 32, 64 or 128
        exclude: linear layers to keep in floating point, by module name (e.g. lm_head); a tied head always is
        text_files: held-out text for the quality gates (default this repository's README.md)
        max_tokens: of that text, at most this many tokens
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if max_tokens < 2:
        raise UserError(f"--max_tokens must be at least 2, got {max_tokens}")
    absent = [str(path) for path in text_files if not Path(path).is_file()]
    if absent:
        raise FileNotFoundError(f"--text_files: {absent[0]} is not a file")
    refuse_quantized(checkpoint_dir, "--checkpoint_dir", "quantizing")
    reference = load_model(checkpoint_dir, dtype=torch.float32)
    tokens = held_out_tokens(Tokenizer(checkpoint_dir), text_files, max_tokens)  # too little text: refused, no output
    tied_head = ("lm_head",) if reference.config.tie_embeddings else ()
    quantization = Quantization(mode, group_size if mode == "int4" else None, tuple(dict.fromkeys([*exclude,
                                                                                                    *tied_head])))
    quantized = copy.deepcopy(reference)  # the reference stays float for the quality gates
    try:
        quantize_model(quantized, quantization)
    except ValueError as error:
        raise UserError(f"--mode {mode} --group_size {group_size} --exclude {list(exclude)}: {error}") from None
    # the template is written with the tokenizer files; a checkpoint whose template is in tokenizer_config.json keeps
    # it there, as that file is a tokenizer file
    template = checkpoint_dir / TEMPLATE_FILE
    text_files_out = {TEMPLATE_FILE: template.read_text()} if template.is_file() else None
    save_model_dir(quantized.state_dict(), quantized.config, checkpoint_dir, out_dir,
                   json_files={QUANTIZATION_FILE: to_json(quantization)}, text_files=text_files_out)
    float_bytes, stored_bytes = weight_bytes(reference), weight_bytes(quantized)
    print(f"Wrote {out_dir}: {mode}{f' (groups of {group_size})' if mode == 'int4' else ''}, weights "
          f"{float_bytes / 1e6:,.1f} MB -> {stored_bytes / 1e6:,.1f} MB")

    prepare_model(quantized, activation_dtype(torch.device("cpu")))
    print(describe(quantized))
    gates = quality_gates(reference, quantized, tokens)
    print(f"Held-out text ({len(tokens):,} tokens of {', '.join(map(str, text_files))}): perplexity "
          f"{gates['reference_perplexity']:.4f} -> {gates['perplexity']:.4f} ({gates['perplexity_change']:+.2%}), "
          f"top-1 agreement {gates['top1_agreement']:.2%}")
    return gates


def held_out_tokens(tokenizer: Tokenizer, text_files: List[Path], max_tokens: int) -> torch.Tensor:
    ids: List[int] = []
    for path in text_files:
        ids += tokenizer.encode(Path(path).read_text(encoding="utf-8"), bos=tokenizer.bos_id is not None)
    if len(ids) < 2:
        raise UserError(f"--text_files {', '.join(map(str, text_files))} make fewer than 2 tokens")
    return torch.tensor(ids[:max_tokens])


@torch.no_grad()
def quality_gates(reference: GPT, quantized: GPT, tokens: torch.Tensor) -> dict:
    """Both models' loss over `tokens` (windows of the block size) and how often their argmax predictions agree."""
    block = reference.config.block_size
    losses, agree, count = {"reference": 0.0, "quantized": 0.0}, 0, 0
    for start in range(0, len(tokens) - 1, block):
        window = tokens[start: start + block + 1]
        inputs, targets = window[:-1][None], window[1:]
        predictions = {}
        for name, model in (("reference", reference), ("quantized", quantized)):
            logits = model(inputs)[0].float()
            losses[name] += F.cross_entropy(logits, targets, reduction="sum").item()
            predictions[name] = logits.argmax(-1)
        agree += int((predictions["reference"] == predictions["quantized"]).sum())
        count += len(targets)
    reference_loss, loss = losses["reference"] / count, losses["quantized"] / count
    return dict(reference_perplexity=math.exp(reference_loss), perplexity=math.exp(loss),
                perplexity_change=math.exp(loss - reference_loss) - 1, top1_agreement=agree / count, tokens=count)


if __name__ == "__main__":
    cli(main)
