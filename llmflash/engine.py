"""The inference engine: a Hugging Face model whose FFNs are served from flash.

Embeddings, attention and norms are resident (loaded once with direct I/O), except, in the sparse modes under budgets
below their share, the streamed layers' attention projections (``layer_stream``: read every token into slot buffers,
the next one in flight while the layers before it compute). Each layer's FFN is one of:

- ``ResidentFFN`` (``DenseFFN`` over weights read once into DRAM): ``dense`` mode; the layers that fit in ``hybrid``;
- ``StreamedFFN``: the whole layer read through a staging buffer every token: ``naive``; the rest of ``hybrid``;
- ``SparseFFN``: only the active neurons, kept in a ``NeuronCache`` whose membership a ``CachePolicy`` decides
  (``EngineConfig.cache_policy``: the paper's sliding window by default, LRU, a pinned hot set plus the window, or
  decayed use counts);
  the active set comes from an ``ActiveSetProvider`` (``oracle``: the true set; ``predictor``: trained low-rank
  predictors).

Per generated token the engine records I/O, memory-management and compute milliseconds and the bytes and reads that
reached the flash files. A token's latency is its wall time; ``io_ms`` is the time spent handing reads to the kernel
(``queue_ms``) and waiting for them (a sparse layer computes its already-cached rows, and a streamed layer its current
chunk, while the next reads are in flight), ``mem_ms`` the cache bookkeeping and the reads' planning (the paper's
memory management: deleting and inserting neurons, copying rows), and ``compute_ms`` the rest.

On an accelerator (``EngineConfig.device="cuda"``, the paper's GPU setting) the resident model, the FFN biases, the
neuron caches (``DeviceRows``) and the predictors live in GPU memory. Direct I/O cannot write there, so reads land in
page-locked host buffers: a sparse layer's new rows in a landing buffer the size of the largest layer cache, streamed
chunks in the staging buffer, and are copied over (timed as memory management; naive also copies the resident weights
again after re-reading them). The cache's bookkeeping is unchanged; its row moves happen on the GPU.

Lookahead (``EngineConfig.lookahead``, sparse modes; on by default only on a quiet CPU of at most 2 cores whose
caches hold less than a token's set): a layer with few new neurons per token issues few reads, and a wave of a few
dozen reads is latency-bound (the disk needs many in flight). So while layer l runs, the engine also guesses layer
l+1's set from layer l's FFN input (rescaled from l's FFN norm to l+1's: the residual stream changes little from one
layer to the next; Deja Vu's observation) and starts reading the guessed neurons that are new to l+1's window. At
layer l+1 the real set is predicted as usual and only what the guess missed is read then. The guess only moves reads
earlier: what is computed is the window of the real sets plus the guessed rows (exact zeros for a ReLU rule when a
guessed neuron is inactive). With
``lookahead_depth`` D > 1, layer l starts layer l+D's reads (layer 0 those of layers 1..D), so D layers' reads are
queued while the host plans and computes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from . import decode_step, graph_step
from .arch import Adapter, HFModel, adapter_for
from .backend import Backend, make_backend
from .budget import SparseBudget, hybrid_resident_layers, streamed_layer_count
from .cache import CacheUpdate, DeviceRows, NeuronCache, RowStore
from .cache_policy import POLICIES, HotPolicy, hot_sets, make_policy
from .errors import BudgetError, LLMFlashError
from .ffn import DenseFFN, FFNWeights, SparsityRule, activation_fn
from .flashdir import FlashDir, TensorEntry, build_skeleton, ffn_weights_from_rows, open_flash_dir
from .hooks import EngineObserver
from .layer_stream import LayerStream, StreamPlan, plan_stream, spread_layers, stream_holes, tensor_index
from .layout import bridge, read_plan
from .masked import MASKED_BYTES_PER_NEURON, MaskedRows
from .metrics import GenerationResult, TokenStats
from .models import default_predictors, predictor_dir
from .native import library as native_library
from .predictor import ENGINE_DTYPE, PredictorSet
from .provider import ActiveSetProvider, GateProvider, OracleProvider, PredictorProvider
from .quant import compute_layout, dense_layer_bytes, storage_dtype
from .sparsity import model_rule, stored_thresholds, threshold_rule
from .step import MAX_NATIVE_TOKENS, NativeRows, rows_output, slot_plan
from .storage import URING_DEPTH, FlashReader, RowsJob, RowsTarget
from .threads import CpuState, choose_threads, lookahead_pays, sense_cpu

log = logging.getLogger(__name__)

MODES = ("dense", "naive", "hybrid", "oracle", "predictor")
CACHE_FORMS = ("stored", "compute")  # EngineConfig.cache_form
PREDICTOR_DTYPES = ("int8", "float16", "float32")  # EngineConfig.predictor_dtype
LARGE_D_MODEL = 2048
AUTO_GAP_BYTES = 8192  # EngineConfig.max_gap_rows = -1: gaps filled up to this many bytes of rows
SPARSE_MODES = ("oracle", "predictor")
# cache_policy="hot": the text whose needed sets choose each layer's hot neurons at engine start (fixed, so runs agree)
HOT_CALIBRATION_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both the "
    "natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about the "
    "natural world, produced by scientists who emphasize the observation, explanation, and prediction of real-world "
    "phenomena. In the early modern period, printing spread books across Europe, and cities grew around ports, "
    "markets and universities, where people met to trade goods, argue about ideas and write letters to each other."
)


@dataclass(frozen=True)
class EngineConfig:
    mode: str = "oracle"
    dram_budget: float = 0.5  # fraction of the model's weight bytes the engine may hold
    window: int = 5  # tokens in the sliding window (paper: 4-5)
    io_threads: int = 0  # reader threads; 0 = auto: from the free cores at start (``threads.choose_threads``)
    sparsity: str = "auto"  # auto (the model's own rule, else relu) | relu | threshold
    threshold_sparsity: float = 0.8  # target sparsity of the calibrated thresholds (threshold rule)
    predictors: Optional[str] = None  # predictor directory (predictor mode; None: the model's default ones, if any)
    # the form the predictors are held in: int8 (weight-only, per-row scales: a quarter of fp32's DRAM and the fastest
    # here), float16 (as stored) or float32
    predictor_dtype: str = "int8"
    # rows of the staging buffer (two halves in flight): whole layers in naive/hybrid (1024: reads big enough to keep
    # the disk busy), only overflow and prefill in the sparse modes (384: the rest of the budget goes to the cache)
    staging_rows: Optional[int] = None
    max_read_bytes: int = 256 * 1024  # longer runs of neighbouring rows are split so reads spread over threads
    min_cache_rows: int = 16  # per layer: a budget that cannot hold this many rows per layer is too small
    # torch threads; 0 = auto (``threads.choose_threads``): every free core in the sparse modes (results/engine_options,
    # one_thread arm) and from d_model >= LARGE_D_MODEL (GBs of matvecs per token: results/latency); 1 for small models
    # in dense, naive and hybrid, whose whole-layer reads keep the second core busy. Free: the cores the process may
    # use less the load other work put on them at start (on a busy machine torch's workers wait for a core at every
    # small op)
    compute_threads: int = 0
    # sparse modes: start reading layer l+1's guessed new neurons while layer l runs. None = auto
    # (``threads.lookahead_pays``): on with one compute thread on a quiet CPU of at most 2 cores (0.91-0.93x the time
    # without it there: results/relufy/reruns_c5/engine_options*), off elsewhere (with two compute threads on 2 cores it
    # was 1.08x: the reader threads' hand-offs slow the overlapped compute more than the hidden I/O saves), and there
    # only while the caches hold less than a token's expected set (``Engine._ahead_pays``: with larger caches the
    # guesses' wrong loads evict the window and it was 1.1-1.25x)
    lookahead: Optional[bool] = None
    # with lookahead: how many layers ahead reads are in flight. 1: while layer l runs, layer l+1's guessed rows are
    # read (guessed from layer l's FFN input); D > 1: layer l starts layer l+D's reads (layer 0 the first D layers'),
    # so the disk always has D layers' reads queued while the host plans and computes (a layer's reads no longer wait
    # for the previous layer's host work). The guess of layer l+D comes from layer l's input through the composed
    # norm maps, so it misses more the further ahead it looks; each layer in flight takes a host buffer
    # (accelerator: a landing buffer the size of the largest cache, in the budget; CPU: an ``aheads`` buffer)
    lookahead_depth: int = 1
    # with lookahead on the CPU: rows of each of the two host buffers a layer's guessed neurons that do not fit its
    # cache are read ahead into (layers alternate between them), counted in the budget. At half the model most of a
    # token's set does not fit the caches; without these, lookahead could only read ahead what fits. -1 = auto: the
    # staging buffer's rows, at most a quarter of a layer's, the two together at most a quarter of what the budget
    # leaves beyond its minimum (none when that is under ``min_cache_rows``); 0 = off
    lookahead_rows: int = -1
    # sparse modes: a token's rows beyond its cache (read into the staging buffer, computed, not kept) are read with
    # every gap of at most this many rows between two of them filled in, and the filled rows computed too (the model's
    # own rule applies to them: an inactive one adds exactly zero, so the oracle stays exact): fewer, longer reads for
    # a few more bytes, where the disk's reads per second (and the CPU each read costs) are the limit. 0 = off; -1 =
    # auto: the gap rows that fit in ``AUTO_GAP_BYTES`` (one row of SmolLM2's float32 bundles, two of float16, none
    # for the scale model's 24 KiB rows). On this disk a read costs about what 8-10 KiB more of a read does (machine
    # notes: 4 KiB reads at ~80k/s, 8 KiB at ~62k/s, 16 KiB at ~50k/s), plus ~8 us of a core; measured: the engine
    # options' bridge arms (results/relufy/reruns_c5/engine_options)
    max_gap_rows: int = -1
    # sparse modes: False empties each layer's neuron cache before a token's set enters it, so every token loads its
    # whole active set (the paper's "+predictor" row, without the window's reuse). Not with lookahead
    reuse: bool = True
    # sparse modes: compute each region of cached rows padded up to a multiple of this many rows (padding's outputs
    # zeroed), so the matmuls see few distinct shapes: oneDNN keeps memory per matmul shape, and without this the
    # scale model's process grew by 51 MiB per token (12 MiB with 256; results/memory_growth). -1 = auto: 256 from
    # d_model >= LARGE_D_MODEL, off for small models (whose regions are a few hundred rows); 0 = off. The Python path
    # only: the native step (``native``) computes no matmul over the rows, and its process did not grow at all
    # (results/native_step/memory_growth)
    row_bucket: int = -1
    # sparse modes: DRAM held back from the budget for the compute's working memory (contiguous copies of cached rows,
    # what the allocator and oneDNN keep per matmul shape), in units of the largest layer cache. -1 = auto: 4 from
    # d_model >= LARGE_D_MODEL (the scale model's process grew 185-383 MiB past its buffers, 3-6 of its 61 MB layer
    # caches, and was OOM-killed in a cgroup of its budget: results/memory_growth, results/memory_limit; on a GPU
    # the caching allocator's peak was 130 MB above the accounted bytes without it: results/gpu_scale); 0 for small
    # models, whose working memory is within the runtime's overhead; 0 too where the native step runs (no per-shape
    # working memory: results/native_step/memory_growth). On an accelerator the reserve is allocated, as the rows that
    # gathers of cached slots are copied into (``Engine.gather_scratch``: no allocation per call), and its auto is 1.
    working_reserve: float = -1
    # where the model computes: "cpu", or an accelerator ("cuda", "cuda:1"). On an accelerator the resident weights,
    # neuron caches and predictors live in its memory (the budget then bounds that memory plus the engine's host
    # buffers); reads still land in page-locked host buffers (direct I/O cannot write into GPU memory) and are copied
    # over, timed as memory management. The paper's GPU setting (its Table 3, RTX 4090 rows)
    device: str = "cpu"
    # sparse modes: which neurons each layer's cache keeps (``cache_policy``): "window" (the paper's sliding window),
    # "lru" (the most recently used up to the cache's rows) or "hot" (PowerInfer-style: the layer's most frequently
    # needed neurons, counted by running this engine's own active-set provider over ``HOT_CALIBRATION_TEXT`` at start
    # (``hot_calibration_tokens`` decode steps, no extra weights loaded), pinned in ``hot_fraction`` of its cache rows;
    # the window manages the rest) or "lfu" (decayed use counts: the neurons needed most often lately stay, and a
    # newcomer enters only in place of one worth less: ``cache_policy.LFUPolicy``)
    cache_policy: str = "window"
    hot_fraction: float = 0.5
    hot_calibration_tokens: int = 64
    # quantized directories (int8/int4): the form the neuron caches and the staging rows hold. "stored": the rows as
    # read (DRAM per neuron at the stored bits, the budget counting them so), dequantized inside the native step's
    # dot products (on the Python path: for every matmul); "compute":
    # dequantized once when read into rows of the compute dtype (more DRAM per neuron, no dequantization per token;
    # reads land in a landing buffer first). Float directories: both are the stored rows
    cache_form: str = "stored"
    # flash modes on the CPU: compute each layer's rows with the native step (``step.NativeRows``, ``native/``: one
    # fused C++ call over the rows in place, built with g++ on first use) instead of torch matmuls. Where it cannot
    # build, one warning and the Python path; the Python path stays the reference the native one equals within
    # float32 rounding. Rows need no padding then: ``row_bucket`` does not apply and ``working_reserve``'s auto is 0
    native: bool = True
    # the flash reader's workers: C++ threads that never take the interpreter's lock (``storage.FlashReader``,
    # ``native/reader.cpp``; built with g++ on first use), else Python threads (the reference, and the fallback)
    native_reader: bool = True
    # the native reader through io_uring where the kernel allows it (one thread keeping up to max(io_threads,
    # uring_depth) reads in flight; less CPU per read than its C++ threads' blocking reads: results/engine_options),
    # else its C++ threads
    io_uring: bool = True
    uring_depth: int = URING_DEPTH
    # with the native reader: a layer's reads planned from its neuron ids inside the reader (``FlashReader.submit_rows``,
    # one call per layer), else by ``layout.read_plan`` / ``step.slot_plan`` in numpy (the reference; also used while an
    # observer counts the reads)
    native_plans: bool = True
    # the neuron caches' slot bookkeeping per token (``NeuronCache.update``) in ``native/cache.cpp`` (window, LRU and
    # hot policies), else numpy (the reference it equals exactly)
    native_cache: bool = True
    # a fixed decode step for one token's attention (norms, projections, rotary embedding, grouped attention, residual):
    # on the CPU a Llama-family layer's in two native calls around transformers' cache append (``decode_step``); on an
    # accelerator an OPT or Llama-family layer's over a static key/value buffer as one CUDA graph per layer, the
    # predictor's network in it (``graph_step``); else transformers' modules (the reference it equals within rounding)
    native_attention: bool = True
    # sparse modes on the CPU: decoder layers whose attention projections are read from
    # ``resident.safetensors`` every token into two or three slot buffers, the next streamed layer's read in flight
    # while the layers before it compute (``layer_stream``), so budgets below the resident weights' share run (on
    # Llama-2-7B's geometry at 4 bits they are 36% of the model). Spread evenly over the layers. -1 = auto
    # (``budget.streamed_layer_count``): none while the budget holds the resident weights and neuron caches of a
    # token's expected set (or a tenth of the FFN rows when the provider does not know it), else the fewest that
    # leave the caches that, at most all; 0 = none
    stream_layers: int = -1
    # sparse modes on an accelerator, float rows, no gated model's own gate: compute each layer's needed rows over the
    # whole device cache at once, the rows not needed masked to zero (fixed shapes: three matmuls over [capacity, d],
    # no gathers of slots; on CUDA one graph replay per layer: ``masked.MaskedRows``), instead of gathering the cached
    # rows and the loaded rows apart. The same terms summed in another order (equal within rounding). None = auto: on
    # on a CUDA device where the caches hold float rows (its compute 22-25 ms per token against 37-45 gathered on the
    # scale model, the same I/O: results/gpu_scale/run_22nd), off elsewhere
    masked_compute: Optional[bool] = None


def _now_ms() -> float:
    return time.perf_counter() * 1e3


# ------------------------------------------------------------------------------------------------ active-set providers


# ``ActiveSetProvider``, ``OracleProvider`` and ``PredictorProvider``: see ``provider``.


# ------------------------------------------------------------------------------------------------------ FFN modules


class _FlashFFNBase(nn.Module):
    """What streamed and sparse FFNs share: the layer's biases, rule, reader and the staging buffer."""

    def __init__(self, engine: "Engine", layer: int) -> None:
        super().__init__()
        self.e = engine
        self.layer = layer
        self.act_bias, self.out_bias = engine.biases[layer]
        self.threshold = engine.thresholds[layer]
        self.on_act = engine.threshold_on_act  # the threshold compares |act(gate x)| alone
        self.act = activation_fn(engine.fd.activation)
        # the native step (``step.NativeRows``) when the engine runs it (``EngineConfig.native``), else None
        self.native: Optional[NativeRows] = engine.native_rows(self.act_bias, self.threshold)

    def _submit(self, store: RowStore, ids: np.ndarray, dest: int | np.ndarray) -> list:
        """Start reading rows ``ids`` (sorted) of this layer into ``store`` rows from ``dest`` (an int: consecutive
        rows), or into its rows ``dest`` (int64 [len(ids)]: a neuron cache's slots; scatter reads)."""
        return self._submit_many([(store, ids, dest)])

    def _submit_many(self, parts: list[tuple[RowStore, np.ndarray, int | np.ndarray]]) -> list:
        """``_submit`` for several (store, ids, dest) at once: with the native reader one plan and one ticket for all
        (a layer's cache loads and its rows beyond the cache: one hand-over to the kernel, one wait)."""
        e = self.e
        t0 = _now_ms()
        tickets = []
        parts = [p for p in parts if p[1].size]
        for o in e.observers:
            for _, ids, _ in parts:
                o.read_plan(self.layer, ids)
        if parts and e.reader.native and e.cfg.native_plans:
            # the hot path: the native reader plans the same reads from the ids (one call, one ticket); observers that
            # count reads get the planned sizes from it (so an experiment measures the path users run)
            segs = e.fd.layout.segments
            jobs = []
            for store, ids, dest in parts:
                e.backend.before_reads(store)
                targets = tuple(RowsTarget(buf, seg.layer_offsets[self.layer], seg.stride_bytes,
                                           max(1, e.cfg.max_read_bytes // seg.stride_bytes))
                                for seg, buf in zip(segs, store.buffers))
                slots = dest if isinstance(dest, np.ndarray) else None
                jobs.append(RowsJob(targets, ids, slots, 0 if slots is not None else int(dest)))
            counting = [o for o in e.observers if type(o).reads_issued is not EngineObserver.reads_issued]

            def on_sizes(sizes: np.ndarray) -> None:
                for o in counting:
                    o.reads_issued("ffn", sizes)

            tickets.append(e.reader.submit_rows_jobs(jobs, e.fd.layout.d_ffn, on_sizes if counting else None))
        else:  # the reference: plans made here (and shown to observers that count reads)
            for store, ids, dest in parts:
                e.backend.before_reads(store)  # copies out of these host rows (to an accelerator) are done
                for seg, buf in zip(e.fd.layout.segments, store.buffers):
                    if isinstance(dest, np.ndarray):
                        fo, nb, do = slot_plan(seg, self.layer, ids, dest, e.cfg.max_read_bytes)
                        piece = seg.stride_bytes
                    else:
                        fo, nb, do = read_plan(seg, self.layer, ids, dest, e.cfg.max_read_bytes)
                        piece = 0
                    for o in e.observers:
                        o.reads_issued("ffn", nb)
                    tickets.append(e.reader.submit(buf, fo, nb, do, piece_bytes=piece))
        # planning the reads is memory management; handing them over (the reader's submit call after it queued them:
        # on few cores mostly the kernel starting them, done by the reader's thread in this one's place) is I/O, moved
        # there by ``_wait`` once the tickets say how long it took (``queue_ms``)
        e.meter.mem_ms += _now_ms() - t0
        return tickets

    def _wait(self, tickets: list) -> None:
        """Wait for the tickets' reads. I/O time: the waiting, and the hand-over the submit calls took (``queue_ms``,
        counted as memory management by ``_submit`` until now). Both lie within the reads' own time in flight, so
        ``io_ms`` does not exceed it (``metrics.io_wait_gbps`` >= ``read_gbps``)."""
        if not tickets:
            return
        t0 = _now_ms()
        for t in tickets:
            self.e.reader.wait(t)
        m = self.e.meter
        queue = sum(t.queue_ms for t in tickets)
        flight = max(t.elapsed_ms for t in tickets)
        # (the wait's own call overhead after the reads had landed is not I/O: at most their time in flight counts)
        waited = _now_ms() - t0 + queue
        io = max(queue, min(waited, flight))
        m.io_ms += io
        m.wait_extra_ms += max(0.0, waited - io)
        m.mem_ms -= queue
        m.queue_ms += queue
        m.read_ms += flight

    def _read(self, store: RowStore, ids: np.ndarray, dest: int | np.ndarray) -> None:
        """Read rows ``ids`` (sorted) into ``store`` (``_submit``'s ``dest``); timed as I/O."""
        self._wait(self._submit(store, ids, dest))

    def _upload(self, host: RowStore, rows: RowStore | DeviceRows, n: int, host_start: int,
                start: int | np.ndarray) -> RowStore | DeviceRows:
        """The rows to compute on once reads into ``host`` rows [host_start, +n) have landed: ``host`` itself on the
        CPU; on an accelerator, ``rows`` (``DeviceRows``) after the n rows are copied in at ``start`` (or into the
        slots ``start``; timed as memory management)."""
        if not isinstance(rows, DeviceRows):
            return host
        t0 = _now_ms()
        self.e.backend.load(rows, host, n, host_start, start, self.e.gather_scratch)
        self.e.meter.mem_ms += _now_ms() - t0
        return rows

    def _rows_output(self, store: RowStore | DeviceRows, ids: np.ndarray, x: Tensor, start: int = 0,
                     slots: Optional[np.ndarray] = None) -> tuple[Tensor, Tensor]:
        """FFN contribution of store rows [start, start + n) or ``slots`` holding neurons ``ids``: the Python
        reference (``step.rows_output``) with this layer's rule, bias, gate and the engine's row bucket."""
        mask = self.e.gate_mask(self.layer, x) if self.e.gate is not None else None
        return rows_output(store, ids, x, self.act, self.e.fd.gated, self.threshold, self.on_act, self.act_bias,
                           start, slots, self.e.row_bucket, mask, self.e.gather_scratch, self.e.backend.indices)

    def _native_ok(self, x: Tensor) -> bool:
        return self.native is not None and x.shape[0] <= MAX_NATIVE_TOKENS

    def _acc(self, x: Tensor) -> Tensor:
        """A zero sum for this layer's output: float32 on the native path (the kernel's accumulator), else x's dtype."""
        dtype = torch.float32 if self._native_ok(x) else x.dtype
        return torch.zeros(x.shape[0], self.e.fd.layout.d_model, dtype=dtype, device=x.device)

    def _add(self, y: Optional[Tensor], store: RowStore | DeviceRows, ids: np.ndarray, x: Tensor, start: int = 0,
             slots: Optional[np.ndarray] = None) -> Tensor:
        """y (None: zeros) + the contribution of store rows [start, start + len(ids)) or ``slots`` holding neurons
        ``ids``: the native step where it runs (y then float32, added in place), the Python reference otherwise."""
        if y is None:
            y = self._acc(x)
        if self.native is not None and y.dtype == torch.float32 and store.rows[0].device.type == "cpu" \
                and x.shape[0] <= MAX_NATIVE_TOKENS:
            rows = slots if slots is not None else self.e.row_range[start : start + ids.size]
            mask = self.e.gate_mask(self.layer, x) if self.e.gate is not None else None
            self.native.add(y, x if x.dtype == torch.float32 else x.float(), store, rows, ids, mask)
            return y
        out = self._rows_output(store, ids, x, start, slots)[0]
        return y + out.to(y.dtype)

    def _stream(self, x: Tensor, ids: np.ndarray, y: Optional[Tensor] = None) -> Tensor:
        """y (default: zeros) + the sum over neurons ``ids`` (sorted) of their contribution, through the staging
        buffer, double-buffered: the next chunk's reads are in flight while the current chunk is computed. Only
        waiting counts as I/O."""
        e = self.e
        if y is None:
            y = self._acc(x)
        half = max(1, e.staging.capacity // 2)
        chunks = [ids[i : i + half] for i in range(0, ids.size, half)]
        pending = self._submit(e.staging, chunks[0], 0) if chunks else []
        for k, chunk in enumerate(chunks):
            self._wait(pending)
            if k + 1 < len(chunks):
                pending = self._submit(e.staging, chunks[k + 1], ((k + 1) % 2) * half)
            start = (k % 2) * half
            rows = self._upload(e.staging, e.staging_rows, chunk.size, start, start)
            y = self._add(y, rows, chunk, x, start=start)
        return y

    def _finish(self, y: Tensor, x: Tensor, biased: bool = False) -> Tensor:
        """The layer's output from y (``biased``: the output bias already in it)."""
        y = y.to(x.dtype)
        if self.out_bias is not None and not biased:
            y = y + self.out_bias
        return y.view(x.shape)


class StreamedFFN(_FlashFFNBase):
    """The whole layer read from flash on every call (naive and hybrid baselines)."""

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [T, d]
        return self._finish(self._stream(x2, self.e.all_ids), x)


class SparseFFN(_FlashFFNBase):
    """Only the active neurons: read those new to the window into the layer's ``NeuronCache``, compute on its rows."""

    def __init__(self, engine: "Engine", layer: int, capacity: int) -> None:
        super().__init__(engine, layer)
        policy = make_policy(engine.cfg.cache_policy, engine.cfg.window, engine.fd.layout.d_ffn)
        self.cache = NeuronCache(engine.fd.layout, capacity, engine.cfg.window, engine.fd.dtype,
                                 device=engine.device if engine.offload else None, policy=policy,
                                 row_layout=engine.row_layout, native=engine.cfg.native_cache)
        # with lookahead: (layer m, scale, shift) for each later layer m whose reads this layer may start, x_l * scale +
        # shift approximating x_m (``Engine._link_lookahead``)
        self.ahead_of: list[tuple["SparseFFN", Tensor, Tensor]] = []
        # (tickets, slots) read ahead for this layer: into the cache's slots, or (accelerator) into its landing
        # buffer's first rows, copied into the slots when they have arrived (``_land_prefetch``)
        self._prefetch: Optional[tuple[list, np.ndarray]] = None
        # (tickets, ids) of the guessed neurons beyond the cache, read ahead into ``engine.aheads[layer % n]``'s first
        # rows (lookahead on the CPU; n = depth + 1 buffers)
        self._ahead: Optional[tuple[list, np.ndarray]] = None
        # ``EngineConfig.masked_compute``: the layer's step over its whole device cache (``masked.MaskedRows``: one CUDA
        # graph; the layer's output bias included)
        store = self.cache.store
        self.masked: Optional[MaskedRows] = None
        # the layer's fixed decode step (``graph_step``) when it computes the predictor's mask with the attention
        self.graph_step: Optional[graph_step.GraphStep] = None
        if (engine.cfg.masked_compute and isinstance(store, DeviceRows) and not store.layout.quantized
                and engine.gate is None):
            self.masked = MaskedRows(store, engine.fd.gated, self.act, self.threshold, self.on_act, self.act_bias,
                                     self.out_bias, pool=engine.graph_pool, stream=engine.graph_stream)

    def _landing(self, slots: np.ndarray, start: int = 0) -> tuple[RowStore, int | np.ndarray]:
        """Where reads meant for cache ``slots`` land: in the cache itself, in those slots (CPU), or in this layer's
        host landing buffer from row ``start`` (accelerator; ``_upload`` then copies them into the slots)."""
        store = self.cache.store
        if isinstance(store, RowStore):
            return store, slots
        landings = self.e.landings
        assert landings  # an engine with device caches has a landing buffer
        return landings[self.layer % len(landings)], start

    def _update(self, need: np.ndarray, evict: bool = True, lookup: bool = True) -> CacheUpdate:
        upd = self.cache.update(need, self.e.step, evict=evict, lookup=lookup)
        m = self.e.meter
        m.cache_hits += upd.hits
        m.cache_misses += upd.misses
        m.cache_evictions += upd.deleted
        for o in self.e.observers:
            o.cache_updated(self.layer, upd)
        return upd

    def _ids(self, mask: Tensor) -> np.ndarray:
        return self.e.backend.host_ids(mask)

    def _need(self, x: Tensor, guess: bool = False) -> np.ndarray:
        """Union of the provider's active sets (or guessed sets) over the rows of x: sorted neuron ids."""
        e = self.e
        t0 = _now_ms()
        provider = e.provider
        assert provider is not None  # sparse modes always have one
        if guess:
            ids = self._ids(provider.guess(self.layer, x))
        elif e.accelerator:  # the mask comes back through page-locked memory: the layer's one wait
            m = self.graph_step.take_mask() if self.graph_step is not None else None  # (computed in its graph)
            ids = self._ids(provider.active(self.layer, x) if m is None else provider.active_after(self.layer, x, m))
        else:
            ids = provider.active_ids(self.layer, x)  # x [T, d] -> sorted ids of the union over the rows
        dt = _now_ms() - t0
        if provider.counted:  # a trace replays simulated sets: that part stands for no real work
            replay = provider.pop_replay_ms()
            e.meter.predictor_ms += dt - replay
            e.meter.excluded_ms += replay
        else:
            e.meter.excluded_ms += dt
        return ids

    def start_ahead(self, x: Tensor) -> None:
        """Lookahead from this layer's FFN input x [1, d]: start the reads of each later layer within the depth that no
        earlier layer of this token has started (layer 0: layers 1..depth; layer l > 0: layer l + depth)."""
        e = self.e
        if self.layer == 0:
            e.ahead_upto = 0
        for m, scale, shift in self.ahead_of:
            if m.layer > e.ahead_upto:
                m.prefetch(x * scale + shift)
                e.ahead_upto = m.layer

    def prefetch(self, x_guess: Tensor) -> None:
        """Lookahead: enter the guessed set into the window now and start reading its new rows."""
        e = self.e
        guess = self._need(x_guess, guess=True)
        t0 = _now_ms()
        upd = self._update(guess, lookup=False)  # slides the window; guessed overflow is dropped
        e.meter.mem_ms += _now_ms() - t0
        e.meter.loaded_neurons += upd.load_ids.size
        land, dest = self._landing(upd.dest_slots)
        self._prefetch = (self._submit(land, upd.load_ids, dest), upd.dest_slots)
        if e.aheads and upd.overflow_ids.size:  # what does not fit the cache: read ahead into a host buffer
            ahead = e.aheads[self.layer % len(e.aheads)]
            over = upd.overflow_ids[: ahead.capacity]
            self._ahead = (self._submit(ahead, over, 0), over)

    def _land_prefetch(self, pre: tuple[list, np.ndarray]) -> None:
        """Wait for the reads a lookahead started for this layer; on an accelerator copy them into their slots."""
        self._wait(pre[0])
        if pre[1].size:
            land, _ = self._landing(pre[1])
            self._upload(land, self.cache.store, pre[1].size, 0, pre[1])

    def drain(self) -> None:
        """Wait for reads started by a lookahead that no forward consumed (before the cache is cleared)."""
        for pending in (self._prefetch, self._ahead):
            if pending is not None:
                for t in pending[0]:
                    self.e.reader.wait(t)
        self._prefetch = self._ahead = None

    def forward(self, x: Tensor) -> Tensor:
        e = self.e
        x2 = x.reshape(-1, x.shape[-1])  # [T, d]
        cache = self.cache
        if x2.shape[0] > 1:  # prefill: exact dense output by streaming, then warm the window
            self.drain()
            full = self._stream(x2, e.all_ids)
            need = self._need(x2[-e.cfg.window :])
            upd = self._update(need)
            land, dest = self._landing(upd.dest_slots)
            self._read(land, upd.load_ids, dest)
            self._upload(land, cache.store, upd.load_ids.size, 0, upd.dest_slots)
            return self._finish(full, x)
        if not e.cfg.reuse:  # every token loads its whole set
            cache.clear()
        need = self._need(x2)
        pre, self._prefetch = self._prefetch, None
        t0 = _now_ms()
        if pre is not None:
            late = int((cache.slot[need] < 0).sum())  # what the guess missed
            if late > cache.free.size:  # slots must be freed to make room: let the early reads land first
                # (issued a layer ago, they have mostly arrived by now)
                e.meter.mem_ms += _now_ms() - t0
                self._land_prefetch(pre)
                pre = None
                t0 = _now_ms()
        # after a lookahead the window has already slid for this step: nothing is freed while its reads are in flight
        upd = self._update(need, evict=pre is None)
        ready = upd.ready_slots
        if pre is not None and pre[1].size:  # the slots a lookahead is still filling: computed once they have landed
            filling = np.zeros(cache.capacity, dtype=bool)
            filling[pre[1]] = True
            ready = ready[~filling[ready]]  # (a mask: np.setdiff1d sorted both, 0.3-0.8 ms per layer)
        e.meter.loaded_neurons += upd.load_ids.size
        # the new rows' reads are in flight while the rows already cached are computed; only waiting counts as I/O
        # (on an accelerator they land after the rows a lookahead read ahead, which are not copied over yet)
        land, dest = self._landing(upd.dest_slots, 0 if pre is None else pre[1].size)
        load_ids, overflow = upd.load_ids, upd.overflow_ids  # overflow: beyond the cache, read into the staging buffer
        ahead, self._ahead = self._ahead, None
        copy = ahead_ids = None
        read_ahead = None  # bool [d_ffn]: the neurons the guess read beyond the cache (masks: np.isin sorts)
        if ahead is not None:  # what the guess already read beyond the cache is not read again (CPU: host rows)
            read_ahead = np.zeros(cache.d_ffn, dtype=bool)
            read_ahead[ahead[1]] = True
            into = read_ahead[load_ids]  # cache slots freed since: copied over
            copy = (upd.dest_slots[into], np.searchsorted(ahead[1], load_ids[into]))
            load_ids, dest = load_ids[~into], upd.dest_slots[~into]
            have = read_ahead[overflow]  # computed where they landed
            ahead_ids, overflow = overflow[have], overflow[~have]
        keep = None  # the staging rows to compute, when the read bridged gaps over rows computed elsewhere
        span = bridge(overflow, e.max_gap_rows)
        if overflow.size < span.size <= e.staging.capacity:
            fresh = cache.slot[span] < 0  # not cached (a cached row is computed from its slot)
            if ahead_ids is not None and ahead_ids.size:  # nor read ahead and computed there
                computed = np.zeros(cache.d_ffn, dtype=bool)
                computed[ahead_ids] = True
                fresh &= ~computed[span]
            overflow, keep = span, (None if fresh.all() else np.flatnonzero(fresh))
        e.meter.mem_ms += _now_ms() - t0
        # the cache loads and the rows beyond the cache (into the staging buffer): one hand-over, one ticket
        beyond = 0 < overflow.size <= e.staging.capacity
        pending = self._submit_many([(land, load_ids, dest)] + ([(e.staging, overflow, 0)] if beyond else []))
        if self.ahead_of:  # start later layers' reads before computing this one
            self.start_ahead(x2)
        ids = cache.ids
        masked: list[np.ndarray] = []  # ``masked``: the slots computed at the end, in one pass over the whole cache
        y: Optional[Tensor] = None  # (masked: the output bias is in the masked step's part; no zeros to add to)
        if self.masked:
            masked = [ready]
        else:
            y = self._add(y, cache.store, ids[ready], x2, slots=ready)
        if pre is not None:
            self._land_prefetch(pre)
            if pre[1].size and self.masked:
                masked.append(pre[1])
            elif pre[1].size:
                y = self._add(y, cache.store, ids[pre[1]], x2, slots=pre[1])
        if ahead is not None:
            self._wait(ahead[0])  # (always: the buffer takes layer + depth + 1's guess next)
            buf = e.aheads[self.layer % len(e.aheads)]
            assert ahead_ids is not None and copy is not None and isinstance(cache.store, RowStore)
            if ahead_ids.size:
                y = self._add(y, buf, ahead_ids, x2, slots=np.searchsorted(ahead[1], ahead_ids))
            if copy[0].size:
                t0 = _now_ms()
                for dst, src in zip(cache.store.rows, buf.rows):
                    dst[torch.from_numpy(copy[0])] = src[torch.from_numpy(copy[1])]
                e.meter.mem_ms += _now_ms() - t0
        self._wait(pending)  # (the loads and the rows beyond the cache)
        if upd.load_ids.size:
            rows = self._upload(land, cache.store, upd.load_ids.size, 0 if isinstance(dest, np.ndarray) else dest,
                                upd.dest_slots)
            if self.masked:
                masked.append(upd.dest_slots)
            else:
                y = self._add(y, rows, upd.load_ids, x2, slots=upd.dest_slots)
        biased = False  # the layer's output bias added (by the masked step)
        if self.masked is not None:
            slots = np.concatenate(masked)
            if slots.size:
                part = self.masked(x2, slots, cache.ids[slots])
                y, biased = (part if y is None else y + part.to(y.dtype)), True
        if beyond:
            rows = self._upload(e.staging, e.staging_rows, overflow.size, 0, 0)
            if keep is None:
                y = self._add(y, rows, overflow, x2)
            elif keep.size:
                y = self._add(y, rows, overflow[keep], x2, slots=keep)
        elif overflow.size:
            y = self._stream(x2, overflow, y)
        return self._finish(self._acc(x2) if y is None else y, x, biased)


# ----------------------------------------------------------------------------------------------------------- engine


_F = TypeVar("_F", bound=Callable[..., Any])


def _with_compute_threads(fn: _F) -> _F:
    """Run an ``Engine`` method with torch's intra-op threads at the engine's ``compute_threads``, then put back what
    the process had (torch's thread count is process-wide: an engine only holds it while it computes)."""

    @functools.wraps(fn)
    def run(self: "Engine", *args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(self.compute_threads)
        try:
            return fn(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return cast(_F, run)


class Engine:
    """Load a flash directory for one mode and generate from it (see the module docstring)."""

    # tests: take the accelerator's code path (device rows, host landing buffer, copies) with CPU tensors
    copy_on_cpu: bool = False

    def __init__(
        self, flash_dir: str | Path | FlashDir, config: EngineConfig = EngineConfig(),
        provider: Optional[ActiveSetProvider] = None, observers: Sequence[EngineObserver] = (),
    ) -> None:
        """``provider`` overrides the active-set source of the sparse modes (e.g. a recorded trace); ``observers``
        watch it run (``hooks``)."""
        try:
            self._build(flash_dir, config, provider, observers)
        except BaseException:  # (an engine that failed half-built unpins and closes what it had made)
            self._abandon()
            raise

    def _abandon(self) -> None:
        for name in ("reader", "resident_reader", "stream_reader"):
            r = getattr(self, name, None)
            if r is not None:
                r.close()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.release()

    def _build(self, flash_dir: str | Path | FlashDir, config: EngineConfig, provider: Optional[ActiveSetProvider],
               observers: Sequence[EngineObserver]) -> None:
        if config.mode not in MODES:
            raise LLMFlashError(f"unknown mode {config.mode!r}: use one of {', '.join(MODES)}")
        if config.window < 1:
            raise LLMFlashError("--window must be at least 1")
        if config.cache_policy not in POLICIES:
            raise LLMFlashError(f"unknown cache policy {config.cache_policy!r}: use one of {', '.join(POLICIES)}")
        if not 0 <= config.hot_fraction <= 1:
            raise LLMFlashError("hot_fraction is a fraction of each layer's cache rows, in [0, 1]")
        if config.io_threads < 0 or config.compute_threads < 0:
            raise LLMFlashError("--threads and --compute-threads must be 0 (auto: fit the free cores) or more")
        self.cfg = config
        self.observers: list[EngineObserver] = []
        self._layers_timed = False
        if config.cache_form not in CACHE_FORMS:
            raise LLMFlashError(f"unknown cache form {config.cache_form!r}: use one of {', '.join(CACHE_FORMS)}")
        # where the model computes (``backend``): the CPU, or an accelerator the host copies rows to
        self.backend: Backend = make_backend(config.device, stand_in=self.copy_on_cpu)
        self.device = self.backend.device
        self.fd = fd = flash_dir if isinstance(flash_dir, FlashDir) else open_flash_dir(flash_dir)
        self.accelerator = self.backend.accelerator  # the model computes apart from the host
        dequantize_on_read = fd.layout.quantized and config.cache_form == "compute"
        # the rows computed on are kept apart from those reads land in: on an accelerator, or dequantized on arrival
        self.offload = self.accelerator or dequantize_on_read
        # the layout of those compute rows: the file's, or float rows of the compute dtype (no alignment padding)
        self.row_layout = compute_layout(fd.layout, fd.manifest.compute_dtype) if dequantize_on_read else fd.layout
        if config.masked_compute is None:  # auto (see ``EngineConfig.masked_compute``)
            masked = self.device.type == "cuda" and not self.row_layout.quantized
            self.cfg = config = replace(config, masked_compute=masked)
        if config.lookahead and not config.reuse:
            raise LLMFlashError("lookahead fills the window ahead of a token: it needs reuse between tokens")
        if config.lookahead_depth < 1:
            raise LLMFlashError("--lookahead-depth must be at least 1 (layers whose reads are in flight ahead)")
        large = fd.layout.d_model >= LARGE_D_MODEL
        # what the machine offers now (the cores, the load of other work): sampled before this engine starts anything
        cpu = sense_cpu()
        auto_ahead = config.lookahead is None  # auto: where it was measured to pay (and, below, small caches only)
        if auto_ahead:
            auto = config.mode in SPARSE_MODES and config.reuse and lookahead_pays(cpu, accelerator=self.accelerator)
            self.cfg = config = replace(config, lookahead=auto)
        self._set_threads(cpu, large)
        # (auto: on the CPU only; an accelerator's matmuls keep no memory per shape, and its gathers go to the
        # preallocated ``gather_scratch``)
        self.row_bucket = config.row_bucket if config.row_bucket >= 0 else (256 if large and not self.accelerator else 0)
        row_bytes = max(seg.stride_bytes for seg in fd.layout.segments)  # one read unit of a row
        self.max_gap_rows = config.max_gap_rows if config.max_gap_rows >= 0 else AUTO_GAP_BYTES // row_bytes
        # the native step's library, loaded (built on first use) when the config asks for it and it applies
        self._native_lib = config.native and self.backend.native_ok \
            and config.mode in ("naive", "hybrid", *SPARSE_MODES) and native_library() is not None
        fd.verify_ffn()
        self.tokenizer = fd.tokenizer()
        self.meter = TokenStats()  # the token being computed: FFN modules add their costs to it
        self.step = 0  # index of the token being computed (for the window)
        layout = fd.layout
        self.all_ids = np.arange(layout.d_ffn, dtype=np.int64)
        self.row_range = self.all_ids  # rows [a, b) of a row store: row_range[a:b] (the native step's row lists)
        own = model_rule(self.fd.manifest.config) if self.cfg.sparsity == "auto" else None
        self.thresholds = self._thresholds(own)
        self.threshold_on_act = own is not None and own.on_act  # the model's own rule thresholds |act(gate x)|
        self.gate = self._load_gate()  # a gated model's gate (part of its rule), or None
        self._gate_cache: tuple[int, Optional[Tensor], Optional[Tensor]] = (-1, None, None)  # (layer, x, mask)
        self.reader = FlashReader(fd.ffn_path, n_threads=self.threads.io_threads, align_bytes=layout.align_bytes,
                                  native=config.native_reader, io_uring=config.io_uring,
                                  uring_depth=config.uring_depth, spin_wait_us=self.threads.spin_wait_us)
        self.resident_reader: Optional[FlashReader] = None
        self.provider: Optional[ActiveSetProvider] = None
        budget_bytes = int(config.dram_budget * fd.model_bytes)
        staging_rows = config.staging_rows or (384 if config.mode in SPARSE_MODES else 1024)
        self.staging = RowStore(layout, min(staging_rows, layout.d_ffn), fd.dtype)

        # streamed layers (``layer_stream``): planned before the resident weights are read, which then leave them out
        self.stream: Optional[LayerStream] = None
        self.stream_reader: Optional[FlashReader] = None
        if config.stream_layers < -1:
            raise LLMFlashError("--stream-layers is -1 (auto), 0 (none) or a number of layers")
        if config.stream_layers > 0 and (config.mode not in SPARSE_MODES or self.accelerator):
            raise LLMFlashError("--stream-layers applies to the sparse modes (oracle, predictor) on the CPU")
        stream_plan: Optional[StreamPlan] = None
        index: dict[str, TensorEntry] = {}
        if config.stream_layers != 0 and config.mode in SPARSE_MODES and not self.accelerator:
            # (the oracle's provider reads the FFN rows with their biases, which come with the model: later)
            self.provider = provider if provider is not None else (
                self._make_provider() if config.mode != "oracle" else None)
            index = tensor_index(fd.resident_path)
            stream_plan = self._plan_stream(index, budget_bytes, self.provider)
        # tensors over one aligned buffer (without streamed layers fd.resident_buffer, which naive mode reads into
        # again every token)
        resident = fd.read_resident(stream_holes(index, stream_plan) if stream_plan else ())
        self.resident_buffer = fd.resident_buffer if stream_plan is None else None
        if stream_plan:
            self.stream_reader = FlashReader(fd.resident_path, n_threads=self.threads.io_threads,
                                             native=config.native_reader, io_uring=config.io_uring,
                                             uring_depth=config.uring_depth)
            self.stream = LayerStream(stream_plan, index, self.stream_reader)
            resident.update(self.stream.views())
        self.model, self.adapter, self.biases = build_skeleton(fd, resident)
        if self.stream is not None:
            decoder = self.adapter.layers(self.model)
            for layer in self.stream.plan.layers:
                decoder[layer].register_forward_pre_hook(functools.partial(self._enter_streamed, layer))
        # the KV cache's argument: ``cache`` in newer transformers (which warn on ``past_key_values``), else the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(type(self.model).forward).parameters else "past_key_values"
        # naive on an accelerator copies the resident weights again every token: (host view, device tensor) pairs
        self._resident_pairs = self._move_resident() if self.accelerator else []
        if config.mode != "naive":
            self._resident_pairs = []
        resident_bytes = fd.resident_path.stat().st_size - (sum(stream_plan.layer_bytes) if stream_plan else 0)
        self.staging_rows: RowStore | DeviceRows = self.staging  # what streamed chunks are computed from
        # where the caches' reads land apart from the caches (accelerator, or rows dequantized on arrival): one host
        # buffer, or depth + 1 with lookahead (layer l's reads land in landings[l % n] while layers l + 1 .. l + depth's
        # are in flight)
        self.landings: list[RowStore] = []
        self.dram = {"resident": resident_bytes, "staging": self.staging.nbytes}
        if self.stream is not None:
            self.dram["layer_slots"] = self.stream.nbytes
        self.aheads: list[RowStore] = []  # lookahead on the CPU: the guessed rows beyond the caches (``SparseFFN``)
        self.gather_scratch: Optional[list[Tensor]] = None  # accelerator: preallocated rows for gathered slots
        if self.offload:
            self.staging_rows = DeviceRows(self.row_layout, self.staging.capacity, fd.dtype, self.device)
            self.dram["staging_device"] = self.staging_rows.nbytes
            self.backend.pin(self.staging.buffers)
        mode = config.mode
        # one memory pool and one side stream for every CUDA graph (``masked``, ``graph_step``; they replay in turn)
        graphs = self.device.type == "cuda" and (config.masked_compute or config.native_attention)
        self.graph_pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graph_stream = torch.cuda.Stream(self.device) if graphs else None

        if mode in SPARSE_MODES:
            if self.provider is None:
                self.provider = provider if provider is not None else self._make_provider()
            active = self.provider
            if self.offload and not isinstance(active, GateProvider):
                active.to_device(self.device)
            self.dram["predictors"] = active.nbytes
            reserve = config.working_reserve if config.working_reserve >= 0 else (
                (1.0 if self.accelerator else 4.0) if large and not self._native_lib else 0.0)
            if auto_ahead and config.lookahead and not self._ahead_pays(budget_bytes, reserve, active.layer_demand):
                self.cfg = config = replace(config, lookahead=False)
                self._set_threads(cpu, large)  # (compute threads no longer held to one for the reads ahead)
            depth = min(config.lookahead_depth, max(1, layout.n_layers - 1))
            if config.lookahead and not self.offload:  # depth + 1 host buffers for the guessed rows beyond the caches
                rows = config.lookahead_rows
                if rows < 0:  # auto: the staging buffer's rows, at most a quarter of a layer's and of the budget left
                    spare = budget_bytes - sum(self.dram.values()) - (
                        config.min_cache_rows * layout.n_layers * self.row_layout.neuron_stride_bytes)
                    rows = min(self.staging.capacity, layout.d_ffn // 4,
                               max(0, spare) // (4 * (depth + 1) * layout.neuron_stride_bytes))
                    rows = rows if rows >= config.min_cache_rows else 0
                if rows > 0:
                    self.aheads = [RowStore(layout, min(rows, layout.d_ffn), fd.dtype) for _ in range(depth + 1)]
                    self.dram["lookahead"] = sum(b.nbytes for b in self.aheads)
            if config.masked_compute and self.accelerator:  # the masked step's buffers at most (caches of every row)
                self.dram["masked_buffers"] = layout.n_layers * (layout.d_ffn * MASKED_BYTES_PER_NEURON
                                                                 + 4 * layout.d_model)
            # (landing rows are counted at the cache's row size: at most that, more than a quantized row needs)
            sb = self._sparse_budget(budget_bytes, reserve, active.layer_demand, depth + 1 if config.lookahead else 1)
            self._check_budget(budget_bytes, sb.minimum_bytes)
            plan = sb.plan()
            self.cache_rows = list(plan.cache_rows)
            if plan.reserve_rows and self.accelerator:  # the reserve allocated: the rows gathers copy slots into
                self.gather_scratch = [torch.empty(plan.reserve_rows, seg.stride_bytes // self.row_layout.elem_bytes,
                                                   dtype=storage_dtype(self.row_layout, fd.dtype), device=self.device)
                                       for seg in self.row_layout.segments]
                self.dram["gather_scratch"] = sum(t.numel() * t.element_size() for t in self.gather_scratch)
            elif plan.reserve_rows:
                self.dram["working_reserve"] = plan.reserve_rows * self.row_layout.neuron_stride_bytes  # held back
            if self.offload:
                per = plan.landing_rows // sb.landings
                self.landings = [RowStore(layout, per, fd.dtype) for _ in range(sb.landings)]
                self.dram["landing"] = sum(b.nbytes for b in self.landings)
                for b in self.landings:
                    self.backend.pin(b.buffers)
            sparse = [SparseFFN(self, layer, rows) for layer, rows in enumerate(self.cache_rows)]
            self.dram["neuron_cache"] = sum(m.cache.store.nbytes for m in sparse)
            if "masked_buffers" in self.dram:  # (what they take, within what the plan set aside)
                self.dram["masked_buffers"] = sum(m.masked.nbytes for m in sparse if m.masked)
            if config.lookahead and active.supports_guess:
                self._link_lookahead(sparse, depth)
            modules: list[nn.Module] = list(sparse)
        elif mode == "dense":
            dense = [self._resident_ffn(layer) for layer in range(layout.n_layers)]
            del self.dram["staging"]
            self.dram["ffn_resident"] = sum(self._ffn_bytes(m.w) for m in dense)
            modules = list(dense)
        elif mode == "hybrid":
            self._check_budget(budget_bytes, sum(self.dram.values()))
            layer_payload = dense_layer_bytes(layout, fd.dtype)  # what a resident layer holds (dequantized)
            n_resident = hybrid_resident_layers(budget_bytes, sum(self.dram.values()), layer_payload, layout.n_layers)
            modules = [self._resident_ffn(i) if i < n_resident else StreamedFFN(self, i) for i in range(layout.n_layers)]
            self.dram["ffn_resident"] = layer_payload * n_resident
            self.hybrid_resident_layers = n_resident
        else:  # naive: everything from flash every token
            self._check_budget(budget_bytes, sum(self.dram.values()))
            modules = [StreamedFFN(self, layer) for layer in range(layout.n_layers)]
            self.resident_reader = FlashReader(fd.resident_path, n_threads=self.threads.io_threads,
                                               native=config.native_reader, io_uring=config.io_uring,
                                               uring_depth=config.uring_depth)
            if self.accelerator:  # the resident weights are copied to the accelerator again every token
                self.backend.pin([self.resident_buffer])
        if self.gate is not None and not isinstance(self.provider, GateProvider):
            self.dram["gate"] = int(self.gate.nbytes)
        for layer, m in enumerate(modules):
            self.adapter.install_ffn(self.model, layer, m)
        self.ffn_modules = modules
        layers = self.adapter.layers(self.model)
        self.decode_steps: list[decode_step.LayerStep] = []
        self.graph_steps: list[graph_step.GraphStep] = []
        if config.native_attention and self.accelerator:  # the attention (and predictor) as one graph per layer
            sparse_ffns = {i: m for i, m in enumerate(modules) if isinstance(m, SparseFFN)}
            provider = self.provider
            masks: list[Optional[graph_step.MaskFn]] = [
                _device_mask_fn(provider, i) if i in sparse_ffns and provider is not None else None
                for i in range(len(layers))]
            self.graph_steps = graph_step.install(self.model, layers, pool=self.graph_pool, stream=self.graph_stream,
                                                  device_masks=masks, n_neurons=layout.d_ffn)
            for st in self.graph_steps:
                if st.device_mask is not None:  # (sparse layers only)
                    sparse_ffns[st.idx].graph_step = st
        elif config.native_attention and self.device.type == "cpu":
            self.decode_steps = decode_step.install(self.model, layers, torch.get_num_threads)
        if mode in SPARSE_MODES and config.cache_policy == "hot":
            self.pin_hot_sets(self.calibrate_hot_sets())
        for o in observers:
            self.observe(o)
        self.dram_bytes = sum(self.dram.values())
        log.info("engine %s: DRAM %d of %d model bytes (%s); threads %s", mode, self.dram_bytes, fd.model_bytes,
                 self.dram, self.threads)

    # -- construction helpers

    def native_rows(self, act_bias: Optional[Tensor], threshold: Optional[float]) -> Optional[NativeRows]:
        """A flash layer's native compute (``step.NativeRows``), or None: the Python path (off in the config, not
        built, on an accelerator, or an activation / dtype the kernel lacks). Quantized rows: as stored (int8 / int4,
        dequantized inside the kernel) or, ``cache_form="compute"``, the float rows they were dequantized into."""
        if not self._native_lib:
            return None
        rows = NativeRows.make(self.fd.activation, self.fd.dtype, self.fd.gated, threshold, act_bias,
                               self.threshold_on_act)
        if rows is not None:
            rows.threads = self.native_threads
        return rows

    @property
    def native(self) -> bool:
        """Whether the flash layers compute with the native step."""
        return any(isinstance(m, _FlashFFNBase) and m.native is not None for m in self.ffn_modules)

    def _move_resident(self) -> list[tuple[Tensor, Tensor]]:
        """Accelerator: move the resident model and the FFN biases there. Returns (host view of the resident buffer,
        device tensor) pairs: naive mode copies them again after re-reading the buffer every token."""
        host = dict(self.model.state_dict())
        self.model.to(self.device)
        dev = self.model.state_dict()
        pairs, seen = [], set()
        for name, h in host.items():
            d = dev[name]
            if d.data_ptr() not in seen:
                seen.add(d.data_ptr())
                pairs.append((h, d))
        moved = {}
        for layer, biases in self.biases.items():
            moved[layer] = tuple(None if b is None else b.to(self.device) for b in biases)
            pairs += [(h, d) for h, d in zip(biases, moved[layer]) if h is not None]
        self.biases = moved
        return pairs

    def _plan_stream(self, index: dict[str, TensorEntry], budget_bytes: int,
                     active: Optional[ActiveSetProvider]) -> Optional[StreamPlan]:
        """The streamed layers (``EngineConfig.stream_layers``), or None for none."""
        fd, lay, cfg = self.fd, self.fd.layout, self.cfg
        adapter = adapter_for(fd.config())
        # (the attention's projections only: the norms stay resident, where lookahead's maps read them at start)
        prefixes = [adapter.attention_prefix(layer) for layer in range(lay.n_layers)]

        def plan(m: int) -> StreamPlan:
            return plan_stream(index, prefixes, spread_layers(lay.n_layers, m))

        if cfg.stream_layers > 0:
            m = min(cfg.stream_layers, lay.n_layers)
        else:  # auto: what the budget holds before the caches, as the sparse budget will count it (an estimate)
            fixed = fd.resident_path.stat().st_size + self.staging.nbytes + (active.nbytes if active else 0) + (
                int(self.gate.nbytes) if self.gate is not None and not isinstance(active, GateProvider) else 0)
            demand = active.layer_demand if active else None
            want_rows = max(cfg.min_cache_rows * lay.n_layers,
                            round(sum(demand) * lay.d_ffn) if demand else lay.n_layers * lay.d_ffn // 10)
            m = streamed_layer_count(budget_bytes, fixed, want_rows * self.row_layout.neuron_stride_bytes,
                                     lambda k: plan(k).saved_bytes, lay.n_layers)
        if m == 0:
            return None
        p = plan(m)
        log.info("streaming %d layers' resident weights (%s): %.1f MiB fewer resident, %d slots of %.1f MiB, "
                 "%.1f MiB read per token", len(p.layers), p.layers, sum(p.layer_bytes) / 2**20, p.n_slots,
                 p.slot_bytes / 2**20, p.read_bytes_per_pass / 2**20)
        return p

    def _enter_streamed(self, layer: int, module: nn.Module, args: Any) -> None:
        assert self.stream is not None
        self.meter.io_ms += self.stream.enter(layer)

    def _check_budget(self, budget_bytes: int, minimum: int) -> None:
        if budget_bytes < minimum:
            mb = self.fd.model_bytes
            parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.dram.items() if v)
            raise BudgetError(
                f"--dram-budget {self.cfg.dram_budget:g} ({budget_bytes / 2**20:.1f} MiB) is below the minimum "
                f"{minimum / mb:.3f} ({minimum / 2**20:.1f} MiB of the model's {mb / 2**20:.1f} MiB) for mode "
                f"{self.cfg.mode} ({parts}, plus {self.cfg.min_cache_rows} cached rows per layer in sparse modes)"
            )

    def _set_threads(self, cpu: CpuState, large: bool) -> None:
        """Reader, compute and native-step threads for ``self.cfg`` on ``cpu`` (``threads.choose_threads``; compute
        threads are set while generating/scoring). The native step's: one for small models (a layer's rows are a few
        hundred KB, done in ~0.1-0.2 ms, and a second OpenMP thread spins after each call on the core the reader
        threads need: with it, predictor mode's reads waited 2x longer than the Python path's in
        results/native_step/run_a_native_threads_2), every compute thread for large ones (compute-bound: the scale
        model)."""
        cfg = self.cfg
        self.threads = choose_threads(cpu, sparse=cfg.mode in SPARSE_MODES, large=large, io_threads=cfg.io_threads,
                                      compute_threads=cfg.compute_threads,
                                      lookahead=bool(cfg.lookahead) and not self.accelerator)
        self.compute_threads = self.threads.compute_threads
        self.native_threads = self.compute_threads if large else 1

    def _sparse_budget(self, budget_bytes: int, reserve: float, demand: Optional[Sequence[float]],
                       landings: int) -> SparseBudget:
        """The sparse modes' budget over what the engine holds so far (``self.dram``), at this directory's row size."""
        lay = self.fd.layout
        return SparseBudget(budget_bytes, sum(self.dram.values()), self.row_layout.neuron_stride_bytes, lay.n_layers,
                            lay.d_ffn, self.cfg.min_cache_rows, reserve, self.offload, demand, landings=landings)

    def _ahead_pays(self, budget_bytes: int, reserve: float, demand: Optional[Sequence[float]]) -> bool:
        """Lookahead's auto rule past the CPU's (``threads.lookahead_pays``): only while the caches, planned without it,
        hold fewer rows than a token's expected set (``demand``: each layer's predicted share; unknown: True). With
        caches that hold a token's set, the guessed loads that the token does not need evict the window's rows (1.5-1.6x
        the reads) and its reads are wasted. Measured on this 2-core CPU, lookahead's
        time against none (3 alternating repeats, results/engine_options/auto_lookahead): 0.89x at half the float32
        model, where the caches hold a fifth of a token's set; 1.04x at 60%, 1.14x at 80%, and 1.21x with int8
        resident weights at half the model."""
        if demand is None:
            return True
        try:
            held = sum(self._sparse_budget(budget_bytes, reserve, demand, landings=1).plan().cache_rows)
        except ValueError:  # below the minimum: the budget check reports it
            return True
        return held < sum(demand) * self.fd.layout.d_ffn

    def _link_lookahead(self, modules: list["SparseFFN"], depth: int) -> None:
        """Give each sparse layer l the layers l+1..l+depth it may start reads for, each with the map from l's FFN input
        to a guess of that layer's (the one-layer maps composed)."""
        steps = [lookahead_map(self.adapter, self.model, layer) for layer in range(len(modules) - 1)]
        for layer, m in enumerate(modules):
            scale, shift = torch.ones_like(steps[0][0]), torch.zeros_like(steps[0][1])
            for k in range(1, depth + 1):
                if layer + k >= len(modules):
                    break
                s1, b1 = steps[layer + k - 1]
                scale, shift = scale * s1, shift * s1 + b1  # (x * scale + shift) * s1 + b1
                m.ahead_of.append((modules[layer + k], scale.to(self.device, self.fd.dtype),
                                   shift.to(self.device, self.fd.dtype)))
        self.ahead_upto = 0  # the last layer whose reads the token being computed has started

    def _load_gate(self) -> Optional[PredictorSet]:
        """A gated model's gate, in the form every mode computes it: int8 on the CPU, float16 on an accelerator."""
        path = self.fd.gate_dir() if self.cfg.sparsity == "auto" else None
        if path is None:
            return None
        gate = PredictorSet.load(path, dtype=self.backend.predictor_dtype(ENGINE_DTYPE))
        lay = self.fd.layout
        gate.check_compatible(lay.n_layers, lay.d_model, lay.d_ffn)
        if self.fd.neuron_order is not None:
            gate.permute_outputs(self.fd.neuron_order)
        return gate.to_device(self.device) if self.accelerator else gate

    def gate_mask(self, layer: int, x: Tensor, h: Optional[Tensor] = None) -> Tensor:
        """bool [T, n]: the neurons the gate lets through for the rows of x (file row order); computed once per
        layer and input (the provider and every chunk of the layer's compute share it)."""
        assert self.gate is not None
        cached_layer, cached_x, mask = self._gate_cache
        if cached_layer != layer or cached_x is not x or mask is None:
            mask = self.gate.predict(layer, x.reshape(-1, x.shape[-1]))
            self._gate_cache = (layer, x, mask)
        return mask

    def _rule_kind(self) -> str:
        return "threshold" if any(t is not None for t in self.thresholds) else "relu"

    def _thresholds(self, own: Optional[SparsityRule]) -> list[Optional[float]]:
        """Per-layer thresholds of the configured rule (``own``: the model's own rule, resolved for ``auto``)."""
        n = self.fd.layout.n_layers
        if self.cfg.sparsity == "auto":
            return list(own.thresholds) if own is not None and own.thresholds else [None] * n
        if self.cfg.sparsity == "relu":
            return [None] * n
        if self.cfg.sparsity != "threshold":
            raise LLMFlashError(f"unknown sparsity {self.cfg.sparsity!r}: use auto, relu or threshold")

        thresholds = threshold_rule(stored_thresholds(self.fd), self.cfg.threshold_sparsity).thresholds
        assert thresholds is not None
        return list(thresholds)

    def _layer_rows(self, layer: int, parts: tuple[str, ...]) -> FFNWeights:
        """A layer's weights read once from flash (direct I/O) into compact DRAM tensors (padding dropped)."""
        store = RowStore(self.fd.layout, self.fd.layout.d_ffn, self.fd.dtype)
        for seg, buf in zip(self.fd.layout.segments, store.buffers):
            if set(seg.parts) & set(parts):
                fo, nb, do = read_plan(seg, layer, self.all_ids, 0, self.cfg.max_read_bytes)
                self.reader.read(buf, fo, nb, do)
        w = ffn_weights_from_rows(self.fd, store.rows, self.biases[layer])

        def keep(name: str, t: Optional[Tensor]) -> Optional[Tensor]:
            return t.to(self.device).contiguous() if (t is not None and name in parts) else None

        # the oracle's copy holds gate/up only: its ``down`` is None (FFNWeights types the full layer's)
        return FFNWeights(keep("gate", w.gate), keep("up", w.up), keep("down", w.down),  # type: ignore[arg-type]
                          w.act_bias, w.out_bias)

    @staticmethod
    def _ffn_bytes(w: FFNWeights) -> int:
        return sum(t.numel() * t.element_size() for t in (w.gate, w.up, w.down) if t is not None)

    def _resident_ffn(self, layer: int) -> DenseFFN:
        return DenseFFN(layer, self._layer_rows(layer, ("gate", "up", "down")), self.fd.activation, self.thresholds[layer],
                        mask_fn=self.gate_mask if self.gate is not None else None, on_act=self.threshold_on_act)

    def _make_provider(self) -> ActiveSetProvider:
        if self.cfg.mode == "oracle":
            parts = ("gate", "up") if self.fd.gated else ("up",)
            weights = [self._layer_rows(layer, parts) for layer in range(self.fd.layout.n_layers)]
            provider = OracleProvider(weights, self.fd.activation, self.thresholds,
                                      self.gate_mask if self.gate is not None else None, self.threshold_on_act)
            self.oracle_bytes = sum(self._ffn_bytes(w) for w in weights)  # outside the budget (docs/cli.md)
            return provider
        if not self.cfg.predictors and self.gate is not None:  # a gated model predicts with its own gate
            return GateProvider(self.gate, self.gate_mask)
        predictors = self.cfg.predictors or default_predictors(self.fd.manifest.model.source)
        if not predictors:
            raise LLMFlashError(f"--mode predictor needs --predictors PATH: {self.fd.name} has no default predictors "
                                "(train them with `llmflash collect` + `llmflash train-predictors`)")
        if self.cfg.predictor_dtype not in PREDICTOR_DTYPES:
            raise LLMFlashError(f"unknown predictor dtype {self.cfg.predictor_dtype!r}: use one of {', '.join(PREDICTOR_DTYPES)}")
        dtype = ENGINE_DTYPE if self.cfg.predictor_dtype == "int8" else getattr(torch, self.cfg.predictor_dtype)
        held = self.backend.predictor_dtype(dtype)
        if held != dtype:
            log.info("%s predictors have no kernel on %s: holding them in %s", self.cfg.predictor_dtype, self.device, held)
            dtype = held
        p = PredictorSet.load(predictor_dir(predictors), dtype=dtype)
        lay = self.fd.layout
        p.check_compatible(lay.n_layers, lay.d_model, lay.d_ffn, self.fd.name, rule_kind=self._rule_kind())
        if self.fd.neuron_order is not None:  # a reordered file (`llmflash reorder`): predict its rows directly
            p.permute_outputs(self.fd.neuron_order)
        return PredictorProvider(p)

    # -- cache policies

    def calibrate_hot_sets(self) -> list[np.ndarray]:
        """Per sparse layer: its ``hot_fraction`` * cache rows most frequently needed neurons, counted over the decode
        steps of ``HOT_CALIBRATION_TEXT`` (its first ``hot_calibration_tokens`` tokens) run through this engine."""
        counter = _NeedCounter(self.fd.layout.n_layers, self.fd.layout.d_ffn)
        ids = self.tokenizer(HOT_CALIBRATION_TEXT, return_tensors="pt").input_ids[0][: self.cfg.hot_calibration_tokens + 1]
        self.observers.append(counter)
        try:
            self.score(ids)
        finally:
            self.observers.remove(counter)
            self.reset()
        sizes = [int(self.cfg.hot_fraction * m.cache.capacity) for m in self.ffn_modules if isinstance(m, SparseFFN)]
        log.info("hot sets from %d calibration tokens: %s neurons per layer", ids.numel() - 1, sizes)
        return hot_sets(counter.counts, sizes)

    def pin_hot_sets(self, sets: Sequence[np.ndarray]) -> None:
        """Give each sparse layer a ``HotPolicy`` pinning ``sets[layer]`` (neuron ids in file row order); the caches
        are emptied, and the hot rows are read when each cache next fills."""
        for m, hot in zip([m for m in self.ffn_modules if isinstance(m, SparseFFN)], sets):
            m.drain()
            m.cache.clear()
            m.cache.policy = HotPolicy(self.cfg.window, hot, self.fd.layout.d_ffn)

    # -- running

    def _reread_resident(self) -> None:
        """naive: the resident weights come from flash again (into the same buffer: identical bytes)."""
        assert self.resident_reader is not None
        size = self.fd.resident_path.stat().st_size
        buf = self.resident_buffer
        assert buf is not None  # read_resident ran at construction
        chunk = 1 << 20
        offs = np.arange(0, size, chunk, dtype=np.int64)
        nb = np.minimum(chunk, ((size - offs + 4095) // 4096) * 4096).astype(np.int64)
        for o in self.observers:
            o.reads_issued("resident", nb)
        t0 = _now_ms()
        self.resident_reader.read(buf, offs, nb, offs)
        dt = _now_ms() - t0
        self.meter.io_ms += dt
        self.meter.read_ms += dt
        if self._resident_pairs:  # accelerator: and on to its memory
            t0 = _now_ms()
            for h, d in self._resident_pairs:
                d.copy_(h)
            self.backend.sync()
            self.meter.mem_ms += _now_ms() - t0

    def reader_totals(self) -> tuple[int, int]:
        """(bytes, reads) the flash readers (FFN file; naive mode's resident file; streamed layers') have returned so far."""
        b, r = self.reader.stats.bytes_read, self.reader.stats.reads
        for extra in (self.resident_reader, self.stream_reader):
            if extra is not None:
                b += extra.stats.bytes_read
                r += extra.stats.reads
        return b, r

    @torch.inference_mode()
    def _forward(self, ids: Tensor, cache: Any) -> Tensor:
        logits = self.model(input_ids=ids, **{self._cache_arg: cache}, use_cache=True).logits[0, -1]
        for o in self.observers:
            o.forward_done(self.step)
        return logits

    def reset(self) -> None:
        for m in self.ffn_modules:
            if isinstance(m, SparseFFN):
                m.drain()
                m.cache.clear()
        self.meter = TokenStats()
        self.step = 0

    def _prefill(self, ids: Tensor, cache: Any) -> Tensor:
        """The prompt's forward (a method of its own: a sampling profile tells it from the tokens' steps)."""
        logits = self._forward(ids, cache)
        self.backend.sync()
        return logits

    @_with_compute_threads
    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int = 64, stop_at_eos: bool = True) -> GenerationResult:
        """Greedy decoding, batch 1. ``prompt_ids``: [L] token ids."""
        from transformers import DynamicCache

        self.reset()
        cache = DynamicCache()
        ids = prompt_ids.view(1, -1).to(self.device)
        t0 = _now_ms()
        logits = self._prefill(ids, cache)
        prefill_ms = _now_ms() - t0
        eos = self.tokenizer.eos_token_id
        tokens: list[int] = []
        stats: list[TokenStats] = []
        for step in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            if stop_at_eos and nxt == eos:
                break
            if step == max_new_tokens - 1:
                break
            self.meter = m = TokenStats()
            self.step = step + 1
            b0, r0 = self.reader_totals()
            t0 = _now_ms()
            if self.resident_reader is not None:
                self._reread_resident()
            logits = self._forward(torch.tensor([[nxt]], device=self.device), cache)
            self.backend.sync()
            total = _now_ms() - t0 - m.excluded_ms
            b1, r1 = self.reader_totals()
            m.finish(total_ms=total, bytes_read=b1 - b0, reads=r1 - r0,
                     cached_neurons=sum(f.cache.count for f in self.ffn_modules if isinstance(f, SparseFFN)))
            stats.append(m)
            for o in self.observers:
                o.token_done(self.step, m)
        return GenerationResult(
            mode=self.cfg.mode, model=self.fd.name, prompt_tokens=int(ids.shape[1]), tokens=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True), dram_bytes=self.dram_bytes,
            model_bytes=self.fd.model_bytes, prefill_ms=prefill_ms, per_token=stats, dram_breakdown=dict(self.dram),
            config=asdict(self.cfg) | {"compute_threads": self.compute_threads, "io_threads": self.threads.io_threads,
                                       "row_bucket": self.row_bucket, "max_gap_rows": self.max_gap_rows,
                                       "native_step": self.native,
                                       "streamed_layers": list(self.stream.plan.layers) if self.stream else [],
                                       "n_layers": self.fd.layout.n_layers,
                                       "native_reader": self.reader.native, "io_uring": self.reader.uring,
                                       "native_plans": self.reader.native and self.cfg.native_plans,
                                       "busy": self.threads.busy, "spin_wait_us": self.threads.spin_wait_us,
                                       "load_cores": self.threads.load_cores, "cores": self.threads.cores},
        )

    @_with_compute_threads
    @torch.inference_mode()
    def score(self, ids: Tensor) -> Tensor:
        """Log-probabilities of ``ids[1:]`` computed token by token through the engine's decode path. [L-1]."""
        from transformers import DynamicCache

        self.reset()
        cache = DynamicCache()
        out = []
        ids = ids.view(-1).to(self.device)
        logits = self._forward(ids[:1].view(1, 1), cache)
        for i in range(1, ids.numel()):
            out.append(torch.log_softmax(logits.float(), -1)[ids[i]])
            self.step = i
            if self.resident_reader is not None:
                self._reread_resident()
            logits = self._forward(ids[i : i + 1].view(1, 1), cache)
        return torch.stack(out).cpu()

    def observe(self, observer: EngineObserver) -> None:
        """Attach an observer (``hooks``); per-layer timing is only taken once one asks for it."""
        self.observers.append(observer)
        if not self._layers_timed and type(observer).layer_done is not EngineObserver.layer_done:
            self._layers_timed = True
            for layer, m in enumerate(self.ffn_modules):
                m.register_forward_pre_hook(self._layer_started)
                m.register_forward_hook(functools.partial(self._layer_finished, layer))

    def _layer_started(self, module: nn.Module, args: Any) -> None:
        self._layer_t0 = _now_ms()

    def _layer_finished(self, layer: int, module: nn.Module, args: Any, output: Any) -> None:
        ms = _now_ms() - self._layer_t0
        for o in self.observers:
            o.layer_done(layer, ms)

    def close(self) -> None:
        """Close the readers and drop the model, caches and staging buffers now (FFN modules refer back to the
        engine, so without this their buffers would wait for the garbage collector)."""
        self.reader.close()
        if self.stream is not None:
            self.stream.drain()
        for extra in (self.resident_reader, self.stream_reader):
            if extra is not None:
                extra.close()
        self.backend.release()
        self.model = None
        self.ffn_modules = []
        self.provider = None


def _device_mask_fn(provider: ActiveSetProvider, layer: int) -> graph_step.MaskFn:
    """Layer ``layer``'s predictor network as the fixed decode step captures it (``ActiveSetProvider.device_mask``)."""
    def fn(x: Tensor) -> Optional[Tensor]:
        return provider.device_mask(layer, x)
    return fn


class _NeedCounter(EngineObserver):
    """Times each neuron was needed per layer, over decode steps (lookahead guesses not counted)."""

    def __init__(self, n_layers: int, d_ffn: int) -> None:
        self.counts = [np.zeros(d_ffn, dtype=np.int64) for _ in range(n_layers)]

    def cache_updated(self, layer: int, update: CacheUpdate) -> None:
        if update.need is not None and update.hits + update.misses:
            self.counts[layer][update.need] += 1


def lookahead_map(adapter: Adapter, model: HFModel, layer: int) -> tuple[Tensor, Tensor]:
    """(scale, shift) [d], float32: ``x * scale + shift`` turns layer ``layer``'s FFN input into a guess of layer + 1's.

    x = n(h) * w0 + b0, so n(h) = (x - b0) / w0 and the guess is n(h) * w1 + b1 (the residual stream h taken as
    unchanged); an adapter that does not know its norms gives the identity.
    """
    (w0, b0), (w1, b1) = adapter.ffn_input_norm(model, layer), adapter.ffn_input_norm(model, layer + 1)
    d = adapter.ffn_spec(model.config).d_model
    if w0 is None or w1 is None:
        return torch.ones(d), torch.zeros(d)
    w0 = w0.float()
    w0 = w0.where(w0.abs() > 1e-6, torch.full_like(w0, 1e-6))
    scale = w1.float() / w0
    b0f, b1f = (w0.new_zeros(d) if b is None else b.float() for b in (b0, b1))
    return scale.cpu(), (b1f - b0f * scale).cpu()
