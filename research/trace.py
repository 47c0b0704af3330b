"""Active-set statistics of real models, and the synthetic trace source that drives the scale model.

Statistics (``window_stats``, ``popularity``, ``closest_friends``) work on boolean masks [T, n] (tokens x neurons)
of one layer, over consecutive tokens of a text (``llmflash.reorder.collect_masks`` records them for a real model;
``llmflash.reorder.coactivation`` counts co-activations). With S_t the active set at token t and n the layer's neurons:

- aggregated usage U(k) = |S_t u S_{t-1} u ... u S_{t-k+1}| / n: what a window of k tokens holds (Figure 4a);
- new share N(k) = |S_t minus (S_{t-1} u ... u S_{t-k})| / n: what must be loaded for token t when the last k tokens'
  neurons are cached (the engine's ``NeuronCache`` with ``window=k`` loads exactly this); N(0) = |S_t| / n.

The trace source (``TraceModel``) is a latent-Gaussian model of one layer's neurons, documented here and in
``paper_notes.md``:

    u_i(t) = b_i + z_i(t)          b_i ~ N(0, sigma_b^2) fixed per neuron (popularity);
    z_i(t) = sqrt(1-f) s_i(t) + sqrt(f) w_i(t)
                                   s_i an AR(1) process with unit variance and lag-one correlation rho (persistence:
                                   the residual stream, and so the pre-activation, changes slowly from token to
                                   token), w_i fresh N(0, 1) noise every token (flicker: neurons near the threshold
                                   switch on and off and come back within a few tokens), f the flicker share
    active_i(t)    = u_i(t) > theta_l                      theta_l sets the layer's active fraction a_l
    predicted_i(t) = u_i(t) + e_i(t) > theta'_l            e_i: the predictor's error, AR(1) with the same rho and
                                                           std sigma_e,l; (sigma_e,l, theta'_l) solved so that the
                                                           recall is 95% and 7% of inactive neurons are predicted
                                                           (the paper's OPT-6.7B predictors: ~5% false negatives,
                                                           ~7% false positives, ~3x the true set, ~10% of the FFN)

Popularity follows from sigma_b (a neuron's long-run activation rate is Phi(b_i - theta_l)); persistence and
window reuse from rho and f. Validation (``experiments/trace_validation.py``): (sigma_b, rho, f) are fitted
(``fit_trace``) to three statistics of a real model's true sets (N(1), N(5), U(5)), with its per-layer active
fractions, and the whole U(k), N(k) curves (k = 1..32), the persistence and the popularity concentration of the
fitted trace are compared with the real model's. Scale model: the flicker share fitted on smollm2-relu (0.20) is
kept, and (sigma_b, rho) are fitted to the paper's OPT-6.7B predicted sets (N(5) = 2.4% of the FFN per token,
U(5) = 24%).

``TraceProvider`` plugs a trace into ``Engine(..., provider=...)``: for each layer call it advances that layer's
trace by one token per row of x and returns the true or the predicted sets. In predicted mode it also runs a real
low-rank predictor of the paper's size (ranks 128, and 1024 for the last 4 layers, random weights) on x, so the
predictor's compute and DRAM are real; its output is discarded in favour of the trace. Drawing the trace's sets
(about 0.5 ms per layer on this CPU) is simulation: the engine leaves it out of the token's time, like the oracle's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from llmflash.layout import runs
from llmflash.provider import ActiveSetProvider, WrappedProvider

# --------------------------------------------------------------------------------------------------- statistics


def window_stats(seqs: Sequence[np.ndarray], k_max: int = 32, warm: Optional[int] = None) -> dict:
    """U(k) for k = 1..k_max and N(k) for k = 0..k_max, averaged over tokens t >= warm of each sequence.

    ``seqs``: boolean masks [T, n] of one layer (each a run of consecutive tokens). Returns fractions of n.
    """
    warm = k_max if warm is None else warm
    age_hist = np.zeros(k_max + 1, np.int64)  # ages 0..k_max-1, and >= k_max
    gap_hist = np.zeros(k_max + 2, np.int64)  # gaps of active neurons 1..k_max, and > k_max
    n_tok, n, active = 0, None, 0
    for m in seqs:
        T, n = m.shape
        last = np.full(n, -(10**9), np.int64)
        for t in range(T):
            idx = np.flatnonzero(m[t])
            if t >= warm:
                gaps = np.minimum(t - last[idx], k_max + 1)
                gap_hist += np.bincount(gaps, minlength=k_max + 2)
                active += idx.size
            last[idx] = t
            if t >= warm:
                age_hist += np.bincount(np.minimum(t - last, k_max), minlength=k_max + 1)
                n_tok += 1
    if not n_tok:
        raise ValueError("no token past the warm-up: give longer sequences or a smaller k_max")
    union = np.cumsum(age_hist[:k_max]) / (n_tok * n)  # U(k) = share of neurons with age < k
    tail = gap_hist[::-1].cumsum()[::-1]  # tail[g] = active with gap >= g
    new = np.array([active] + [tail[k + 1] for k in range(1, k_max + 1)]) / (n_tok * n)
    return {"k_union": list(range(1, k_max + 1)), "union": union.tolist(), "k_new": list(range(0, k_max + 1)),
            "new": new.tolist(), "active": active / (n_tok * n), "tokens": n_tok}


def persistence(seqs: Sequence[np.ndarray]) -> float:
    """P(active at t | active at t-1)."""
    both = prev = 0
    for m in seqs:
        both += int((m[1:] & m[:-1]).sum())
        prev += int(m[:-1].sum())
    return both / prev if prev else float("nan")


def popularity(seqs: Sequence[np.ndarray], shares: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5)) -> dict:
    """Long-run activation rate per neuron and the share of all activations that the top x% of neurons account for."""
    counts = sum(m.sum(0, dtype=np.int64) for m in seqs)
    tokens = sum(m.shape[0] for m in seqs)
    order = np.sort(counts)[::-1]
    total = max(int(order.sum()), 1)
    n = order.size
    top = {f"{s:g}": float(order[: max(1, int(round(s * n)))].sum() / total) for s in shares}
    return {"rate_sorted": (order / tokens).tolist(), "top_share": top, "never_active": float((counts == 0).mean())}


def closest_friends(c: np.ndarray, counts: np.ndarray) -> dict:
    """Each neuron's closest friend (the neuron most often active when it is) and how often that friend co-fires."""
    cc = c.copy()
    np.fill_diagonal(cc, -1)
    friend = cc.argmax(1)
    alive = counts > 0
    rate = np.where(alive, cc[np.arange(c.shape[0]), friend] / np.maximum(counts, 1), np.nan)
    hot = np.argsort(counts)[::-1][: max(1, c.shape[0] // 100)]
    return {"friend": friend, "rate": rate, "alive": alive,
            "friend_is_top1pct": float(np.isin(friend[alive], hot).mean()) if alive.any() else float("nan"),
            "distinct_friends": int(np.unique(friend[alive]).size)}


# ---------------------------------------------------------------------------------------------- the trace model


def _phi(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    from scipy.special import ndtr

    return ndtr(x)


def _predictor_noise(a: float, sigma_b: float, recall: float, fpr: float) -> tuple[float, float]:
    """(sigma_e, theta') such that P(pred | active) = recall and P(pred | inactive) = fpr, for active fraction a."""
    from scipy.optimize import brentq
    from scipy.special import ndtri

    sd = math.sqrt(1 + sigma_b**2)
    theta = sd * ndtri(1 - a)
    u = np.linspace(-9 * sd, 9 * sd, 12001)
    w = _phi(u / sd) / sd * (u[1] - u[0])
    pos = u > theta

    def rates(se: float, tp: float) -> tuple[float, float]:
        p = _Phi((u - tp) / se) * w
        return p[pos].sum() / w[pos].sum(), p[~pos].sum() / w[~pos].sum()

    def tp_for(se: float) -> float:
        return brentq(lambda tp: rates(se, tp)[0] - recall, theta - 100 * sd, theta + 20 * sd)

    se = brentq(lambda se: rates(se, tp_for(se))[1] - fpr, 1e-3, 5 * sd)
    return se, tp_for(se)


@dataclass(frozen=True)
class TraceParams:
    active: tuple[float, ...]  # true active fraction per layer
    sigma_b: float  # popularity spread
    rho: float  # per-token persistence of the latent
    recall: float = 0.95  # predicted mode: share of active neurons predicted
    fpr: float = 0.07  # predicted mode: share of inactive neurons predicted
    seed: int = 0
    flicker: float = 0.0  # share of the latent's variance drawn fresh every token (fast on/off near the threshold)

    def to_json(self) -> dict:
        return asdict(self)


def paper_active_profile(n_layers: int = 32) -> tuple[float, ...]:
    """OPT-6.7B's active fraction per layer (paper, Figure 9): 1.56% at layer 1, 2.66% at 16, 5.36% at 32, mean
    3.30%. Monotone cubic (PCHIP) through those three points and one more knot at layer 22 whose value is solved so
    that the mean is 3.30%."""
    from scipy.interpolate import PchipInterpolator
    from scipy.optimize import brentq

    x = np.arange(1, n_layers + 1) * (32 / n_layers)

    def prof(y22: float) -> np.ndarray:
        return PchipInterpolator([1, 16, 22, 32], [1.56, 2.66, y22, 5.36])(x) / 100

    y = brentq(lambda v: prof(v).mean() - 0.033, 2.7, 5.3)
    return tuple(float(v) for v in prof(y))


# PAPER_FLICKER: from the fit of (sigma_b, rho, flicker) to smollm2-relu's true sets (N(1), N(5), U(5) on wiki:eval;
# experiments/trace_validation.py), transferred to the scale model; then (sigma_b, rho) fitted with
# fit_trace(paper_active_profile(), {"new5": 0.024, "union5": 0.24}, kind="predicted", fixed={"flicker": 0.2})
# (``experiments/trace_validation.py --refit`` re-runs it and checks the trace against the paper's numbers).
PAPER_SIGMA_B = 1.00
PAPER_RHO = 0.714
PAPER_FLICKER = 0.20


def paper_params(n_layers: int = 32, seed: int = 0) -> TraceParams:
    return TraceParams(paper_active_profile(n_layers), PAPER_SIGMA_B, PAPER_RHO, seed=seed, flicker=PAPER_FLICKER)


@dataclass
class _LayerState:
    b: np.ndarray
    theta: float
    sigma_e: float
    theta_p: float
    rng: np.random.Generator
    z: np.ndarray = field(default=None)  # type: ignore[assignment]
    e: np.ndarray = field(default=None)  # type: ignore[assignment]


class TraceModel:
    """Per-layer latent processes (see the module docstring); ``step(layer)`` advances one layer by one token."""

    def __init__(self, params: TraceParams, n: int, layers: Optional[Sequence[int]] = None) -> None:
        from scipy.special import ndtri

        self.p = params
        self.n = n
        self.layers = list(range(len(params.active))) if layers is None else list(layers)
        sd = math.sqrt(1 + params.sigma_b**2)
        q = ndtri((np.arange(n) + 0.5) / n)  # stratified: the layer's biases are the normal quantiles, shuffled
        self._noise_cache: dict[float, tuple[float, float]] = {}
        self.state: dict[int, _LayerState] = {}
        for layer in self.layers:
            a = params.active[layer]
            rng = np.random.default_rng([params.seed, layer, 1])
            b = (params.sigma_b * q[rng.permutation(n)]).astype(np.float32)
            key = round(a, 6)
            if key not in self._noise_cache:
                self._noise_cache[key] = _predictor_noise(a, params.sigma_b, params.recall, params.fpr)
            se, tp = self._noise_cache[key]
            self.state[layer] = _LayerState(b, float(sd * ndtri(1 - a)), se, tp, rng)
        self.reset()

    def reset(self) -> None:
        for layer, s in self.state.items():
            s.rng = np.random.default_rng([self.p.seed, layer, 2])
            s.z = s.rng.standard_normal(self.n, dtype=np.float32)
            s.e = s.rng.standard_normal(self.n, dtype=np.float32)

    def step(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(true mask [n], predicted mask [n]) for the layer's next token."""
        s = self.state[layer]
        r, c = self.p.rho, math.sqrt(1 - self.p.rho**2)
        s.z *= r
        s.z += c * s.rng.standard_normal(self.n, dtype=np.float32)
        s.e *= r
        s.e += c * s.rng.standard_normal(self.n, dtype=np.float32)
        lam = self.p.flicker
        if lam > 0:
            u = s.b + math.sqrt(1 - lam) * s.z + math.sqrt(lam) * s.rng.standard_normal(self.n, dtype=np.float32)
        else:
            u = s.b + s.z
        return u > s.theta, (u + s.sigma_e * s.e) > s.theta_p

    def masks(self, layer: int, tokens: int, kind: str = "true") -> np.ndarray:
        """[tokens, n] masks of one layer from a fresh start (statistics)."""
        out = np.empty((tokens, self.n), bool)
        for t in range(tokens):
            out[t] = self.step(layer)[0 if kind == "true" else 1]
        return out


FIT_STATS = {"new1": ("new", 1), "new5": ("new", 5), "union5": ("union", 4), "new16": ("new", 16)}


def fit_trace(active: Sequence[float], targets: dict, kind: str = "true", free: Sequence[str] = ("sigma_b", "rho"),
              fixed: Optional[dict] = None, n: int = 4096, tokens: int = 200, n_layers_sim: int = 6, seed: int = 0,
              maxfev: int = 150) -> dict:
    """Fit the trace parameters in ``free`` (of sigma_b, rho, flicker) so that the trace's statistics match
    ``targets`` ({"new1"|"new5"|"new16"|"union5": value, or a per-layer list}, see ``window_stats``), the others
    ``fixed``. Simulated on ``n_layers_sim`` layers spread over the model (per-layer targets are averaged over the
    same layers), with the same random numbers for every candidate."""
    from scipy.optimize import minimize

    active = list(active)
    pick = sorted(set(np.linspace(0, len(active) - 1, n_layers_sim).round().astype(int).tolist()))
    sub = tuple(active[i] for i in pick)
    targets = {t: float(np.mean([v[i] for i in pick])) if isinstance(v, (list, tuple, np.ndarray)) else float(v)
               for t, v in targets.items()}
    base = {"sigma_b": 1.0, "rho": 0.9, "flicker": 0.0}
    base.update(fixed or {})
    kmax = max(FIT_STATS[t][1] for t in targets) + 1

    def unpack(v) -> dict:
        p = dict(base)
        for name, x in zip(free, v):
            p[name] = math.exp(x) if name == "sigma_b" else 1 / (1 + math.exp(-x))
        return p

    def stats(p: dict) -> dict:
        tm = TraceModel(TraceParams(sub, p["sigma_b"], p["rho"], seed=seed, flicker=p["flicker"]), n)
        ws = [window_stats([tm.masks(layer, tokens, kind)], k_max=kmax, warm=min(40, tokens // 4))
              for layer in range(len(sub))]
        return {t: float(np.mean([w[FIT_STATS[t][0]][FIT_STATS[t][1]] for w in ws])) for t in targets}

    def loss(v) -> float:
        got = stats(unpack(v))
        return sum(math.log(got[t] / targets[t]) ** 2 for t in targets)

    def enc(name, x):
        return math.log(x) if name == "sigma_b" else math.log(x / (1 - x))

    starts = {"sigma_b": 1.0, "rho": 0.9, "flicker": 0.3}
    v0 = [enc(f, starts[f]) for f in free]
    res = minimize(loss, v0, method="Nelder-Mead", options={"xatol": 0.005, "fatol": 1e-6, "maxfev": maxfev})
    p = unpack(res.x)
    return {**p, "got": stats(p), "targets": dict(targets), "kind": kind, "free": list(free), "loss": float(res.fun),
            "evaluations": int(res.nfev)}


# ------------------------------------------------------------------------------------------------ engine providers


PAPER_RANKS = (128,) * 28 + (1024,) * 4


class TraceProvider(ActiveSetProvider):
    """An ``Engine`` active-set provider replaying a ``TraceModel`` (true or predicted sets).

    ``kind="true"``: like the oracle (time not counted, no DRAM). ``kind="predicted"``: a real low-rank predictor
    (``ranks``, random weights in the model dtype) runs on x for its compute and DRAM, and the trace's predicted set
    is returned. ``perm`` (per layer: file position -> original neuron id) serves a reordered flash layout.

    Lookahead (``guess``, simulated): the set the layer's next ``active`` call will return is drawn ahead, and the
    guess keeps each of its neurons with probability ``guess_recall`` (1: a lookahead predictor as good as the layer's
    own; Deja Vu reports its lookahead predictors close to that). The predictor network runs for the guess too.
    """

    def __init__(self, model: TraceModel, kind: str = "predicted", d_model: int = 4096,
                 ranks: Optional[Sequence[int]] = PAPER_RANKS, dtype: torch.dtype = torch.bfloat16,
                 perm: Optional[Sequence[np.ndarray]] = None, guess_recall: float = 1.0) -> None:
        if kind not in ("true", "predicted"):
            raise ValueError(kind)
        self.guess_recall = guess_recall
        self._ahead: dict[int, np.ndarray] = {}  # layer -> its next sets [T, n], drawn by a guess
        self._guess_rng = np.random.default_rng([model.p.seed, 3])
        self.model = model
        self.kind = kind
        self.counted = kind == "predicted"
        self.perm = None if perm is None else [np.asarray(p) for p in perm]
        self.pred: list[tuple[Tensor, Tensor, Tensor]] = []
        if kind == "predicted":
            g = torch.Generator().manual_seed(model.p.seed + 7)
            n = model.n
            for layer in range(len(model.p.active)):
                r = ranks[min(layer, len(ranks) - 1)] if ranks else 128
                r = min(r, d_model)
                self.pred.append(((torch.randn(r, d_model, generator=g) * 0.02).to(dtype),
                                  (torch.randn(n, r, generator=g) * 0.02).to(dtype), torch.zeros(n, dtype=dtype)))
        self.nbytes = sum(t.numel() * t.element_size() for p in self.pred for t in p)
        pp = model.p  # expected share of each layer's neurons needed per token (the engine sizes caches by it)
        self.layer_demand = [a if kind == "true" else pp.recall * a + pp.fpr * (1 - a) for a in pp.active]
        self.calls = 0
        self.replay_ms = 0.0

    supports_guess = True

    def reset(self) -> None:
        self.model.reset()
        self._ahead.clear()
        self._guess_rng = np.random.default_rng([self.model.p.seed, 3])

    def to_device(self, device: torch.device) -> None:
        """Run the predictor's compute on ``device`` (an engine on an accelerator)."""
        self.pred = [tuple(t.to(device) for t in p) for p in self.pred]

    def pop_replay_ms(self) -> float:
        """ms spent drawing the trace's sets since the last call (the engine excludes it: see ``active``)."""
        ms, self.replay_ms = self.replay_ms, 0.0
        return ms

    def device_mask(self, layer: int, x: Tensor) -> Optional[Tensor]:
        """The predictor network's decisions on x (device ops; predicted mode only, else None)."""
        if not self.pred:
            return None
        down, up, bias = self.pred[layer]
        return torch.nn.functional.linear(torch.nn.functional.linear(x.to(down.dtype), down), up, bias) >= 0

    def _network(self, layer: int, x: Tensor) -> None:
        """The predictor network's compute on x, its decisions brought to the host as a real predictor's would be
        (a sync on a GPU); predicted mode only."""
        z = self.device_mask(layer, x)
        if z is not None:
            z.cpu()

    def active_after(self, layer: int, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """``active`` once the network's decisions (``mask``) have reached the host (a graph computed them)."""
        t0 = time.perf_counter()
        m = self._draw(layer, x.shape[0])
        self.calls += 1
        self.replay_ms += (time.perf_counter() - t0) * 1e3
        return torch.from_numpy(m)

    def _draw(self, layer: int, tokens: int) -> np.ndarray:
        """The layer's next sets [tokens, n] (drawn ahead by a guess, else now), in the file's order."""
        m = self._ahead.pop(layer, None)
        if m is None or m.shape[0] != tokens:
            which = 0 if self.kind == "true" else 1
            m = np.stack([self.model.step(layer)[which] for _ in range(tokens)])
            if self.perm is not None:
                m = m[:, self.perm[layer]]
        return m

    def active(self, layer: int, x: Tensor) -> Tensor:
        """The trace's next sets [T, n]. In predicted mode the predictor network runs on x first and its decisions
        reach the host, as a real predictor's would; drawing the trace's sets in their place is simulation, timed
        apart (``pop_replay_ms``) and left out of the token's time like the oracle's."""
        self._network(layer, x)
        return self.active_after(layer, x, None)

    def guess(self, layer: int, x: Tensor) -> Tensor:
        """Lookahead (simulated, see the class docstring): the layer's next sets drawn now, each neuron kept with
        probability ``guess_recall``; ``active`` returns the full sets later."""
        self._network(layer, x)
        t0 = time.perf_counter()
        m = self._draw(layer, x.shape[0])
        self._ahead[layer] = m
        g = m if self.guess_recall >= 1 else m & (self._guess_rng.random(m.shape) < self.guess_recall)
        self.replay_ms += (time.perf_counter() - t0) * 1e3
        return torch.from_numpy(g)


class PermutedProvider(WrappedProvider):
    """Wraps a provider whose ids are original neuron ids, for a flash directory whose rows were permuted
    (``perm[layer][j]`` = original id stored at row j). (The engine's own predictors need no wrapper: it permutes
    their outputs at load, ``PredictorSet.permute_outputs``.)"""

    def __init__(self, inner: ActiveSetProvider, perm: Sequence[np.ndarray]) -> None:
        super().__init__(inner)
        self.perm = [torch.as_tensor(np.asarray(p), dtype=torch.long) for p in perm]

    def active(self, layer: int, x: Tensor) -> Tensor:
        return self.inner.active(layer, x)[:, self.perm[layer]]


def new_sets(seq: np.ndarray, window: int) -> list[np.ndarray]:
    """Per token t of one sequence [T, n]: ids active at t and in none of the previous ``window`` tokens
    (``window=0``: the whole active set), i.e. what the engine's window cache loads."""
    out = []
    last = np.full(seq.shape[1], -(10**9), np.int64)
    for t in range(seq.shape[0]):
        ids = np.flatnonzero(seq[t])
        out.append(ids if window == 0 else ids[t - last[ids] > window])
        last[ids] = t
    return out


def read_sizes(ids_rows: np.ndarray, stride_bytes: int, max_read_bytes: int = 256 * 1024) -> np.ndarray:
    """Byte sizes of the reads that bring rows ``ids_rows`` (any order) with neighbouring rows merged, as
    ``layout.read_plan`` plans them."""
    if ids_rows.size == 0:
        return np.empty(0, np.int64)
    _, length = runs(np.unique(ids_rows), max(1, max_read_bytes // stride_bytes))
    return length * stride_bytes
