"""Group-wise weight quantization (issue 13): the codec of quantized FFN rows in ``ffn.bin`` and the neuron cache,
and of quantized resident weights. Symmetric below; int4 gate and up rows may also be asymmetric (``quantize_asym``:
Q4_1's grid, an int8 offset per group).

A vector of ``d`` values is cut into groups of ``group_size`` consecutive values (along d_model); each group has one
float16 scale ``s = r * max|w| / qmax`` and integer codes ``q = round(w / s)`` clamped to ``[-qmax, qmax]``, where
the clipping ratio ``r`` is the one of ``CLIP_RATIOS`` with the least squared error in that group (``search``, the
default for int4: outliers clipped a little buy finer steps for the rest; int8 uses ``r = 1``):

- int8: ``qmax = 127``, one signed byte per value;
- int4: ``qmax = 7``, two values per byte, stored as ``q + 8``: the low nibble holds the even index, the high nibble
  the odd one.

int4's search also tries the code the symmetric range leaves unused, -8 (llama.cpp's Q4_0 does the same): scales
``s = +-r * max|w| / 8`` with codes in ``[-8, 7]``, the sign chosen per group so that the group's extreme value lands
on -8. The scale may then be negative; every decoder computes ``w = q * s`` and needs nothing else. Same bytes, a
16th level: on smollm2-relu's FFN weights the relative RMS error drops from 0.093 to 0.087 (results/quantized).

With ``r = 1``, ``|w - q * s| <= s / 2`` (plus float16's rounding of ``s``: at most ``qmax * s * 2**-11``); with the
search, each group's squared error is at most that of ``r = 1``.

A quantized FFN part (gate row, up row or down column) in a row is its codes followed by its scales
(``layout.part_bytes``); rows are held as uint8 tensors, so the flash bytes and the neuron cache's DRAM both shrink
with the bits. The native step (``step.NativeRows``, ``native/step.cpp``) computes on them as they are, dequantizing
inside its dot products; the Python path dequantizes a part to the compute dtype when it is used (``part_rows``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import QUANT_BITS, FlashLayout
from .native import library as native_library

SCALE_DTYPE = torch.float16
INT4_CODES = ";codes -8..7"  # the manifest's ``rounding`` of int4 directories whose search uses the 16th level
GROUP_SIZES = (32, 64)  # the group sizes convert offers (results/quantized: error against bytes)
DEFAULT_GROUP_SIZE = 32


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def code_bytes(d: int, bits: int) -> int:
    return d * bits // 8


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # the scale search's candidates (fractions of max|w|)


def qmin(bits: int) -> int:
    """The lowest code: -8 for int4 (its 16th level, reached by the scale search only), -qmax for int8."""
    return -8 if bits == 4 else -qmax(bits)


def safe_div(w: Tensor, s: Tensor) -> Tensor:
    """w / s for scales of either sign (a zero scale: the group is all zeros, its codes 0)."""
    return w / torch.where(s == 0, torch.ones_like(s), s)


def _codes(g: Tensor, scales: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Groups g [n, G, k] at float16 scales [n, G] (either sign) -> (int codes in [lo, hi] as float [n, G, k], squared
    error per group [n, G])."""
    s = scales.float()[..., None]
    q = torch.round(safe_div(g, s)).clamp_(lo, hi)
    return q, (g - q * s).square().sum(-1)


def quantize(w: Tensor, bits: int, group_size: int, search: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """w [n, d] (any float dtype) -> (codes uint8 [n, d * bits / 8], scales float16 [n, d / group_size]).

    ``search``: pick each group's clipping ratio from ``CLIP_RATIOS`` by squared error (default: int4 only)."""
    n, d = w.shape
    check_shape(n, d, bits, group_size)
    scales, qf = group_scales(w.detach().float().reshape(n, d // group_size, group_size), bits, search)
    return pack(qf.to(torch.int8).reshape(n, d), bits), scales.contiguous()


def check_shape(n: int, d: int, bits: int, group_size: int) -> None:
    if bits not in (4, 8) or d % group_size or group_size % 2:
        raise ValueError(f"cannot quantize [{n}, {d}] to {bits} bits in groups of {group_size}")


def group_scales(g: Tensor, bits: int, search: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Groups g [n, G, k] (float32) -> (float16 scales [n, G], int codes as float [n, G, k]): absmax scales, or with
    ``search`` (default: int4 only) each group's clipping ratio of ``CLIP_RATIOS`` with the least squared error, int4
    also over scales that put the group's extreme value on the code -8 (see the module docstring)."""
    m, lo = qmax(bits), qmin(bits)
    absmax = g.abs().amax(-1)  # [n, groups]
    scales = (absmax / m).to(SCALE_DTYPE)
    qf, err = _codes(g, scales, lo, m)
    if bits == 4 if search is None else search:
        # the extreme value's sign: a scale of the opposite sign puts it on the code -8 (int4's 16th level)
        at = g.abs().argmax(-1, keepdim=True)
        flip = -torch.sign(torch.gather(g, -1, at)[..., 0]).where(absmax > 0, torch.ones_like(absmax))
        for r in CLIP_RATIOS:
            sym = () if r == 1.0 else ((absmax * r / m).to(SCALE_DTYPE),)  # (r = 1: the scales the search starts from)
            for cand in (*sym, (flip * absmax * r / -lo).to(SCALE_DTYPE)):
                cq, cerr = _codes(g, cand, lo, m)
                better = cerr < err
                scales = torch.where(better, cand, scales)
                qf = torch.where(better[..., None], cq, qf)
                err = torch.minimum(cerr, err)
    return scales, qf


def pack(q: Tensor, bits: int) -> Tensor:
    """Integer codes q [n, d] (int8, within [qmin, qmax]) -> the stored bytes uint8 [n, d * bits / 8]."""
    if bits == 8:
        return q.view(torch.uint8).contiguous()
    u = (q + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def dequantize(codes: Tensor, scales: Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32,
               offsets: Optional[Tensor] = None) -> Tensor:
    """The inverse of ``quantize`` (and, with ``offsets``, of ``quantize_asym``): codes [n, d * bits / 8] (uint8, or
    any view of those bytes), scales [n, groups], offsets int8 [n, groups] -> w [n, d] in ``dtype``."""
    n = codes.shape[0]
    if bits == 8:
        q = codes.view(torch.int8)
    else:
        q = torch.stack((codes & 15, codes >> 4), dim=-1).view(n, 2 * codes.shape[1]).view(torch.int8) - 8
    d = q.shape[1]
    s = scales.to(dtype).unsqueeze(-1)
    w = q.view(n, d // group_size, group_size).to(dtype) * s
    if offsets is not None:
        w = w + offsets.view(torch.int8).to(dtype).unsqueeze(-1) * (s / OFFSET_UNITS)
    return w.view(n, d)


# ----------------------------------------------------------------------------- asymmetric int4 (gate and up rows)
#
# A group of an asymmetric part: codes n in [0, 15] (stored as the symmetric ones are), a float16 scale s and an int8
# offset z: w = s * (n - 8) + s * z / 16. That is Q4_1's grid (w = n * d + m, the form of SmolLM2's GGUF) with
# d = s and m = s * (z / 16 - 8), the minimum kept to a sixteenth of a step (one byte instead of Q4_1's float16 two):
# a Q4_1 group comes back within s / 32 of its values. Only the parts the FFN takes dot products with (gate, up) may
# be asymmetric (``layout.ASYM_PARTS``): an offset adds s * z / 16 * sum(x over the group) to x . w.

OFFSET_UNITS = 16


def quantize_asym(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w [n, d] -> (codes uint8 [n, d / 2], scales float16 [n, groups], offsets int8 [n, groups]) on the asymmetric
    int4 grid (above): per group the range [min, max] (shrunk about its middle by the ratio of ``CLIP_RATIOS`` with
    the least squared error) spread over the 16 codes. A group already on a 4-bit asymmetric grid that uses its
    lowest and highest codes (a Q4_1 block) gets its own step back exactly."""
    n, d = w.shape
    check_shape(n, d, 4, group_size)
    g = w.detach().float().reshape(n, d // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)

    def grid(r: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # (codes - 8, scales, offsets, squared error)
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * r
        s = (2 * half / 15).to(SCALE_DTYPE)
        sf = s.float()
        safe = torch.where(sf == 0, torch.ones_like(sf), sf)
        z = torch.round((mid - half + 8 * sf) / safe * OFFSET_UNITS).clamp_(-128, 127)
        off = (sf * z / OFFSET_UNITS)[..., None]
        q = torch.round((g - off) / safe[..., None]).clamp_(-8, 7)
        return q, s, z, (g - q * sf[..., None] - off).square().sum(-1)

    best_q, best_s, best_z, best_err = grid(CLIP_RATIOS[0])
    for r in CLIP_RATIOS[1:]:
        q, s, z, err = grid(r)
        better = err < best_err
        best_q = torch.where(better[..., None], q, best_q)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return pack(best_q.to(torch.int8).reshape(n, d), 4), best_s.contiguous(), best_z.to(torch.int8).contiguous()


def on_asym_grid(w: Tensor, group_size: int, tol: float = 1e-6, min_fraction: float = 0.99) -> bool:
    """Whether w [n, d] already sits on 4-bit asymmetric grids of ``group_size`` (a Q4_1 source: SmolLM2's GGUF), so
    that ``quantize_asym`` keeps it to a sixteenth of a step where ``quantize`` would round it again: at least
    ``min_fraction`` of its groups span exactly 15 steps of their own (a Q4_1 block that uses neither its lowest nor its
    highest code does not show its step; ``quantize_asym`` rounds such a group like any other)."""
    n, d = w.shape
    if d % group_size or d < group_size:
        return False
    g = w.detach().float().reshape(n, d // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-30)
    q = (g - lo) / step
    on = ((q - q.round()).abs() * step <= tol * g.abs().amax().clamp_min(1e-30)).all(-1)
    return float(on.float().mean()) >= min_fraction


def error_bound(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Per-value bound on |w - dequantize(quantize(w, search=False))|: half a step, plus float16's rounding of the
    scale."""
    n, d = w.shape
    s = w.detach().float().reshape(n, d // group_size, group_size).abs().amax(-1) / qmax(bits)
    bound = s * (0.5 + qmax(bits) * 2.0**-11) + 1e-7
    return bound.repeat_interleave(group_size, dim=1)


# ------------------------------------------------------------------------------------------------- FFN rows (ffn.bin)


def encode_part(w: Tensor | tuple[Tensor, ...], bits: int, group_size: int, asym: bool = False) -> Tensor:
    """One part of every row: w [n, d], or its (codes, scales[, offsets]) already quantized (``gptq``,
    ``quantize_asym``) -> uint8 [n, part_bytes] (codes, then the float16 scales' bytes, then an asymmetric part's
    int8 offsets, padded to an even count)."""
    if isinstance(w, tuple):
        enc = w
    else:
        enc = quantize_asym(w, group_size) if asym else quantize(w, bits, group_size)
    if asym != (len(enc) == 3):
        raise ValueError("an asymmetric part needs (codes, scales, offsets), a symmetric one (codes, scales)")
    out = [enc[0], enc[1].view(torch.uint8)]
    if asym:
        off = enc[2].view(torch.uint8)
        out += [off, torch.zeros(off.shape[0], off.shape[1] % 2, dtype=torch.uint8)]
    return torch.cat(out, dim=1)


def encode_rows(parts: Sequence[Tensor | tuple[Tensor, ...]], layout: FlashLayout, stride_bytes: int,
                names: Optional[tuple[str, ...]] = None) -> Tensor:
    """Rows of one segment: the parts [n, d] each (in the segment's order, named ``names``: the segment's parts, for
    the layout's asymmetric ones), or their (codes, scales[, offsets]) -> uint8 [n, stride_bytes] (zero padded)."""
    n = parts[0][0].shape[0] if isinstance(parts[0], tuple) else parts[0].shape[0]
    if names is None:
        if layout.asym_parts:
            raise ValueError("encode_rows on a layout with asymmetric parts needs the parts' names")
        names = ("",) * len(parts)
    enc = [encode_part(p, layout.bits, layout.group_size, name in layout.asym_parts) for p, name in zip(parts, names)]
    out = torch.zeros(n, stride_bytes, dtype=torch.uint8)
    row = torch.cat(enc, dim=1)
    out[:, : row.shape[1]] = row
    return out


def storage_dtype(layout: FlashLayout, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the row tensors over ``ffn.bin``'s bytes: uint8 for quantized rows, else the compute dtype."""
    return torch.uint8 if layout.quantized else dtype


def part_rows(layout: FlashLayout, rows: list[Tensor], part: str, start: int, n: int, dtype: torch.dtype) -> Tensor:
    """Part ``part`` (gate/up/down) of rows [start, start + n) of per-segment row tensors, [n, d] in ``dtype``: a view
    of float rows, the dequantized values of quantized ones."""
    s, off = layout.locate(part)
    d = layout.d_model
    r = rows[s][start : start + n]
    if not layout.quantized:
        return r[:, off : off + d]
    cb = code_bytes(d, layout.bits)
    groups = d // layout.group_size
    codes = r[:, off : off + cb]
    scales = r[:, off + cb : off + cb + 2 * groups].view(SCALE_DTYPE)  # byte offsets even: a float16 view
    offsets = r[:, off + cb + 2 * groups : off + cb + 3 * groups] if part in layout.asym_parts else None
    return dequantize(codes, scales, layout.bits, layout.group_size, dtype, offsets)


def compute_layout(layout: FlashLayout, dtype: str) -> FlashLayout:
    """The rows of ``layout`` dequantized: float rows of ``dtype``, the same parts, not padded (held in DRAM only:
    ``EngineConfig.cache_form="compute"``)."""
    gated = any("gate" in seg.parts for seg in layout.segments)
    return FlashLayout.build(layout.n_layers, layout.d_model, layout.d_ffn, gated, dtype, layout.bundled,
                             align_bytes=torch.empty(0, dtype=getattr(torch, dtype)).element_size())


def dense_layer_bytes(layout: FlashLayout, dtype: torch.dtype) -> int:
    """DRAM of one layer's FFN held whole in ``dtype`` (``dense``/``hybrid``: quantized rows are dequantized once)."""
    if not layout.quantized:
        return layout.neuron_payload_bytes * layout.d_ffn
    parts = sum(len(seg.parts) for seg in layout.segments)
    return parts * layout.d_model * layout.d_ffn * dtype.itemsize


@dataclass(frozen=True)
class QuantError:
    """How far quantized weights are from the originals (``measure``)."""

    rel_rms: float  # ||w - w'|| / ||w|| over all values
    max_abs: float
    bytes_per_value: float  # codes and scales


def measure(w: Tensor, bits: int, group_size: int, search: Optional[bool] = None) -> QuantError:
    codes, scales = quantize(w, bits, group_size, search)
    back = dequantize(codes, scales, bits, group_size)
    diff = (w.float() - back).float()
    nbytes = codes.numel() + scales.numel() * scales.element_size()
    return QuantError(float(diff.norm() / w.float().norm().clamp_min(1e-30)), float(diff.abs().max()), nbytes / w.numel())


__all__ = ["quantize", "dequantize", "encode_rows", "part_rows", "storage_dtype", "QUANT_BITS", "GROUP_SIZES"]


# ------------------------------------------------------------------------------------------- resident weights (int8)

QWEIGHT = "{}.int8"  # resident.safetensors: a weight-only int8 matrix [rows, cols] in place of the float ``{}``
QSCALE = "{}.int8_scale"  # its float32 scales [rows], one per row


def quantize_per_row(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [rows, cols] -> (int8 [rows, cols], float32 scales [rows]), symmetric, one scale per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


# torch's int8 weight-only CPU kernel (x [T, k] bf16/fp32, int8 [m, k], per-row scales [m] -> [T, m]), if this torch has it
INT8_WEIGHT_MM = getattr(torch, "_weight_int8pack_mm", None)
_INT8_MM = INT8_WEIGHT_MM
_INT8_K = 16  # the kernel wants an inner dimension that is a multiple of this
# ... and weights on a 16-byte boundary: torch 2.13's kernel on an AVX-512 CPU crashed (SIGSEGV) on int8 weights 2, 4,
# 8, 24 or 40 bytes past one for 4 or more rows of x (a prefill; 16, 32 and 48 ran right). Weights viewed in place in
# resident.safetensors sit wherever the file puts them (safetensors aligns to 8 bytes), so ``Int8Linear`` hands that
# kernel an aligned copy of a misaligned one for the call (torch allocates at 64 bytes); llmflash's own kernel (a
# decode step) reads them where they are. (Until the eighteenth session the copy was taken once and kept: every
# misaligned weight then sat twice in DRAM, 0.7 GB more on the 8-layer Llama-2-7B geometry of results/peer.)
KERNEL_ALIGN_BYTES = 16
NATIVE_MAX_TOKENS = 8  # rows of x up to which Int8Linear runs llmflash's own kernel (decode); more: torch's


def _native_linear(x: Tensor, bias: Optional[Tensor], out_features: int, applies: bool,
                   call: Callable[..., object]) -> Optional[Tensor]:
    """A decode step's rows x [..., in] (float32 on the CPU, at most ``NATIVE_MAX_TOKENS`` of them) through a native
    kernel, ``call(lib, x2 [T, in], T, bias address or 0, y [T, out])`` filling y; None where it does not apply
    (``applies`` False, other rows, a bias not float32 and contiguous, no native library): the caller's other path."""
    if not (applies and x.dtype == torch.float32 and x.device.type == "cpu"):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    t = x2.shape[0]
    if not 0 < t <= NATIVE_MAX_TOKENS or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
        return None
    lib = native_library()
    if lib is None:
        return None
    y = torch.empty(t, out_features, dtype=torch.float32)
    call(lib, x2.contiguous(), t, 0 if bias is None else bias.data_ptr(), y)
    return y.view(*x.shape[:-1], -1)


class Int8Linear(nn.Module):
    """A ``nn.Linear`` whose weight is held in int8 with per-row scales (weight-only).

    torch's int8 weight-only CPU kernel (``torch._weight_int8pack_mm``) is fast only on bfloat16 activations: on this
    machine, one thread, the 49152-row head takes 3.9 ms against 10.0 for float32 ``F.linear`` and 23.7 on float32
    activations; dequantizing the weight for each call (``F.linear(x, q * s)``, the path elsewhere, or with
    ``kernel = False``) is 3-12x slower than float32 (results/quantized/kernels.csv).

    bfloat16 keeps 8 bits of each activation, which cost smollm2-relu 1.2% perplexity on wiki:eval (15.83 against
    float32's 15.65; 15.68 with the weights dequantized per call), and its output is rounded to bfloat16 too, so the
    result jumps where a tiny change of x crosses a rounding boundary (two paths that sum the same FFN terms in
    another order, dense and oracle, then part after a few tokens). So:

    - a decode step's few rows of float32 activations (at most ``NATIVE_MAX_TOKENS``) go to llmflash's own kernel
      (``native/step.cpp``, ``llmflash_int8_linear``): int8 codes converted in registers, float32 activations,
      accumulation and output, the rows split over torch's threads (the head 1.8 ms, one thread);
    - a prefill's many rows (or where the native library is missing) go to torch's kernel with ``split`` (the
      default): x as two bfloat16 rows, x_hi = bf16(x) and x_lo = bf16(x - x_hi), the outputs summed in float32: 16
      bits of each activation for twice the rows (wiki:eval 15.58; the output's bfloat16 rounding stays)."""

    kernel = True
    split = True  # torch's kernel: float32 activations as a bfloat16 hi/lo pair (the class docstring)
    native = True  # decode steps through llmflash's kernel where it loads
    q: Tensor
    scale: Tensor
    bias: Optional[Tensor]

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.register_buffer("q", q)  # int8 [out, in]
        self.register_buffer("scale", scale)  # [out]
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self._scale_bf16: Optional[Tensor] = None  # the kernel's form of the scales (made once)

    def weight_dequantized(self, dtype: torch.dtype) -> Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]

    def _native_forward(self, x: Tensor) -> Optional[Tensor]:
        """y through ``llmflash_int8_linear`` (float32 throughout), or None where it does not apply."""
        q, scale = self.q, self.scale
        applies = self.kernel and self.native and q.device.type == "cpu" and scale.dtype == torch.float32 \
            and scale.is_contiguous() and q.is_contiguous()
        return _native_linear(x, self.bias, self.out_features, applies, lambda lib, x2, t, b, y: lib.llmflash_int8_linear(
            x2.data_ptr(), t, self.in_features, q.data_ptr(), scale.data_ptr(), b, self.out_features, y.data_ptr(),
            torch.get_num_threads()))

    def forward(self, x: Tensor) -> Tensor:
        y_native = self._native_forward(x)
        if y_native is not None:
            return y_native
        if self.kernel and _INT8_MM is not None and x.device.type == "cpu" and self.in_features % _INT8_K == 0:
            if self._scale_bf16 is None or self._scale_bf16.device != self.scale.device:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            # a view at an offset the kernel cannot take (``KERNEL_ALIGN_BYTES``): an aligned copy for this call
            q = self.q if self.q.data_ptr() % KERNEL_ALIGN_BYTES == 0 else self.q.clone()
            x2 = x.reshape(-1, x.shape[-1])  # [T, in]
            hi = x2.to(torch.bfloat16)
            if self.split and x2.dtype == torch.float32:
                t = x2.shape[0]
                lo = (x2 - hi.float()).to(torch.bfloat16)
                y2 = _INT8_MM(torch.cat((hi, lo)), q, self._scale_bf16)  # [2T, out]: hi's rows, then lo's
                y = y2[:t].float() + y2[t:].float()
            else:
                y = _INT8_MM(hi.contiguous(), q, self._scale_bf16)
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight_dequantized(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    """A ``nn.Embedding`` held in int8 with one scale per token row: the looked-up rows are dequantized."""

    q: Tensor
    scale: Tensor

    def __init__(self, q: Tensor, scale: Tensor, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.register_buffer("q", q)  # int8 [vocab, d]
        self.register_buffer("scale", scale)  # [vocab]
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: Tensor) -> Tensor:
        return self.q[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


QROWS = "{}.qrows"  # a weight's group-quantized rows (``--resident-dtype int4``): uint8 [rows, part_bytes]


def part_values(width: int, bits: int, group_size: int) -> int:
    """Values d of a symmetric part of ``width`` bytes (``layout.part_bytes``' inverse: width = d bits / 8 + 2 d / G)."""
    return width * 8 * group_size // (bits * group_size + 8 * SCALE_DTYPE.itemsize)


def decode_rows(rows: Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Group-quantized rows (``encode_part``'s form: codes, then float16 scales) uint8 [n, part_bytes] -> [n, d]."""
    d = part_values(rows.shape[1], bits, group_size)
    cb = code_bytes(d, bits)
    return dequantize(rows[:, :cb], rows[:, cb : cb + 2 * (d // group_size)].view(SCALE_DTYPE), bits, group_size, dtype)


class QLinear(nn.Module):
    """A ``nn.Linear`` whose weight rows are group-quantized (``encode_part``: int4 or int8 codes, one float16 scale
    per ``group_size`` values along the input; weight-only), the form of ``--resident-dtype int4``.

    A decode step's few rows of float32 activations (at most ``NATIVE_MAX_TOKENS``) go to llmflash's kernel
    (``native/step.cpp``, ``llmflash_q_linear``: codes converted in registers, each group's partial dot product
    scaled once, float32 accumulation and output); more rows (a prefill), other devices, or no native library:
    the weight is dequantized for the call and ``F.linear`` computes (the reference the kernel equals within float32
    rounding)."""

    rows: Tensor
    bias: Optional[Tensor]

    def __init__(self, rows: Tensor, bits: int, group_size: int, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.register_buffer("rows", rows)  # uint8 [out, part_bytes]
        self.register_buffer("bias", bias)
        self.bits, self.group_size = bits, group_size
        self.out_features = rows.shape[0]
        self.in_features = part_values(rows.shape[1], bits, group_size)

    def weight_dequantized(self, dtype: torch.dtype) -> Tensor:
        return decode_rows(self.rows, self.bits, self.group_size, dtype)

    def _native_forward(self, x: Tensor) -> Optional[Tensor]:
        """y through ``llmflash_q_linear`` (float32 throughout), or None where it does not apply."""
        rows = self.rows

        def call(lib: ctypes.CDLL, x2: Tensor, t: int, b: int, y: Tensor) -> None:
            rc = lib.llmflash_q_linear(x2.data_ptr(), t, self.in_features, rows.data_ptr(), rows.stride(0), self.bits,
                                       self.group_size, b, self.out_features, y.data_ptr(), torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"llmflash_q_linear failed ({rc})")

        return _native_linear(x, self.bias, self.out_features, rows.device.type == "cpu" and rows.stride(1) == 1, call)

    def forward(self, x: Tensor) -> Tensor:
        y = self._native_forward(x)
        if y is not None:
            return y
        return F.linear(x, self.weight_dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QEmbedding(nn.Module):
    """A ``nn.Embedding`` whose rows are group-quantized (``QLinear``'s form): the looked-up rows are dequantized."""

    rows: Tensor

    def __init__(self, rows: Tensor, bits: int, group_size: int, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("rows", rows)  # uint8 [vocab, part_bytes]
        self.bits, self.group_size, self.padding_idx, self.dtype = bits, group_size, padding_idx, dtype
        self.num_embeddings = rows.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        flat = self.rows[ids.reshape(-1)]
        return decode_rows(flat, self.bits, self.group_size, self.dtype).view(*ids.shape, -1)


def quantizable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """{weight name: module} of the weights ``--resident-dtype int8`` quantizes: every ``nn.Linear`` and plain
    ``nn.Embedding`` (subclasses such as learned positions or scaled embeddings keep their own forward: left float)."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m) is nn.Embedding:
            out[f"{name}.weight" if name else "weight"] = m
    return out


def _groupable(t: Tensor, group_size: int) -> bool:
    return t.dim() == 2 and group_size > 0 and group_size % 2 == 0 and t.shape[1] % group_size == 0


def int8_under_int4(model: nn.Module) -> set[str]:
    """The weights ``--resident-dtype int4`` keeps in int8: the input embedding and the output head (as llama.cpp's
    4-bit mixes keep the output at more bits). On smollm2-relu this halves int4's cost in perplexity for 12.6 MB
    (results/quantized/README.md)."""
    heads = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings())  # type: ignore[operator]
             if m is not None}
    return {name for name, m in quantizable_weights(model).items() if id(m) in heads}


def _resident_bits(name: str, dtype: str, int8_names: set[str]) -> int:
    return 4 if dtype == "int4" and name not in int8_names else 8


def quantize_resident(tensors: dict[str, Tensor], model: nn.Module, dtype: str = "int8",
                      group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Tensor]:
    """Resident tensors with every quantizable weight (``quantizable_weights``) replaced by its ``dtype`` form: int8
    with one scale per row (``QWEIGHT``/``QSCALE``), or int4 rows in groups of ``group_size`` (``QROWS``; a weight
    whose width the groups do not divide stays float), the embedding and the head then int8 (``int8_under_int4``)."""
    targets = quantizable_weights(model)
    keep8 = int8_under_int4(model)
    out = {}
    for name, t in tensors.items():
        if name in targets and _resident_bits(name, dtype, keep8) == 4 and _groupable(t, group_size):
            out[QROWS.format(name)] = encode_part(t.detach().float(), 4, group_size)
        elif name in targets and t.dim() == 2 and (dtype == "int8" or name in keep8):
            q, s = quantize_per_row(t)
            out[QWEIGHT.format(name)], out[QSCALE.format(name)] = q, s
        else:
            out[name] = t
    return out


def dequantize_resident_in_place(model: nn.Module, names: set[str], dtype: str = "int8",
                                 group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Replace the float weights ``names`` of an in-memory model by their ``quantize_resident`` round trip
    (calibration sees the weights a directory holds)."""
    keep8 = int8_under_int4(model)
    for name, m in quantizable_weights(model).items():
        if name in names:
            w: Tensor = getattr(m, "weight").data
            if _resident_bits(name, dtype, keep8) == 4:
                if _groupable(w, group_size):
                    w.copy_(decode_rows(encode_part(w.float(), 4, group_size), 4, group_size).to(w.dtype))
                continue
            q, s = quantize_per_row(w)
            w.copy_((q.float() * s[:, None]).to(w.dtype))


def install_quantized_resident(model: nn.Module, tensors: dict[str, Tensor], tied: bool, group_size: int = 0,
                               dtype: torch.dtype = torch.float32) -> set[str]:
    """Swap the modules whose weights ``tensors`` holds quantized for modules over those tensors (views: no copy):
    int8 (``QWEIGHT``/``QSCALE``) -> ``Int8Linear`` / ``Int8Embedding``; int4 rows (``QROWS``, groups of
    ``group_size``) -> ``QLinear`` / ``QEmbedding`` (embeddings looked up in ``dtype``). A tied output head shares
    the input embedding's rows. Returns the names of the weights so installed."""
    done = set()
    targets = quantizable_weights(model)
    for name, m in targets.items():
        q, s = tensors.get(QWEIGHT.format(name)), tensors.get(QSCALE.format(name))
        rows = tensors.get(QROWS.format(name))
        if (q is None or s is None) and rows is None:
            continue
        parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = tensors.get(name.removesuffix("weight") + "bias") if isinstance(m, nn.Linear) else None
        new: nn.Module
        if rows is not None:
            new = (QLinear(rows, 4, group_size, bias) if isinstance(m, nn.Linear)
                   else QEmbedding(rows, 4, group_size, getattr(m, "padding_idx", None), dtype))
        else:
            assert q is not None and s is not None
            new = Int8Linear(q, s, bias) if isinstance(m, nn.Linear) else Int8Embedding(q, s, getattr(m, "padding_idx", None))
        setattr(parent, attr, new)
        done.add(name)
    if tied:
        emb = model.get_input_embeddings()  # type: ignore[operator]
        head: Optional[nn.Module] = None
        if isinstance(emb, Int8Embedding):
            head = Int8Linear(emb.q, emb.scale, None)
        elif isinstance(emb, QEmbedding):
            head = QLinear(emb.rows, emb.bits, emb.group_size, None)
        if head is not None:
            model.set_output_embeddings(head)  # type: ignore[operator]
            done.add("lm_head.weight")
    return done
