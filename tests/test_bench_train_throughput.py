"""bench/train_throughput.py: the commands of its docstring run end to end on a tiny stand-in config, and its check
that ours and HF compute the same thing catches a wrong weight mapping."""

import json
import shlex

import pytest

pytest.importorskip("transformers")

from bench import train_throughput  # noqa: E402
from utils import cli  # noqa: E402

# the docstring's commands on the CPU in seconds: the tiny config, short sequences, one warmup and two timed steps.
# Without --compile: inductor takes a minute or more per model on 2 cores (the compiled path was run by hand).
STAND_IN = {"--model_name": "micro", "--seq_len": "16", "--steps": "2", "--warmup_steps": "1", "--device": "cpu"}


def documented_commands() -> list:
    """The flags of each `python bench/train_throughput.py ...` command of the docstring as {flag: value}, without
    --compile and --output, once each."""
    commands = []
    for line in train_throughput.__doc__.replace("\\\n", "").splitlines():  # a command's continued lines joined
        if line.strip().startswith("python bench/train_throughput.py "):
            words = [word for word in shlex.split(line)[2:] if word != "--compile"]
            assert all(word.startswith("--") for word in words[::2]), line  # the rest are flag-value pairs
            flags = {flag: value for flag, value in zip(words[::2], words[1::2]) if flag != "--output"}
            if flags not in commands:
                commands.append(flags)
    return commands


@pytest.mark.parametrize("flags", documented_commands(), ids=lambda flags: " ".join(flags.values()))
def test_documented_command_times_ours_and_hf_and_writes_the_figures(flags, tmp_path, capsys):
    output = tmp_path / "figures.json"
    argv = [word for pair in {**flags, **STAND_IN, "--output": str(output)}.items() for word in pair]
    returned = cli(train_throughput.main, argv)

    report = json.loads(output.read_text())
    assert report == json.loads(json.dumps(returned))  # the file holds what the run returned, complete
    assert report["complete"] and report["arguments"]["models"] == ["ours", "hf"]
    assert report["arguments"]["precision"] == flags["--precision"]
    assert report["same_computation"]["relative_differences"]["loss"] <= report["same_computation"]["tolerance"]
    results = report["results"]
    for name in ("ours", "hf"):
        assert len(results[name]["step_seconds"]) == 2 and results[name]["tokens_per_sec"] > 0
        assert results[name]["mfu"] is None  # no peak FLOP/s for a CPU
        assert results[name]["peak_memory_gb"] >= results[name]["state_gb"] > 0
        assert report["attention"][name]["backends"]  # the profiled step ran SDPA
    assert results["ours_over_hf"] == pytest.approx(results["ours"]["tokens_per_sec"] / results["hf"]["tokens_per_sec"])
    out = capsys.readouterr().out
    assert "same weights, same tokens, first step" in out and "tokens/s" in out


def test_a_wrong_weight_mapping_fails_the_same_computation_check(monkeypatch):
    right = train_throughput.hf_state_dict

    def swapped_gate_and_up(state_dict, config):
        converted = right(state_dict, config)
        for layer in range(config.n_layer):
            gate, up = (f"model.layers.{layer}.mlp.{part}_proj.weight" for part in ("gate", "up"))
            converted[gate], converted[up] = converted[up], converted[gate]
        return converted

    monkeypatch.setattr(train_throughput, "hf_state_dict", swapped_gate_and_up)
    with pytest.raises(RuntimeError, match="do not compute the same thing"):
        train_throughput.main(model_name="micro", micro_batch_size=2, seq_len=16, steps=1, warmup_steps=1,
                              device="cpu")


def test_models_must_be_ours_or_hf():
    with pytest.raises(ValueError, match="--models"):
        train_throughput.main(model_name="micro", models=["ours", "llama"], device="cpu")
