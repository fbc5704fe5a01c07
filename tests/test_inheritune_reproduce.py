"""inheritune/reproduce.py end to end, its documented command with the tiny preset, on shards made here: every
experiment runs through the training core and is measured, the table and the plot are written, and a rerun trains
nothing again."""

import json
from pathlib import Path

import numpy as np
import pytest

from inheritune.reproduce import PAPER, lazy_control, reproduce, stack_blocks
from shard_format import PackedDatasetBuilder, write_manifest
from tests.documented import documented, run_script

SEQ_LEN = 32  # the tiny preset's


def write_corpus(directory, split: str, prefix: str, n_blocks: int, seed: int) -> None:
    """Learnable token streams (arithmetic progressions mod 256), n_blocks blocks of SEQ_LEN + 1 tokens."""
    rng = np.random.default_rng(seed)
    builder = PackedDatasetBuilder(directory / split, prefix, chunk_size=(SEQ_LEN + 1) * 8, vocab_size=256)
    tokens = np.concatenate([(rng.integers(256) + rng.integers(1, 7) * np.arange(40)) % 256
                             for _ in range(n_blocks * (SEQ_LEN + 1) // 40 + 1)])
    builder.add_array(tokens[: n_blocks * (SEQ_LEN + 1)].astype(np.uint16))
    builder.finish()
    write_manifest(directory / split)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    data = root / "data"
    write_corpus(data, "train", "train_code", 32, seed=1)
    write_corpus(data, "train", "train_prose", 32, seed=2)
    write_corpus(data, "validation", "validation_code", 8, seed=3)
    out = root / "out"
    run_script(documented("python inheritune/reproduce.py --preset cpu", replace={"--preset": "tiny"},
                          add={"--data_dir": data, "--out_dir": out, "--vocab_size": 256, "--accelerator": "cpu"}))
    return out, data, json.loads((out / "results.json").read_text())


def test_every_experiment_is_trained_measured_and_tabulated(reproduced):
    out, _, results = reproduced
    experiments = results["experiments"]
    assert list(experiments) == ["reference", "inheritune", "random T", "random 2T", "lazy-layer control", "attn",
                                 "mlp", "attn_mlp", "teacher", "kd", "inherit+kd", "stacking", "half-width"]
    assert experiments["reference"]["layers"] == 4 and experiments["inheritune"]["layers"] == 2
    assert experiments["random 2T"]["steps"] == 2 * experiments["random T"]["steps"] == 8
    # the baselines: every one at T steps but the teacher (2T); the shapes of the module docstring
    assert experiments["teacher"]["steps"] == 8 and experiments["teacher"]["layers"] == 4
    assert all(experiments[name]["steps"] == 4 for name in ("kd", "inherit+kd", "stacking", "half-width"))
    assert experiments["kd"]["parameters"] == experiments["inherit+kd"]["parameters"] == experiments["random T"][
        "parameters"]
    assert experiments["kd"]["teacher"] == experiments["inherit+kd"]["teacher"] == "teacher"
    assert experiments["stacking"]["parameters"] == experiments["random T"]["parameters"]
    assert experiments["stacking"]["growth"] == "1 layers for 2 steps, stacked to 2 for 2"
    half = experiments["half-width"]
    assert (half["layers"], half["width"], half["heads"]) == (4, 32, 2)
    assert experiments["reference"]["width"] // experiments["reference"]["heads"] == half["width"] // half["heads"]
    for name, run_dir in (("kd", "kd"), ("inherit+kd", "inherit+kd")):  # distilled: the teacher in its settings
        hparams = json.loads((out / run_dir / "train" / "hyperparameters.json").read_text())
        assert hparams["teacher_checkpoint_dir"] == str(out / "teacher" / "train" / "final"), name
    hparams = json.loads((out / "random_T" / "train" / "hyperparameters.json").read_text())
    assert hparams["teacher_checkpoint_dir"] is None
    assert all(np.isfinite(run["validation_loss"]) for run in experiments.values())
    # the inherited and the random model are the same size; the reference is larger
    assert experiments["inheritune"]["parameters"] == experiments["random T"]["parameters"]
    assert experiments["reference"]["parameters"] > experiments["inheritune"]["parameters"]
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    for name, (text, loss) in PAPER.items():
        assert f"| {name} |" in table and f"{text}: {loss}" in table
    assert (out / "validation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["attention_rank"]) == {"reference", "inheritune"}
    assert len(results["attention_rank"]["reference"]) == 4
    first_round = {"layers": 2, "validation_loss": experiments["inheritune"]["validation_loss"]}
    assert results["grow"]["rounds"][0] == first_round


def test_the_inherited_model_generates(reproduced):
    """The end of the chain init_from -> training -> generation: the inherited model's final weights decode."""
    import torch

    from checkpoint import load_model
    from generation import generate

    _, _, results = reproduced
    model = load_model(Path(results["experiments"]["inheritune"]["run_dir"]) / "final")
    assert model.config.n_layer == 2 and model.config.name.endswith("-inherit-2")
    output = generate(model, torch.tensor([1, 2, 3]), max_new_tokens=5, temperature=0.0)
    assert output[:3].tolist() == [1, 2, 3] and len(output) == 8


def test_a_rerun_trains_nothing_again(reproduced):
    out, data, results = reproduced
    logs_before = sorted(str(path) for path in out.rglob("metrics.csv"))
    again = reproduce(preset="tiny", data_dir=data, out_dir=out, vocab_size=256, accelerator="cpu")
    assert sorted(str(path) for path in out.rglob("metrics.csv")) == logs_before  # no new training run
    for name, run in results["experiments"].items():
        assert again["experiments"][name]["validation_loss"] == run["validation_loss"]


def test_the_lazy_layer_control_inherits_the_references_lazy_layers_or_else_the_last_blocks(reproduced):
    _, _, results = reproduced
    assert results["lazy_control"] == lazy_control(results["attention_rank"]["reference"], 2)
    layers = [dict(layer=i, lazy=lazy) for i, lazy in enumerate([False, False, True, False, True, True])]
    assert lazy_control(layers, 2) == dict(layer_ids=[4, 5], chosen_by="the reference's lazy layers")
    assert lazy_control(layers, 4)["layer_ids"] == [2, 4, 5]  # fewer lazy layers than n: all of them
    busy = [dict(layer, lazy=False) for layer in layers]
    assert lazy_control(busy, 2) == dict(layer_ids=[4, 5], chosen_by="the last n blocks (the reference has no lazy "
                                                                      "layer)")


def test_stacking_applies_the_blocks_in_order_twice(tmp_path):
    """stack_blocks of a 3-block model computes what the model computes with its blocks applied 0, 1, 2, 0, 1, 2
    (the same Block modules, listed twice), in float64: exactly."""
    import torch

    from checkpoint import load_model, save_model_dir
    from model import GPT, Config

    config = Config(name="stack-test", block_size=16, vocab_size=64, n_layer=3, n_head=2, n_query_groups=1, n_embd=16,
                    intermediate_size=32)
    torch.manual_seed(0)
    save_model_dir(GPT(config), config, None, tmp_path / "shallow")
    stack_blocks(tmp_path / "shallow", tmp_path / "stacked")
    stacked = load_model(tmp_path / "stacked", dtype=torch.float64)
    assert (stacked.config.n_layer, stacked.config.name) == (6, "stack-test-stacked-6")
    chain = load_model(tmp_path / "shallow", dtype=torch.float64)
    chain.transformer.h = torch.nn.ModuleList([*chain.transformer.h, *chain.transformer.h])
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(stacked(idx), chain(idx))
