"""Error-aware rounding of the FFN rows at convert time (GPTQ, Frantar et al. 2022) for the int8 and int4 flash
formats.

Round-to-nearest (``quant.quantize``) rounds every weight on its own. GPTQ quantizes a linear layer's input columns
one at a time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian ``H = X^T X`` of the layer's inputs, so that the layer's output on real inputs moves as little as possible.
The codes and float16 scales it returns are in ``quant``'s format (same groups, same clipping search for the scales),
so the flash directory, the engine and the native step do not change: only which codes are stored.

The three parts of an FFN, as stored (every part a row per neuron, groups of ``group_size`` values along d_model):

- gate and up, ``W [d_ffn, d_model]``: the inputs are the FFN's input x; the columns processed in order are
  d_model's, so a group's scales are chosen (per row, the clipping search on the current values) when its first
  column is reached;
- down, stored as its transpose ``[d_ffn, d_model]``: the inputs are the neurons' outputs h (after the model's own
  sparsity rule); the columns processed are neurons, each one a stored row whose own groups get their scales when it
  is reached.

``collect_hessians`` runs the model on calibration text to accumulate both Hessians per layer (``convert`` uses
``SOURCES``, half of its tokens each).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import install_dense_ffns
from .ffn import FFNWeights, SparsityRule
from .quant import check_shape, dequantize, group_scales, pack, qmax, qmin, safe_div

log = logging.getLogger(__name__)

BLOCK = 128  # columns updated together (the lazy batch of the GPTQ paper); a multiple of every group size
DAMP = 0.1  # added to H's diagonal, as a fraction of its mean (0.1 generalized better than 0.01 to unseen text)
ACT_ORDER = False  # quantize the most active inputs first (measured on smollm2-relu: no better, within noise)
# calibration text: two kinds, so the rounding does not fit one kind of text (wiki alone: shakespeare's perplexity
# rose more than with round-to-nearest); none of them is a held-out evaluation source
SOURCES = ("wiki:train", "bigbench:")


class Hessians:
    """Per layer, the sums of x x^T (FFN inputs, [d_model, d_model]) and h h^T (neuron outputs, [d_ffn, d_ffn]) over
    the calibration tokens, float64."""

    def __init__(self) -> None:
        self.x: dict[int, Tensor] = {}
        self.h: dict[int, Tensor] = {}
        self.tokens = 0

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        h2 = h.detach().reshape(-1, h.shape[-1]).double()
        if layer == 0:
            self.tokens += x2.shape[0]
        for sums, v in ((self.x, x2), (self.h, h2)):
            vv = v.T @ v
            sums[layer] = sums[layer] + vv if layer in sums else vv


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Tensor], rule: SparsityRule,
                     progress: bool = True) -> Hessians:
    """Run ``model`` on ``batches`` (token ids [1, T]) with its FFNs as ``DenseFFN`` under ``rule`` (the model is
    modified in place: same weights) and return the Hessians of every layer's FFN inputs and neuron outputs."""
    hs = Hessians()
    install_dense_ffns(model, rule, observer=hs)
    for ids in tqdm(list(batches), desc="GPTQ: collecting activations", disable=not progress):
        model(ids)
    return hs


def _inverse_factor(H: Tensor, dead: Tensor) -> Tensor:
    """The upper Cholesky factor of H^-1 (H damped; columns never active get H = 1 on the diagonal)."""
    H = H.clone().float()
    H[dead, dead] = 1.0
    H.diagonal().add_(DAMP * H.diagonal().mean())
    for extra in (0.0, 0.1, 1.0):  # more damping only where rounding left H not positive definite
        try:
            L = torch.linalg.cholesky(H + extra * H.diagonal().mean() * torch.eye(H.shape[0]))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError
            continue
    raise ValueError("the calibration Hessian is not positive definite")


def _run(W: Tensor, U: Tensor, quantize_column: Callable[[int, Tensor, int], Tensor]) -> None:
    """GPTQ over W [rows, cols] (float32, modified in place), columns in order: ``quantize_column(j, block, i)`` rounds
    column j (= block[:, i]) and returns its dequantized values; the error goes to the later columns through U."""
    cols = W.shape[1]
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        block = W[:, a:b].clone()
        err = torch.zeros_like(block)
        Ub = U[a:b, a:b]
        for i in range(b - a):
            w = block[:, i]
            q = quantize_column(a + i, block, i)
            e = (w - q) / Ub[i, i]
            block[:, i:] -= e[:, None] * Ub[i, i:][None, :]
            err[:, i] = e
        W[:, b:] -= err @ U[a:b, b:]


def _order(H: Tensor, act_order: bool) -> Tensor:
    """The order the columns are quantized in: the most active inputs first (``act_order``), else as they are."""
    return torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(H.shape[0])


def quantize_inputs(w: Tensor, H: Tensor, bits: int, group_size: int, act_order: bool = ACT_ORDER
                    ) -> tuple[Tensor, Tensor]:
    """A gate or up part, w [n, d] with groups along d (its input), H [d, d] -> (codes, scales) as ``quant.quantize``.
    With ``act_order`` the groups' scales are chosen first, on the weights as they are (the columns of a group are no
    longer quantized together); else each group's when its first column is reached, on its current values."""
    n, d = w.shape
    check_shape(n, d, bits, group_size)
    perm = _order(H, act_order)
    W = w.detach().float()[:, perm].contiguous()
    Hp = H[perm][:, perm]
    dead = Hp.diagonal() == 0
    W[:, dead] = 0
    U = _inverse_factor(Hp, dead)
    m, lo = qmax(bits), qmin(bits)
    scales = torch.zeros(n, d // group_size, dtype=torch.float16)
    if act_order:
        scales = group_scales(w.detach().float().reshape(n, d // group_size, group_size), bits)[0]
    q = torch.zeros(n, d, dtype=torch.int8)

    def column(j: int, block: Tensor, i: int) -> Tensor:
        col = int(perm[j])  # the column of w
        g = col // group_size
        if not act_order and col % group_size == 0:  # the group's scales, from its columns' current values
            scales[:, g] = group_scales(block[:, i : i + group_size][:, None, :], bits)[0][:, 0]
        s = scales[:, g].float()
        c = torch.round(safe_div(block[:, i], s)).clamp_(lo, m)
        q[:, col] = c.to(torch.int8)
        return c * s

    _run(W, U, column)
    return pack(q, bits), scales


def quantize_outputs(down: Tensor, H: Tensor, bits: int, group_size: int, act_order: bool = ACT_ORDER
                     ) -> tuple[Tensor, Tensor]:
    """The down part as stored, [n_neurons, d] with groups along d (its output), H [n, n] over the neurons' outputs
    -> (codes, scales) as ``quant.quantize(down)``: each neuron's row rounded in turn, its error spread over the
    neurons after it."""
    n, d = down.shape
    check_shape(n, d, bits, group_size)
    perm = _order(H, act_order)
    W = down.detach().float()[perm].T.contiguous()  # [d, n]: the linear layer's own orientation, neurons as columns
    Hp = H[perm][:, perm]
    dead = Hp.diagonal() == 0
    W[:, dead] = 0
    U = _inverse_factor(Hp, dead)
    scales = torch.zeros(n, d // group_size, dtype=torch.float16)
    q = torch.zeros(n, d, dtype=torch.int8)

    def column(j: int, block: Tensor, i: int) -> Tensor:
        s, c = group_scales(block[:, i].reshape(1, d // group_size, group_size), bits)
        scales[perm[j]] = s[0]
        q[perm[j]] = c.reshape(d).to(torch.int8)
        return (c * s.float()[..., None]).reshape(d)

    _run(W, U, column)
    return pack(q, bits), scales


def quantize_ffn(w: FFNWeights, hx: Tensor, hh: Tensor, bits: int, group_size: int, skip: tuple[str, ...] = ()
                 ) -> dict[str, tuple[Tensor, Tensor]]:
    """Every part of one FFN but those in ``skip`` -> {part: (codes, scales)} ("gate", "up", "down"; "up" and "down"
    only without a gate)."""
    out = {}
    if "up" not in skip:
        out["up"] = quantize_inputs(w.up, hx, bits, group_size)
    if "down" not in skip:
        out["down"] = quantize_outputs(w.down, hh, bits, group_size)
    if w.gate is not None and "gate" not in skip:
        out["gate"] = quantize_inputs(w.gate, hx, bits, group_size)
    return out


def output_error(w: Tensor, codes_scales: tuple[Tensor, Tensor], H: Tensor, bits: int, group_size: int,
                 along_inputs: bool = True) -> float:
    """Relative error of the part's outputs on the calibration inputs: tr(E H E^T) / tr(W H W^T), E = W - W~."""
    wq = dequantize(*codes_scales, bits, group_size)
    W, E = (w.float(), (w.float() - wq)) if along_inputs else (w.float().T, (w.float() - wq).T)
    Hf = H.float()
    return float(((E @ Hf) * E).sum() / ((W @ Hf) * W).sum().clamp_min(1e-30))

