"""checkpoint.py: the checkpoint directory's one writer (atomic, round-trips) and one loader (a mismatched checkpoint
names the key and both shapes)."""

import json

import pytest
import torch

from checkpoint import check_state_dict, load_checkpoint, load_model, save_atomic, save_model_dir
from model import GPT, Config
from utils import UserError


def test_save_atomic_leaves_no_temporary_file(tmp_path):
    save_atomic({"x": torch.arange(3)}, tmp_path / "a" / "ckpt.pth")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ckpt.pth"]
    assert torch.equal(torch.load(tmp_path / "a" / "ckpt.pth", weights_only=True)["x"], torch.arange(3))


def test_save_atomic_gives_the_file_the_mode_of_a_normal_file(tmp_path):
    save_atomic({"x": 1}, tmp_path / "ckpt.pth")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "ckpt.pth").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_save_atomic_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"x": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"x": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=True) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_save_model_dir_is_atomic_and_round_trips(tmp_path):
    config = Config.from_name("micro", n_layer=3)
    model = GPT(config)
    out = tmp_path / "out"
    save_model_dir(model, config, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    assert sorted(p.name for p in out.iterdir()) == ["lit_model.pth", "model_config.json"]
    assert Config.from_file(out) == config
    loaded = load_model(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(b"spm")
    (tmp_path / "tokenizer" / "notes.txt").write_text("not a tokenizer file")
    save_model_dir(model.state_dict(), config, tmp_path / "tokenizer", out, json_files={"provenance.json": {"a": 1}})
    assert sorted(p.name for p in out.iterdir()) == [  # the older directory replaced whole
        "lit_model.pth", "model_config.json", "provenance.json", "tokenizer.model"]
    assert json.loads((out / "provenance.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tokenizer"]

    with pytest.raises(ValueError, match=r"the weights for .*out: 'transformer.wte.weight' has shape \(256, 32\)"):
        save_model_dir(GPT(Config.from_name("micro", n_layer=3, n_embd=32)), config, None, out)
    assert Config.from_file(out) == config  # the directory that was there is intact


def test_save_model_dir_into_the_tokenizer_dir_keeps_its_files(tmp_path):
    """A converted Hugging Face directory: the weights and the config go beside its own files."""
    config = Config.from_name("micro")
    (tmp_path / "config.json").write_text("{}")
    save_model_dir(GPT(config).state_dict(), config, tmp_path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "lit_model.pth", "model_config.json"]


def test_mismatched_checkpoint_names_key_and_both_shapes(tmp_path):
    small = GPT(Config.from_name("micro"))
    big = GPT(Config.from_name("micro", n_embd=128))
    save_atomic(big.state_dict(), tmp_path / "lit_model.pth")
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' has shape \(256, 128\).*expects \(256, 64\)"):
        load_checkpoint(small, tmp_path / "lit_model.pth")
    state = small.state_dict()
    state["extra.weight"] = state.pop("lm_head.weight")
    with pytest.raises(UserError, match=r"missing keys \['lm_head.weight'\].*unexpected keys \['extra.weight'\]"):
        check_state_dict(small, state, "test")
