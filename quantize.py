"""Weight-only quantization of GPT's linear layers (the head included; embeddings and norms stay as they are).

int8: symmetric, one scale per output channel: w = code * scale, code in [-127, 127].
int4: asymmetric, groups of `group_size` along the input dimension: w = code * scale + low, code in [0, 15] (stored
two to a byte, the even input index in the low nibble). The kernels take the same numbers as (code - 8) * scale +
zero with zero = low + 8 * scale: that form is computed when the weights are packed for the device, at load.

What is stored (`QuantizedLinear`'s buffers, a quantized checkpoint's lit_model.pth) is device-independent: codes
and float32 scales. `prepare` packs them for the device and picks the computation:
- CPU with bf16 instructions (avx512_bf16 or amx_bf16): activations in bf16, aten's `_weight_int8pack_mm` and
  `_weight_int4pack_mm_for_cpu` (with fp32 activations these kernels take a path ~5-25x slower than fp32 F.linear);
  a packed int4 copy replaces the stored codes;
- CPU, int8, bf16 or float32 activations (so a CPU without bf16 instructions too), output widths a multiple of 32:
  the codes re-laid in blocks of 32 output channels, (N / 32, K, 32), each block one stream. Calls of up to 32 rows
  (decode and verify steps, short prompts) run native_kernels' C kernel (AVX-512 or AVX2, built on first use with the
  machine's C and C++ compilers; 1.3-1.8x the eager decode on aten's kernel), eager or compiled (a torch operator).
  Larger calls (long prompts) convert the codes into a (K, N) matrix of the activation dtype and multiply. Where the C
  kernel is not built (no AVX-512 nor AVX2, no C or C++ compiler), eager steps run aten's `_weight_int8pack_mm` (bf16
  activations) and a compiled decode re-lays the codes (`prepare_compiled_decode`) for inductor's loop over the same
  layout, converting each code once for all rows of the step (1.5x the compiled decode on aten's kernel, which
  streams its (N, K) rows slower);
- CUDA: int8 through quantized_kernels' Triton kernel (bf16 or fp16 activations; Triton comes with torch's CUDA wheels
  for Linux), which reads the stored codes as they are; without Triton, a matmul of the codes with the scales applied
  to its output, where a compiled step of a few rows runs a product-and-sum that inductor fuses into one kernel
  reading each code once (a 7B decode: 0.78x bf16, against the Triton kernel's 1.33x); int4 through the tinygemm kernel
  (`_weight_int4pack_mm`), which reads the 7B layers faster than the Triton int4 kernels we wrote;
- elsewhere (eagerly on a CPU without bf16 instructions, except int8 layers on the C kernel; another device; eagerly
  on the CPU, an int8 layer aten's kernel runs whose input width it cannot take, not a multiple of 16): the weights
  dequantized once into the activation dtype and F.linear: the same numbers, float memory, no speedup; `describe`
  says so in one line.
The head returns float32 logits whatever the activation dtype.
"""

import json
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import native_kernels
from model import GPT

QuantizeMode = Literal["int8", "int4"]
MODES = typing.get_args(QuantizeMode)
GROUP_SIZES = (32, 64, 128)
INT8_BLOCK = native_kernels.BLOCK  # output channels per block of the CPU int8 layout (the C kernel's, compiled steps')
INT8PACK_WIDTH = 16  # aten's CPU _weight_int8pack_mm takes input widths that are multiples of this (others crash it)
FUSED_ROWS = 8  # compiled steps of at most this many rows (decode, speculative verify) take the fused loops
# calls of at most this many rows run native_kernels' C kernel (beyond, converting the codes into a matrix for a
# matmul is faster: bench/RESULTS.md)
NATIVE_ROWS = 32
QUANTIZATION_FILE = "quantization.json"
FORMAT = 1  # of QUANTIZATION_FILE and the stored codes


@dataclass(frozen=True)
class Quantization:
    """What a quantized checkpoint's quantization.json records."""

    mode: str
    group_size: Optional[int] = None  # int4 only
    excluded: Tuple[str, ...] = ()  # linear layers left in floating point, by module name
    format: int = FORMAT

    def check(self, widths: Sequence[int] = ()) -> None:
        """ValueError naming what is wrong: an unknown mode, a group size int4 cannot use, or one that does not
        divide an input width (`widths`: the in_features of the layers to quantize)."""
        if self.mode not in MODES:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {list(MODES)}")
        if self.mode == "int4":
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"int4 group size {self.group_size} is not one of {list(GROUP_SIZES)}")
            bad = sorted({width for width in widths if width % self.group_size})
            if bad:
                raise ValueError(f"int4 group size {self.group_size} does not divide the input widths {bad}")


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> codes int8 (N, K), scales float32 (N,)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) -> codes uint8 (N, K // 2) two per byte, scales and lows float32 (N, K // group_size)."""
    N, K = weight.shape
    groups = weight.float().reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes[:, ::2] | (codes[:, 1::2] << 4), scales, low


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The codes (N, K) in [0, 15] of the stored bytes (N, K // 2)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.size(0), -1)


def dequantize(module: "QuantizedLinear", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the stored codes stand for, computed in float32 (float64 for float64)."""
    if module.codes is None:
        raise ValueError(f"the {module.mode} codes were packed for the device ({module.kernel}) and released: "
                         "dequantize before `prepare`")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if module.mode == "int8":
        return (int8_rows(module.codes).to(compute) * module.scales.to(compute)[:, None]).to(dtype)
    codes = int4_codes(module.codes).to(compute)
    N, K = codes.shape
    groups = codes.reshape(N, K // module.group_size, module.group_size)
    weight = groups * module.scales.to(compute)[..., None] + module.lows.to(compute)[..., None]
    return weight.reshape(N, K).to(dtype)


def int8_blocks(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> (N / INT8_BLOCK, K, INT8_BLOCK): each block's codes for one input index contiguous."""
    N, K = codes.shape
    return codes.reshape(N // INT8_BLOCK, INT8_BLOCK, K).transpose(1, 2).contiguous()


def int8_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K), from either layout."""
    return codes if codes.dim() == 2 else codes.transpose(1, 2).reshape(-1, codes.size(1))


def stored_codes(module: "QuantizedLinear", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state dict holds the codes as stored (N, K), whatever layout they run in (never a packed layer's, released)."""
    if module.codes is None:
        raise RuntimeError(f"{prefix}codes: packed for the device ({module.kernel}) and released; a quantized model's "
                           f"state dict is taken before `prepare` (scripts/quantize.py saves it then)")
    if module.mode == "int8":
        state_dict[prefix + "codes"] = int8_rows(state_dict[prefix + "codes"])


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as codes and scales (see the module docstring); `prepare` before use."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: Optional[int],
                 float_output: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size, self.float_output = mode, group_size, float_output
        if mode == "int8":
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features))
        else:
            groups = in_features // group_size
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups))
            self.register_buffer("lows", torch.zeros(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel = "unprepared"
        self.register_state_dict_post_hook(stored_codes)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: Optional[int],
                    float_output: bool = False) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size, float_output)
        weight = linear.weight.detach()
        if mode == "int8":
            module.codes, module.scales = quantize_int8(weight)
        else:
            module.codes, module.scales, module.lows = quantize_int4(weight, group_size)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def prepare(self, activation_dtype: torch.dtype, compiled: bool = False, triton: bool = True,
                native: bool = True) -> str:
        """Pack the stored codes for this device's kernel and `activation_dtype` (`compiled`: the layout of a compiled
        decode where it differs; `triton`: on CUDA, int8 through quantized_kernels' Triton kernel where Triton is
        installed, else the torch-only path; `native`: on the CPU, int8 in the blocked layout through native_kernels'
        C kernel where it builds, else aten's kernel); returns the kernel's name."""
        if self.codes is None:
            raise ValueError(f"this layer is packed for {self.kernel} already: prepare it once")
        device = self.codes.device
        self.activation_dtype = activation_dtype
        cpu_int8 = device.type == "cpu" and self.mode == "int8"
        library, self.native_missing = native_kernels.load() if native and cpu_int8 else (None, "")
        if (cpu_int8 and self.out_features % INT8_BLOCK == 0 and activation_dtype in (torch.bfloat16, torch.float32)
                and (compiled or library is not None)):
            # the stored codes themselves change layout: one copy of the weights in memory, not two
            self.codes = int8_blocks(int8_rows(self.codes))
            self.packed, self.packed_scales = self.codes, self.scales.to(activation_dtype)
            # the C kernel's float32 scales, converted once here rather than at every step
            self.native_scales = self.scales.float()
            self.kernel = "cpu_int8_blocked" if library is None else "cpu_int8_native"
        elif (device.type == "cpu" and activation_dtype == torch.bfloat16 and self.mode == "int8"
                and self.in_features % INT8PACK_WIDTH == 0):
            self.codes = int8_rows(self.codes)
            self.packed, self.packed_scales = self.codes, self.scales.to(torch.bfloat16)
            self.kernel = "cpu_int8pack"
        elif device.type == "cpu" and activation_dtype == torch.bfloat16 and self.mode == "int4":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes(self.codes).int(), 1)
            self.packed_scales = self.scales_and_zeros()
            self.kernel = "cpu_int4pack"
            self.codes = None  # the packed copy replaces them: one copy of the weights in memory
        elif (device.type == "cuda" and self.mode == "int8" and activation_dtype in (torch.bfloat16, torch.float16)
                and triton and (kernels := triton_kernels()) is not None):
            self.triton_matmul = kernels.int8_matmul  # the stored codes as they are
            self.launch_configs = kernels.launch_configs(
                self.out_features, self.in_features, torch.cuda.get_device_properties(device).multi_processor_count)
            self.kernel = "cuda_int8_triton"
        elif device.type == "cuda" and self.mode == "int4" and activation_dtype == torch.bfloat16:
            codes = int4_codes(self.codes)  # tinygemm's byte order: the even input index in the high nibble
            # tinygemm reads the input dimension in tiles of 16 x inner_k_tiles: the widest tiling it divides
            inner_k_tiles = next(tiles for tiles in (8, 4, 2) if self.in_features % (16 * tiles) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4) | codes[:, 1::2],
                                                                     inner_k_tiles)
            self.packed_scales = self.scales_and_zeros()
            self.kernel = "cuda_int4pack"
            self.codes = None  # the packed copy replaces them
        elif device.type == "cuda" and self.mode == "int8":
            self.kernel = "cuda_int8"
        else:
            self.packed = dequantize(self, activation_dtype)
            self.kernel = "dequantized"
        return self.kernel

    def scales_and_zeros(self) -> torch.Tensor:
        """(K // group_size, N, 2) bf16: the kernels' scale and zero = low + 8 * scale."""
        return torch.stack([self.scales, self.lows + 8 * self.scales], dim=-1).transpose(0, 1).contiguous().to(
            torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.activation_dtype)
        if self.kernel == "cpu_int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x, self.packed, self.packed_scales)
        elif self.kernel in ("cpu_int8_native", "cpu_int8_blocked"):
            rows = x.size(0)
            if self.kernel == "cpu_int8_native" and rows <= NATIVE_ROWS:  # eager or compiled
                y = torch.ops.small_llama.int8_blocked_matmul(x, self.codes, self.native_scales)
                y = y if self.float_output else y.to(x.dtype)  # the head's logits in float32 as summed
            elif torch.compiler.is_compiling() and rows <= FUSED_ROWS:
                weight = self.codes.float()
                if isinstance(rows, int):
                    # one product-and-sum per row over the same converted codes: inductor fuses them into one loop
                    # that converts each code once
                    y = torch.stack([(row.float()[None, :, None] * weight).sum(1).flatten() for row in x])
                else:  # a dynamic number of rows (a step compiled for several): the codes converted for each row
                    y = (x.float()[:, None, :, None] * weight).sum(2).flatten(1)
                y = (y * self.scales).to(x.dtype)
            else:  # a prefill: the codes converted in one pass into a (K, N) bf16 matrix, then a matmul (as fast as
                # aten's int8 kernel at 16 rows, 2x at 128)
                weight = torch.empty(self.in_features, self.out_features, dtype=x.dtype, device=x.device)
                weight.view(self.in_features, -1, INT8_BLOCK).copy_(self.codes.permute(1, 0, 2))
                y = (x @ weight) * self.packed_scales
        elif self.kernel == "cuda_int8_triton":  # the head's logits straight from the float32 sums
            y = self.triton_matmul(x, self.codes, self.scales, torch.float32 if self.float_output else x.dtype,
                                   self.launch_configs)
        elif self.kernel == "cpu_int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.packed_scales)
        elif self.kernel == "cuda_int4pack":
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.packed_scales)
        elif self.kernel == "cuda_int8":
            if torch.compiler.is_compiling() and x.size(0) <= 8:
                # decode and verify steps: inductor fuses this into one reduction that reads the int8 codes once (a
                # matmul would first write them out in bf16 and read them again: 5 bytes a weight instead of 1)
                y = (x[:, None, :] * self.codes.to(x.dtype)).sum(-1)
            else:
                y = F.linear(x, self.codes.to(x.dtype))
            y = y * self.scales.to(y.dtype)
        else:
            y = F.linear(x, self.packed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.reshape(*shape, self.out_features)
        return y.float() if self.float_output else y


def linear_layers(model: GPT) -> Dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def quantize_model(model: GPT, quantization: Quantization) -> GPT:
    """Replace every linear layer of `model` not in `quantization.excluded` by a QuantizedLinear, in place (on the
    meta device too: the structure of a quantized checkpoint, whose buffers its state dict then fills)."""
    layers = linear_layers(model)
    unknown = sorted(set(quantization.excluded) - set(layers))
    if unknown:
        raise ValueError(f"excluded layers {unknown} are not linear layers of the model (e.g. 'lm_head', "
                         f"'transformer.h.0.attn.qkv')")
    chosen = {name: layer for name, layer in layers.items() if name not in quantization.excluded}
    quantization.check([layer.in_features for layer in chosen.values()])
    if model.config.tie_embeddings and "lm_head" in chosen:
        raise ValueError("the head is the token embedding (tie_embeddings): exclude 'lm_head', which stays tied")
    for name, layer in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(layer, quantization.mode, quantization.group_size,
                                                           float_output=name == "lm_head"))
    return model


def quantize_for_inference(model: GPT, quantization: Quantization, dtype: torch.dtype,
                           device: Optional[torch.device] = None, triton: bool = True, native: bool = True) -> GPT:
    """A float `model` quantized (in place), moved to `device` with its float parts in `dtype` (the activations'),
    and packed for its kernels there (`triton`, `native`: see `QuantizedLinear.prepare`)."""
    quantize_model(model, quantization)
    model = model.to(device=device, dtype=dtype)
    prepare_model(model, dtype, triton, native)
    return model


def triton_kernels():
    """The quantized_kernels module, or None where Triton is not installed (torch's CUDA wheels for Linux bring it)."""
    try:
        import quantized_kernels
    except ImportError:  # pip install triton
        return None
    return quantized_kernels


def bf16_instructions() -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux's cpuinfo flags), where the packed kernels are fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def activation_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the kernels are fast in it (CUDA; a CPU with bf16 instructions), else float32."""
    return torch.bfloat16 if device.type == "cuda" or bf16_instructions() else torch.float32


def prepare_model(model: GPT, dtype: torch.dtype, triton: bool = True, native: bool = True) -> None:
    """Pack every QuantizedLinear for its device with activations in `dtype` (`triton`, `native`: see
    `QuantizedLinear.prepare`)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare(dtype, triton=triton, native=native)


def prepare_compiled_decode(model: GPT) -> None:
    """Re-pack the layers that have a faster layout for a compiled decode step (CPU int8 on aten's kernel or
    dequantized, where the native kernel was not built or not asked for: blocks of output channels, for inductor's
    loop); a float model, or one without such layers, is left as it is."""
    for module in model.modules():
        if (isinstance(module, QuantizedLinear) and module.mode == "int8" and module.codes.device.type == "cpu"
                and module.kernel in ("cpu_int8pack", "dequantized")):
            module.prepare(module.activation_dtype, compiled=True, native=False)


def describe(model: GPT) -> str:
    """A line saying which kernels the quantized layers run (and, for the dequantized fallback, what that means)."""
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    kernels = sorted({module.kernel for module in layers})
    dtype = str(layers[0].activation_dtype).removeprefix("torch.")
    line = f"{len(layers)} {layers[0].mode} linear layers run {', '.join(kernels)} with {dtype} activations"
    if "dequantized" in kernels:
        line += (" (no fast kernel for this device and activation dtype, or for an input width that is not a "
                 f"multiple of {INT8PACK_WIDTH}: those weights are dequantized, the numbers are the same, the speed "
                 "and memory those of a float model)")
    missing = {module.native_missing for module in layers if module.native_missing}
    if missing:
        line += f" (the native int8 kernel could not be built: {'; '.join(sorted(missing))})"
    return line


def weight_bytes(model: GPT) -> int:
    """Bytes of the weights a forward pass reads as stored: codes and scales for quantized layers."""
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, QuantizedLinear):  # packed int4 codes take the bytes the stored ones took
            codes = module.codes if module.codes is not None else module.packed
            tensors += [codes, module.scales] + ([module.lows] if module.mode == "int4" else [])
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def to_json(quantization: Quantization) -> dict:
    return {**asdict(quantization), "excluded": list(quantization.excluded)}


def read_quantization(directory: Path) -> Optional[Quantization]:
    """The Quantization of a checkpoint directory, None if it is not quantized."""
    path = Path(directory) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    if values.get("format") != FORMAT:
        raise ValueError(f"{path} has format {values.get('format')!r}; this version reads {FORMAT}")
    return Quantization(values["mode"], values.get("group_size"), tuple(values.get("excluded", ())), FORMAT)
