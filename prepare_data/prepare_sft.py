"""Prepare instruction data for supervised finetuning (finetune/sft.py, finetune/lora.py): each example rendered with
a chat template, tokenized once, and written with a per-token loss mask that makes only the assistant turns targets.

    python prepare_data/prepare_sft.py --source_path data/guanaco/train.jsonl \
        --checkpoint_dir checkpoints/TinyLlama-1.1B --chat_template guanaco --destination_path data/guanaco_sft

Input: JSON lines (.jsonl, .ndjson, their .zst) or .json files (a JSON array, as Alpaca's, or JSON lines); a
directory is searched for them. Each record is one example, in one of these formats (--format, or recognized per
record by its keys):
    alpaca           {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_response  {"prompt": ..., "response": ...} (the keys: --prompt_key, --response_key)
    chat             {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}, multi-turn
    guanaco          {"text": "### Human: ... ### Assistant: ... ### Human: ..."} (OpenAssistant-guanaco), multi-turn

The template renders the conversation (chat_template.py: exactly what transformers' apply_chat_template renders) and
gives the character spans of the assistant turns, each with its end-of-turn token ("</s>", "<|im_end|>"): the model
must learn to stop. The whole rendered string is tokenized once, special tokens parsed, and a token is a target when
its characters overlap an assistant span (as transformers' `return_assistant_tokens_mask`). BOS comes first when the
tokenizer adds it to a text by default and the template has not written it.

Writes, atomically, `destination_path` in sft_data.py's format: the train and val splits (by a hash of each
conversation: stable from run to run, independent of the template and of file order) and sft_metadata.json (the
template and its sha256, the tokenizer, the settings, the counts). Malformed lines and records are skipped, counted
and listed (--strict refuses the run instead), and so are conversations with a special token's text in a message
("</s>"): chat encodes what a user writes literally, so such text must not train as a control token. Examples longer
than --max_seq_length tokens are dropped, or cut with --truncate (one left with no target token is dropped), counted.
"""

import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import jinja2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sft_data
from chat_template import ChatTemplate, prefix_bos, resolve_chat_template
from shard_format import file_sha256
from shard_packing import NothingWrittenError, load_tokenizer
from text_readers import (
    JSON_LINES_SUFFIXES, JSON_SUFFIX, MAX_LISTED_PROBLEMS, Report, find_inputs, hashed_split, is_encodable,
    read_records,
)
from tokenizer import Tokenizer
from utils import UserError, atomic_directory, cli

Format = Literal["auto", "alpaca", "prompt_response", "chat", "guanaco"]
FORMATS = ("alpaca", "prompt_response", "chat", "guanaco")
SUFFIXES = (*JSON_LINES_SUFFIXES, JSON_SUFFIX)
GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):")  # the data set writes "...### Assistant: ..." with no newline
GUANACO_ROLES = {"Human": "user", "Assistant": "assistant"}
Messages = List[Dict[str, str]]


class BadRecord(ValueError):
    """A record that cannot be made into a conversation; its message says why (for the list of problems)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason  # the count it adds to in the summary


@dataclass
class Example:
    ids: np.ndarray  # uint32 (T,)
    mask: np.ndarray  # bool (T,): True where the token is a target
    split: str  # "train" or "val"


@dataclass(frozen=True)
class Settings:
    """How records become examples: main's arguments of the same names (input_format: --format)."""

    input_format: Format
    prompt_key: str
    response_key: str
    max_seq_length: int
    truncate: bool
    train_on_prompt: bool
    val_fraction: float


@dataclass
class Counts:
    """What a run read and left out, beside common.Report's bookkeeping of bad lines and files."""

    formats: Dict[str, int] = field(default_factory=Counter)  # records read, by input format
    bad: Dict[str, int] = field(default_factory=Counter)  # bad records skipped (report.skip), by reason
    dropped: Dict[str, int] = field(default_factory=Counter)  # good records not written (too long), by reason
    truncated: int = 0  # examples kept after cutting them to max_seq_length


def main(
    source_path: str = "data/guanaco",
    checkpoint_dir: Path = Path("checkpoints/TinyLlama-1.1B"),
    destination_path: Path = Path("data/guanaco_sft"),
    chat_template: Optional[str] = None,
    format: Format = "auto",
    prompt_key: str = "prompt",
    response_key: str = "response",
    max_seq_length: int = 2048,
    truncate: bool = False,
    train_on_prompt: bool = False,
    val_fraction: float = 0.05,
    strict: bool = False,
    quiet: bool = False,
) -> dict:
    """Render, tokenize and mask instruction data into destination_path; return its metadata.

    Args:
        source_path: a JSON lines or .json file, a glob (quote it), or a directory searched for them
        checkpoint_dir: the model to finetune: its tokenizer (tokenizer.model or tokenizer.json) and, unless
            --chat_template is given, its chat template
        destination_path: the prepared data directory (replaced, once complete, if it holds prepared data already)
        chat_template: a built-in template (llama-2, zephyr, chatml, guanaco) or a .jinja file; none: the
            checkpoint's own
        format: the records' format; auto: recognized per record by its keys
        prompt_key: the prompt's field in prompt_response records
        response_key: the response's field in prompt_response records
        max_seq_length: the most tokens an example may have: the model sees all but the last, so a model of block
            size B takes examples of B + 1
        truncate: cut longer examples to max_seq_length tokens instead of dropping them
        train_on_prompt: make every token a target, not only the assistant turns
        val_fraction: the share of examples in the val split (chosen by a hash of the conversation)
        strict: refuse the run at the first bad line, record or file (else skip it, counted and reported)
        quiet: print no summary
    """
    start = time.perf_counter()
    check_flags(format, max_seq_length, val_fraction)
    destination_path = Path(destination_path)
    check_destination(destination_path)
    files, unknown_files = find_inputs(source_path, SUFFIXES)
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer, _ = load_tokenizer(checkpoint_dir, bos=False, eos=False, dtype=None)
    template = resolve_chat_template(tokenizer.path.parent, chat_template)

    report, counts = Report(strict=strict), Counts()
    settings = Settings(input_format=format, prompt_key=prompt_key, response_key=response_key,
                        max_seq_length=max_seq_length, truncate=truncate, train_on_prompt=train_on_prompt,
                        val_fraction=val_fraction)
    examples = read_examples(files, settings, template, tokenizer, report, counts)
    malformed = report.skipped - sum(counts.bad.values())  # what read_records skipped: lines, not records
    skipped = {**({"malformed line or item": malformed} if malformed else {}), **counts.bad, **counts.dropped}
    if not examples:
        found = f"skipped {skipped}" if skipped else "they hold no records"
        raise NothingWrittenError(
            f"no example kept from {len(files)} files in {source_path!r}: {found}, "
            f"{report.unreadable_files} unreadable files"
            + (f"; the first problem: {report.problems[0]}" if report.problems else "")
        )
    with atomic_directory(destination_path) as tmp:
        splits = {split: sft_data.write_split(tmp, split, ((e.ids, e.mask) for e in examples if e.split == split))
                  for split in sft_data.SPLITS}
        metadata = {
            "chat_template": template.source,
            "chat_template_sha256": template.sha256,
            "chat_template_name": template.name,
            "tokenizer": {"file": tokenizer.path.name, "sha256": file_sha256(tokenizer.path),
                          "vocab_size": tokenizer.vocab_size},
            "add_bos_token": tokenizer.add_bos_token,  # BOS first unless the template writes it (prefix_bos)
            **asdict(settings),
            "splits": splits,
            "skipped": skipped,
            "truncated": counts.truncated,
            "formats": dict(counts.formats),
            "unreadable_files": report.unreadable_files,
            "sources": [str(path) for path in files],
        }
        sft_data.write_metadata(tmp, metadata)
    if not quiet:
        print_summary(destination_path, metadata, report, unknown_files, time.perf_counter() - start)
    return metadata


def check_flags(format: str, max_seq_length: int, val_fraction: float) -> None:
    if not 0 <= val_fraction <= 1:
        raise UserError(f"--val_fraction must be in [0, 1], got {val_fraction}")
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2 (an input and a target), got {max_seq_length}")
    if format not in ("auto", *FORMATS):
        raise UserError(f"--format must be auto or one of {', '.join(FORMATS)}, got {format!r}")


def check_destination(path: Path) -> None:
    """The destination is replaced as a whole: refuse one that holds anything but prepared SFT data."""
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / sft_data.METADATA_FILE).is_file()):
        raise UserError(f"--destination_path {str(path)!r} exists and is not prepared SFT data (it would be "
                        "replaced): choose a new directory")


def read_examples(files: List[Path], settings: Settings, template: ChatTemplate, tokenizer: Tokenizer, report: Report,
                  counts: Counts) -> List[Example]:
    """The examples of every record of `files`, in order; what is left out is recorded in `report` and `counts`."""
    special_tokens = ChatTemplate.special_tokens(tokenizer)
    examples = []
    for path in files:
        for line, record in read_records(path, report):
            try:
                input_format, messages = record_messages(record, settings.input_format, settings.prompt_key,
                                                         settings.response_key)
                counts.formats[input_format] += 1
                ids, mask = tokenize_conversation(template, tokenizer, messages, special_tokens,
                                                  settings.train_on_prompt)
            except BadRecord as error:
                counts.bad[error.reason] += 1
                report.skip(path, line, str(error))
                continue
            limit = settings.max_seq_length
            if len(ids) > limit and not settings.truncate:
                counts.dropped[f"longer than {limit} tokens (--truncate cuts them)"] += 1
                continue
            if len(ids) > limit:
                ids, mask = ids[:limit], mask[:limit]
                counts.truncated += 1
                if not mask[1:].any():
                    counts.dropped[f"no target token in the first {limit}"] += 1
                    continue
            if not mask[1:].any():  # the first token is never predicted
                counts.dropped["no target token"] += 1
                continue
            split = "val" if hashed_split(split_key(messages), settings.val_fraction) == "validation" else "train"
            examples.append(Example(ids, mask, split))
        report.input_files += 1
        report.input_bytes += path.stat().st_size
    return examples


def record_messages(record: dict, format: Format, prompt_key: str, response_key: str) -> Tuple[str, Messages]:
    """(the record's format, its conversation as [{"role", "content"}]); BadRecord if it is none of the formats."""
    if format == "auto":
        format = detect_format(record, prompt_key, response_key)
    if format == "alpaca":
        instruction, output = string_field(record, "instruction"), string_field(record, "output")
        extra = string_field(record, "input", required=False)
        request = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": request}, {"role": "assistant", "content": output}]
    elif format == "prompt_response":
        messages = [{"role": "user", "content": string_field(record, prompt_key)},
                    {"role": "assistant", "content": string_field(record, response_key)}]
    elif format == "chat":
        messages = chat_messages(record.get("messages"))
    else:
        messages = guanaco_messages(string_field(record, "text"))
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no assistant turn")
    if any(message["role"] == "assistant" and not message["content"].strip() for message in messages):
        raise BadRecord("empty response", "an assistant turn has no text")
    return format, messages


def detect_format(record: dict, prompt_key: str, response_key: str) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if prompt_key in record and response_key in record:
        return "prompt_response"
    if isinstance(record.get("text"), str) and GUANACO_TURN.search(record["text"]):
        return "guanaco"
    raise BadRecord("unknown format", f"keys {sorted(record)[:10]}; expected messages, instruction and output, "
                                      f"{prompt_key} and {response_key} (--prompt_key, --response_key), or a text "
                                      "of ### Human: / ### Assistant: turns")


def string_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str):
        raise BadRecord("bad field", f"no string {key!r} field" if value is None else
                        f"{key!r} is a {type(value).__name__}, expected a string")
    return value


def chat_messages(messages: object) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad field", "'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRecord("bad field", f"messages[{i}] is not an object with string 'role' and 'content'")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def guanaco_messages(text: str) -> Messages:
    """The turns of an OpenAssistant-guanaco text: "### Human: question### Assistant: answer### Human: ..."."""
    head, *parts = GUANACO_TURN.split(text)
    if head.strip() or not parts:
        raise BadRecord("unknown format", "a guanaco text must start with '### Human:'")
    return [{"role": GUANACO_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(parts[::2], parts[1::2])]


def tokenize_conversation(template: ChatTemplate, tokenizer: Tokenizer, messages: Messages,
                          special_tokens: Dict[str, str], train_on_prompt: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The rendered conversation's token ids, uint32 (T,), and whether each is a target, bool (T,): it overlaps an
    assistant span (its end-of-turn token included), or every token with train_on_prompt."""
    forged = [token for token in tokenizer.special_tokens for message in messages if token in message["content"]]
    if forged:  # it would become a control token here, but stays text in chat (ChatTemplate.encode)
        raise BadRecord("special token in a message", f"{forged[0]!r} in a message's text")
    try:
        text, spans = template.render_with_spans(messages, special_tokens=special_tokens)
    except UserError as error:
        if not isinstance(error.__cause__, jinja2.TemplateError):  # the template itself is unusable
            raise
        # the template refused this conversation (raise_exception: "roles must alternate")
        raise BadRecord("template error", str(error)) from None
    if not is_encodable(text):
        raise BadRecord("invalid text", "a lone surrogate (possible in JSON), which no tokenizer can take")
    ids, offsets = encode_rendered(tokenizer, text)
    mask = np.ones(len(ids), dtype=bool) if train_on_prompt else target_mask(offsets, spans)
    return np.asarray(ids, dtype=np.uint32), mask


def encode_rendered(tokenizer: Tokenizer, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    """The ids of a rendered conversation and their character spans: special tokens parsed, and BOS first (an empty
    span) by chat's rule (`prefix_bos`: the tokenizer adds it and the template has not written it)."""
    bos = prefix_bos(tokenizer, text)
    ids, offsets = tokenizer.encode_with_offsets(text, parse_special=True)
    return bos + ids, [(0, 0)] * len(bos) + offsets


def target_mask(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> np.ndarray:
    """bool (T,): token t (characters offsets[t]) overlaps one of the character spans, start inclusive, end
    exclusive. A token cut by a span's edge is a target: the one holding an answer's first characters must be
    predicted too."""
    if not offsets or not spans:
        return np.zeros(len(offsets), dtype=bool)
    token = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    span = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return ((token[:, :1] < span[None, :, 1]) & (token[:, 1:] > span[None, :, 0])).any(axis=1)


def split_key(messages: Messages) -> str:
    """What hashed_split hashes: the conversation itself, so the split does not change with the template."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def print_summary(destination: Path, metadata: dict, report: Report, unknown_files: int, seconds: float) -> None:
    splits = metadata["splits"]
    lines = [
        f"prepare_sft: {report.input_files} files ({report.input_bytes / 1e6:,.1f} MB) in {seconds:.1f} s, template "
        f"{metadata['chat_template_name']!r}, {metadata['tokenizer']['file']}",
        *(f"  {split:<6} {counts['examples']:>10,} examples {counts['tokens']:>13,} tokens "
          f"{counts['target_tokens']:>13,} target tokens" for split, counts in splits.items()),
        f"  formats {dict(metadata['formats'])}",
        *([f"  truncated {metadata['truncated']:,} examples to {metadata['max_seq_length']} tokens"]
          if metadata["truncate"] else []),
        *(f"  skipped {count:>8,}: {reason}" for reason, count in metadata["skipped"].items()),
        *([f"  unreadable {report.unreadable_files:,} files"] if report.unreadable_files else []),
        *([f"  unknown {unknown_files:,} files of other extensions"] if unknown_files else []),
        f"  wrote {destination}",
    ]
    if report.problems:
        lines.append(f"  problems (the first {MAX_LISTED_PROBLEMS} skipped lines, every unreadable file):")
        lines += [f"    {problem}" for problem in report.problems]
    lines += [f"  warning: the {split} split is empty (--val_fraction {metadata['val_fraction']})"
              for split, counts in splits.items() if counts["examples"] == 0 and metadata["val_fraction"] > 0]
    print("\n".join(lines))


if __name__ == "__main__":
    cli(main)
