"""quantize.py and scripts/quantize.py: codes within the format's error bound; the CPU kernels against a float64
matmul of the same dequantized weights; a quantized model against a float model holding those weights; a saved
quantized checkpoint loading in another process to the same logits; every inference script with --quantize; the
fallback where the fast kernel cannot run; the refusals and the bad flags."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import native_kernels
from checkpoint import load_model, save_model_dir
from model import GPT, Config
from quantize import (QuantizedLinear, Quantization, bf16_instructions, dequantize, int4_codes, prepare_model,
                      quantize_for_inference, quantize_model, weight_bytes)
from tests.documented import ROOT, documented, run_script
from utils import UserError

needs_bf16 = pytest.mark.skipif(not bf16_instructions(), reason="this CPU has no bf16 instructions: the packed "
                                                                "kernels are not used here (the fallback is tested)")
needs_native = pytest.mark.skipif(native_kernels.load()[0] is None, reason=native_kernels.load()[1] or "built")


def linear(out_features: int = 96, in_features: int = 256, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, out_features)[:, None])  # channels of different ranges
    return layer


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_codes_round_trip_within_half_a_step(mode, group_size):
    layer = linear()
    module = QuantizedLinear.from_linear(layer, mode, group_size)
    error = (dequantize(module, torch.float64) - layer.weight.double()).abs()
    if mode == "int8":
        step = module.scales.double()[:, None]
    else:
        step = module.scales.double().repeat_interleave(group_size, dim=1)
        assert int4_codes(module.codes).max() <= 15 and module.codes.dtype == torch.uint8
    assert (error <= step / 2 * (1 + 1e-6)).all()


@needs_bf16
@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 64)])
def test_cpu_kernels_compute_the_dequantized_matmul(mode, group_size):
    """The packed kernel against float64 x_bf16 @ dequantized weight: within the bf16 rounding of its output."""
    layer = linear(bias=True)
    module = QuantizedLinear.from_linear(layer, mode, group_size)
    x = torch.randn(5, 256).bfloat16()
    expected = x.double() @ dequantize(module, torch.float64).T + layer.bias.double()
    assert module.prepare(torch.bfloat16, native=False) == f"cpu_{mode}pack"  # int8: aten's kernel, not ours
    got = module(x).double()
    assert ((got - expected).abs() <= 2 ** -7 * expected.abs() + 1e-2).all()


@needs_bf16
def test_a_packed_int4_layer_keeps_one_copy_of_its_codes():
    """The packed copy replaces the stored codes (not both in memory): the bytes stay those of the stored codes, and
    what needs the stored ones (a state dict to save, dequantize) says it must come before prepare."""
    torch.manual_seed(0)
    model = quantize_model(GPT(Config.from_name("micro", intermediate_size=192)), Quantization("int4", 32))
    stored = weight_bytes(model)
    prepare_model(model, torch.bfloat16)
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    assert all(layer.codes is None and layer.kernel == "cpu_int4pack" for layer in layers)
    assert weight_bytes(model) == stored
    with pytest.raises(RuntimeError, match=r"h.0.attn.qkv.codes: packed for the device \(cpu_int4pack\) and released"):
        model.state_dict()
    with pytest.raises(ValueError, match="dequantize before `prepare`"):
        dequantize(layers[0])


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16), torch.float32])
def test_the_blocked_cpu_int8_layout_computes_the_dequantized_matmul(dtype, native):
    """The codes re-laid in blocks of output channels (the state dict keeps them as stored), for native_kernels' C
    kernel or, without it, for a compiled step (prepare(compiled=True)), with bf16 activations or float32 ones (a CPU
    without bf16 instructions); eager (a step, a short prompt, a long one), compiled for a fixed number of rows (a
    decode or verify step: the C kernel as a torch operator, or inductor's fused loop) and compiled for a dynamic
    number: each within the activation dtype's rounding of the float64 matmul. Every call of at most 32 rows runs the
    C kernel where it is built, compiled or not; a longer prompt multiplies the codes converted into a matrix."""
    layer = linear(bias=True)
    module = QuantizedLinear.from_linear(layer, "int8", None)
    stored = module.state_dict()["codes"].clone()
    assert module.prepare(dtype, compiled=True, native=native) == ("cpu_int8_native" if native else "cpu_int8_blocked")
    assert module.codes.shape == (3, 256, 32) and torch.equal(module.state_dict()["codes"], stored)
    x = torch.randn(40, 256).to(dtype)
    expected = x.double() @ dequantize(module, torch.float64).T + layer.bias.double()
    tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch._dynamo.reset()
    # fullgraph: the operator must not break the graph (a compiled decode step is compiled whole)
    fixed, dynamic = (torch.compile(module, dynamic=dynamic, fullgraph=True) for dynamic in (False, True))
    native_rows = []  # the calls that ran the operator, as torch's profiler records it
    for forward, rows in ((module, 1), (module, 5), (module, 12), (module, 40), (fixed, 1), (fixed, 5), (dynamic, 3)):
        with torch.profiler.profile() as profiler:
            got = forward(x[:rows])
        if any(event.key == "small_llama::int8_blocked_matmul" for event in profiler.key_averages()):
            native_rows.append(rows)
        assert got.dtype == dtype
        error = (got.double() - expected[:rows]).abs()
        assert (error <= tolerance * expected[:rows].abs() + 10 * tolerance).all(), (forward, rows)
    torch._dynamo.reset()
    assert native_rows == ([1, 5, 12, 1, 5, 3] if native else [])


@needs_bf16
@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_a_decode_runs_each_cpu_int8_layer_on_the_kernel_it_can(monkeypatch, native):
    """The int8 layers whose output width is a multiple of the block run native_kernels' C kernel on the blocked
    layout; without it, generate(compiled=True) prepares them for its compiled step in that layout; the others keep
    aten's kernel. Eagerly, an input width aten's int8 kernel cannot take (not a multiple of 16: it crashes) is
    dequantized; the blocked layout takes it. The numbers stay those of the float64 twin."""
    import generation

    monkeypatch.setattr(generation, "compiled_step", lambda step, device: step)  # the wiring, without a compile
    torch.manual_seed(0)
    config = Config.from_name("micro", intermediate_size=200)  # fc_1, fc_2: 200 outputs; mlp.proj: 200 inputs
    model = quantize_for_inference(GPT(config), Quantization("int8"), torch.bfloat16, native=native)
    twin = float_twin(model)
    idx = torch.randint(0, 256, (1, 12))

    def kernels() -> dict:
        return {name: module.kernel for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}

    for compiled in (False, True):
        generation.generate(model, idx[0, :4], 3, temperature=0.0, compiled=compiled)
        blocked = "cpu_int8_native" if native else "cpu_int8_blocked" if compiled else None
        expected = {"fc_1": "cpu_int8pack", "fc_2": "cpu_int8pack", "mlp.proj": blocked or "dequantized",
                    "": blocked or "cpu_int8pack"}
        for name, kernel in kernels().items():
            assert kernel == next(expected[end] for end in expected if name.endswith(end)), name
        with torch.no_grad():
            torch.testing.assert_close(model(idx).double(), twin(idx), rtol=0.03, atol=0.03)


def float_twin(model: GPT) -> GPT:
    """A float64 GPT whose linear layers hold the quantized model's dequantized weights."""
    twin = GPT(model.config).double()
    state = {key: value for key, value in model.state_dict().items()}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                state[f"{name}.weight"] = dequantize(module, torch.float64)
                for key in ("codes", "scales", "lows"):
                    state.pop(f"{name}.{key}", None)
    twin.load_state_dict({key: value.double() for key, value in state.items()})
    return twin


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_is_the_float_model_of_its_dequantized_weights(mode):
    """In float64 (the dequantized fallback), every quantized layer and the head's float output are wired as in the
    float model: the logits agree to rounding."""
    torch.manual_seed(0)
    config = Config.from_name("micro", bias=True, intermediate_size=192)  # every width a multiple of 32
    model = quantize_model(GPT(config), Quantization(mode, 32 if mode == "int4" else None))
    twin = float_twin(model)
    model = model.double()
    prepare_model(model, torch.float64)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits.double(), twin(idx), rtol=0, atol=1e-5)
    assert logits.dtype == torch.float32  # the head returns float32 logits


def test_without_bf16_instructions_or_the_native_kernel_the_weights_are_dequantized_with_the_same_numbers(
        trained, monkeypatch, capsys):
    import quantize
    from generation import load_inference_model

    monkeypatch.setattr(quantize, "bf16_instructions", lambda: False)
    monkeypatch.setattr(native_kernels, "load", lambda: (None, "no C compiler: 'cc' is not on PATH"))
    model = load_inference_model(trained.checkpoint_dir, torch.device("cpu"), quantize="int8")
    said = capsys.readouterr().err
    assert "dequantized" in said and "the native int8 kernel could not be built: no C compiler" in said  # one line
    twin = float_twin(model).float()
    idx = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), twin(idx), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def quantized_dir(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "int4"
    run_script(documented(
        "python scripts/quantize.py --checkpoint_dir out/demo/final --mode int4 --group_size 64 "
        "--out_dir out/demo/int4",
        replace={"--checkpoint_dir": trained.checkpoint_dir, "--out_dir": out}))
    return out


def test_a_saved_quantized_checkpoint_loads_in_another_process_to_the_same_logits(quantized_dir, tmp_path):
    assert json.loads((quantized_dir / "quantization.json").read_text())["mode"] == "int4"
    stored = torch.load(quantized_dir / "lit_model.pth", weights_only=True)
    assert "lm_head.codes" in stored and "lm_head.weight" not in stored and stored["lm_head.codes"].dtype == torch.uint8
    idx = torch.randint(0, 4096, (1, 16))
    torch.save(idx, tmp_path / "idx.pt")
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from checkpoint import load_model; "
              "model = load_model(sys.argv[2], dtype=torch.bfloat16); "
              "torch.save(model(torch.load(sys.argv[3])), sys.argv[4])")
    subprocess.run([sys.executable, "-c", script, str(ROOT), str(quantized_dir), str(tmp_path / "idx.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=120)
    with torch.no_grad():
        here = load_model(quantized_dir, dtype=torch.bfloat16)(idx)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), here)


def test_every_inference_script_runs_quantized(trained, quantized_dir, capsys):
    checkpoint = str(trained.checkpoint_dir)
    run_script(documented("python generate/base.py --checkpoint_dir out/demo/final --prompt 'def ' --quantize int8",
                          replace={"--checkpoint_dir": checkpoint}))
    assert capsys.readouterr().out.startswith("def ")
    run_script(["generate/chat.py", "--checkpoint_dir", checkpoint, "--chat_template", "chatml", "--prompt", "Hi",
                "--max_new_tokens", "4", "--quantize", "int4", "--group_size", "32"])
    run_script(documented(
        "python generate/speculative.py --checkpoint_dir out/demo/final --draft_checkpoint_dir out/demo/int4 "
        "--quantize int8 --max_new_tokens 16", replace={"--checkpoint_dir": checkpoint,
                                                       "--draft_checkpoint_dir": quantized_dir, "--max_new_tokens": 6}))
    err = capsys.readouterr().err
    assert "int8 linear layers run" in err and "int4 linear layers run" in err
    run_script(documented("python eval/perplexity.py --checkpoint_dir out/demo/int4 --text_files README.md",
                          replace={"--checkpoint_dir": quantized_dir, "--text_files": ROOT / "README.md"}))
    assert "perplexity" in capsys.readouterr().out


def test_what_needs_float_weights_refuses_a_quantized_checkpoint_in_one_line(quantized_dir, tmp_path):
    from inheritune.init_from import init_from
    from scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from training import model_config

    for call in (lambda: model_config(None, quantized_dir), lambda: init_from(quantized_dir, tmp_path / "small"),
                 lambda: convert_lit_checkpoint(quantized_dir, tmp_path / "hf")):
        with pytest.raises(UserError, match=r"is quantized \(int4\): .* needs its float weights"):
            call()


def test_bad_flags_are_one_line_errors(trained, tmp_path):
    with pytest.raises(UserError, match="group size 48 is not one of"):
        from generation import load_inference_model
        load_inference_model(trained.checkpoint_dir, torch.device("cpu"), quantize="int4", group_size=48)
    config = Config.from_name("micro", n_embd=96, n_head=4, n_query_groups=2)  # width 96: no group of 64 fits
    save_model_dir(GPT(config), config, None, tmp_path / "odd")
    with pytest.raises(UserError, match="does not divide the input widths"):
        load_inference_model(tmp_path / "odd", torch.device("cpu"), quantize="int4", group_size=64)
    result = subprocess.run([sys.executable, "scripts/quantize.py", "--checkpoint_dir", str(trained.checkpoint_dir),
                             "--out_dir", str(tmp_path / "q"), "--mode", "int3"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'int3'" in result.stderr
    from scripts.quantize import main as quantize_checkpoint
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="make fewer than 2 tokens"):
        quantize_checkpoint(trained.checkpoint_dir, tmp_path / "q", text_files=[tmp_path / "empty.txt"])
    assert not (tmp_path / "q").exists()  # refused before anything was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: needs a GPU")
@pytest.mark.parametrize("mode, group_size, triton, kernel", [("int8", None, True, "cuda_int8_triton"),
                                                              ("int8", None, False, "cuda_int8"),
                                                              ("int4", 64, True, "cuda_int4pack")])
def test_cuda_kernels_compute_the_dequantized_matmul(mode, group_size, triton, kernel):
    layer = linear(bias=True)
    module = QuantizedLinear.from_linear(layer, mode, group_size).cuda()
    x = torch.randn(40, 256, device="cuda").bfloat16()
    expected = x.double() @ dequantize(module, torch.float64).T + layer.bias.double().cuda()
    assert module.prepare(torch.bfloat16, triton=triton) == kernel
    for forward in (module, torch.compile(module)):  # compiled: the fused product-and-sum of decode steps too
        for rows in (1, 5, 40):  # decode, verify, prefill
            got = forward(x[:rows]).double()
            # bf16 activations, scales and outputs (and int4's bf16 zeros): within 2^-7 of each row's norm
            assert ((got - expected[:rows]).norm(dim=-1) <= 2 ** -7 * expected[:rows].norm(dim=-1)).all()


def test_the_cuda_int8_forward_computes_the_dequantized_matmul_eager_and_compiled():
    """The arithmetic of the CUDA int8 branch (a matmul with output scales; compiled, for a few rows, a product and
    a sum), run here on the CPU in float32 so that a machine without a GPU checks it."""
    layer = linear(bias=True)
    module = QuantizedLinear.from_linear(layer, "int8", None)
    module.prepare(torch.float32, native=False)  # the codes as stored, (N, K)
    module.kernel = "cuda_int8"
    x = torch.randn(5, 256)
    expected = x.double() @ dequantize(module, torch.float64).T + layer.bias.double()
    compiled = torch.compile(module, dynamic=False)
    for rows in (1, 5):
        for got in (module(x[:rows]), compiled(x[:rows])):
            torch.testing.assert_close(got.double(), expected[:rows], rtol=1e-5, atol=1e-5)
