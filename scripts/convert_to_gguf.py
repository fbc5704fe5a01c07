"""Convert a checkpoint of this repository into a GGUF file, the format of llama.cpp, Ollama, LM Studio and
llama-cpp-python:

    python scripts/convert_to_gguf.py --checkpoint_dir out/demo/final --out_file out/demo.gguf --type q8_0

The file holds the weights (architecture `llama`, llama.cpp's tensor names, q and k in its row order), the
hyperparameters, the tokenizer (sentencepiece `tokenizer.model` or `tokenizer.json`), its special ids and the chat
template. `--type` is the type of the matrices: f32, f16, bf16, or quantized by gguf-py as ggml does, q8_0 or q4_0
(the output layer then stays at 8 bits); 1-D tensors are f32, and a matrix whose rows are not a multiple of 32 values
stays f16 under q8_0 and q4_0. The file is written under a temporary name and renamed when complete. The format and
the tokenizer rules are gguf_format.py's; the reverse is scripts/convert_gguf_checkpoint.py.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import ChatTemplate
from checkpoint import WEIGHTS_FILE, check_state_dict, load_config, load_state_dict, refuse_quantized
from gguf_format import TYPES, check_exportable, checkpoint_vocabulary, write_gguf
from model import GPT
from tokenizer import Tokenizer, has_tokenizer, read_tokenizer_config
from utils import UserError, atomic_write, cli

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def convert_to_gguf(checkpoint_dir: Path, out_file: Path, type: str = "f16") -> Path:
    """Write a GGUF file from a checkpoint directory; returns its path.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer files
        out_file: the GGUF file to write (replaced if it exists)
        type: the type of the weight matrices: f32, f16, bf16, q8_0 or q4_0
    """
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if type not in TYPES:
        raise UserError(f"--type {type!r}: expected one of {', '.join(TYPES)}")
    if out_file.is_dir():
        raise UserError(f"--out_file {out_file} is a directory: give a file name such as {out_file / 'model.gguf'}")
    refuse_quantized(checkpoint_dir, "--checkpoint_dir", "the GGUF export (--type q8_0 or q4_0 quantizes)")
    config = load_config(checkpoint_dir)
    check_exportable(config, str(checkpoint_dir / "model_config.json"))
    if not has_tokenizer(checkpoint_dir):
        raise UserError(f"{checkpoint_dir} has no tokenizer.model or tokenizer.json: a GGUF file carries its tokenizer")
    state_dict = load_state_dict(checkpoint_dir / WEIGHTS_FILE)
    other = sorted({str(t.dtype) for t in state_dict.values()} - {str(d) for d in FLOAT_DTYPES})
    if other:
        raise UserError(f"{checkpoint_dir / WEIGHTS_FILE} holds {', '.join(other)} tensors: the GGUF export reads "
                        f"float weights (--type q8_0 or q4_0 quantizes)")
    with torch.device("meta"):
        check_state_dict(GPT(config), state_dict, str(checkpoint_dir / WEIGHTS_FILE))
    tokenizer = Tokenizer(checkpoint_dir)
    tokenizer.check_fits(config.vocab_size, str(checkpoint_dir / "model_config.json"))
    template = ChatTemplate.from_checkpoint(checkpoint_dir)
    vocabulary = checkpoint_vocabulary(tokenizer, config.vocab_size, template.stop_ids(tokenizer) if template else [])
    # a head equal to the embedding is written once too: a tied model converted before tie_embeddings kept a copy
    head, embedding = (state_dict[key][:config.vocab_size] for key in ("lm_head.weight", "transformer.wte.weight"))
    tie_embeddings = config.tie_embeddings or torch.equal(head, embedding)

    with atomic_write(out_file) as tmp:
        notes = write_gguf(tmp, state_dict, config, vocabulary, template.source if template else None, type,
                           tie_embeddings=tie_embeddings, name=config.name or checkpoint_dir.name)
    print(f"Wrote {out_file} ({out_file.stat().st_size / 1e6:.1f} MB): {type}, {len(vocabulary.tokens)} tokens "
          f"({vocabulary.model} vocabulary), chat template {template.name if template else 'none'}")
    if tie_embeddings:
        print("The head is the token embedding: written once, as token_embd (no output tensor)")
    for note, names in notes.items():
        print(f"{len(names)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {note}")
    if vocabulary.model == "llama" and not read_tokenizer_config(checkpoint_dir).get("legacy", False):
        print("Note: llama.cpp puts sentencepiece's '\u2581' before text that follows a special token, this tokenizer "
              "does not (docs/gguf.md): prompts with text right after a special token get other ids there")
    return out_file


if __name__ == "__main__":
    cli(convert_to_gguf)
