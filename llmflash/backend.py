"""Where the model computes (``EngineConfig.device``): the host's CPU, or an accelerator the host copies rows to.

One interface instead of device branches in the engine. What differs between the two:

- ``CpuBackend``: the resident weights, caches and predictors are host tensors; reads land where they are computed;
  nothing is page-locked, copied asynchronously or waited for.
- ``AcceleratorBackend`` (CUDA): resident weights, neuron caches (``cache.DeviceRows``) and predictors live in the
  device's memory. Direct I/O cannot write there, so reads land in page-locked host buffers (``pin``) and ``load``
  copies them on asynchronously, ordered on the compute stream; before reads land in a host buffer again,
  ``before_reads`` waits until the copies out of it have finished. A layer's active set reaches the host as one copy
  of its mask through page-locked memory (``host_ids``): the one wait per layer that the reads need. Index lists the
  device needs (cache slots, neuron ids) go over the same way, without a wait (``indices``): a copy from pageable
  memory would make the host wait for everything queued before it, several times per layer.

Tests run the accelerator's code path with CPU tensors (``Engine.copy_on_cpu``): ``AcceleratorBackend`` on the
``cpu`` device pins nothing and copies synchronously.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .cache import DeviceRows, RowStore
from .errors import LLMFlashError
from .storage import pin_buffer, unpin_buffer

INDEX_RING = 16  # page-locked index buffers that ``AcceleratorBackend.indices`` cycles through


class Backend:
    """The CPU: every method is the identity or a no-op (see the module docstring)."""

    accelerator = False  # the model computes apart from the host (reads land in host buffers and are copied on)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def native_ok(self) -> bool:
        """Whether the native step (host rows, ``step.NativeRows``) can compute this backend's rows."""
        return not self.accelerator

    def predictor_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype predictors are held in here (``dtype`` asked for)."""
        return dtype

    def pin(self, buffers: list) -> None:
        """Page-lock host buffers that reads land in before they are copied on."""

    def release(self) -> None:
        """Wait for outstanding copies and unpin what ``pin`` locked."""

    def sync(self) -> None:
        """Wait until the device has done everything queued (a token's end, before its time is taken)."""

    def before_reads(self, host: RowStore) -> None:
        """Wait until copies out of ``host`` are done: reads are about to overwrite it."""

    def load(self, rows: DeviceRows, host: RowStore, n: int, host_start: int, start: int | np.ndarray,
             scratch: Optional[list[Tensor]] = None) -> None:
        """Copy host rows [host_start, +n) into ``rows`` at ``start`` (or its slots ``start``; ``scratch``: device rows
        the copies into slots pass through instead of a temporary)."""
        rows.load(host, n, host_start, start, scratch=scratch)

    def host_ids(self, mask: Tensor) -> np.ndarray:
        """Sorted ids of the neurons set in any row of ``mask`` (bool [T, n]), on the host."""
        return np.flatnonzero(_union(mask).cpu().numpy())

    def indices(self, arrays: list[np.ndarray]) -> list[Tensor]:
        """int64 index tensors on the device for host index arrays (int64), in one copy; on the CPU their views."""
        return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays]


class CpuBackend(Backend):
    pass


class AcceleratorBackend(Backend):
    """A CUDA device (or, in tests, the CPU standing in for one)."""

    accelerator = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.cuda = device.type == "cuda"
        self._pinned: list = []
        self._copied: dict[int, torch.cuda.Event] = {}  # id(host store) -> the event after its last copy out
        self._mask_host: Optional[Tensor] = None  # page-locked bool [n]: where a layer's mask comes back
        self._mask_ready = torch.cuda.Event() if self.cuda else None
        # ``indices``: a ring of page-locked int64 buffers (numpy views beside them), each with the event after its
        # last copy (a buffer is refilled only once its copy is done: long since, the ring being INDEX_RING deep; an
        # event never recorded is done at once)
        self._index_bufs: list[Optional[tuple[Tensor, np.ndarray]]] = [None] * INDEX_RING
        # and the device buffers they are copied into (``Tensor.to`` allocated one per call: 84 us of host time each
        # on the H200 host, results/gpu_scale/run_22nd; reuse is safe: every use is queued on the one stream)
        self._index_dev: list[Optional[Tensor]] = [None] * INDEX_RING
        self._index_done = [torch.cuda.Event() for _ in range(INDEX_RING)] if self.cuda else []
        self._index_next = 0
        # the stream every copy and event goes on, looked up once: ``Event.record()`` without a stream asks torch for
        # the current one, 53 us a call on the H200 host (4 per layer: 7 ms of a 453 ms token; results/gpu_scale)
        self._stream = torch.cuda.current_stream(device) if self.cuda else None
        self._load_events: dict[int, torch.cuda.Event] = {}  # id(host store) -> its reusable copy event

    def predictor_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # int8 predictors have a CPU kernel only (``predictor.ENGINE_DTYPE``): float16 on the device
        return torch.float16 if self.cuda and dtype not in (torch.float16, torch.float32, torch.bfloat16) else dtype

    def pin(self, buffers: list) -> None:
        if self.cuda:
            self._pinned += [b for b in buffers if pin_buffer(b)]

    def release(self) -> None:
        if self._pinned:
            self.sync()
            for b in self._pinned:
                unpin_buffer(b)
            self._pinned = []
        self._copied.clear()
        self._load_events.clear()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def before_reads(self, host: RowStore) -> None:
        ev = self._copied.pop(id(host), None)
        if ev is not None:
            ev.synchronize()

    def load(self, rows: DeviceRows, host: RowStore, n: int, host_start: int, start: int | np.ndarray,
             scratch: Optional[list[Tensor]] = None) -> None:
        if not n:
            return
        rows.load(host, n, host_start, start, non_blocking=self.cuda, scratch=scratch, indices=self.indices)
        if self.cuda:
            ev = self._load_events.get(id(host))
            if ev is None:
                ev = self._load_events[id(host)] = torch.cuda.Event()
            ev.record(self._stream)
            self._copied[id(host)] = ev

    def indices(self, arrays: list[np.ndarray]) -> list[Tensor]:
        if not self.cuda:
            return super().indices(arrays)
        n = sum(a.size for a in arrays)
        k = self._index_next
        self._index_next = (k + 1) % INDEX_RING
        ev = self._index_done[k]
        ev.synchronize()
        buf = self._index_bufs[k]
        if buf is None or buf[1].size < n:
            pinned = torch.empty(max(n, 4096), dtype=torch.int64, pin_memory=True)
            buf = self._index_bufs[k] = (pinned, pinned.numpy())
        host, view = buf
        off = 0
        for a in arrays:
            view[off : off + a.size] = a
            off += a.size
        dev = self._index_dev[k]
        if dev is None or dev.numel() < n:
            dev = self._index_dev[k] = torch.empty(host.numel(), dtype=torch.int64, device=self.device)
        dev = dev[:n]
        dev.copy_(host[:n], non_blocking=True)
        ev.record(self._stream)
        out, off = [], 0
        for a in arrays:
            out.append(dev[off : off + a.size])
            off += a.size
        return out

    def host_ids(self, mask: Tensor) -> np.ndarray:
        if not self.cuda or mask.device.type == "cpu":
            return super().host_ids(mask)
        m = _union(mask)
        if self._mask_host is None or self._mask_host.numel() < m.numel():
            self._mask_host = torch.empty(m.numel(), dtype=torch.bool, pin_memory=True)
        out = self._mask_host[: m.numel()]
        out.copy_(m, non_blocking=True)
        assert self._mask_ready is not None
        self._mask_ready.record(self._stream)
        self._mask_ready.synchronize()
        return np.flatnonzero(out.numpy())


def _union(mask: Tensor) -> Tensor:
    """bool [n]: set in any row of ``mask`` [T, n]."""
    return mask[0] if mask.shape[0] == 1 else mask.any(dim=0)


def make_backend(name: str, stand_in: bool = False) -> Backend:
    """The backend of ``--device name`` (``cpu``, ``cuda``, ``cuda:N``); ``stand_in``: the accelerator's code path on
    the CPU (tests)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LLMFlashError(f"--device {name!r} is not a device: use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLMFlashError(f"--device {name}: no CUDA device is visible to torch {torch.__version__}")
    if device.type not in ("cpu", "cuda"):
        raise LLMFlashError(f"--device {name}: only cpu and cuda are supported")
    return AcceleratorBackend(device) if device.type == "cuda" or stand_in else CpuBackend(device)
