"""The sparse step's pieces that are not the engine's orchestration: reads into cache slots and the native compute.

- ``slot_plan``: the reads that bring a layer's rows ``ids`` into the slots the cache gave them. Neighbouring ids are
  still one read of the file (the same reads as a plan into consecutive rows: ``layout.read_plan``); a read whose
  slots are not neighbours fills them with one scatter ``preadv`` (``FlashReader.submit(..., piece_bytes=stride)``).
- ``NativeRows``: one layer's FFN contribution over a set of rows of a row store (a neuron cache's used slots, the
  staging buffer's rows) computed by the native kernel (``native/step.cpp``): rows read in place, one call per set,
  no matmul, no gathered copies, no per-shape working memory. Float rows (float32, bfloat16, float16), or int8 /
  int4 group-quantized rows as stored (``quant``: ``EngineConfig.cache_form="stored"``), dequantized on the fly
  inside the dot products and axpys (each group's partial dot product scaled once; float32 accumulation) where the
  Python path dequantizes every gathered part for every matmul. ``rows_output``, the Python path (torch matmuls over
  the rows), stays the reference; the native one equals it within float32 rounding (see
  ``tests/test_native_step.py``: the sums run in another order, and an ``|h|`` within rounding of a threshold may fall
  on the other side).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .cache import DeviceRows, RowStore
from .ffn import neuron_outputs
from .layout import Segment, runs
from .native import library
from .quant import part_rows
from .storage import array_address

log = logging.getLogger(__name__)

# activation names (``transformers.activations.ACT2FN``) -> the kernel's codes; others run the Python path
ACT_CODES = {"relu": 0, "silu": 1, "swish": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3, "gelu_fast": 3,
             "relu2": 4, "relu6": 5, "quick_gelu": 6}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# token rows of x up to which the native step runs (decode, scoring: 1); a prefill's many rows are matmul work
MAX_NATIVE_TOKENS = 8


def slot_plan(seg: Segment, layer: int, ids: np.ndarray, slots: np.ndarray,
              max_read_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads of one segment that bring rows ``ids`` (sorted) into rows ``slots`` (one per id) of a row store.

    Returns (file_offsets [reads], nbytes [reads], piece_offsets [len(ids)]), int64 bytes, for
    ``FlashReader.submit(buf, fo, nb, piece_offsets, piece_bytes=seg.stride_bytes)``: the reads are those of
    ``layout.read_plan`` (neighbouring ids merged, long runs split), each landing row by row in its slots."""
    stride = seg.stride_bytes
    first, length = runs(ids, max(1, max_read_bytes // stride))
    return seg.layer_offsets[layer] + first * stride, length * stride, slots.astype(np.int64) * stride


def rows_output(store: RowStore | DeviceRows, ids: np.ndarray, x: Tensor, act: Callable[[Tensor], Tensor], gated: bool,
                threshold: Optional[float] = None, on_act: bool = False, act_bias: Optional[Tensor] = None,
                start: int = 0, slots: Optional[np.ndarray] = None, bucket: int = 0,
                mask: Optional[Tensor] = None, scratch: Optional[list[Tensor]] = None,
                indices: Optional[Callable[[list[np.ndarray]], list[Tensor]]] = None) -> tuple[Tensor, Tensor]:
    """The Python reference of a layer's FFN contribution over rows of a store: rows [start, start + n) or the rows
    ``slots`` (int64 [n]), holding neurons ``ids`` (n of them, file row order); x [T, d] -> (y [T, d], h [T, n]).

    ``act_bias``: the layer's activation bias over all its neurons; ``mask``: bool [T, d_ffn], a gated model's gate
    (rows it shuts give 0); ``bucket`` > 0: the matmuls run over a multiple of that many rows (padding rows give 0);
    ``scratch``: per segment a preallocated [rows, stride] tensor on the store's device that gathered slots are copied
    into (no allocation per call; used when they fit), else each gather allocates its copy. ``indices``: how index
    arrays reach the store's device (``backend.Backend.indices``: one page-locked copy, no wait), else plain copies."""
    n = ids.size
    device = store.rows[0].device
    if indices is None or device.type == "cpu":
        def indices(arrays: list[np.ndarray]) -> list[Tensor]:
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device) for a in arrays]
    idx_np = None
    if slots is not None:
        m = -(-n // bucket) * bucket if bucket > 0 and n else n
        idx_np = np.concatenate([slots, np.full(m - n, slots[0] if n else 0)]) if m > n else slots
    need_ids = act_bias is not None or mask is not None
    uploaded = indices([a for a in (idx_np, ids if need_ids else None) if a is not None])
    idx = uploaded[0] if idx_np is not None else None
    ids_t = uploaded[-1] if need_ids else None
    if slots is None:
        m = min(-(-n // bucket) * bucket, store.capacity - start) if bucket > 0 else n  # rows computed (>= n)

        def part(name: str) -> Tensor:
            return store.part(name, m, start)
    else:
        assert idx is not None
        if scratch is not None and m <= scratch[0].shape[0]:  # into the preallocated rows: no allocation
            gathered = [torch.index_select(r, 0, idx, out=buf[:m]) for r, buf in zip(store.rows, scratch)]
        else:
            gathered = [r.index_select(0, idx) for r in store.rows]  # per segment [m, stride]: one copy
        d = store.layout.d_model

        def part(name: str) -> Tensor:
            if store.layout.quantized:  # the gathered rows as stored: dequantized ([m, d], a temporary)
                return part_rows(store.layout, gathered, name, 0, m, store.dtype)
            seg, off = store.layout.locate(name)
            return gathered[seg][:, off : off + d]  # [m, d]
    bias = None if act_bias is None else act_bias[ids_t]
    if bias is not None and m > n:
        bias = torch.cat([bias, bias.new_zeros(m - n)])
    a = part("gate" if gated else "up")
    u = part("up") if gated else None
    h = neuron_outputs(x, a, u, bias, act, threshold, on_act)  # [T, m]
    if mask is not None:  # a gated model: rows the gate shuts for this token (cached rows too) give 0
        h[..., :n] *= mask[:, ids_t]
    if m > n:
        h[..., n:] = 0  # padding rows (stale or zero rows of the store, repeated slots) contribute nothing
    return h @ part("down"), h[..., :n]


class _Parts(NamedTuple):
    """Where a store's parts are: the first row's a (gate, else up), u (up of a gated FFN, else 0) and down; a/u's
    row stride and down's (elements of float rows, bytes of quantized ones); and the rows' format."""

    a: int
    u: int
    down: int
    stride: int
    stride_down: int
    dtype_code: int  # float rows: ``DTYPE_CODES``; -1: quantized
    bits: int  # quantized rows: 8 or 4
    group_size: int
    asym: int = 0  # int4: bit 0, a's parts asymmetric (an offset per group: ``quant``); bit 1, u's


class NativeRows:
    """One layer's native compute over rows of row stores (``RowStore``, or ``DeviceRows`` in host memory: any row
    stride): float rows, or group-quantized ones (int8 / int4, ``quant``) dequantized on the fly inside the kernel."""

    def __init__(self, lib: ctypes.CDLL, kind: int, dtype: torch.dtype, gated: bool, threshold: Optional[float],
                 act_bias: Optional[Tensor], on_act: bool = False) -> None:
        self._fn = lib.llmflash_sparse_ffn
        self._fn_q = lib.llmflash_sparse_ffn_q
        self.kind = kind
        self.dtype_code = DTYPE_CODES[dtype]
        self.gated = gated
        self.threshold = -1.0 if threshold is None else float(threshold)
        self.on_act = int(on_act and threshold is not None)  # the threshold compares |act(a x + b)| alone
        self.bias = None if act_bias is None else act_bias.detach().float().contiguous()  # [d_ffn], float32
        self._bias_ptr = 0 if self.bias is None else self.bias.data_ptr()
        self._parts: dict[int, _Parts] = {}  # id(store) -> ``_pointers``
        self.threads = 1

    @staticmethod
    def make(activation: str, dtype: torch.dtype, gated: bool, threshold: Optional[float],
             act_bias: Optional[Tensor], on_act: bool = False) -> Optional["NativeRows"]:
        """The native compute for a layer, or None where it does not apply (no library, an activation or dtype the
        kernel lacks: logged at info level; the library's own absence was warned about once). ``dtype``: the compute
        dtype (float rows are held in it; quantized rows are computed in float32 whatever it is)."""
        if activation not in ACT_CODES or dtype not in DTYPE_CODES:
            log.info("native sparse step: %s / %s not supported, using the Python path", activation, dtype)
            return None
        lib = library()
        if lib is None:
            return None
        return NativeRows(lib, ACT_CODES[activation], dtype, gated, threshold, act_bias, on_act)

    def _pointers(self, store: RowStore | DeviceRows) -> _Parts:
        """A store's ``_Parts``; its buffers never move, so computed once. Parts of one segment share its stride
        (bundled); unbundled, down has its own."""
        key = id(store)
        p = self._parts.get(key)
        if p is not None:
            return p
        lay = store.layout
        if lay.quantized:  # uint8 rows: each part's codes, then its scales (``quant``), at byte offsets
            (sa, oa), (sd, od) = lay.locate("gate" if self.gated else "up"), lay.locate("down")
            su, ou = lay.locate("up") if self.gated else (sa, 0)
            rows = store.rows
            if su != sa or any(r.dtype != torch.uint8 or r.stride(1) != 1 for r in rows):
                raise ValueError("the native step needs quantized rows as uint8, gate and up in one segment")
            asym = int(("gate" if self.gated else "up") in lay.asym_parts) | (2 * int(self.gated and "up" in lay.asym_parts))
            p = _Parts(rows[sa].data_ptr() + oa, rows[su].data_ptr() + ou if self.gated else 0,
                       rows[sd].data_ptr() + od, rows[sa].stride(0), rows[sd].stride(0), -1, lay.bits, lay.group_size,
                       asym)
        else:
            a = store.view("gate" if self.gated else "up")
            u = store.view("up") if self.gated else None
            down = store.view("down")
            if any(v.stride(1) != 1 for v in (a, down)) or (u is not None and u.stride(0) != a.stride(0)):
                raise ValueError("the native step needs rows of contiguous parts, gate and up with one stride")
            if a.dtype not in DTYPE_CODES or down.dtype != a.dtype:
                raise ValueError(f"the native step has no kernel for rows of {a.dtype}")
            p = _Parts(a.data_ptr(), 0 if u is None else u.data_ptr(), down.data_ptr(), a.stride(0), down.stride(0),
                       DTYPE_CODES[a.dtype], 0, 0)
        self._parts[key] = p
        return p

    def add(self, y: Tensor, x: Tensor, store: RowStore | DeviceRows, rows: np.ndarray, ids: np.ndarray,
            mask: Optional[Tensor] = None) -> None:
        """y [T, d] (float32, contiguous) += the contribution of ``store`` rows ``rows`` (int64 [n]) holding neurons
        ``ids`` (int64 [n]) for x [T, d] (float32, contiguous); ``mask`` (bool [T, d_ffn]): a gated model's gate.
        ``store`` is in host memory."""
        n = rows.size
        if n == 0:
            return
        p = self._pointers(store)
        d = store.layout.d_model
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mptr, mstride = (0, 0) if mask is None else (mask.data_ptr(), mask.stride(0))
        if p.dtype_code < 0:
            rc = self._fn_q(x.data_ptr(), x.shape[0], d, p.a, p.u, p.down, p.stride, p.stride_down, p.bits,
                            p.group_size, array_address(rows), array_address(ids), n, self._bias_ptr, mptr, mstride, self.kind,
                            self.threshold, self.on_act, y.data_ptr(), self.threads, p.asym)
        else:
            rc = self._fn(x.data_ptr(), x.shape[0], d, p.a, p.u, p.down, p.stride, p.stride_down, p.dtype_code,
                          array_address(rows), array_address(ids), n, self._bias_ptr, mptr, mstride, self.kind, self.threshold,
                          self.on_act, y.data_ptr(), self.threads)
        if rc != 0:
            raise RuntimeError(f"native sparse step failed ({rc})")
