"""The commands of README.md and docs/*.md, run as the pages show them (tests/documented.py: the same flags, with only
the substitutions of docs/development.md's table), in the order a user meets them: data, pretraining, Inheritune,
finetuning and chat, generation, conversion, evaluation. Inputs are made here from the standard library's text; the
models are the session's tiny trained checkpoint (tests/conftest.py) and what the commands themselves write."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from chat_template import BUILTIN_TEMPLATES, ChatTemplate
from checkpoint import load_model, save_model_dir
from generation import generate
from model import Config, GPT
from tests.documented import ROOT, documented, run_script
from text_readers import stdlib_files
from tokenizer import Tokenizer

# what the recipes' defaults (TinyLlama's 1.1B model, 1024 sequences a step, bf16 on GPUs) become on the CPU
ON_THE_CPU = {"--accelerator": "cpu", "--devices": "1", "--precision": "32-true", "--global_batch_size": "2",
              "--micro_batch_size": "2", "--eval_iters": "1"}
SLIMPAJAMA_SETS = ("RedPajamaCommonCrawl", "RedPajamaGithub", "RedPajamaBook", "RedPajamaC4")


def texts(start: int, count: int) -> list:
    return [path.read_text(errors="replace") for path in stdlib_files(start + count)[start:]]


def manifest_files(directory: Path, name: str) -> list:
    return sorted(json.loads((directory / name).read_text())["files"])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Stand-ins for the downloads the data commands read: SlimPajama's tree of .jsonl.zst files (four of its sets),
    StarCoder's parquet files (python and java), Project Gutenberg's text files, a corpus of JSON lines."""
    root = tmp_path_factory.mktemp("raw")
    compressor = zstandard.ZstdCompressor()
    for split, start, count in (("train", 0, 16), ("validation", 16, 8)):
        lines = [json.dumps({"text": text, "meta": {"redpajama_set_name": SLIMPAJAMA_SETS[i % 4]}})
                 for i, text in enumerate(texts(start, count))]
        path = root / "SlimPajama-627B" / split / "chunk1" / f"example_{split}_0.jsonl.zst"
        path.parent.mkdir(parents=True)
        path.write_bytes(compressor.compress("\n".join(lines).encode() + b"\n"))
    for language, start in (("python", 24), ("java", 30)):
        (root / "starcoderdata" / language).mkdir(parents=True)
        pq.write_table(pa.table({"content": texts(start, 6)}), root / "starcoderdata" / language / "train-0.parquet")
    (root / "gutenberg").mkdir()
    for i, text in enumerate(texts(36, 4)):
        (root / "gutenberg" / f"book_{i}.txt").write_text(text)
    (root / "corpus").mkdir()
    (root / "corpus" / "part_0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(40, 30)))
    return root


@pytest.fixture(scope="module")
def slim_star(raw, trained, tmp_path_factory) -> Path:
    """data/slim_star_combined as docs/data.md makes it, with the tiny checkpoint's tokenizer for Llama-2's."""
    destination = tmp_path_factory.mktemp("slim_star_combined")
    paths = {"--tokenizer_path": trained.checkpoint_dir, "--destination_path": destination}
    slimpajama = {**paths, "--source_path": raw / "SlimPajama-627B"}
    run_script(documented(
        "python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split train "
        "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined", replace=slimpajama))
    run_script(documented(
        "python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split validation "
        "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined", replace=slimpajama))
    run_script(documented(
        "python prepare_data/prepare_starcoder.py --source_path data/starcoderdata --split train "
        "--tokenizer_path checkpoints/TinyLlama-1.1B --destination_path data/slim_star_combined",
        replace={**paths, "--source_path": raw / "starcoderdata"}))
    return destination


def test_tinyllama_data_commands_leave_out_github_and_keep_every_language(slim_star):
    summary = json.loads((slim_star / "summary_train_slimpajama.json").read_text())
    assert summary["documents"] == {"train": 12} and summary["excluded"] == {"RedPajamaGithub": 4}
    assert json.loads((slim_star / "summary_validation_slimpajama.json").read_text())["documents"] == {"validation": 6}
    assert json.loads((slim_star / "summary_train_starcoder.json").read_text())["documents"] == {"train": 12}
    for run in ("train_slimpajama", "validation_slimpajama", "train_starcoder"):
        shards = sorted(path.name for path in slim_star.glob(f"{run}*.bin"))
        assert manifest_files(slim_star, f"manifest_{run}.json") == shards


def test_own_corpus_tokenizer_and_manifest_commands(raw, slim_star, tmp_path):
    tokenizer_dir = tmp_path / "my-model"
    run_script(documented(
        "python prepare_data/train_tokenizer.py --source_path 'corpus/**/*.jsonl' "
        "--destination_path checkpoints/my-model --vocab_size 32000",
        replace={"--source_path": f"{raw}/corpus/**/*.jsonl", "--destination_path": tokenizer_dir,
                 "--vocab_size": 600}))
    assert Tokenizer(tokenizer_dir).vocab_size == 600
    destination = tmp_path / "mine"
    run_script(documented(
        "python prepare_data/prepare_text.py --source_path 'corpus/**/*.jsonl' --text_key text --name mine "
        "--validation_fraction 0.01 --tokenizer_path checkpoints/my-model --destination_path data/mine",
        replace={"--source_path": f"{raw}/corpus/**/*.jsonl", "--tokenizer_path": tokenizer_dir,
                 "--destination_path": destination}))
    summary = json.loads((destination / "summary_mine.json").read_text())
    assert sum(summary["documents"].values()) == 30

    shards = tmp_path / "lit_gpt_shards"  # shards without a manifest, as lit-gpt and TinyLlama wrote them
    shards.mkdir()
    for path in slim_star.glob("train_starcoder*.bin"):
        shutil.copy(path, shards)
    run_script(documented("python prepare_data/write_manifest.py --directory data/lit_gpt_shards",
                          replace={"--directory": shards}))
    assert manifest_files(shards, "manifest.json") == sorted(p.name for p in shards.glob("*.bin"))


def test_tinyllama_recipe_trains_on_the_prepared_data(slim_star, trained, tmp_path):
    out = tmp_path / "tinyllama_1b"
    run_script(documented("python pretrain/tinyllama.py", add={
        **ON_THE_CPU, "--model_name": "demo", "--train_data_dir": slim_star, "--val_data_dir": slim_star,
        "--tokenizer_dir": trained.checkpoint_dir, "--out_dir": out, "--max_steps": 2}))
    assert Config.from_file(out / "final") == Config.from_name("demo")
    assert (out / "final" / "tokenizer.model").is_file()


def test_amd_llama_data_pretraining_and_code_finetuning_commands(raw, trained, tmp_path):
    amd = tmp_path / "amd_llama_135m"
    tokenizer = {"--tokenizer_path": trained.checkpoint_dir}
    slimpajama = {**tokenizer, "--source_path": raw / "SlimPajama-627B", "--destination_path": amd}
    run_script(documented(
        "python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split train "
        "--exclude_sets RedPajamaGithub,RedPajamaBook --tokenizer_path checkpoints/AMD-Llama-135m "
        "--destination_path data/amd_llama_135m", replace=slimpajama))
    run_script(documented(
        "python prepare_data/prepare_slimpajama.py --source_path data/SlimPajama-627B --split validation "
        "--exclude_sets RedPajamaGithub,RedPajamaBook --tokenizer_path checkpoints/AMD-Llama-135m "
        "--destination_path data/amd_llama_135m", replace=slimpajama))
    run_script(documented(
        "python prepare_data/prepare_text.py --source_path data/gutenberg --name gutenberg "
        "--tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/amd_llama_135m",
        replace={**tokenizer, "--source_path": raw / "gutenberg", "--destination_path": amd}))
    summary = json.loads((amd / "summary_train_slimpajama.json").read_text())
    assert summary["excluded"] == {"RedPajamaGithub": 4, "RedPajamaBook": 4}
    pretrained = tmp_path / "out_amd"
    run_script(documented("python pretrain/amd_llama_135m.py", add={
        **ON_THE_CPU, "--model_name": "demo", "--seq_len": 256, "--train_data_dir": amd, "--val_data_dir": amd,
        "--tokenizer_dir": trained.checkpoint_dir, "--out_dir": pretrained, "--max_steps": 2}))
    recipe = json.loads((pretrained / "hyperparameters.json").read_text())  # AMD's, where no flag replaced it
    assert (recipe["learning_rate"], recipe["min_lr"], recipe["warmup_steps"]) == (6e-4, 6e-5, 2000)
    assert (recipe["weight_decay"], recipe["eps"], recipe["grad_clip"]) == (0.1, 1e-8, 1.0)
    assert recipe["train_data_mix"] == "train_slimpajama,train_gutenberg" and recipe["max_tokens"] == 670_000_000_000

    code = tmp_path / "starcoder_python"
    run_script(documented(
        "python prepare_data/prepare_starcoder.py --source_path data/starcoderdata --languages python --split train "
        "--tokenizer_path checkpoints/AMD-Llama-135m --destination_path data/starcoder_python",
        replace={**tokenizer, "--source_path": raw / "starcoderdata", "--destination_path": code}))
    assert json.loads((code / "summary_train_starcoder.json").read_text())["documents"] == {"train": 6}  # python only
    run_script(documented("python finetune/amd_llama_135m_code.py", add={
        **ON_THE_CPU, "--initial_checkpoint_dir": pretrained / "final", "--seq_len": 256, "--train_data_dir": code,
        "--val_data_dir": amd, "--tokenizer_dir": trained.checkpoint_dir, "--out_dir": tmp_path / "out_code",
        "--max_steps": 2}))
    assert Config.from_file(tmp_path / "out_code" / "final") == Config.from_file(pretrained / "final")


def test_inheritune_commands(slim_star, trained, tmp_path):
    inherited = tmp_path / "inherit-2"
    run_script(documented(
        "python inheritune/init_from.py --ref_checkpoint_dir checkpoints/TinyLlama-1.1B --n_layers 11 "
        "--out_dir checkpoints/inherit-11",
        replace={"--ref_checkpoint_dir": trained.checkpoint_dir, "--n_layers": 2, "--out_dir": inherited}))
    reference, small = load_model(trained.checkpoint_dir), load_model(inherited)
    assert small.config.n_layer == 2
    torch.testing.assert_close(small.transformer.h[1].state_dict(), reference.transformer.h[1].state_dict(),
                               rtol=0, atol=0)
    run_script(documented(
        "python pretrain/tinyllama.py --initial_checkpoint_dir checkpoints/inherit-11 --out_dir out/inherit-11",
        replace={"--initial_checkpoint_dir": inherited, "--out_dir": tmp_path / "trained-2"},
        add={**ON_THE_CPU, "--train_data_dir": slim_star, "--val_data_dir": slim_star,
             "--tokenizer_dir": trained.checkpoint_dir, "--max_steps": 2}))
    assert Config.from_file(tmp_path / "trained-2" / "final") == small.config
    gguf = tmp_path / "inherit-2.gguf"  # an inherited model exports for llama.cpp as it is
    run_script(documented(
        "python scripts/convert_to_gguf.py --checkpoint_dir out/tinyllama_1b/final --out_file out/tinyllama_1b.gguf "
        "--type q4_0", replace={"--checkpoint_dir": inherited, "--out_file": gguf}))
    assert gguf.read_bytes()[:4] == b"GGUF"

    grow = tmp_path / "grow"
    run_script(documented(
        "python inheritune/grow.py --ref_checkpoint_dir checkpoints/TinyLlama-1.1B --max_steps 1430512 "
        "--out_dir out/grow --train_data_dir data/slim_star_combined --val_data_dir data/slim_star_combined",
        replace={"--ref_checkpoint_dir": trained.checkpoint_dir, "--max_steps": 2, "--out_dir": grow,
                 "--train_data_dir": slim_star, "--val_data_dir": slim_star},
        add={**ON_THE_CPU, "--tokenizer_dir": trained.checkpoint_dir}))
    grown = json.loads((grow / "grow.json").read_text())
    assert [r["n"] for r in grown["rounds"]] == [2]  # k/2 of the 4-block reference; 2 more would be the reference
    assert grown["rounds"][0]["steps"] == 2

    out = tmp_path / "rank"
    run_script(documented(
        "python inheritune/attention_rank.py --checkpoint_dir out/demo/final --data_dir data/demo --num_sequences 32 "
        "--seq_len 256", replace={"--checkpoint_dir": trained.checkpoint_dir, "--data_dir": trained.data_dir,
                                  "--num_sequences": 2, "--seq_len": 32}, add={"--out_dir": out}))
    report = json.loads((out / "attention_rank.json").read_text())
    assert len(report["layers"]) == 4


@pytest.fixture(scope="module")
def sft_data(trained, tmp_path_factory) -> Path:
    """data/guanaco_sft from a guanaco-format file (### Human / ### Assistant turns) of a few requests."""
    root = tmp_path_factory.mktemp("guanaco")
    records = [{"text": f"### Human: What does {name} do?### Assistant: It is a module of the standard library."}
               for name in ("json", "re", "os", "sys", "math", "glob", "shlex", "time")]
    (root / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    run_script(documented(
        "python prepare_data/prepare_sft.py --source_path data/guanaco/train.jsonl "
        "--checkpoint_dir checkpoints/TinyLlama-1.1B --chat_template guanaco --max_seq_length 528 "
        "--destination_path data/guanaco_sft",
        replace={"--source_path": root / "train.jsonl", "--checkpoint_dir": trained.checkpoint_dir,
                 "--max_seq_length": 257, "--destination_path": root / "guanaco_sft"}))
    return root / "guanaco_sft"


def finetune_command(recipe: str, **substitutions) -> list:
    if recipe == "sft":
        return documented("python finetune/sft.py --initial_checkpoint_dir checkpoints/TinyLlama-1.1B "
                          "--data_dir data/guanaco_sft --out_dir out/tinyllama-chat", **substitutions)
    return documented("python finetune/lora.py --initial_checkpoint_dir checkpoints/TinyLlama-1.1B "
                      "--data_dir data/guanaco_sft --lora_r 16 --out_dir out/tinyllama-chat-lora", **substitutions)


@pytest.mark.parametrize("recipe", ["sft", "lora"])
def test_finetuning_commands_and_chat_with_the_result(recipe, sft_data, trained, tmp_path, capsys):
    out = tmp_path / "chat"
    run_script(finetune_command(recipe, replace={"--initial_checkpoint_dir": trained.checkpoint_dir,
                                                 "--data_dir": sft_data, "--out_dir": out},
                                add={**ON_THE_CPU, "--max_steps": 2}))
    assert ChatTemplate.from_checkpoint(out / "final").name == "guanaco"
    if recipe == "lora":
        assert (out / "final" / "lora_adapters.pth").is_file()
    capsys.readouterr()
    run_script(documented(
        "python generate/chat.py --checkpoint_dir out/sft_demo/final --prompt 'What does json.dumps do?'",
        replace={"--checkpoint_dir": out / "final"}))
    assert capsys.readouterr().out.strip()  # an answer, streamed
    gguf = tmp_path / "chat.gguf"  # what finetuning writes (LoRA: merged) exports for llama.cpp as it is
    run_script(documented(
        "python scripts/convert_to_gguf.py --checkpoint_dir out/sft_demo/final --out_file out/sft_demo-q8_0.gguf "
        "--type q8_0", replace={"--checkpoint_dir": out / "final", "--out_file": gguf}))
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_chat_command_with_a_system_prompt_reads_turns_from_stdin(trained, tmp_path, capsys):
    chat_model = tmp_path / "TinyLlama-1.1B-Chat-v1.0"  # zephyr's template, as TinyLlama-Chat v1.0
    shutil.copytree(trained.checkpoint_dir, chat_model)
    ChatTemplate(BUILTIN_TEMPLATES["zephyr"]).save(chat_model)
    run_script(documented(
        "python generate/chat.py --checkpoint_dir checkpoints/TinyLlama-1.1B-Chat-v1.0 --system 'You are brief.'",
        replace={"--checkpoint_dir": chat_model}), stdin="Hi\nWhat did I just say?\n")
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) >= 2  # two answers


def greedy_continuation(checkpoint_dir: Path, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer = load_model(checkpoint_dir), Tokenizer(checkpoint_dir)
    ids = torch.tensor(tokenizer.encode(prompt, bos=True))
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0, stop_ids=[tokenizer.eos_id])
    return tokenizer.decode(out.tolist())


def test_generation_commands(trained, capsys):
    run_script(documented("python generate/base.py --checkpoint_dir out/demo/final --prompt 'class Parser:'",
                          replace={"--checkpoint_dir": trained.checkpoint_dir}))
    assert capsys.readouterr().out.startswith("class Parser:")
    run_script(documented(
        "python generate/base.py --checkpoint_dir out/demo/final --prompt 'def ' --max_new_tokens 100 "
        "--temperature 0.8 --top_k 200 --top_p 0.95",
        replace={"--checkpoint_dir": trained.checkpoint_dir, "--max_new_tokens": 5}))
    assert capsys.readouterr().out.startswith("def ")


def test_speculative_command_gives_the_targets_greedy_output(trained, tmp_path, capsys):
    draft = tmp_path / "draft"
    run_script(documented(  # the draft: the target's first 2 blocks, as a small model of the same family
        "python inheritune/init_from.py --ref_checkpoint_dir checkpoints/TinyLlama-1.1B --n_layers 11 "
        "--out_dir checkpoints/inherit-11",
        replace={"--ref_checkpoint_dir": trained.checkpoint_dir, "--n_layers": 2, "--out_dir": draft}))
    capsys.readouterr()
    run_script(documented(
        "python generate/speculative.py --checkpoint_dir checkpoints/CodeLlama-7b-hf "
        "--draft_checkpoint_dir checkpoints/AMD-Llama-135m-code --prompt 'def quick_sort(array):' --speculative_k 5 "
        "--max_new_tokens 256 --temperature 0",
        replace={"--checkpoint_dir": trained.checkpoint_dir, "--draft_checkpoint_dir": draft,
                 "--max_new_tokens": 12}))
    out = capsys.readouterr().out
    assert out.strip() == greedy_continuation(trained.checkpoint_dir, "def quick_sort(array):", 12).strip()


def test_distilled_draft_commands(trained, tmp_path, capsys):
    """The draft trained for acceptance: distilled from the shared checkpoint as its target (the loss all divergence),
    then compared by bench/speculative.py, whose greedy outputs must equal the target's alone (fp32: checked)."""
    draft = tmp_path / "draft_kd"
    run_script(documented(
        "python pretrain/tinyllama.py --model_name demo --out_dir out/spec_bench/draft_kd "
        "--train_data_dir data/demo/train --val_data_dir data/demo/validation --train_data_mix train_code,train_prose "
        "--tokenizer_dir data/demo --accelerator cpu --devices 1 --precision 32-true "
        "--global_batch_size 8 --micro_batch_size 8 --max_steps 500 --learning_rate 2e-3 --min_lr 2e-4 "
        "--warmup_steps 20 --eval_interval 100 --eval_iters 16 --resume auto --seed 3407 "
        "--teacher_checkpoint_dir out/spec_bench/target/final --kd_alpha 0 --kd_temperature 1",
        replace={"--out_dir": draft, "--train_data_dir": trained.data_dir / "train",
                 "--val_data_dir": trained.data_dir / "validation", "--tokenizer_dir": trained.data_dir,
                 "--max_steps": 2, "--eval_iters": 1, "--teacher_checkpoint_dir": trained.checkpoint_dir}))
    assert f"Teacher {trained.checkpoint_dir}" in capsys.readouterr().out
    output = tmp_path / "speculative_kd.json"
    run_script(documented(
        "python bench/speculative.py --target_dir out/spec_bench/target/final "
        "--draft_dir out/spec_bench/draft_kd/final --ks 1,2,3,4,5 --temperatures 0 --max_new_tokens 128 "
        "--output out/bench/speculative_cpu_kd.json",
        replace={"--target_dir": trained.checkpoint_dir, "--draft_dir": draft / "final", "--max_new_tokens": 3,
                 "--output": output}))
    rows = json.loads(output.read_text())["results"]
    assert [row["k"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert all(0 <= row["alpha"] <= 1 for row in rows[1:])


def test_speculative_command_on_humaneval_prompts(trained, tmp_path, capsys):
    """HumanEval's prompts are longer than the tiny model's 256-token context: the stand-in target is a 1-layer model
    of a 2048-token context with the same tokenizer (random weights), the draft the same."""
    target = tmp_path / "CodeLlama-7b-hf"
    config = Config(name="long-context", block_size=2048, vocab_size=4096, n_layer=1, n_head=4, n_embd=64,
                    n_query_groups=2, intermediate_size=176)
    torch.manual_seed(0)
    save_model_dir(GPT(config), config, trained.checkpoint_dir, target)
    run_script(documented(
        "python generate/speculative.py --checkpoint_dir checkpoints/CodeLlama-7b-hf "
        "--draft_checkpoint_dir checkpoints/AMD-Llama-135m-code --prompts humaneval --batch_size 8 --adaptive "
        "--max_new_tokens 64",
        replace={"--checkpoint_dir": target, "--draft_checkpoint_dir": target, "--max_new_tokens": 3}))
    captured = capsys.readouterr()
    assert "alpha 1.000" in captured.err  # a draft identical to the target is always accepted
    assert "def has_close_elements" in captured.out and "def generate_integers" in captured.out  # first, last


def test_conversion_commands_round_trip_the_weights(trained, tmp_path):
    lit = tmp_path / "tinyllama_1b" / "final"
    shutil.copytree(trained.checkpoint_dir, lit)
    hf = tmp_path / "tinyllama_1b" / "hf"
    run_script(documented(
        "python scripts/convert_lit_checkpoint.py --checkpoint_dir out/tinyllama_1b/final "
        "--output_dir out/tinyllama_1b/hf", replace={"--checkpoint_dir": lit, "--output_dir": hf}))
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {path.name for path in hf.iterdir()}
    run_script(documented("python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/TinyLlama-1.1B",
                          replace={"--checkpoint_dir": hf}))
    back, original = load_model(hf).state_dict(), load_model(lit).state_dict()
    assert back.keys() == original.keys()
    for name in original:
        assert torch.equal(back[name], original[name]), name


def test_perplexity_commands(trained, slim_star, capsys):
    run_script(documented(
        "python eval/perplexity.py --checkpoint_dir out/tinyllama_1b/final --data_dir data/slim_star_combined "
        "--eval_iters 100", replace={"--checkpoint_dir": trained.checkpoint_dir, "--data_dir": slim_star,
                                     "--eval_iters": 2}))
    run_script(documented("python eval/perplexity.py --checkpoint_dir out/demo/final --text_files README.md",
                          replace={"--checkpoint_dir": trained.checkpoint_dir, "--text_files": ROOT / "README.md"}))
    out = capsys.readouterr().out
    assert out.count("perplexity") >= 2
