"""The main job, shown honestly: the original model in DRAM, then the sparse model from flash under a DRAM budget.

Rows, in order (``demo_rows``):

1. ``dense`` on the original model (``smollm2``, exact activations, every weight in DRAM): the reference a user has;
2. ``dense`` on the sparse model (its own sparsity rule, every weight in DRAM): what the sparse rows must reproduce;
3. ``naive`` (the whole model read from flash every token) and ``hybrid`` (whole layers resident as the budget allows,
   the rest read every token): the baselines;
4. ``predictor``: the paper's method, trained low-rank predictors choosing the neurons (their cost counted), a sliding
   window of neurons cached in DRAM; then the same with the model's default predictors where they are of another kind
   (smollm2-relu: ``lowbit``, a 4-bit copy of the FFN's own gate and up, which marks far fewer neurons); then those
   with the LFU cache policy instead of the window (beyond the paper: the caches keep the neurons needed most often
   lately; fewer reads when they are smaller than the window's sets, results/cache_policies); then the default
   predictors at half the demo's budget, where the engine streams attention too (``layer_stream``: beyond the paper,
   whose budgets start at the resident weights' share; dropped with a progress line where even that is too small);
5. ``oracle``: the true active set, the cost of finding it not counted: an upper bound, not a method.

The sparse model's rows run on a copy of its flash directory whose neurons that fire together are stored side by
side (``reorder``, co-activation order), built once and cached beside the plain conversion. That directory holds the
resident weights (attention, the embeddings and the tied head) in int8 (``RESIDENT_DTYPE``; ``convert
--resident-dtype int8``): for smollm2-relu 53 MiB instead of 210, so that half of the model leaves the neuron cache
room for more than a token's active neurons, at a perplexity within -1.3% to +0.1% of float32's on four held-out
sources (results/quantized, ``float32+r8``). The reference row runs the same directory in full DRAM, so the sparse
rows are compared with the model they run. Each row says what its DRAM holds (from the engine that ran it) and
whether the machine was busy with other work when it started.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .convert import RESIDENT_DTYPES, convert
from .engine import Engine, EngineConfig
from .errors import BudgetError, LLMFlashError
from .flashdir import FlashDir, open_flash_dir
from .models import default_predictors, lowrank_predictors, relu_artifact_tag
from .paths import cache_dir
from .predictor import set_kind
from .report import environment, fmt_bytes

log = logging.getLogger(__name__)

ORIGINAL = "smollm2"  # the original model: the reference row runs it dense, with exact activations
DEMO_MODELS = ("smollm2-relu", "smollm2")
RESIDENT_DTYPE = "int8"  # the sparse rows' directory: resident weights in int8 ("auto": in float32, as stored)
ORDER_SOURCE = "wiki:train"  # the text the neuron order is fitted on (the prompt is not from it)
ORDER_TOKENS = 4096

Progress = Callable[[str], None]  # one line of progress, for the caller to show (the library never prints)


def default_setup(model: str = "smollm2") -> dict:
    """``smollm2``: the original model with the threshold rule (80% sparsity), exact oracle. ``smollm2-relu``: the
    sparse model under its own rule, with its committed default predictors when they exist."""
    if model == "smollm2":
        return {"model": "smollm2", "sparse_mode": "oracle", "sparsity": "threshold", "predictors": None}
    if model != "smollm2-relu":
        raise LLMFlashError(f"demo runs {' or '.join(DEMO_MODELS)}, not {model!r}")
    preds = default_predictors(model)
    lowrank = lowrank_predictors(model)
    if preds is not None:
        return {"model": "smollm2-relu", "sparse_mode": "predictor", "sparsity": "auto", "predictors": str(preds),
                "lowrank_predictors": None if lowrank is None else str(lowrank)}
    return {"model": "smollm2-relu", "sparse_mode": "oracle", "sparsity": "auto", "predictors": None}


def _cache_name(model: str, resident_dtype: str = "auto") -> str:
    name = f"{model}-{relu_artifact_tag()}" if model == "smollm2-relu" else model
    return name + {"int8": "-r8", "int4": "-r4"}.get(resident_dtype, "")


def _resident_dtype(fd: FlashDir) -> str:
    """A directory's resident weights: ``int8`` / ``int4`` (``convert --resident-dtype``), else ``auto``."""
    q = fd.manifest.quantization
    return q.resident if q is not None and q.resident in ("int8", "int4") else "auto"


def flash_dir_for(model: str, resident_dtype: str = "auto") -> Path:
    """Convert once and reuse: the cache holds one flash directory per model (per artifact for smollm2-relu) and
    resident dtype (``auto``: float32; ``int8`` / ``int4``: ``convert --resident-dtype``); one converted before convert
    calibrated thresholds (and never calibrated since) is converted again."""
    out = cache_dir() / "flash" / _cache_name(model, resident_dtype)
    try:
        fd = open_flash_dir(out)
        if fd.thresholds() is not None and _resident_dtype(fd) == resident_dtype:
            return out
    except LLMFlashError:
        pass
    return convert(model, out, force=True, resident_dtype=resident_dtype)


def _ordered_path(model: str, sparsity: str, resident_dtype: str = "auto") -> Path:
    return cache_dir() / "flash" / f"{_cache_name(model, resident_dtype)}-coact-{sparsity}"


def ordered_flash_dir(model: str, sparsity: str, threshold_sparsity: float = 0.8, progress: bool = False,
                      resident_dtype: str = "auto") -> Path:
    """The model's flash directory (``flash_dir_for``) reordered by co-activation (``reorder``), fitted on
    ``ORDER_TOKENS`` tokens of ``ORDER_SOURCE`` under its sparsity rule; built once and cached beside the plain
    conversion (keyed like it: by the model artifact and resident dtype), rebuilt when the source's checksums or the
    fit changed."""
    from .reorder import reorder_flash_dir

    src = open_flash_dir(flash_dir_for(model, resident_dtype))
    out = _ordered_path(model, sparsity, resident_dtype)
    want = {"kind": "coactivation", "source": ORDER_SOURCE, "requested_tokens": ORDER_TOKENS, "sparsity": sparsity,
            "src_checksums": src.manifest.checksums.to_json()}
    try:
        copy = open_flash_dir(out)
        order = copy.manifest.neuron_order
        same_thresholds = copy.thresholds() == src.thresholds()  # a copy made before they were in the manifest
        if order is not None and all(order.meta.get(k) == v for k, v in want.items()) and same_thresholds:
            return out
    except LLMFlashError:
        pass
    reorder_flash_dir(src.path, out, "coactivation", sparsity, threshold_sparsity, source=ORDER_SOURCE,
                      max_tokens=ORDER_TOKENS, progress=progress,
                      extra_meta={"requested_tokens": ORDER_TOKENS, "src_checksums": want["src_checksums"]})
    return out


@dataclass(frozen=True)
class DemoRow:
    """One row of the demo: a mode run on one model's flash directory."""

    mode: str
    model: str
    flash_dir: Path
    sparsity: str
    dram_budget: float
    role: str  # "original" | "reference" | "baseline" | "method" | "upper bound"
    predictors: Optional[str] = None
    tag: str = ""  # what tells this row from another of its mode (e.g. the predictors' kind)
    cache_policy: str = "window"  # sparse modes: who stays in the neuron caches (``EngineConfig.cache_policy``)
    optional: bool = False  # a budget below the engine's minimum drops the row (with a progress line) instead of failing

    @property
    def label(self) -> str:
        return f"{self.mode}{' ' + self.tag if self.tag else ''} on {self.model}"

    def config(self) -> EngineConfig:
        return EngineConfig(mode=self.mode, dram_budget=self.dram_budget, sparsity=self.sparsity,
                            predictors=self.predictors, cache_policy=self.cache_policy)


def demo_rows(model: str, dram_budget: float, progress: Optional[Progress] = None,
              resident_dtype: str = RESIDENT_DTYPE) -> list[DemoRow]:
    """The rows (module docstring), preparing what they need: conversions and the co-activation order (cached)."""
    say = progress or (lambda msg: None)
    setup = default_setup(model)
    if not 0 < dram_budget <= 1:
        raise LLMFlashError(f"--dram-budget {dram_budget:g} is not a fraction of the model in (0, 1]: use e.g. 0.5")
    if resident_dtype not in RESIDENT_DTYPES:
        raise LLMFlashError(f"--resident-dtype {resident_dtype!r}: choose int8, int4 or auto")
    for m, res in dict.fromkeys(((ORIGINAL, "auto"), (setup["model"], resident_dtype))):
        if not (cache_dir() / "flash" / _cache_name(m, res)).is_dir():
            say(f"converting {m} into a flash directory{f' ({res} resident weights)' if res != 'auto' else ''} "
                "(once, cached)")
        flash_dir_for(m, res)
    if not _ordered_path(setup["model"], setup["sparsity"], resident_dtype).is_dir():
        say(f"ordering {setup['model']}'s neurons by co-activation on {ORDER_TOKENS} tokens of {ORDER_SOURCE} "
            "(once, cached)")
    ordered = ordered_flash_dir(setup["model"], setup["sparsity"], resident_dtype=resident_dtype)
    sparse = {"model": setup["model"], "flash_dir": ordered, "sparsity": setup["sparsity"]}
    rows = [
        DemoRow("dense", ORIGINAL, flash_dir_for(ORIGINAL), "auto", 1.0, "original"),
        DemoRow("dense", **sparse, dram_budget=1.0, role="reference"),
        DemoRow("naive", **sparse, dram_budget=dram_budget, role="baseline"),
        DemoRow("hybrid", **sparse, dram_budget=dram_budget, role="baseline"),
    ]
    if setup.get("lowrank_predictors"):  # the paper's predictors first, then the default ones (another kind)
        rows.append(DemoRow("predictor", **sparse, dram_budget=dram_budget, role="method",
                            predictors=setup["lowrank_predictors"], tag="low-rank"))
    if setup["predictors"]:
        kind = _kind_tag(setup["predictors"])
        rows.append(DemoRow("predictor", **sparse, dram_budget=dram_budget, role="method",
                            predictors=setup["predictors"], tag=kind))
        rows.append(DemoRow("predictor", **sparse, dram_budget=dram_budget, role="method",
                            predictors=setup["predictors"], tag=", ".join(t for t in (kind, "lfu") if t), cache_policy="lfu"))
        rows.append(DemoRow("predictor", **sparse, dram_budget=dram_budget / 2, role="method",
                            predictors=setup["predictors"], tag=", ".join(t for t in (kind, "half budget") if t),
                            optional=True))
    rows.append(DemoRow("oracle", **sparse, dram_budget=dram_budget, role="upper bound"))
    return rows


def _kind_tag(predictors: str) -> str:
    """A predictor set's kind as the table names it: "low-bit" or "low-rank" ("" where it cannot be read)."""
    kind = set_kind(predictors)
    return "" if kind is None else "low-bit" if kind == "lowbit" else "low-rank"


def dram_holds(engine: Engine) -> str:
    """What an engine's DRAM holds, in words, from its own accounting (``Engine.dram``)."""
    parts = engine.dram
    n_layers = engine.fd.layout.n_layers
    if engine.cfg.mode == "dense":
        return "all weights"
    stream = engine.stream
    words = ["embeddings+attention" + ("" if stream is None else
                                       f" ({len(stream.plan.layers)} of {n_layers} layers' attention read per token)")]
    if parts.get("ffn_resident"):
        n = getattr(engine, "hybrid_resident_layers", n_layers)
        words.append(f"{n} of {n_layers} FFN layers")
    if parts.get("predictors"):
        words.append("predictors")
    if parts.get("neuron_cache"):
        policy = engine.cfg.cache_policy
        words.append(f"neuron cache ({'window ' + str(engine.cfg.window) if policy == 'window' else policy})")
    text = "+".join(words)
    oracle_bytes = getattr(engine, "oracle_bytes", 0)
    if oracle_bytes:
        text += f"; true set from a {fmt_bytes(oracle_bytes)} copy outside the budget"
    return text


def run_row(row: DemoRow, prompt: str, max_new_tokens: int) -> dict:
    engine = Engine(row.flash_dir, row.config())
    try:
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids[0]
        res = engine.generate(ids, max_new_tokens, stop_at_eos=False)
        holds = dram_holds(engine)
    finally:
        engine.close()
    cfg = res.config
    return {
        "mode": row.mode, "tag": row.tag, "model": row.model, "role": row.role, "flash_dir": str(row.flash_dir),
        "sparsity": row.sparsity, "dram_budget": row.dram_budget, "cache_policy": row.cache_policy, **res.summary(),
        "prefill_ms": res.prefill_ms, "generated_tokens": len(res.tokens),
        "dram_bytes": res.dram_bytes, "dram_fraction": res.dram_bytes / res.model_bytes, "dram_holds": holds,
        "dram_breakdown": res.dram_breakdown, "io_threads": cfg["io_threads"], "io_uring": cfg["io_uring"],
        "compute_threads": cfg["compute_threads"],
        "busy": cfg["busy"], "load_cores": cfg["load_cores"], "cores": cfg["cores"],
        "tokens": res.tokens, "text": res.text,
    }


def run_demo(max_new_tokens: int = 32, prompt: str = "The history of the printing press begins",
             dram_budget: float = 0.5, model: str = "smollm2-relu", progress: Optional[Progress] = None,
             rows: Optional[Sequence[DemoRow]] = None, resident_dtype: str = RESIDENT_DTYPE) -> dict:
    """Run every row (``demo_rows(model, dram_budget)`` unless ``rows`` are given: one ``reference`` and one
    ``naive`` among them) on the same prompt, greedy; ``progress`` gets a line as each row starts and ends."""
    say = progress or (lambda msg: None)
    if max_new_tokens < 2:
        raise LLMFlashError("--max-new-tokens must be at least 2 (the first token comes from the prompt)")
    setup = default_setup(model) if rows is None else None
    rows = demo_rows(model, dram_budget, say, resident_dtype) if rows is None else list(rows)
    out = []
    for i, row in enumerate(rows, 1):
        say(f"[{i}/{len(rows)}] {row.label} ({row.role}, DRAM budget {row.dram_budget:.0%})")
        try:
            r = run_row(row, prompt, max_new_tokens)
        except BudgetError as err:
            if not row.optional:
                raise
            say(f"[{i}/{len(rows)}] {row.label}: skipped ({err})")
            continue
        say(f"[{i}/{len(rows)}] {row.label}: {r['ms_per_token']:.1f} ms/token" + (" (machine busy)" if r["busy"] else ""))
        out.append(r)
    reference = next(r for r in out if r["role"] == "reference")
    original = next((r for r in out if r["role"] == "original"), reference)
    naive = next(r for r in out if r["mode"] == "naive")
    for r in out:
        r["same_tokens_as_reference"] = r["tokens"] == reference["tokens"]
        r["same_tokens_as_original"] = r["tokens"] == original["tokens"]
        r["tokens_as_reference"] = common_prefix(r["tokens"], reference["tokens"])  # leading tokens that agree
        r["speedup_vs_naive"] = naive["ms_per_token"] / r["ms_per_token"]
    fd = open_flash_dir(reference["flash_dir"])
    order = fd.manifest.neuron_order
    res = _resident_dtype(fd)
    return {"setup": setup, "model": reference["model"], "original": original["model"], "model_bytes": fd.model_bytes,
            "resident_dtype": res if res != "auto" else fd.manifest.dtype,
            "neuron_order": order.meta if order is not None else None, "prompt": prompt,
            "max_new_tokens": max_new_tokens, "dram_budget": dram_budget, "rows": out,
            "busy_rows": [f"{r['mode']} on {r['model']}" for r in out if r["busy"]], "environment": environment()}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def format_table(result: dict) -> str:
    rows = result["rows"]
    model, original = result["model"], result["original"]
    order = result.get("neuron_order") or {}
    lines = [
        f"llmflash demo: {model} ({fmt_bytes(result['model_bytes'])} of weights"
        + (f", neurons in {order.get('kind')} order" if order else "")
        + (f", resident weights in {result['resident_dtype']}" if result.get("resident_dtype") in ("int8", "int4")
           else "")
        + f"), DRAM budget {result['dram_budget']:.0%} of the model, {result['max_new_tokens']} tokens, greedy",
        f"prompt: {result['prompt']!r}",
        "",
        f"{'row':<33}{'ms/token':>9}{'tok/s':>7}{'vs naive':>9}{'read/token':>12}{'reads':>7}{'threads':>8}"
        f"{'DRAM':>17}  {'same text as ' + model + ' dense':<34}DRAM holds",
    ]
    for r in rows:
        what = r.get("tag") or (r["model"] if r["role"] == "original" else r["role"])
        name = f"{r['mode']}{'*' if r['busy'] else ''} ({what})"
        same = "yes" if r["same_tokens_as_reference"] else f"first {r['tokens_as_reference']} of {len(r['tokens'])} tokens"
        dram = f"{fmt_bytes(r['dram_bytes'])} ({r['dram_fraction']:.0%})"
        lines.append(
            f"{name:<33}{r['ms_per_token']:>9.1f}{r['tokens_per_s']:>7.1f}{r['speedup_vs_naive']:>8.1f}x"
            f"{fmt_bytes(r['bytes_read_per_token']):>12}{r['reads_per_token']:>7.0f}"
            f"{('ring' if r.get('io_uring') else str(r['io_threads'])) + '/' + str(r['compute_threads']):>8}"
            f"{dram:>17}  {same:<34}{r['dram_holds']}"
        )
    ref = next(r for r in rows if r["role"] == "reference")
    texts = [(f"{original} dense (the original model)", r["text"]) for r in rows if r["role"] == "original"]
    texts += [(f"{model} dense", ref["text"])]
    texts += [(f"{r['mode']}{' ' + r['tag'] if r.get('tag') else ''} on {model}", r["text"]) for r in rows if r["role"] == "method"]
    width = max(len(label) for label, _ in texts) + 1
    lines += [""] + [f"{label + ':':<{width}} {text!r}" for label, text in texts]
    busy = [r for r in rows if r["busy"]]
    if busy:
        worst = max(r["load_cores"] for r in busy)
        lines.append(f"* the machine was busy when this row started: other work kept up to {worst:.1f} of "
                     f"{busy[0]['cores']} cores busy (threads chosen to fit what was left)")
    else:
        lines.append(f"the machine was quiet when every row started ({rows[0]['cores']} cores free)")
    lines += [
        "predictor: the paper's method, the predictors' cost counted (low-rank: trained predictors, the paper's; "
        "low-bit: a 4-bit copy of the FFN's gate and up; lfu: the caches keep the neurons needed most often lately "
        "instead of the last tokens' window, beyond the paper; half budget: at half the DRAM budget, where the "
        "attention of some layers is read every token too, beyond the paper); oracle: the true active set, found for free (an upper "
        "bound); threads: readers (ring: io_uring, one thread) / compute",
        "(ms/token: median over generated tokens, measured; reads bypass the page cache; the oracle sums the same "
        "terms as dense in another order, and a threshold rule can turn a rounding difference into another neuron: "
        "texts may part after many tokens)",
    ]
    return "\n".join(lines)
