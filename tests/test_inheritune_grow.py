"""inheritune/grow.py: the stopping rule and resume on a fake trainer, refusals, and one small real run.

The fake trainer stands in for pretrain.tinyllama.setup and the fake measure for validation_loss, so the rounds'
losses are scripted and the expected rounds follow from them by hand. The real run trains micro models on shards
made here; its figures are checked against independent references: a cross-entropy computed by hand on the tokens
written, the training loop's own logged validation loss and token count, a parameter count of the model.
"""

import csv
import inspect
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import inheritune.grow as grow_module
from checkpoint import save_model_dir
from inheritune.grow import grow, validation_loss
from model import GPT, Config, num_parameters
from pretrain.tinyllama import setup
from shard_format import PackedDatasetBuilder, write_manifest
from utils import cli

T = 4  # steps of every round


class Killed(Exception):
    """A job killed in the middle of a round."""


def make_reference(directory: Path, n_layer: int, seed: int = 0) -> GPT:
    config = replace(Config.from_name("micro"), n_layer=n_layer, name=f"micro-{n_layer}")
    torch.manual_seed(seed)
    model = GPT(config)
    save_model_dir(model, config, None, directory)
    return model


def n_layer(checkpoint_dir: Path) -> int:
    return Config.from_file(Path(checkpoint_dir) / "model_config.json").n_layer


class FakeTrainer:
    """pretrain.tinyllama.setup's stand-in: 'trains' by copying the initial weights to out_dir/final. `die_in`:
    the layer count of a round in which it writes a checkpoint, then dies, as a killed job (once)."""

    def __init__(self, die_in: int = None) -> None:
        self.die_in, self.calls = die_in, []

    def __call__(self, **kwargs) -> int:
        self.calls.append(kwargs)
        out_dir, initial = Path(kwargs["out_dir"]), Path(kwargs["initial_checkpoint_dir"])
        if n_layer(initial) == self.die_in:
            self.die_in = None
            out_dir.mkdir(parents=True)
            (out_dir / "step-00000001").write_bytes(b"")  # where the training core's resume would continue
            raise Killed
        shutil.copytree(initial, out_dir / "final")
        return kwargs["max_steps"]


class FakeMeasure:
    """validation_loss's stand-in: the scripted loss of the checkpoint's layer count."""

    def __init__(self, losses: dict, die_in: int = None) -> None:
        self.losses, self.die_in, self.calls = losses, die_in, []

    def __call__(self, checkpoint_dir, *args) -> float:
        n = n_layer(checkpoint_dir)
        if n == self.die_in:
            self.die_in = None
            raise Killed
        self.calls.append(n)
        return self.losses[n]


@pytest.fixture
def fakes(monkeypatch):
    """Install a fake trainer and measure, count init_from's calls, record plot_rounds' records; returns a function
    that replaces the fakes."""
    init_calls = []
    real_init_from = grow_module.init_from

    def counted_init_from(ref_dir, out_dir, **kwargs):
        init_calls.append(kwargs["n_layers"])
        return real_init_from(ref_dir, out_dir, **kwargs)

    monkeypatch.setattr(grow_module, "init_from", counted_init_from)

    plots = []  # the records plotted; drawing them is the real run's test
    monkeypatch.setattr(grow_module, "plot_rounds", lambda record, out_dir: plots.append(json.dumps(record)))

    def install(losses: dict, die_in_training: int = None, die_in_measure: int = None):
        trainer, measure = FakeTrainer(die_in_training), FakeMeasure(losses, die_in_measure)
        init_calls.clear()
        plots.clear()
        monkeypatch.setattr(grow_module, "setup", trainer)
        monkeypatch.setattr(grow_module, "validation_loss", measure)
        return trainer, measure, init_calls, plots

    return install


def fake_run(tmp_path: Path, **overrides) -> dict:
    args = dict(ref_checkpoint_dir=tmp_path / "ref", train_data_dir=tmp_path / "data",
                val_data_dir=tmp_path / "data", max_steps=T, out_dir=tmp_path / "grow", learning_rate=1e-3)
    return grow(**{**args, **overrides})


# ---- the stopping rule and resume, on a fake trainer ------------------------------------------------------------


@pytest.mark.parametrize("losses, overrides, rounds, matched_at", [
    ({4: 3.5, 6: 2.95}, {}, [4, 6], 6),  # k = 8: n = 4, 6; 6 is the first at or below the reference's 3.0
    ({4: 3.5, 6: 2.95}, dict(tolerance=0.5), [4], 4),  # 3.5 <= 3.0 + 0.5: at the target is a match
    ({4: 3.5, 6: 3.2}, {}, [4, 6], None),  # no n < 8 matches: the reference is the answer
    ({3: 3.4, 5: 3.1, 7: 3.05}, dict(start_layers=3), [3, 5, 7], None),
    ({2: 3.4, 5: 3.0}, dict(start_layers=2, step_layers=3), [2, 5], 5),
])
def test_grow_stops_at_the_first_round_that_matches_the_reference(tmp_path, fakes, losses, overrides, rounds,
                                                                   matched_at):
    make_reference(tmp_path / "ref", n_layer=8)
    trainer, measure, init_calls, plots = fakes({8: 3.0, **losses})
    record = fake_run(tmp_path, **overrides)

    assert [entry["n"] for entry in record["rounds"]] == rounds
    assert record["matched_at"] == matched_at
    assert [entry["matched"] for entry in record["rounds"]] == [n == matched_at for n in rounds]
    assert [entry["validation_loss"] for entry in record["rounds"]] == [losses[n] for n in rounds]
    assert record["reference"]["validation_loss"] == 3.0 and record["reference"]["layers"] == 8
    assert measure.calls == [8, *rounds]  # the reference, then every round's final weights, once
    assert ("the reference itself" in record["result"]) == (matched_at is None)
    assert json.loads((tmp_path / "grow" / "grow.json").read_text()) == record
    assert len(plots) == len(rounds) + 1 and json.loads(plots[-1]) == record  # after every round, and at the end

    # each round: the inherited n-block model, trained with the recipe's flags, weights only, resumable
    assert init_calls == rounds
    for index, (n, call) in enumerate(zip(rounds, trainer.calls), start=1):
        round_dir = tmp_path / "grow" / f"round-{index:02d}"
        assert call["initial_checkpoint_dir"] == round_dir / "init" and n_layer(round_dir / "init") == n
        assert call["out_dir"] == round_dir / "train"
        assert (call["model_name"], call["resume"], call["max_steps"], call["learning_rate"]) == (None, "auto", T, 1e-3)
    expected_parameters = [num_parameters(GPT(Config.from_name("micro", n_layer=n))) for n in rounds]
    assert [entry["parameters"] for entry in record["rounds"]] == expected_parameters


def test_rerun_continues_without_retraining_or_remeasuring_what_is_done(tmp_path, fakes):
    make_reference(tmp_path / "ref", n_layer=8)
    losses = {8: 3.0, 4: 3.5, 6: 2.9}
    # 1. killed in round 2's training, after a checkpoint
    trainer, measure, init_calls, _ = fakes(losses, die_in_training=6)
    with pytest.raises(Killed):
        fake_run(tmp_path)
    assert [call["out_dir"].parent.name for call in trainer.calls] == ["round-01", "round-02"]
    recorded = json.loads((tmp_path / "grow" / "grow.json").read_text())
    assert [entry["n"] for entry in recorded["rounds"]] == [4] and recorded["result"] is None

    # 2. the same command: round 1 is not trained or measured again, nor the reference; round 2 continues in its
    # train dir with --resume auto from its init dir, which is not made again; then it is killed in the measure
    trainer, measure, init_calls, _ = fakes(losses, die_in_measure=6)
    with pytest.raises(Killed):
        fake_run(tmp_path)
    assert [call["out_dir"] for call in trainer.calls] == [tmp_path / "grow" / "round-02" / "train"]
    assert trainer.calls[0]["resume"] == "auto" and init_calls == [] and measure.calls == []

    # 3. round 2 trained but unmeasured: measured, not trained again
    trainer, measure, init_calls, _ = fakes(losses)
    record = fake_run(tmp_path)
    assert trainer.calls == [] and init_calls == [] and measure.calls == [6]
    assert [entry["n"] for entry in record["rounds"]] == [4, 6] and record["matched_at"] == 6

    # 4. complete: a rerun trains and measures nothing and gives the same record
    trainer, measure, init_calls, _ = fakes(losses)
    assert fake_run(tmp_path) == record
    assert trainer.calls == [] and measure.calls == [] and init_calls == []


def test_rerun_with_other_settings_is_refused_naming_the_setting(tmp_path, fakes):
    make_reference(tmp_path / "ref", n_layer=8)
    fakes({8: 3.0, 4: 3.5, 6: 3.2})
    record = fake_run(tmp_path)
    trainer, measure, _, _ = fakes({8: 3.0, 4: 3.5, 6: 3.2})
    changes = [(dict(learning_rate=2e-3), "--learning_rate 0.001, not 0.002"),
               (dict(tolerance=0.1), "--tolerance 0.0, not 0.1"),
               (dict(start_layers=2), "--start_layers 4, not 2"),
               (dict(max_steps=T + 1), f"--max_steps {T}, not {T + 1}"),
               (dict(reference_loss=2.5), "--reference_loss 2.5 differs from the 3.0")]
    for change, message in changes:
        with pytest.raises(ValueError, match=message):
            fake_run(tmp_path, **change)
    # how the rounds run and log may change: the run continues (here: it is complete)
    assert fake_run(tmp_path, log_interval=1, eval_interval=2, devices="1", accelerator="cpu") == record
    assert trainer.calls == [] and measure.calls == []


def test_training_flags_default_to_pretrain_setups():
    grow_parameters = inspect.signature(grow).parameters
    shared = set(grow_parameters) & set(inspect.signature(setup).parameters)
    own = {"out_dir", "tokenizer_dir", "train_data_dir", "val_data_dir", "max_steps"}  # grow's own defaults
    assert {"learning_rate", "global_batch_size", "warmup_steps", "precision"} <= shared - own
    for name in sorted(shared - own):
        assert grow_parameters[name].default == inspect.signature(setup).parameters[name].default, name


def test_start_layers_out_of_range_is_a_clear_error(tmp_path, fakes):
    make_reference(tmp_path / "ref", n_layer=4)
    trainer, _, _, _ = fakes({4: 3.0})
    with pytest.raises(ValueError, match="--start_layers 4 is out of range: .* has 4 blocks .* choose 1 to 3"):
        fake_run(tmp_path, start_layers=4)
    assert trainer.calls == [] and not (tmp_path / "grow").exists()


# ---- one real run ----------------------------------------------------------------------------------------------


SEQ_LEN = 16


def write_tokens(directory: Path, prefix: str, n_blocks: int, seed: int) -> np.ndarray:
    """n_blocks blocks of SEQ_LEN + 1 tokens, 4 blocks per file (no tail): runs of +step mod 256, learnable."""
    rng = np.random.default_rng(seed)
    starts, steps = rng.integers(256, size=n_blocks), rng.integers(1, 5, size=n_blocks)
    tokens = ((starts[:, None] + steps[:, None] * np.arange(SEQ_LEN + 1)) % 256).astype(np.uint16).reshape(-1)
    builder = PackedDatasetBuilder(directory, prefix, chunk_size=4 * (SEQ_LEN + 1), vocab_size=256)
    builder.add_array(tokens)
    builder.finish()
    write_manifest(directory)
    return tokens


def test_grow_end_to_end_on_micro_models_with_an_interrupted_round(tmp_path, monkeypatch):
    """A 4-layer random reference; grow from n = 2 trains 4 steps; the first attempt is killed after step 1 (a
    checkpoint), the rerun (the command line) resumes it. grow.json's figures against the hand-computed reference
    loss, the training loop's logs and a parameter count; grow.png is a PNG of the plot's size."""
    reference = make_reference(tmp_path / "ref", n_layer=4)
    data = tmp_path / "data"
    write_tokens(data, "train_a", n_blocks=64, seed=1)
    validation = write_tokens(data, "validation_a", n_blocks=12, seed=2)
    args = dict(ref_checkpoint_dir=tmp_path / "ref", train_data_dir=data, val_data_dir=data, max_steps=T,
                out_dir=tmp_path / "grow", train_data_mix="train_a", accelerator="cpu", devices="1",
                precision="32-true", seq_len=SEQ_LEN, global_batch_size=8, micro_batch_size=2, learning_rate=1e-2,
                min_lr=1e-3, warmup_steps=1, log_interval=1, eval_interval=2, eval_iters=4, save_interval=T)

    def killed_after_one_step(**kwargs):
        setup(**kwargs, max_time=1e-9)  # stops after step 1, with a checkpoint, as --max_time does
        raise Killed

    monkeypatch.setattr(grow_module, "setup", killed_after_one_step)
    with pytest.raises(Killed):
        grow(**args)
    train_dir = tmp_path / "grow" / "round-01" / "train"
    assert (train_dir / "step-00000001").exists() and not (train_dir / "final").exists()
    monkeypatch.setattr(grow_module, "setup", setup)
    # the same settings, as the module docstring's command line gives them
    argv = [item for name, value in args.items() for item in (f"--{name}", str(value))]
    record = cli(grow, argv=argv)

    # the reference's loss: cross-entropy of the first eval_iters x micro_batch_size = 8 validation blocks
    blocks = torch.from_numpy(validation.astype(np.int64)).view(12, SEQ_LEN + 1)[:8]
    with torch.no_grad():
        logits = reference(blocks[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert record["reference"]["validation_loss"] == pytest.approx(expected, rel=1e-5)

    # the round: resumed from step 1; its loss is the training loop's own final validation (one process, fp32)
    (entry,) = record["rounds"]
    assert entry["n"] == 2 and entry["steps"] == T and entry["resumed_from_step"] == 1
    assert len(list((train_dir / "logs").glob("version_*"))) == 2  # the killed attempt and the resumed one
    with open(train_dir / "logs" / "version_1" / "metrics.csv") as f:  # the resumed attempt's log
        last = {key: float(value) for row in csv.DictReader(f) if int(row["step"]) == T
                for key, value in row.items() if value}
    assert entry["validation_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert entry["tokens"] == last["tokens"] == T * 8 * SEQ_LEN
    assert entry["parameters"] == num_parameters(GPT(Config.from_name("micro", n_layer=2)))
    assert validation_loss(train_dir / "final", data, SEQ_LEN, 2, 4) == entry["validation_loss"]
    # 4 steps at lr 1e-2 take the inherited half far below the random reference (about ln 256 = 5.5)
    assert entry["matched"] and record["matched_at"] == 2 and entry["validation_loss"] < expected - 0.3
    assert json.loads((tmp_path / "grow" / "grow.json").read_text()) == record

    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "grow" / "grow.png")
    assert image.shape[:2] == (600, 960)  # 8 x 5 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # drawn, not blank

