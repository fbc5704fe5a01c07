"""prepare_data/prepare_sft.py and the SFT demo's data against independent references: transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` on the same templates with `{% generation %}` markers
(ids and loss masks), on a tokenizer.json with added ChatML tokens and a sentencepiece model, both trained here."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sft_data
from chat_template import BUILTIN_TEMPLATES
from prepare_data import prepare_sft, prepare_sft_demo
from shard_packing import NothingWrittenError
from tests.test_chat_template import CHATML_WITH_GENERATION
from text_readers import BadInputError, hashed_split
from tests.test_tokenizer import train_chatml_tokenizer, train_sentencepiece
from tokenizer import Tokenizer
from utils import UserError, cli

# the built-in templates with the assistant turns in generation markers, for transformers' assistant mask
MARKED = {
    "llama-2": ("{{ ' '  + content.strip() + ' ' + eos_token }}",
                "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}"),
    "guanaco": ("{{ '### Assistant: ' + message['content'] + eos_token }}",
                "{{ '### Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"),
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "It serializes  an object to a JSON string."},
    {"role": "user", "content": "And the café?"},
    {"role": "assistant", "content": "It is text, like any other."},
]
# one record per input format, each with the conversation it must become
RECORDS = [
    ({"instruction": "Name a module.", "input": "", "output": "json"},
     [{"role": "user", "content": "Name a module."}, {"role": "assistant", "content": "json"}]),
    ({"instruction": "Translate.", "input": "the fox", "output": "le renard"},
     [{"role": "user", "content": "Translate.\n\nthe fox"}, {"role": "assistant", "content": "le renard"}]),
    ({"question": "What is 2 + 2?", "answer": "4"},
     [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]),
    ({"messages": CONVERSATION}, CONVERSATION),
    ({"text": "### Human: Hi there.### Assistant: Hello! How can I help?### Human: Tell me a joke.### Assistant: "
              "A pun about a fox.", "lang": "en"},
     [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "A pun about a fox."}]),
]
KEYS = dict(prompt_key="question", response_key="answer")


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with ChatML's added special tokens, no BOS."""
    return train_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A Llama-2 style sentencepiece model (<s>, </s>, byte fallback), as the demo's."""
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(tmp_path, records, tokenizer_dir, name="out", **kwargs):
    """Run prepare_sft on `records` (all in the train split unless val_fraction is given); return (metadata, the
    train examples in input order as (ids, mask) lists)."""
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    kwargs = {"val_fraction": 0.0, "quiet": True, **kwargs}
    metadata = prepare_sft.main(str(source), tokenizer_dir, tmp_path / name, **kwargs)
    train = sft_data.SFTSplit(tmp_path / name, "train")
    return metadata, [(ids.tolist(), mask.tolist()) for ids, mask in (train[i] for i in range(len(train)))]


def transformers_reference(tokenizer, template, messages):
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return out["input_ids"], [bool(m) for m in out["assistant_masks"]]


def test_target_mask_marks_the_tokens_that_overlap_a_span():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 9), (9, 12), (12, 15)]
    spans = [(4, 9), (12, 15)]
    # (3, 5) is cut by the span's start: a target; the empty (9, 9) sits at the span's end: not one
    assert prepare_sft.target_mask(offsets, spans).tolist() == [False, False, True, True, False, False, True]
    assert prepare_sft.target_mask(offsets, []).tolist() == [False] * 7


def test_each_input_format_becomes_its_conversation():
    for record, messages in RECORDS:
        assert prepare_sft.record_messages(record, "auto", **KEYS)[1] == messages
    assert prepare_sft.record_messages(RECORDS[2][0], "prompt_response", **KEYS)[0] == "prompt_response"
    bad = [({"instruction": "x"}, "unknown format"), ({"instruction": 1, "output": "y"}, "bad field"),
           ({"messages": [{"role": "user"}]}, "bad field"),
           ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
           ({"question": "x", "answer": "  "}, "empty response"), ({"text": "Hi ### Human: x"}, "unknown format")]
    for record, reason in bad:
        with pytest.raises(prepare_sft.BadRecord) as error:
            prepare_sft.record_messages(record, "auto", **KEYS)
        assert error.value.reason == reason
    with pytest.raises(prepare_sft.BadRecord, match="no string 'instruction' field"):
        prepare_sft.record_messages({"messages": CONVERSATION}, "alpaca", **KEYS)


@pytest.mark.parametrize("template", ["chatml", "marked.jinja"])
def test_chatml_masks_equal_transformers_assistant_mask(tmp_path, chatml_dir, template):
    """The built-in ChatML (spans by rendering with and without each turn) and a template with generation markers
    give transformers' ids and mask: assistant contents and <|im_end|> are targets, the rest is not."""
    from transformers import AutoTokenizer

    if template.endswith(".jinja"):
        (tmp_path / template).write_text(CHATML_WITH_GENERATION)
        template = str(tmp_path / template)
    metadata, examples = prepare(tmp_path, [record for record, _ in RECORDS], chatml_dir, chat_template=template,
                                 **KEYS)
    assert metadata["formats"] == {"alpaca": 2, "prompt_response": 1, "chat": 1, "guanaco": 1}
    hf = AutoTokenizer.from_pretrained(chatml_dir)
    tokenizer = Tokenizer(chatml_dir)
    end_of_turn = tokenizer.token_id("<|im_end|>")
    for (ids, mask), (_, messages) in zip(examples, RECORDS, strict=True):
        assert (ids, mask) == transformers_reference(hf, CHATML_WITH_GENERATION, messages)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        targets = np.array(ids)[mask]
        assert tokenizer.decode(targets) == "".join(answers)  # decode drops the special tokens
        assert list(targets).count(end_of_turn) == len(answers)


@pytest.mark.parametrize("legacy", [True, False])
def test_llama2_and_guanaco_masks_equal_transformers_on_sentencepiece(tmp_path, sentencepiece_dir, legacy):
    """Multi-turn conversations with a system prompt, byte-fallback characters and double spaces. Llama-2's
    template writes <s> itself: it is not doubled; guanaco's does not: BOS comes first, as LlamaTokenizer adds it."""
    from transformers import LlamaTokenizer

    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((sentencepiece_dir / "tokenizer.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
    hf = LlamaTokenizer.from_pretrained(directory, legacy=legacy)
    conversations = [CONVERSATION, CONVERSATION[1:3], RECORDS[4][1]]
    for name, (plain, marked) in MARKED.items():
        _, examples = prepare(tmp_path, [{"messages": m} for m in conversations], directory, name=name,
                              chat_template=name)
        for (ids, mask), messages in zip(examples, conversations, strict=True):
            reference_ids, reference_mask = transformers_reference(hf, BUILTIN_TEMPLATES[name].replace(plain, marked),
                                                                   messages)
            if name == "guanaco":
                reference_ids, reference_mask = [hf.bos_token_id] + reference_ids, [False] + reference_mask
            assert (ids, mask) == (reference_ids, reference_mask), (name, messages)
            assert ids[:2].count(hf.bos_token_id) == 1
            assert ids[-1] == hf.eos_token_id and mask[-1]  # the end of the last turn is a target


def test_too_long_examples_are_dropped_or_truncated_and_counted(tmp_path, chatml_dir):
    short = {"question": "Hi", "answer": "Hello"}
    long_answer = {"question": "Hi", "answer": "the fox " * 40}
    long_prompt = {"question": "the fox " * 40, "answer": "Hello"}
    records = [short, long_answer, long_prompt]
    _, [(short_ids, _)] = prepare(tmp_path, [short], chatml_dir, name="short", chat_template="chatml", **KEYS)
    limit = len(short_ids) + 5

    metadata, examples = prepare(tmp_path, records, chatml_dir, chat_template="chatml", max_seq_length=limit, **KEYS)
    assert len(examples) == 1 and metadata["truncated"] == 0
    assert metadata["skipped"] == {f"longer than {limit} tokens (--truncate cuts them)": 2}

    metadata, examples = prepare(tmp_path, records, chatml_dir, chat_template="chatml", max_seq_length=limit,
                                 truncate=True, **KEYS)
    assert [len(ids) for ids, _ in examples] == [len(short_ids), limit]
    assert metadata["truncated"] == 2 and metadata["skipped"] == {f"no target token in the first {limit}": 1}
    full = prepare(tmp_path, [long_answer], chatml_dir, name="full", chat_template="chatml", **KEYS)[1][0]
    assert examples[1] == (full[0][:limit], full[1][:limit])
    assert metadata["splits"]["train"]["examples"] == 2


def test_split_by_hash_is_deterministic_and_independent_of_order_and_template(tmp_path, chatml_dir):
    records = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(60)]
    expected_val = sum(hashed_split(prepare_sft.split_key(prepare_sft.record_messages(r, "auto", **KEYS)[1]), 0.3)
                       == "validation" for r in records)
    assert 0 < expected_val < 60

    def val_answers(name, records, template):
        prepare(tmp_path, records, chatml_dir, name=name, chat_template=template, val_fraction=0.3, **KEYS)
        tokenizer, val = Tokenizer(chatml_dir), sft_data.SFTSplit(tmp_path / name, "val")
        return sorted(tokenizer.decode(ids[mask]) for ids, mask in (val[i] for i in range(len(val))))

    first = val_answers("a", records, "chatml")
    assert len(first) == expected_val
    assert val_answers("b", records[::-1], "chatml") == first
    (tmp_path / "marked.jinja").write_text(CHATML_WITH_GENERATION)
    assert val_answers("c", records, str(tmp_path / "marked.jinja")) == first


def test_bad_input_is_skipped_counted_and_listed_and_strict_refuses(tmp_path, sentencepiece_dir, capsys):
    source = tmp_path / "bad.jsonl"
    lines = [json.dumps({"question": "Hi", "answer": "Hello"}), "{not json", "[1, 2]",
             json.dumps({"question": "Hi"}), json.dumps({"question": "Hi", "answer": "Say </s> twice"}),
             json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"question": "Hi", "answer": ""})]
    source.write_text("\n".join(lines) + "\n")
    run = dict(source_path=str(source), checkpoint_dir=sentencepiece_dir, chat_template="guanaco", val_fraction=0.0,
               **KEYS)
    metadata = prepare_sft.main(destination_path=tmp_path / "out", **run)
    assert metadata["splits"]["train"]["examples"] == 1
    assert metadata["skipped"] == {"malformed line or item": 2, "unknown format": 1, "special token in a message": 1,
                                   "template error": 1, "empty response": 1}
    printed = capsys.readouterr().out
    for line in range(2, 8):
        assert f"{source}:{line}: " in printed
    assert "Unknown role tool" in printed

    with pytest.raises(BadInputError, match=re.escape(f"{source}:2: malformed JSON")):
        prepare_sft.main(destination_path=tmp_path / "strict", strict=True, **run)
    assert not (tmp_path / "strict").exists()
    source.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(NothingWrittenError, match="no example kept"):
        prepare_sft.main(destination_path=tmp_path / "none", **run)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NothingWrittenError, match="no example kept from 1 files .*: they hold no records"):
        prepare_sft.main(destination_path=tmp_path / "none", **{**run, "source_path": str(empty)})
    # a template whose renderings are not prefixes of each other is refused, not skipped record by record
    (tmp_path / "unstable.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                             "{{ messages | length }}")
    with pytest.raises(UserError, match="not prefix-stable"):
        prepare_sft.main(destination_path=tmp_path / "unstable", **{**run, "chat_template": str(tmp_path /
                                                                                            "unstable.jinja")})


def test_json_array_input_equals_json_lines(tmp_path, chatml_dir):
    records = [record for record, _ in RECORDS]
    (tmp_path / "alpaca.json").write_text(json.dumps(records, indent=2))
    prepare_sft.main(str(tmp_path / "alpaca.json"), chatml_dir, tmp_path / "array", chat_template="chatml",
                     val_fraction=0.0, quiet=True, **KEYS)
    _, examples = prepare(tmp_path, records, chatml_dir, chat_template="chatml", **KEYS)
    array = sft_data.SFTSplit(tmp_path / "array", "train")
    assert [(ids.tolist(), mask.tolist()) for ids, mask in (array[i] for i in range(len(array)))] == examples


def test_train_on_prompt_makes_every_token_a_target(tmp_path, chatml_dir):
    records = [record for record, _ in RECORDS]
    _, masked = prepare(tmp_path, records, chatml_dir, name="masked", chat_template="chatml", **KEYS)
    metadata, everything = prepare(tmp_path, records, chatml_dir, chat_template="chatml", train_on_prompt=True,
                                   **KEYS)
    assert [ids for ids, _ in everything] == [ids for ids, _ in masked]
    assert all(all(mask) for _, mask in everything)
    assert metadata["train_on_prompt"] and metadata["splits"]["train"]["target_tokens"] == sum(
        len(ids) for ids, _ in everything)


def test_metadata_records_template_tokenizer_settings_and_counts(tmp_path, sentencepiece_dir):
    source = write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}] * 3 + [record for record, _ in RECORDS])
    cli(prepare_sft.main, [f"--source_path={source}", f"--checkpoint_dir={sentencepiece_dir}",
                           f"--destination_path={tmp_path / 'out'}", "--chat_template=llama-2", "--val_fraction=0.5",
                           "--max_seq_length=300", "--prompt_key=question", "--response_key=answer", "--quiet"])
    metadata = sft_data.read_metadata(tmp_path / "out")
    template = BUILTIN_TEMPLATES["llama-2"]
    assert metadata["chat_template"] == template and metadata["chat_template_name"] == "llama-2"
    assert metadata["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    tokenizer_file = sentencepiece_dir / "tokenizer.model"
    assert metadata["tokenizer"] == {"file": "tokenizer.model", "vocab_size": 600,
                                     "sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()}
    assert (metadata["format"], metadata["max_seq_length"], metadata["input_format"]) == (sft_data.FORMAT, 300, "auto")
    for split in sft_data.SPLITS:
        data = sft_data.SFTSplit(tmp_path / "out", split)
        counts = metadata["splits"][split]
        assert counts["examples"] == len(data) and counts["tokens"] == data.lengths().sum()
        assert counts["target_tokens"] == data.mask.sum()
    assert metadata["splits"]["train"]["examples"] + metadata["splits"]["val"]["examples"] == 8


def test_destination_is_replaced_atomically_and_foreign_directories_are_refused(tmp_path, chatml_dir, monkeypatch):
    records = [record for record, _ in RECORDS]
    first, _ = prepare(tmp_path, records, chatml_dir, chat_template="chatml", **KEYS)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_data, "write_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, records[:2], chatml_dir, chat_template="chatml", **KEYS)
    monkeypatch.undo()
    assert sft_data.read_metadata(tmp_path / "out") == {"format": sft_data.FORMAT, **first}  # the earlier run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.jsonl"]  # no temporary directory left
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "lit_model.pth").write_bytes(b"weights")
    with pytest.raises(UserError, match="is not prepared SFT data"):
        prepare(tmp_path, records, chatml_dir, name="checkpoint", chat_template="chatml", **KEYS)
    assert (tmp_path / "checkpoint" / "lit_model.pth").is_file()


def test_sft_demo_data_from_a_few_standard_library_files(tmp_path, sentencepiece_dir, monkeypatch):
    # the library's top-level modules: listing all of it walks site-packages too, seconds per call
    top_level = sorted(path for path in prepare_sft_demo.STDLIB.glob("*.py") if not path.name.startswith("test_"))
    monkeypatch.setattr(prepare_sft_demo, "stdlib_files", lambda max_files: top_level[:max_files])
    destination = tmp_path / "sft_demo"
    path = prepare_sft_demo.build_sft_demo_data(destination, sentencepiece_dir, max_examples=60, max_files=25,
                                                val_fraction=0.2, quiet=True)
    assert path == destination
    examples_file = tmp_path / "sft_demo.jsonl"
    records = [json.loads(line) for line in examples_file.read_text().splitlines()]
    assert len(records) == 60
    requests = [record["messages"][0]["content"] for record in records]
    assert any(r.startswith("What does ") for r in requests) and any(r.startswith("Write the body") for r in requests)
    for record in records:
        request, answer = (message["content"] for message in record["messages"])
        assert len(request) + len(answer) <= prepare_sft_demo.MAX_CHARACTERS
    first = examples_file.read_bytes()
    prepare_sft_demo.build_sft_demo_data(destination, sentencepiece_dir, max_examples=60, max_files=25,
                                         val_fraction=0.2, quiet=True)
    assert examples_file.read_bytes() == first  # deterministic

    metadata = sft_data.read_metadata(destination)
    assert metadata["chat_template_name"] == "guanaco" and metadata["max_seq_length"] == 257
    kept = metadata["splits"]["train"]["examples"] + metadata["splits"]["val"]["examples"]
    # this test's 600-token vocabulary spends more tokens than the demo's 4096 (which drops 2 of 3000)
    assert metadata["skipped"] == {"longer than 257 tokens (--truncate cuts them)": 60 - kept} and kept >= 40
    held_out = json.loads((destination / sft_data.HELD_OUT_FILE).read_text())
    assert held_out == prepare_sft_demo.held_out_requests(destination)
    assert len(held_out) >= metadata["splits"]["val"]["examples"] > 0 and set(held_out) < set(requests)
    tokenizer, train = Tokenizer(sentencepiece_dir), sft_data.SFTSplit(destination, "train")
    answers = {record["messages"][1]["content"] for record in records}
    for i in range(len(train)):
        ids, mask = train[i]
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and mask[-1]
        assert tokenizer.decode(ids[mask]) in answers


def test_function_examples_pair_signature_and_docstring_with_the_body(tmp_path, monkeypatch):
    library = tmp_path / "lib"
    (library / "pkg").mkdir(parents=True)
    (library / "pkg" / "__init__.py").write_text('"""A package.\n\nMore."""\n')
    (library / "pkg" / "shapes.py").write_text(
        'class Square:\n    """A square."""\n\n    @property\n    def area(self,\n             unit=1):\n'
        '        """The area.\n\n        In units."""\n        # squared\n        return self.side ** 2 * unit\n\n'
        '    def _hidden(self):\n        """Private."""\n        return 0\n\n'
        'def outer():\n    """Outer."""\n    def inner():\n        """Nested."""\n    return inner\n')
    monkeypatch.setattr(prepare_sft_demo, "STDLIB", library)
    examples = [example for path in sorted(library.rglob("*.py")) for example in prepare_sft_demo.file_examples(path)]
    assert examples == [
        ("pkg", "What is the Python module pkg for?", "A package."),
        ("pkg.shapes.Square", "What is the class pkg.shapes.Square for?", "A square."),
        ("pkg.shapes.Square.area", "What does pkg.shapes.Square.area do?", "The area."),
        ("pkg.shapes.Square.area", "Write the body of pkg.shapes.Square.area:\n\n"
         'def area(self,\n         unit=1):\n    """The area.\n\n    In units."""', "return self.side ** 2 * unit"),
        ("pkg.shapes.outer", "What does pkg.shapes.outer do?", "Outer."),
        ("pkg.shapes.outer", 'Write the body of pkg.shapes.outer:\n\ndef outer():\n    """Outer."""',
         'def inner():\n    """Nested."""\nreturn inner'),
    ]


def test_sft_data_preparation_never_imports_torch():
    modules = ["sft_data", "chat_template", "prepare_data.prepare_sft", "prepare_data.prepare_sft_demo"]
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, f'importing {name} imported torch'")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
