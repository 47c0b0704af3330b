"""A fixed decode step on an accelerator: each decoder layer's attention over a static key/value buffer, captured as
one CUDA graph per layer (gpt-fast's recipe), the predictor's network inside it.

transformers computes a decode step's attention in 15-30 small kernel launches per layer, each 10-60 us of host time
on the GPU machine, while the GPU's own work per layer is a few microseconds (results/gpu_scale: the scale model's
compute was host-bound). Batch 1, one token: every shape is fixed once the keys and values live in a preallocated
buffer of ``capacity`` positions and the token's position is data (a device tensor, not a Python int), so the step
is captured once and replayed::

    x, position <- fixed input tensors (position from a page-locked host buffer, copied in by the graph)
    OPT:    xn = LN1(x); q, k, v = Wq xn * scaling, Wk xn, Wv xn
    Llama:  xn = norm_in(x); q, k, v = Wq xn, Wk xn, Wv xn; rotary q, k (cos, sin copied in like x)
    K[:, :, position], V[:, :, position] = k, v           (index_copy_: the buffer is the cache)
    o = softmax(q K^T * scale + mask(positions <= position)) V  (grouped heads: SDPA's enable_gqa)
    h = x + Wo o;  xn2 = norm_ffn(h)
    mask_host <- provider.device_mask(layer, xn2)          (sparse modes, a provider whose network is device ops)

then, outside the graph, ``h + ffn(xn2)`` with the engine's FFN module (dense, or the sparse step that waits for
the predictor's mask, reads the new rows and computes: ``engine.SparseFFN``). transformers' ``DynamicCache`` stays
the source of truth for everything else: the first step after a prefill copies its keys and values into the buffer,
and after every step its layer holds views of the buffer (``keys = K[:, :, :n]``), so its length (which positions the
model computes) stays right at no cost; a step through transformers' own forward (a prefill, a mask, anything this
does not take) replaces the views with new tensors, and the next step copies them in again. The buffer grows by
``CHUNK`` positions when full (a new graph). On the CPU (the accelerator's stand-in path in tests) the same body runs
eagerly from the same buffers. Results equal transformers' within rounding (``tests/test_graph_step.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

CHUNK = 64  # positions the key/value buffer grows by (a new graph each time)
LLAMA_TYPES = ("llama", "mistral", "qwen2")  # the native decode step's family (``decode_step.MODEL_TYPES``)
MaskFn = Callable[[Tensor], Optional[Tensor]]  # xn [1, d] -> bool [1, n] on the device (device ops only), or None


def _kind(config: Any, layer: Any) -> Optional[str]:
    """``opt`` / ``llama`` where this step computes the layer exactly, else None."""
    mt = getattr(config, "model_type", None)
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        return None
    if mt == "opt":
        ok = getattr(config, "do_layer_norm_before", True) and all(
            hasattr(layer, n) for n in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "activation_fn"))
        return "opt" if ok and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")) else None
    if mt in LLAMA_TYPES:
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return None
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return None
        return "llama" if all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")) else None
    return None


def capture(body: Callable[[], Any], device: torch.device, pool: Any = None, stream: Any = None) -> tuple[Any, Any]:
    """``body`` warmed up once on a side stream (``stream``, else a new one), then captured there as a CUDA graph in
    ``pool`` (torch.cuda.graph's recipe). Returns (the graph, body's outputs: overwritten by each replay).

    The device tensors among the outputs are copied, inside the graph, into tensors allocated outside any capture.
    Graphs captured into one pool may be handed memory that graphs captured earlier freed during their capture and
    still write on every replay; an output left there would be overwritten by such a graph replaying before it is
    read (the decode step's outputs are read after the masked step's graph of the same layer has replayed, and a step
    captured again when its key/value buffer grows comes after that graph: tests/test_graph_step.py's CUDA test)."""
    side = stream if stream is not None else torch.cuda.Stream(device=device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        warm = body()
    main.wait_stream(side)
    single = isinstance(warm, Tensor)
    kept = [_kept_like(t) for t in ((warm,) if single else warm)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        outs = body()
        outs = (outs,) if single else outs
        for dst, src in zip(kept, outs):
            if dst is not None:
                dst.copy_(src)
    final = tuple(dst if dst is not None else src for dst, src in zip(kept, outs))
    return graph, final[0] if single else final


def _kept_like(t: Any) -> Optional[Tensor]:
    """A tensor outside the graphs' pool for a device tensor output (``capture``), else None (host tensors, None)."""
    return torch.empty_like(t) if isinstance(t, Tensor) and t.device.type == "cuda" else None


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class GraphStep:
    """One decoder layer's ``forward`` with the fixed decode step in front of transformers' own."""

    def __init__(self, layer: Any, layer_idx: int, config: Any, kind: str, pool: Any = None, stream: Any = None,
                 device_mask: Optional[MaskFn] = None, mask_neurons: int = 0) -> None:
        """``device_mask``: the layer's predictor network as device ops, its mask over ``mask_neurons`` neurons copied
        out by the graph (sparse modes)."""
        self.layer, self.idx, self.kind = layer, layer_idx, kind
        self.orig: Callable[..., Any] = layer.forward
        attn = layer.self_attn
        self.d = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.hd = int(getattr(attn, "head_dim", None) or self.d // self.n_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads) if kind == "llama" else self.n_heads
        self.pool, self.stream = pool, stream
        self.device_mask = device_mask if mask_neurons else None
        self.mask_neurons = mask_neurons
        self.tuple_out: Optional[bool] = None  # transformers' layer returns a tuple (older versions) or a tensor
        self.capacity = 0
        self.k: Optional[Tensor] = None  # [1, n_kv, capacity, hd]
        self.v: Optional[Tensor] = None
        self.graph: Optional[Any] = None  # torch.cuda.CUDAGraph
        self.outs: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None  # h, xn2, mask: the graph's outputs
        self.mask_host: Optional[Tensor] = None  # bool [1, n]: the predictor's mask, copied out by the graph
        self.mask_ready: Optional[Any] = None  # torch.cuda.Event recorded after each replay
        self.pending_mask: Optional[Tensor] = None  # this step's mask (host, bool [1, n]) until the FFN takes it
        self._weights: tuple = ()
        self._tensors: Optional[list[Tensor]] = None
        self.steps = 0  # decode steps taken through the buffer (tests)
        self.captures = 0  # graphs captured (tests)

    # -- buffers

    def _alloc(self, like: Tensor, n: int) -> None:
        """Buffers for at least ``n`` positions (and the step's fixed inputs), on ``like``'s device and dtype."""
        cap = -(-n // CHUNK) * CHUNK
        dev, dt = like.device, like.dtype
        k = torch.zeros(1, self.n_kv, cap, self.hd, device=dev, dtype=dt)
        v = torch.zeros_like(k)
        if self.k is not None and self.v is not None:  # (growing: what was there stays)
            k[:, :, : self.capacity].copy_(self.k)
            v[:, :, : self.capacity].copy_(self.v)
        self.k, self.v, self.capacity = k, v, cap
        pinned = dev.type == "cuda"
        self.x = torch.zeros(1, 1, self.d, device=dev, dtype=dt)
        self.pos_host = torch.zeros(1, dtype=torch.int64, pin_memory=pinned)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.positions = torch.arange(cap, device=dev)
        self.cos = torch.zeros(1, 1, self.hd, device=dev, dtype=dt)
        self.sin = torch.zeros_like(self.cos)
        self.graph, self.outs = None, None

    # -- the step

    def _body(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        layer, attn = self.layer, self.layer.self_attn
        assert self.k is not None and self.v is not None
        self.pos.copy_(self.pos_host, non_blocking=True)
        x = self.x  # [1, 1, d]
        if self.kind == "opt":
            xn = layer.self_attn_layer_norm(x)
            q = attn.q_proj(xn) * attn.scaling
            scale = 1.0
        else:
            xn = layer.input_layernorm(x)
            q = attn.q_proj(xn)
            scale = float(attn.scaling)
        q = q.view(1, 1, self.n_heads, self.hd).transpose(1, 2)  # [1, H, 1, hd]
        k = attn.k_proj(xn).view(1, 1, self.n_kv, self.hd).transpose(1, 2)
        v = attn.v_proj(xn).view(1, 1, self.n_kv, self.hd).transpose(1, 2)
        if self.kind == "llama":
            cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)  # [1, 1, 1, hd]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        self.k.index_copy_(2, self.pos, k.to(self.k.dtype))
        self.v.index_copy_(2, self.pos, v.to(self.v.dtype))
        seen = (self.positions <= self.pos).view(1, 1, 1, -1)
        o = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=seen, scale=scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        o = o.transpose(1, 2).reshape(1, 1, self.n_heads * self.hd)
        if self.kind == "opt":
            h = x + attn.out_proj(o)
            xn2 = layer.final_layer_norm(h)
        else:
            h = x + attn.o_proj(o)
            xn2 = layer.post_attention_layernorm(h)
        mask = None
        if self.device_mask is not None and self.mask_host is not None:
            m = self.device_mask(xn2.reshape(1, self.d))
            if m is not None:
                self.mask_host.copy_(m.reshape(self.mask_host.shape), non_blocking=True)
                mask = self.mask_host
        return h, xn2, mask

    def _run(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The step on the current inputs: eagerly (CPU; a GPU's first step with these buffers, which warms the
        libraries up), then captured (``capture``) and replayed."""
        if self.x.device.type != "cuda" or self.graph is None and self.outs is None:
            self.outs = self._body()
            return self.outs
        if self.graph is None:
            self.graph, self.outs = capture(self._body, self.x.device, self.pool, self.stream)
            self.captures += 1
        self.graph.replay()
        assert self.outs is not None
        return self.outs

    def _weights_key(self) -> tuple:
        """The addresses of every weight the step reads (its tensors looked up once: a module walk per call cost
        ~70 us on the GPU machine's host)."""
        if self._tensors is None:
            layer = self.layer
            mods = [layer.self_attn] + [getattr(layer, n) for n in (
                ("self_attn_layer_norm", "final_layer_norm") if self.kind == "opt"
                else ("input_layernorm", "post_attention_layernorm"))]
            self._tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
        return tuple(t.data_ptr() for t in self._tensors)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden: Any = args[0] if args else kwargs.get("hidden_states")
        cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        entry = layers[self.idx] if isinstance(layers, list) and self.idx < len(layers) else None
        pe: Any = kwargs.get("position_embeddings")
        fast = (len(args) <= 1 and isinstance(hidden, Tensor) and hidden.shape[:-1] == (1, 1)
                and self.tuple_out is not None and kwargs.get("attention_mask") is None and entry is not None
                and isinstance(getattr(entry, "keys", None), Tensor) and entry.keys.dim() == 4
                and entry.keys.shape[-2] > 0 and not torch.is_grad_enabled() and not self.layer.training
                and (self.kind == "opt" or (isinstance(pe, tuple) and len(pe) == 2 and pe[0].numel() == self.hd)))
        self.pending_mask = None
        if not fast:
            out = self.orig(*args, **kwargs)
            self.tuple_out = isinstance(out, tuple)
            return out
        assert entry is not None
        keys, values = entry.keys, entry.values
        n = int(keys.shape[-2])  # positions cached: this token goes to position n
        if keys.dtype != hidden.dtype or tuple(keys.shape[:2]) != (1, self.n_kv):
            return self.orig(*args, **kwargs)
        if self.k is None or keys.dtype != self.k.dtype or keys.device != self.k.device:
            self.k = self.v = None
            self._alloc(keys, n + 1)
        elif n + 1 > self.capacity:
            self._alloc(keys, n + 1)
        assert self.k is not None and self.v is not None
        if keys.data_ptr() != self.k.data_ptr():  # (after a prefill, or a step through transformers: copy in)
            self.k[:, :, :n].copy_(keys)
            self.v[:, :, :n].copy_(values)
        key = self._weights_key()
        if key != self._weights:  # (weights moved: the graph computes on the old addresses)
            self._weights, self.graph, self.outs = key, None, None
        if self.device_mask is not None and self.mask_host is None:  # (made before the graph that writes it)
            pinned = hidden.device.type == "cuda"
            self.mask_host = torch.zeros(1, self.mask_neurons, dtype=torch.bool, pin_memory=pinned)
            self.mask_ready = torch.cuda.Event() if pinned else None
        self.x.copy_(hidden)
        if self.kind == "llama":
            self.cos.copy_(pe[0].reshape(1, 1, self.hd))
            self.sin.copy_(pe[1].reshape(1, 1, self.hd))
        self.pos_host[0] = n
        h, xn2, mask = self._run()
        if mask is not None and self.mask_ready is not None:
            self.mask_ready.record()
        entry.keys = self.k[:, :, : n + 1]
        entry.values = self.v[:, :, : n + 1]
        self.steps += 1
        self.pending_mask = mask
        layer = self.layer
        if self.kind == "opt":
            y = layer.fc2(layer.activation_fn(layer.fc1(xn2.reshape(1, self.d))))
            out = (h.reshape(1, self.d) + y).view(1, 1, self.d)
        else:
            out = h + layer.mlp(xn2)
        return (out,) if self.tuple_out else out

    def take_mask(self) -> Optional[Tensor]:
        """The predictor's mask of the step in progress (host; waits for the graph's copy), once; None without one."""
        m, self.pending_mask = self.pending_mask, None
        if m is not None and self.mask_ready is not None:
            self.mask_ready.synchronize()
        return m


def install(model: Any, layers: list[Any], pool: Any = None, stream: Any = None,
            device_masks: Optional[list[Optional[MaskFn]]] = None, n_neurons: int = 0) -> list[GraphStep]:
    """Put ``GraphStep`` in front of every supported decoder layer's ``forward``. ``device_masks[i]``: layer i's
    predictor network as device ops (its mask over ``n_neurons`` copied out by the graph), or None. Returns the
    steps installed (none for other architectures)."""
    config = model.config
    steps = []
    for i, layer in enumerate(layers):
        kind = _kind(config, layer)
        if kind is None:
            continue
        fn = device_masks[i] if device_masks is not None and i < len(device_masks) else None
        step = GraphStep(layer, i, config, kind, pool=pool, stream=stream, device_mask=fn, mask_neurons=n_neurons)
        layer.forward = step  # (an instance attribute: nn.Module.__call__ still runs the layer's hooks around it)
        steps.append(step)
    log.debug("graph decode step on %d of %d layers", len(steps), len(layers))
    return steps
