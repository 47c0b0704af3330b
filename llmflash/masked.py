"""One layer's FFN over its whole device cache, the rows not needed masked to zero (``EngineConfig.masked_compute``),
as one CUDA graph per layer.

Every shape is fixed (the cache's capacity), so the step can be captured once and replayed: what changes from token
to token is written on the host into page-locked buffers (which slots are needed, their neurons' activation biases)
and the token's input into a fixed device tensor; the graph copies the two host buffers in and computes::

    mask, bias <- host (page-locked)                      [capacity] each, float32
    h = act(A x + bias) (* (U x), gated) (rule) * mask    A, U, D: the cache's rows, [capacity, d] views
    y = h D (+ the layer's output bias)                   -> a fixed output tensor [1, d]

one launch per layer instead of about thirteen (mask and bias index writes, the index upload, the matmuls and the
elementwise steps; on the H200 host each costs 10-40 us of host time: results/gpu_scale). A slot's bias only matters
where the mask is set, so the needed slots' biases are rewritten every call (a few microseconds of numpy). The first
call computes eagerly (warming up the libraries' workspaces), the second captures; the output is overwritten by the
layer's next replay (the next token), after the decoder layer has added it to its residual. On the CPU (the
accelerator's stand-in path in tests) the same body runs eagerly, from the same buffers.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .cache import DeviceRows
from .ffn import ffn_output, neuron_outputs
from .graph_step import capture

# bytes per neuron the buffers take at most: the activation bias's host copy, each slot's mask and bias on the host
# and on the device (float32 each; a cache has at most one slot per neuron)
MASKED_BYTES_PER_NEURON = 4 + 4 * 4


class MaskedRows:
    """The masked step of one layer's device cache ``store`` (float rows)."""

    def __init__(self, store: DeviceRows, gated: bool, act: Callable[[Tensor], Tensor], threshold: Optional[float],
                 on_act: bool, act_bias: Optional[Tensor], out_bias: Optional[Tensor], pool: Any = None,
                 stream: Any = None) -> None:
        """``pool``, ``stream``: the memory pool and the side stream every layer's graph is captured in (one each for
        the engine: a stream of its own per layer would get a cuBLAS workspace of its own)."""
        device = store.rows[0].device
        cap, d = store.capacity, store.layout.d_model
        pinned = device.type == "cuda"
        self.store, self.gated, self.act, self.threshold, self.on_act = store, gated, act, threshold, on_act
        self.out_bias = out_bias
        self.graphs = device.type == "cuda"  # (elsewhere the same body runs eagerly)
        self.pool = pool
        self.stream = stream
        self.mask_host = torch.zeros(cap, dtype=torch.float32, pin_memory=pinned)
        self.mask_np = self.mask_host.numpy()
        self.mask_dev = torch.zeros(cap, dtype=torch.float32, device=device)
        # the activation bias of each neuron (host copy, float32) and of each slot's neuron
        self.act_bias_np = None if act_bias is None else act_bias.detach().float().cpu().numpy()
        self.bias_host = None if act_bias is None else torch.zeros(cap, dtype=torch.float32, pin_memory=pinned)
        self.bias_np = None if self.bias_host is None else self.bias_host.numpy()
        self.bias_dev = None if act_bias is None else torch.zeros(cap, dtype=torch.float32, device=device)
        self.x = torch.zeros(1, d, dtype=store.dtype, device=device)
        self.graph: Optional[Any] = None  # torch.cuda.CUDAGraph once captured
        self.out: Optional[Tensor] = None  # the graph's output [1, d]
        self.calls = 0

    @property
    def nbytes(self) -> int:
        """Host and device bytes of the buffers (not the cache's rows)."""
        ts = [self.mask_host, self.mask_dev, self.x] + [t for t in (self.bias_host, self.bias_dev) if t is not None]
        host = 0 if self.act_bias_np is None else self.act_bias_np.nbytes
        return host + sum(t.numel() * t.element_size() for t in ts)

    def _body(self) -> Tensor:
        store = self.store
        self.mask_dev.copy_(self.mask_host, non_blocking=True)
        bias = None
        if self.bias_dev is not None and self.bias_host is not None:
            self.bias_dev.copy_(self.bias_host, non_blocking=True)
            bias = self.bias_dev.to(store.dtype)
        a = store.view("gate" if self.gated else "up")
        u = store.view("up") if self.gated else None
        h = neuron_outputs(self.x, a, u, bias, self.act, self.threshold, self.on_act) * self.mask_dev.to(a.dtype)
        return ffn_output(h, store.view("down"), self.out_bias)

    def __call__(self, x: Tensor, slots: np.ndarray, ids: np.ndarray) -> Tensor:
        """The contribution [1, d] (store dtype, the layer's output bias included) of the cached rows ``slots``
        holding neurons ``ids``, for one token's FFN input x [1, d]."""
        self.mask_np[:] = 0.0
        self.mask_np[slots] = 1.0
        if self.bias_np is not None and self.act_bias_np is not None:
            self.bias_np[slots] = self.act_bias_np[ids]
        self.x.copy_(x)
        self.calls += 1
        if not self.graphs or self.calls == 1:  # (the first call on a GPU warms up eagerly)
            return self._body()
        if self.graph is None:
            self.graph, self.out = capture(self._body, self.x.device, self.pool, self.stream)
        self.graph.replay()
        assert self.out is not None
        return self.out
