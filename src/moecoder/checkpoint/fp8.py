"""FP8 block-quantized checkpoints (DeepSeek-V3/R1 and MiniMax-M2 as released), dequantized at load.

Such a folder's config.json carries `"quantization_config": {"quant_method": "fp8", "weight_block_size":
[bm, bn], ...}`. Each quantized Linear weight W [rows, cols] is stored as float8_e4m3fn beside a
companion `<name>_scale_inv` of shape [ceil(rows / bm), ceil(cols / bn)] (float32), and the real
weight is

    W[i, j] = float(W_fp8[i, j]) * scale_inv[i // bm, j // bn]

so the last block row / column covers only what is left when rows / cols are not multiples of the
block (DeepSeek's `weight_dequant` kernel and transformers' `finegrained_fp8` agree on this).
Fused expert stacks (`...experts.gate_up_proj` [E, 2F, C], transformers-5 naming) have one such grid
per expert: `gate_up_proj_scale_inv` [E, ceil(2F / bm), ceil(C / bn)]. Tensors left unquantized
(embeddings, norms, router, lm_head, biases, `modules_to_not_convert`) are stored as usual and have
no companion: which tensors are quantized is read from the files, not from the config's lists.

As in transformers, a quantization_config without `weight_block_size` means [128, 128], and an
explicit `"weight_block_size": null` means one scale per matrix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from .formats import CheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"  # safetensors' name of torch.float8_e4m3fn
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # any of these without a quantization_config is an error
_FLOAT_SCALES = ("F32", "BF16", "F16", "F64")
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
_CHUNK_ELEMENTS = 1 << 21  # values dequantized per step: an 8 MiB fp32 chunk, and its 2 MiB of fp8


@dataclass(frozen=True)
class Fp8Format:
    block: tuple[int, int] | None  # (rows, cols) of one scale's block; None: one scale per matrix

    def describe(self) -> str:
        return "one scale per matrix" if self.block is None else f"{list(self.block)} blocks"


def fp8_format(hf: dict[str, Any]) -> Fp8Format | None:
    """The checkpoint's quantization from config.json: None (unquantized) or its fp8 block format.

    Raises CheckpointError, in one line, for any other quantization or an fp8 variant not supported.
    """
    qc = hf.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config must be a JSON object, not {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"quantization_config quant_method {method!r} is not supported "
                              "(supported: 'fp8' block-quantized weights, dequantized at load)")
    # static: per-tensor activation scales; ue8m0: power-of-two scales stored as bytes; fp4: packed experts.
    for key, ok in (("activation_scheme", "dynamic"), ("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if qc.get(key) not in (ok, None):
            raise CheckpointError(f"fp8 quantization_config {key} {qc[key]!r} is not supported (only {ok!r})")
    if "weight_block_size" not in qc:
        return Fp8Format(DEFAULT_BLOCK)
    block = qc["weight_block_size"]
    if block is None:
        return Fp8Format(None)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"fp8 weight_block_size must be two positive integers, not {block!r}")
    return Fp8Format((block[0], block[1]))


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_scale_shape(fmt: Fp8Format, weight: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale grid of a quantized weight of `shape` ([..., rows, cols]; leading dims: stacked experts)."""
    if len(shape) < 2:
        raise CheckpointError(f"tensor {weight} has a scale {scale_name(weight)}, but only matrices are "
                              f"block-quantized and it has shape {list(shape)}")
    *lead, rows, cols = shape
    if fmt.block is None:
        return (*lead, 1, 1)
    return (*lead, _cdiv(rows, fmt.block[0]), _cdiv(cols, fmt.block[1]))


def check_quantized(fmt: Fp8Format | None, weight: str, shape: tuple[int, ...], dtype: str,
                    scale: tuple[tuple[int, ...], str] | None) -> None:
    """Check one checkpoint tensor against its scale ((shape, dtype), or None when it has none)."""
    if scale is None:
        if dtype in FP8_DTYPES:
            if fmt is None:
                raise CheckpointError(f"tensor {weight} is stored as {dtype} but config.json has no "
                                      "quantization_config")
            raise CheckpointError(f"tensor {weight} is stored as {dtype} without its scale {scale_name(weight)}")
        return
    assert fmt is not None  # a scale without a quantization_config is refused before (hf._split_scales)
    if dtype != FP8_DTYPE:
        raise CheckpointError(f"tensor {weight} has a scale {scale_name(weight)} but is stored as {dtype}, "
                              f"not {FP8_DTYPE}")
    want = expected_scale_shape(fmt, weight, shape)
    found, scale_dtype = scale
    # One scale per matrix may also be stored without its unit dims (transformers' FP8Linear: a 0-d tensor).
    ok = (want,) if fmt.block is not None else (want, want[:-2]) + (((1,),) if len(want) == 2 else ())
    if found not in ok:
        raise CheckpointError(f"tensor {scale_name(weight)}: expected shape {list(want)} ({fmt.describe()} of "
                              f"{weight} {list(shape)}), found {list(found)}")
    if scale_dtype not in _FLOAT_SCALES:
        raise CheckpointError(f"tensor {scale_name(weight)} is stored as {scale_dtype}; fp8 scales are floating-point "
                              f"({', '.join(_FLOAT_SCALES)})")


def dequantize_into(out: torch.Tensor, weight: Any, scale: torch.Tensor, fmt: Fp8Format) -> None:
    """out[..., rows, cols] = weight * scale, each fp8 value times the scale of its block.

    `weight` is the stored fp8 tensor or anything indexed like it (a safetensors slice, read lazily);
    it is read a few block rows at a time. The product is formed in fp32 (in `out` itself when that
    is fp32, else in one small chunk) and rounded once to out.dtype, so the memory beside `out` is a
    chunk or two whatever the size of the tensor.
    """
    *lead, rows, cols = out.shape
    bm, bn = fmt.block or (rows, cols)
    grid = scale.to(device="cpu", dtype=torch.float32).reshape(*lead, _cdiv(rows, bm), _cdiv(cols, bn))
    step = bm * max(1, _CHUNK_ELEMENTS // (bm * cols))
    in_place = out.dtype == torch.float32 and out.device.type == "cpu"
    for idx in itertools.product(*map(range, lead)):
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            q = weight[(*idx, slice(r0, r1))]
            dest = out[idx][r0:r1]
            x = dest.copy_(q) if in_place else q.to(torch.float32)  # fp8 -> fp32 is exact
            s = grid[idx][r0 // bm : _cdiv(r1, bm)].repeat_interleave(bm, 0)[: r1 - r0]  # [r1 - r0, col blocks]
            full = cols // bn  # whole column blocks, then the partial one
            x[:, : full * bn].unflatten(1, (full, bn)).mul_(s[:, :full, None])
            if cols % bn:
                x[:, full * bn :].mul_(s[:, full:])
            if not in_place:
                dest.copy_(x)
