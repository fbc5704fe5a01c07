"""Tokenizer for a checkpoint directory: sentencepiece `tokenizer.model` (Llama-2 style) or HF `tokenizer.json`.
Imports neither torch nor the model, so the data preparers' worker processes start fast: ids go in and out as lists.

Text is encoded literally by default: a "</s>" or "<|im_end|>" inside a document is text. Strings rendered from a
chat template are encoded with `parse_special=True`, which turns the special tokens written in them into their single
ids, as Hugging Face tokenizes a rendered chat prompt (`apply_chat_template(..., tokenize=True)`). A tokenizer.json is
run as written (by the `tokenizers` library, as transformers 4 did); transformers 5 rebuilds a LlamaTokenizer's
pipeline from its vocabulary instead, which can differ after a special token (the "legacy" dummy prefix).
"""

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from utils import UserError, read_json

# Text on which two tokenizers that claim to be the same must agree (a speculative draft and its target, a distilled
# student and its teacher): code and prose, digits, spaces, non-ASCII
TOKENIZER_PROBE = (
    "def quick_sort(array):\n    if len(array) <= 1:\n        return array  # 0.5 * 1e-3\n"
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 東京, emoji \U0001F600 and\ttabs.\n"
)

# What a checkpoint directory holds of its tokenizer and chat format: copied next to the weights by pretraining,
# finetuning and conversion
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
# The files Tokenizer loads, the first found
MODEL_FILES = ("tokenizer.model", "tokenizer.json")
# The special-token names transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def has_tokenizer(directory: Union[str, Path]) -> bool:
    """Whether `directory` holds a file Tokenizer loads."""
    return any((Path(directory) / name).is_file() for name in MODEL_FILES)


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if checkpoint_dir.is_file():  # a path to the tokenizer file itself
            checkpoint_dir, files = checkpoint_dir.parent, [checkpoint_dir]
        else:
            files = [checkpoint_dir / name for name in MODEL_FILES]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"No tokenizer.model or tokenizer.json in {str(checkpoint_dir)!r}")
        self.path = path
        config = read_tokenizer_config(checkpoint_dir)
        if path.suffix == ".model":
            import sentencepiece as spm

            self.backend = "sentencepiece"
            try:
                self.processor = spm.SentencePieceProcessor(model_file=str(path))
            except RuntimeError as error:  # "could not parse ModelProto": a truncated or foreign file
                raise UserError(f"{path} cannot be read ({error}): expected a sentencepiece model") from None
            self.vocab_size = self.processor.vocab_size()
            # what transformers' LlamaTokenizer makes special: sentencepiece's control symbols and <unk>
            self.special_tokens = {self.processor.id_to_piece(i): i for i in range(self.vocab_size)
                                   if self.processor.is_control(i) or self.processor.is_unknown(i)}
            longest_first = sorted(self.special_tokens, key=len, reverse=True)  # "<s>" must not split "<s>x"
            self._special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
            # transformers 5's LlamaTokenizer adds the "▁" dummy prefix only at the start of the text, not after
            # each special token, unless tokenizer_config.json says "legacy": true (sentencepiece's own way, and
            # transformers 4's with Llama-2's tokenizer.json); its default is legacy=False, also without a config
            self._no_prefix_processor = None if config.get("legacy", False) else no_dummy_prefix_processor(path)
            # sentencepiece says -1 for a disabled special token
            defaults = {name: self.processor.id_to_piece(i) for name, i in (
                ("bos_token", self.processor.bos_id()), ("eos_token", self.processor.eos_id()),
                ("unk_token", self.processor.unk_id()), ("pad_token", self.processor.pad_id())) if i >= 0}
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            try:
                self.processor = HFTokenizer.from_file(str(path))
            except Exception as error:  # the tokenizers library raises a plain Exception ("expected value at ...")
                raise UserError(f"{path} cannot be read ({error}): expected a Hugging Face tokenizer.json") from None
            self.processor.encode_special_tokens = True  # "</s>" in a text is text, as with sentencepiece
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            # the added tokens that `encode_special_tokens` switches: transformers' split_special_tokens
            self.special_tokens = {token.content: i for i, token in self.processor.get_added_tokens_decoder().items()
                                   if token.special}
            defaults = {name: token for name, token in (("bos_token", "<s>"), ("eos_token", "</s>"))
                        if self.processor.token_to_id(token) is not None}
        # the special-token strings of tokenizer_config.json / special_tokens_map.json, else the backend's own
        self.special_token_strings: Dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = config.get(name, defaults.get(name))
            if isinstance(token, dict):  # {"content": "<s>", ...}
                token = token["content"]
            if token is not None:
                self.special_token_strings[name] = token
        self.bos_token = self.special_token_strings.get("bos_token")
        self.eos_token = self.special_token_strings.get("eos_token")
        self.bos_id = None if self.bos_token is None else self.token_id(self.bos_token)
        self.eos_id = None if self.eos_token is None else self.token_id(self.eos_token)
        self.add_bos_token: bool = config.get("add_bos_token", self._backend_adds_bos())

    def _backend_adds_bos(self) -> bool:
        """Whether HF's tokenizer adds BOS to a text by default when tokenizer_config.json does not say: a Llama
        sentencepiece model does (LlamaTokenizer's add_bos_token=True); a tokenizer.json does if its post-processor
        inserts it."""
        if self.bos_id is None:
            return False
        if self.backend == "sentencepiece":
            return True
        return self.processor.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def token_id(self, token: str) -> Optional[int]:
        """The id of a token string (a vocabulary piece like "</s>" or "<|im_end|>"); None if it is not one."""
        if self.backend == "sentencepiece":
            token_id = self.processor.piece_to_id(token)
            return None if self.processor.id_to_piece(token_id) != token else token_id  # unknown pieces say <unk>'s
        return self.processor.token_to_id(token)

    def special_token_ids(self, tokens: Iterable[str]) -> List[int]:
        """The ids of token strings such as a chat template's end-of-turn tokens; a string that is not one token of
        this tokenizer is an error naming it."""
        ids = []
        for token in tokens:
            token_id = self.token_id(token)
            if token_id is None:
                raise UserError(f"{token!r} is not a token of {self.path}: expected one of its special tokens "
                                f"{sorted(self.special_tokens)}")
            ids.append(token_id)
        return ids

    def check_fits(self, vocab_size: int, source: str) -> None:
        """Every token id must be one of the model's `vocab_size` tokens; `source` names where vocab_size came from."""
        if self.vocab_size > vocab_size:
            raise UserError(f"{self.path} has {self.vocab_size} tokens, more than the vocab_size={vocab_size} "
                            f"of {source}")

    def encode(self, text: str, bos: bool = False, eos: bool = False, parse_special: bool = False) -> List[int]:
        """The ids of `text`, with the BOS id before and the EOS id after when asked for (an error if undefined).

        With `parse_special`, the special tokens written in `text` (`self.special_tokens`: "<s>", "</s>",
        "<|im_start|>", ...) become their single ids: for strings rendered from a chat template, never for corpora
        or what a user types."""
        if parse_special:
            ids = self.encode_with_offsets(text, parse_special=True)[0]
        elif self.backend == "sentencepiece":
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path} defines no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path} defines no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def encode_with_offsets(self, text: str, parse_special: bool = True) -> Tuple[List[int], List[Tuple[int, int]]]:
        """The ids of `text` (no BOS or EOS) and, for each id, its (start, end) character span in `text`, so that a
        span of characters (an assistant turn) can be mapped to the tokens that overlap it.

        Every byte-fallback piece of a character gets that character's span. A token that adds text not in `text`
        (sentencepiece's "▁" dummy prefix when it stands alone) has an empty span (start == end) where it sits."""
        if self.backend == "huggingface":
            self.processor.encode_special_tokens = not parse_special
            try:
                encoding = self.processor.encode(text, add_special_tokens=False)
            finally:
                self.processor.encode_special_tokens = True
            return encoding.ids, [tuple(offset) for offset in encoding.offsets]
        # sentencepiece: split at the special tokens and encode each piece between them on its own, as
        # transformers' LlamaTokenizer does (the dummy prefix only on the text's first piece, or on every piece
        # when legacy)
        pieces = self._special_pattern.split(text) if parse_special and self.special_tokens else [text]
        ids, offsets, start = [], [], 0
        for i, piece in enumerate(pieces):
            if i % 2 == 1:  # a special token
                ids.append(self.special_tokens[piece])
                offsets.append((start, start + len(piece)))
            elif piece:
                piece_ids, piece_offsets = self._sentencepiece_offsets(piece, dummy_prefix=start == 0)
                ids += piece_ids
                offsets += [(start + a, start + b) for a, b in piece_offsets]
            start += len(piece)
        return ids, offsets

    def _sentencepiece_offsets(self, text: str, dummy_prefix: bool) -> Tuple[List[int], List[Tuple[int, int]]]:
        processor = self.processor if dummy_prefix or self._no_prefix_processor is None else self._no_prefix_processor
        proto = processor.encode(text, out_type="proto")
        # sentencepiece's offsets count bytes of the UTF-8 text: map them to characters
        char_at_byte = [0] * (len(text.encode("utf-8")) + 1)
        position = 0
        for index, char in enumerate(text):
            width = len(char.encode("utf-8"))
            char_at_byte[position: position + width] = [index] * width
            position += width
        char_at_byte[position] = len(text)
        ids, offsets = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            offsets.append((char_at_byte[piece.begin], char_at_byte[piece.end]))
        # the first byte pieces of a character have empty spans; the last one carries the character: share it
        for i in range(len(ids) - 2, -1, -1):
            if self.processor.is_byte(ids[i]) and offsets[i][0] == offsets[i][1] and self.processor.is_byte(ids[i + 1]):
                offsets[i] = offsets[i + 1]
        return ids, offsets

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: a list, or an array or tensor (anything with `.tolist()`, so torch is not imported).
        Special tokens decode to nothing."""
        return self.processor.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


def read_tokenizer_config(checkpoint_dir: Path) -> dict:
    """tokenizer_config.json, with the special tokens of special_tokens_map.json (older repositories) where it has
    none: what transformers reads."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(checkpoint_dir) / name
        if path.is_file():
            config.update(read_json(path, "the tokenizer's settings (a JSON object)"))
    return config


class StreamDecoder:
    """Incremental detokenization for streaming: `push(id)` returns the text that id adds, `flush()` whatever is held
    back; the pieces joined equal `tokenizer.decode(all ids)`.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) and is always taken as the
    difference of two decodes that start at the same token: decoding a piece on its own would drop the space a
    sentencepiece "▁word" token starts with, and split a character made of byte-fallback tokens. The window starts
    at the last piece returned, so each push decodes a few tokens, not the whole answer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.prefix = 0  # the window's first token: where the last returned piece starts
        self.read = 0  # tokens whose text has been returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        printed = self.tokenizer.decode(self.ids[self.prefix: self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(printed):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD); the decoder starts afresh."""
        printed = self.tokenizer.decode(self.ids[self.prefix: self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.ids, self.prefix, self.read = [], 0, 0
        return text[len(printed):]


def no_dummy_prefix_processor(path: Path):
    """The sentencepiece model of `path` without its "▁" dummy prefix (for text that continues a special token)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    model.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
