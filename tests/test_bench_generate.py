"""bench/generate_throughput.py and bench/speculative.py run end to end on tiny stand-ins (the real runs are the
commands of their docstrings, for the lead to time alone on the machine)."""

import json

import pytest
import torch

import quantize
from bench import generate_throughput, speculative
from test_speculative import checkpoint_pair  # noqa: F401 (a fixture)


def test_generate_throughput_eager_and_hf_static_on_a_tiny_model(tmp_path, capsys):
    output = tmp_path / "figures.json"
    report = generate_throughput.main(model_name="micro", max_new_tokens=6, repeats=2, modes=["eager", "hf_static"],
                                      device="cpu", output=output)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert report["same_tokens"] == {"eager": True, "hf_static": True}  # fp32, same weights: the same greedy ids
    for mode in ("eager", "hf_static"):
        figures = report["results"][mode]
        assert len(figures["seconds"]) == 2 and 0 < figures["fraction_of_bandwidth_bound"] < 1
    assert report["decode_attention"]  # the profiled decode step ran an SDPA backend
    assert "tokens/s" in capsys.readouterr().out


def test_speculative_bench_on_a_tiny_pair(tmp_path, capsys):
    target_dir, draft_dir = checkpoint_pair(tmp_path)
    output = tmp_path / "speculative.json"
    report = speculative.main(target_dir, draft_dir, n_prompts=2, max_new_tokens=8, ks=[1, 3],
                              temperatures=[0.0, 1.0], step_repeats=2, output=output)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    assert [(row["temperature"], row["k"]) for row in rows] == [(0.0, 0), (0.0, 1), (0.0, 3), (1.0, 0), (1.0, 1),
                                                                (1.0, 3)]
    for row in rows:
        if row["k"]:
            assert 0 <= row["alpha"] <= 1 and row["acceptance_rate"] <= row["alpha"]
            assert row["textbook"] > 0 and row["time_based"] > 0 and row["speedup"] > 0
            assert row.get("same_as_target", 1.0) == 1.0 and ("same_as_target" in row) == (row["temperature"] == 0)
    assert set(report["step_seconds"]["verify"]) == {"1", "2", "3"}
    assert "time-based" in capsys.readouterr().out


def test_speculative_bench_step_times_of_model_shapes(tmp_path):
    """The GPU command's mode: step times of two configs on random weights and the speedups they predict."""
    report = speculative.main(target_model_name="micro", draft_model_name="micro", alpha=0.5, ks=[1, 2],
                              step_repeats=2, output=tmp_path / "steps.json")
    assert json.loads((tmp_path / "steps.json").read_text()) == json.loads(json.dumps(report))
    steps = report["step_seconds"]
    textbook_k1 = (1 + 0.5) / (steps["draft"] / steps["target"] + 1)  # (1 - a^2) / ((1 - a)(c + 1))
    assert report["predictions"][0]["textbook"] == pytest.approx(textbook_k1)
    assert report["predictions"][0]["time_based"] == pytest.approx(
        1.5 * steps["target"] / (steps["draft_2"] + steps["verify"]["1"]))


def test_speculative_bench_times_quantized_shapes(capsys):
    """The docstring's quantized command's mode on tiny shapes: both models quantized, their kernels named."""
    report = speculative.main(target_model_name="demo", draft_model_name="demo", alpha=0.7, ks=[1], step_repeats=1,
                              quantize="int8", draft_quantize="int4", group_size=32)
    assert (report["arguments"]["quantize"], report["arguments"]["draft_quantize"]) == ("int8", "int4")
    # the dtype the quantized models run their activations in, not --precision's float32
    expected = str(quantize.activation_dtype(torch.device("cpu")))
    assert (report["arguments"]["dtype"], report["arguments"]["draft_dtype"]) == (expected, expected)
    err_and_out = capsys.readouterr()
    assert "int8 linear layers run" in err_and_out.out and "int4 linear layers run" in err_and_out.out
    assert report["step_seconds"]["verify"]["1"] > 0
