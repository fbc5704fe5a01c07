"""Convert a checkpoint of this repository into a Hugging Face `LlamaForCausalLM` directory.

Reads `lit_model.pth` and `model_config.json` (and the tokenizer and chat template, if any) from `checkpoint_dir`
and writes `config.json`, `model.safetensors`, `generation_config.json`, the tokenizer files and `chat_template.jinja`
into `output_dir`, loadable with `transformers.LlamaForCausalLM.from_pretrained(output_dir)` and
`AutoTokenizer.from_pretrained(output_dir)`, whose `apply_chat_template` then renders the prompts chat.py does:

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/tinyllama_1b/final --output_dir out/tinyllama_1b/hf

A chat model's generation_config.json lists EOS and the template's end-of-turn tokens as `eos_token_id`, so that
`transformers.generate` (and vLLM) stop at the end of a turn.
"""

import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import TEMPLATE_FILE, ChatTemplate, resolve_chat_template
from checkpoint import check_state_dict, load_config, load_state_dict, refuse_quantized
from hf import generation_config, hf_config, hf_state_dict
from model import GPT, Config
from tokenizer import TOKENIZER_FILES, Tokenizer, has_tokenizer
from utils import UserError, atomic_write, cli, read_json, write_json

# written here rather than copied: generation_config.json gets the ids of this tokenizer and template
WRITTEN_FILES = ("generation_config.json", TEMPLATE_FILE)


def sentencepiece_tokenizer_config(tokenizer_model: Path, config: Config) -> dict:
    """Llama-2's tokenizer_config.json, for a directory that has only `tokenizer.model`."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    # transformers' LlamaTokenizer ignores sentencepiece's normalizer and assumes Llama-2's (none): say so if it matters
    probe = "Text:\n  two spaces,\ta tab, \ufb01 ligature "
    if processor.normalize(probe) != "\u2581" + probe.replace(" ", "\u2581"):
        print(
            f"WARNING: {tokenizer_model} normalizes text (e.g. NFKC, newlines to spaces, collapsed spaces) where "
            "Llama-2's does not, and transformers' LlamaTokenizer skips that step: its ids will differ from "
            "sentencepiece's on such text. Train with normalization_rule_name='identity', "
            "remove_extra_whitespaces=False."
        )

    def piece(token_id: int):
        return processor.id_to_piece(token_id) if token_id >= 0 else None

    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": piece(processor.bos_id()),
        "eos_token": piece(processor.eos_id()),
        "unk_token": piece(processor.unk_id()),
        "pad_token": piece(processor.pad_id()),
        # transformers' default, written down: plain text gets sentencepiece's dummy prefix, as in training; the
        # text after a special token in a chat prompt does not (tokenizer.Tokenizer does the same)
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
    }


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path, chat_template: Optional[str] = None) -> None:
    """Write a Hugging Face LlamaForCausalLM directory from a checkpoint of this repository.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer files
        output_dir: where config.json, model.safetensors and the tokenizer files go
        chat_template: the chat template to export (a built-in name, e.g. zephyr, or a .jinja file); none: the
            checkpoint's own, if it has one
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise UserError(f"--output_dir must differ from --checkpoint_dir ({str(checkpoint_dir)!r})")
    refuse_quantized(checkpoint_dir, "--checkpoint_dir", "the Hugging Face export")
    config = load_config(checkpoint_dir)
    checkpoint = checkpoint_dir / "lit_model.pth"
    state_dict = load_state_dict(checkpoint)
    with torch.device("meta"):
        model = GPT(config)
    check_state_dict(model, state_dict, source=str(checkpoint))

    tokenizer_present = [name for name in TOKENIZER_FILES
                         if (checkpoint_dir / name).is_file() and name not in WRITTEN_FILES]
    template = (resolve_chat_template(checkpoint_dir, chat_template) if chat_template is not None
                else ChatTemplate.from_checkpoint(checkpoint_dir))
    if has_tokenizer(checkpoint_dir):
        tokenizer = Tokenizer(checkpoint_dir)
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
        stop_ids = [] if template is None else template.stop_ids(tokenizer)
    elif template is not None:
        raise UserError(f"{checkpoint_dir} has a chat template but no tokenizer: its end-of-turn tokens have no ids")
    else:
        bos_id, eos_id, stop_ids = 1, 2, []
        print(f"No tokenizer in {checkpoint_dir}: bos_token_id=1 and eos_token_id=2 (Llama's) go into config.json")

    dtype = str(state_dict["transformer.wte.weight"].dtype).removeprefix("torch.")
    config_json = hf_config(config, dtype, bos_id, eos_id)  # before any file is written: it refuses some configs

    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_dir / "model.safetensors") as tmp:
        save_file(hf_state_dict(state_dict, config), tmp, metadata={"format": "pt"})
    write_json(output_dir / "config.json", config_json)
    own_generation_config = checkpoint_dir / "generation_config.json"
    existing = (read_json(own_generation_config, "the checkpoint's generation settings (a JSON object)")
                if own_generation_config.is_file() else {})
    write_json(output_dir / "generation_config.json", generation_config(existing, bos_id, eos_id, stop_ids))
    for name in tokenizer_present:
        with atomic_write(output_dir / name) as tmp:
            shutil.copyfile(checkpoint_dir / name, tmp)
    if "tokenizer.model" in tokenizer_present and "tokenizer_config.json" not in tokenizer_present:
        tokenizer_config = sentencepiece_tokenizer_config(checkpoint_dir / "tokenizer.model", config)
        write_json(output_dir / "tokenizer_config.json", tokenizer_config)
        tokenizer_present.append("tokenizer_config.json (written)")
    if template is not None:
        # transformers 5 reads chat_template.jinja before tokenizer_config.json's chat_template
        template.save(output_dir)
        tokenizer_present.append(f"{TEMPLATE_FILE} ({template.name}; end-of-turn ids {stop_ids})")

    print(f"Wrote {output_dir}: model.safetensors ({dtype}), config.json, generation_config.json, tokenizer files "
          f"{tokenizer_present}")
    if config.padded_vocab_size != config.vocab_size:
        print(f"HF vocab_size is the padded {config.padded_vocab_size} (the model's rows); ids >= {config.vocab_size} "
              "are padding that no token maps to")


if __name__ == "__main__":
    cli(convert_lit_checkpoint)
