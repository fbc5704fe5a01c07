"""bench/gpu_suite.py's dry run: the same orchestration on the CPU with tiny configs, so that the suite is known to run
before a GPU is lent; a step over its limit, a failing step and a step whose package is missing are reported and the
suite goes on; the carry list matches the runtime lock."""

import json
import time

import pytest

pytest.importorskip("transformers")

from bench import gpu_suite  # noqa: E402


def test_the_dry_run_runs_every_step_and_writes_each_result(tmp_path, capsys):
    output = tmp_path / "suite.json"
    report = gpu_suite.main(output=output, dry_run=True)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    steps = report["steps"]
    assert list(steps) == [name for name, _, _ in gpu_suite.STEPS]
    assert all(step["status"] == "ok" for step in steps.values()), {k: v.get("reason") for k, v in steps.items()}
    smoke = steps["smoke"]
    assert smoke["bf16_mixed_step"]["ok"] and smoke["speculative_round"]["same_tokens"]
    assert smoke["int8_decode"]["new_tokens"] == smoke["int4_decode"]["new_tokens"] == 16
    assert smoke["int8_decode"]["ok"] and smoke["int4_decode"]["ok"]  # the packed CPU kernels, dequantized
    assert smoke["fsdp_two_processes"]["ok"]  # over gloo
    assert steps["environment"]["carry"] == gpu_suite.CARRY  # the test environment installs the lock
    assert steps["decode"]["micro"]["results"]["eager"]["tokens_per_s"] > 0
    distillation = steps["distillation"]
    assert distillation["with_teacher"]["tokens_per_s"] > 0 and distillation["without_teacher"]["tokens_per_s"] > 0
    assert "step" in capsys.readouterr().out  # the summary table


def test_a_slow_a_failing_and_a_skipped_step_are_reported_and_the_suite_goes_on(tmp_path, monkeypatch):
    def slow(dry_run):
        yield "first", 1.0
        time.sleep(5)
        yield "second", 2.0

    def failing(dry_run):
        yield "before", 3.0
        raise RuntimeError("CUDA error: an illegal memory access")

    def without_package(dry_run):
        gpu_suite.needs("no_such_package_here")
        yield "never", 0.0

    steps = [("slow", slow, 0.2), ("failing", failing, 5), ("skipped", without_package, 5),
             ("environment", gpu_suite.environment, 30)]
    monkeypatch.setattr(gpu_suite, "STEPS", steps)
    steps = gpu_suite.main(output=tmp_path / "suite.json", dry_run=True)["steps"]
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["seconds"] < 2
    assert steps["slow"]["first"] == 1.0 and "second" not in steps["slow"]  # what it measured before its limit
    assert steps["failing"]["status"] == "failed" and "illegal memory access" in steps["failing"]["reason"]
    assert steps["failing"]["before"] == 3.0
    assert steps["skipped"] == dict(status="skipped", reason="no_such_package_here is not installed",
                                    seconds=steps["skipped"]["seconds"])
    assert steps["environment"]["status"] == "ok"


def test_the_carry_list_is_the_runtime_locks_versions():
    from scripts.lock_requirements import locked_versions, normalize

    locked = locked_versions((gpu_suite.ROOT / "requirements.txt").read_text())
    assert {name: locked[normalize(name)] for name in gpu_suite.CARRY} == gpu_suite.CARRY
