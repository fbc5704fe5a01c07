"""inheritune/init_from.py: which tensors are inherited, checked against a hand-written key list and a fresh GPT init
built here; refusals; the provenance file; the output as a checkpoint directory; the command line."""

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from checkpoint import load_model, save_model_dir
from inheritune.init_from import init_from
from model import GPT, Config
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
K = 4  # reference blocks

# what of a block each --modules choice copies, by hand (micro with bias=True: every linear layer has a bias)
ATTN = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"]
MLP = ["mlp.fc_1.weight", "mlp.fc_1.bias", "mlp.fc_2.weight", "mlp.fc_2.bias", "mlp.proj.weight", "mlp.proj.bias"]
BLOCK_TENSORS = {
    "all": ["norm_1.weight", *ATTN, "norm_2.weight", *MLP],
    "attn": ["norm_1.weight", *ATTN],
    "mlp": ["norm_2.weight", *MLP],
    "attn_mlp": ATTN + MLP,
    "none": [],
}
WTE, LN_F, HEAD = "transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"


def write_reference(directory: Path, dtype: torch.dtype = torch.float32, n_layer: int = K) -> Path:
    """A micro checkpoint directory with a stand-in tokenizer file and every tensor random, norms and biases too, so
    that no copied tensor can equal a freshly initialised one by chance."""
    config = Config.from_name("micro", n_layer=n_layer, bias=True)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in GPT(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(shape, generator=generator).to(dtype) for key, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text('{"stand-in": "copied byte for byte"}')
    save_model_dir(weights, config, directory, directory)
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return write_reference(tmp_path_factory.mktemp("reference"))


def expected_weights(reference: Path, layer_ids: List[int], modules: str, outside: List[str],
                     seed: int = 1337) -> Tuple[dict, set]:
    """The inherited state dict built independently: a fresh GPT of len(layer_ids) blocks after manual_seed(seed),
    with the named tensors replaced by the reference's. Returns it and the copied names."""
    ref = torch.load(reference / "lit_model.pth", weights_only=True)
    torch.manual_seed(seed)
    expected = GPT(Config.from_name("micro", n_layer=len(layer_ids), bias=True)).state_dict()
    copied = {f"transformer.h.{i}.{name}": f"transformer.h.{source}.{name}"
              for i, source in enumerate(layer_ids) for name in BLOCK_TENSORS[modules]}
    copied.update({name: name for name in outside})
    for name, source in copied.items():
        expected[name] = ref[source]
    return expected, set(copied)


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


ALL = [WTE, LN_F, HEAD]
CASES = [  # init_from's keyword arguments, then the reference blocks, --modules and the other tensors copied
    pytest.param(dict(), [0, 1], "all", ALL, id="default-algorithm-1-first-half"),
    pytest.param(dict(n_layers=3), [0, 1, 2], "all", ALL, id="n_layers"),
    pytest.param(dict(n_layers=3, modules="attn"), [0, 1, 2], "attn", ALL, id="attn"),
    pytest.param(dict(modules="mlp"), [0, 1], "mlp", ALL, id="mlp"),
    pytest.param(dict(modules="attn_mlp"), [0, 1], "attn_mlp", ALL, id="attn_mlp-without-norms"),
    pytest.param(dict(modules="none"), [0, 1], "none", ALL, id="none-keeps-wte-ln_f-head"),
    pytest.param(dict(modules="none", copy_embeddings=False, copy_final_norm=False, copy_head=False), [0, 1], "none",
                 [], id="random-baseline"),
    pytest.param(dict(layer_ids=[2, 3]), [2, 3], "all", ALL, id="last-blocks-lazy-layer-control"),
    pytest.param(dict(layer_ids=[3, 0, 2], n_layers=3, modules="attn_mlp", seed=7), [3, 0, 2], "attn_mlp", ALL,
                 id="layer_ids-reordered-other-seed"),
    pytest.param(dict(copy_final_norm=False), [0, 1], "all", [WTE, HEAD], id="official-gpt2-runs"),
    pytest.param(dict(copy_embeddings=False, copy_final_norm=False), [0, 1], "all", [HEAD], id="official-1.5b-run"),
    pytest.param(dict(n_layers=K, copy_head=False), [0, 1, 2, 3], "all", [WTE, LN_F], id="all-blocks-no-head"),
]


@pytest.mark.parametrize("kwargs, layer_ids, modules, outside", CASES)
def test_copied_tensors_are_the_references_and_the_rest_a_fresh_init(reference, tmp_path, kwargs, layer_ids,
                                                                      modules, outside):
    out = init_from(reference, tmp_path / "out", **kwargs)
    expected, copied = expected_weights(reference, layer_ids, modules, outside, kwargs.get("seed", 1337))
    assert_same_weights(torch.load(out / "lit_model.pth", weights_only=True), expected)
    assert set(json.loads((out / "inheritune.json").read_text())["copied"]) == copied


def test_provenance_records_the_reference_its_hash_and_the_options(reference, tmp_path):
    init_from(reference, tmp_path / "out", layer_ids=[3, 1], modules="mlp", copy_head=False, seed=5)
    record = json.loads((tmp_path / "out" / "inheritune.json").read_text())
    _, copied = expected_weights(reference, [3, 1], "mlp", [WTE, LN_F])
    assert sorted(record.pop("copied")) == sorted(copied)
    assert record == dict(
        reference_dir=str(reference.resolve()),
        reference_sha256=hashlib.sha256((reference / "lit_model.pth").read_bytes()).hexdigest(),
        reference_name="micro", reference_n_layer=K, n_layer=2, layer_ids=[3, 1], modules="mlp",
        copy_embeddings=True, copy_final_norm=True, copy_head=False, seed=5,
    )


def test_output_is_a_checkpoint_directory_named_for_the_reference(reference, tmp_path, capsys):
    out = init_from(reference, tmp_path / "out", n_layers=3, modules="attn")
    model = load_model(out)
    assert model.config == replace(Config.from_name("micro", n_layer=3, bias=True), name="micro-inherit-3")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.padded_vocab_size)
    assert (out / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    expected, copied = expected_weights(reference, [0, 1, 2], "attn", ALL)
    copied_params = sum(expected[key].numel() for key in copied)
    fresh_params = sum(value.numel() for key, value in expected.items() if key not in copied)
    assert (f"copied {len(copied)} tensors ({copied_params:,} parameters); freshly initialised with seed 1337: "
            f"{len(expected) - len(copied)} tensors ({fresh_params:,} parameters)") in capsys.readouterr().out


def test_unnamed_reference_is_named_after_its_directory(reference, tmp_path):
    unnamed = Path(shutil.copytree(reference, tmp_path / "my-ref"))
    config = json.loads((unnamed / "model_config.json").read_text())
    (unnamed / "model_config.json").write_text(json.dumps({**config, "name": ""}))
    assert Config.from_file(init_from(unnamed, tmp_path / "out")).name == "my-ref-inherit-2"


def test_every_tensor_keeps_the_references_dtype(tmp_path):
    reference = write_reference(tmp_path / "bf16", dtype=torch.bfloat16)
    out = init_from(reference, tmp_path / "out", modules="attn")
    expected, _ = expected_weights(reference, [0, 1], "attn", ALL)
    assert_same_weights(torch.load(out / "lit_model.pth", weights_only=True),
                        {key: value.to(torch.bfloat16) for key, value in expected.items()})
    assert load_model(out).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layers=K + 1), r"--n_layers 5 is out of range: the reference has 4 blocks; choose 1 to 4"),
    (dict(n_layers=0), r"--n_layers 0 is out of range"),
    (dict(layer_ids=[0, K]), r"--layer_ids \[0, 4\]: \[4\] out of range; the reference's 4 blocks are numbered 0 to 3"),
    (dict(layer_ids=[-1]), r"--layer_ids \[-1\]: \[-1\] out of range"),
    (dict(layer_ids=[1, 2, 1]), r"--layer_ids \[1, 2, 1\] repeats \[1\]"),
    (dict(layer_ids=[]), r"--layer_ids is empty"),
    (dict(n_layers=3, layer_ids=[0, 1]), r"--n_layers 3 disagrees with --layer_ids \[0, 1\] \(2 blocks\)"),
    (dict(modules="blocks"), r"--modules 'blocks' is not one of all, attn, mlp, attn_mlp, none"),
], ids=["n-above-k", "n-zero", "id-above-range", "negative-id", "repeated-id", "no-ids", "n-disagrees", "bad-modules"])
def test_bad_layer_and_module_choices_are_refused(reference, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_from(reference, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_one_block_reference_has_no_default_half(tmp_path):
    reference = write_reference(tmp_path / "one-block", n_layer=1)
    with pytest.raises(ValueError, match=r"the default --n_layers 1 // 2 = 0 is out of range"):
        init_from(reference, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (dict(n_layer=K + 1), r"its weights do not match its model_config.json: .* missing keys \['transformer\.h\.4\."),
    (dict(intermediate_size=128), r"its weights do not match its model_config.json: .*'transformer\.h\.0\.mlp\."
                                  r"fc_1\.(weight|bias)' has shape"),
], ids=["fewer-blocks-in-weights", "other-shape"])
def test_reference_whose_weights_do_not_match_its_config_is_refused(tmp_path, change, message):
    reference = write_reference(tmp_path / "reference")
    config = json.loads((reference / "model_config.json").read_text())
    (reference / "model_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        init_from(reference, tmp_path / "out", n_layers=2)
    assert not (tmp_path / "out").exists()


def test_existing_weights_are_kept_unless_overwrite(reference, tmp_path):
    out = init_from(reference, tmp_path / "out", n_layers=2)
    with pytest.raises(UserError, match=r"already holds lit_model.pth: choose another --out_dir, or pass "
                                        r"--overwrite"):
        init_from(reference, out, n_layers=1)
    assert Config.from_file(out).n_layer == 2
    init_from(reference, out, n_layers=1, overwrite=True)
    assert Config.from_file(out).n_layer == 1


def test_directory_holding_other_files_is_not_replaced(reference, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        init_from(reference, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_reference_directory_is_never_the_output(tmp_path):
    reference = write_reference(tmp_path / "models" / "reference")
    for out_dir in (reference, tmp_path / "models" / ".." / "models" / "reference", tmp_path / "models"):
        with pytest.raises(ValueError, match="is the reference directory .* or holds it"):
            init_from(reference, out_dir, overwrite=True)
    assert Config.from_file(reference).n_layer == K


def test_command_line_gives_what_the_function_gives(reference, tmp_path):
    """The docstring's flags (--ref_checkpoint_dir, --n_layers, --out_dir) and every other one, on a micro stand-in."""
    result = subprocess.run(
        [sys.executable, "inheritune/init_from.py", "--ref_checkpoint_dir", str(reference), "--n_layers", "2",
         "--out_dir", str(tmp_path / "cli"), "--layer_ids", "3", "1", "--modules", "attn", "--no-copy_embeddings",
         "--no-copy_final_norm", "--no-copy_head", "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "copied 10 tensors" in result.stdout  # 2 blocks x (norm_1, qkv, proj with biases)
    init_from(reference, tmp_path / "function", n_layers=2, layer_ids=[3, 1], modules="attn", copy_embeddings=False,
              copy_final_norm=False, copy_head=False, seed=7)
    assert_same_weights(torch.load(tmp_path / "cli" / "lit_model.pth", weights_only=True),
                        torch.load(tmp_path / "function" / "lit_model.pth", weights_only=True))
    for name in ("inheritune.json", "model_config.json"):
        assert (tmp_path / "cli" / name).read_text() == (tmp_path / "function" / name).read_text()


def test_a_tied_reference_gives_a_tied_model_whose_shared_tensor_is_copied_once(tmp_path, capsys):
    config = Config.from_name("micro", n_layer=K, tie_embeddings=True)
    torch.manual_seed(0)
    reference = tmp_path / "tied"
    save_model_dir(GPT(config), config, None, reference)
    init_from(reference, tmp_path / "out", n_layers=2)
    weights = torch.load(tmp_path / "out" / "lit_model.pth", weights_only=True)
    assert weights[HEAD].data_ptr() == weights[WTE].data_ptr()  # one tensor, stored once
    assert torch.equal(weights[WTE], torch.load(reference / "lit_model.pth", weights_only=True)[WTE])
    model = load_model(tmp_path / "out")
    assert model.config.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    out = capsys.readouterr().out
    assert "copied 16 tensors" in out and ": 0 tensors (0 parameters)" in out  # 2 x 7 block tensors, wte, ln_f
    with pytest.raises(UserError, match="give both or neither"):
        init_from(reference, tmp_path / "head_only", n_layers=2, copy_embeddings=False)
