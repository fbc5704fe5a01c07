"""bench/serving.py end to end on a tiny stand-in (micro's layers, the session corpus's 4096-token tokenizer): both
documented commands with the model and the paths substituted, which leaves one run; the real runs are for the lead to
time alone on the machine."""

import json

from tests.documented import documented, run_script

def test_the_serving_bench_streams_every_round_and_checks_each_answer_against_generate(trained, tmp_path, capsys):
    output = tmp_path / "serving.json"
    changes = dict(replace={"--model_name": "micro", "--tokenizer_dir": trained.data_dir, "--output": output},
                   add={"--max_new_tokens": "4"})
    argv = documented("python bench/serving.py --model_name AMD-Llama-135m --tokenizer_dir data/demo "
                      "--output out/bench/serving_cpu_135m.json", **changes)
    assert argv == documented("python bench/serving.py --model_name demo --tokenizer_dir data/demo "
                              "--output out/bench/serving_cpu_demo.json", **changes)
    run_script(argv)
    report = json.loads(output.read_text())
    assert report["benchmark"] == "bench/serving.py" and report["vocab_size"].startswith("4096 ")
    assert list(report["results"]) == ["1", "4", "8", "16"]
    for row in report["results"].values():
        assert row["requests"] == 16 and row["identical_to_alone"] == 16  # greedy text: each request alone, generate's
        assert 16 <= row["tokens"] <= 16 * 4 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50"] <= row["ttft_p95"] and 0 < row["itl_p50"] <= row["itl_p95"]
    assert report["generate"]["tokens"] == report["results"]["1"]["tokens"]  # the same prompts and budget
    assert report["goals"]["greedy answers identical to each alone"] == "all"
    assert set(report["goals"]) >= {"8 clients / 1 client (goal >= 3x)", "1 client / generate (goal >= 0.9)"}
    assert "clients | tokens/s" in capsys.readouterr().out
