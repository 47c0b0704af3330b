"""Command handlers for ``convert``, ``generate``, ``eval-ppl`` and ``demo`` (thin: parse, call the API, print)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import torch

from .cache_policy import POLICIES
from .convert import DTYPES as CONVERT_DTYPES
from .convert import GPTQ_TOKENS, INT4_GATE_UP, RESIDENT_DTYPES
from .demo import DEMO_MODELS
from .engine import CACHE_FORMS, MODES, PREDICTOR_DTYPES, Engine, EngineConfig, GenerationResult
from .errors import LLMFlashError
from .flashdir import FlashDir, open_flash_dir
from .manifest import MANIFEST
from .models import default_predictors
from .quant import DEFAULT_GROUP_SIZE, GROUP_SIZES
from .report import fmt_bytes, write_json
from .sparsity import CALIBRATION_SOURCE, CALIBRATION_TOKENS

log = logging.getLogger(__name__)


SPARSITY_HELP = "auto: the model's own rule (its trained thresholds), else relu; threshold: calibrated CATS-style"


def fraction(text: str) -> float:
    """``argparse`` type of ``--dram-budget``: a fraction of the model's weight bytes, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction of the model's weight bytes in (0, 1]: use e.g. 0.5")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model into a flash directory")
    p.add_argument("model", metavar="MODEL", help="alias (smollm2, smollm2-relu), model directory, .gguf file or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="the flash directory to write (atomically)")
    p.add_argument("--dtype", default="float32", choices=CONVERT_DTYPES,
                   help="weight dtype on flash: a float dtype, or int8/int4 (FFN rows quantized group-wise, computed in "
                        "float32)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES, metavar="G",
                   help="int8/int4 FFN rows and int4 resident weights: values per scale (32 or 64)")
    p.add_argument("--int4-gate-up", default="auto", choices=INT4_GATE_UP,
                   help="int4: gate and up rows symmetric, asymmetric (an offset per group, like Q4_1) or auto "
                        "(asymmetric where they already sit on 4-bit asymmetric grids: a Q4_1 GGUF's are kept)")
    p.add_argument("--resident-dtype", default="auto", choices=RESIDENT_DTYPES,
                   help="the resident weights (attention, embeddings, tied head): auto (the compute dtype), int8 "
                        "(weight-only, one scale per row) or int4 (the linear layers, a scale per --group-size values; "
                        "the embedding and head int8)")
    p.add_argument("--no-bundling", action="store_true", help="store up/gate and down in separate regions (ablation)")
    p.add_argument("--force", action="store_true", help="overwrite a directory holding another model")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS, metavar="N",
                   help=f"tokens of {CALIBRATION_SOURCE} that calibrate the thresholds of --sparsity threshold, stored in "
                        "the manifest (0: none; int8/int4: and no GPTQ, the FFN codes round to nearest)")
    p.add_argument("--gptq-tokens", type=int, default=GPTQ_TOKENS, metavar="N",
                   help="int8/int4 with calibration: tokens (half wiki:train, half bigbench:) whose FFN inputs GPTQ's "
                        "error-aware rounding fits (0: round to nearest)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("reorder", help="copy a flash directory with neurons that fire together stored side by side "
                                       "(Ripple-style: fewer, longer reads)")
    p.add_argument("dir", metavar="DIR", help="the flash directory to copy")
    p.add_argument("--out", required=True, metavar="DIR", help="the reordered copy")
    p.add_argument("--order", default="coactivation", choices=("coactivation", "popularity"), help="how neurons are ordered")
    p.add_argument("--text-file", default="wiki:train", metavar="F",
                   help="text the order is fitted on: UTF-8 file, wiki:train or hf:NAME")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="tokens of that text")
    p.add_argument("--sparsity", default="auto", choices=("auto", "relu", "threshold"), help=SPARSITY_HELP)
    p.add_argument("--threshold-sparsity", type=float, default=0.8, metavar="S", help="target sparsity of the threshold rule")
    p.set_defaults(func=cmd_reorder)

    p = sub.add_parser("generate", help="greedy generation from a flash directory")
    p.add_argument("dir", metavar="DIR", help="a flash directory (made by convert)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", metavar="TEXT", help="the prompt")
    g.add_argument("--prompt-file", metavar="F", help="a UTF-8 file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate")
    _engine_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", metavar="OUT", help="write the result (summary and per-token figures) as JSON here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval-ppl", help="perplexity on a text file (dense, oracle or predictor sparsity)")
    p.add_argument("model", metavar="DIR|MODEL", help="a flash directory or a MODEL, computed in DRAM")
    p.add_argument("--text-file", required=True, metavar="F", help="UTF-8 file, or wiki:eval / wiki:train / hf:NAME")
    p.add_argument("--max-tokens", type=int, default=8192, metavar="N", help="tokens scored")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="window length in tokens")
    p.add_argument("--mode", default="dense", choices=("dense", "oracle", "predictor"),
                   help="which neurons the FFN computes: all (dense), the rule's active ones (oracle), the predicted ones")
    p.add_argument("--predictors", metavar="PATH", help="predictor directory (default: the model's own, if any)")
    p.add_argument("--sparsity", default="auto", choices=("auto", "relu", "threshold"), help=SPARSITY_HELP)
    p.add_argument("--threshold-sparsity", type=float, default=0.8, metavar="S", help="target sparsity of the threshold rule")
    p.add_argument("--window", type=int, default=5, metavar="K", help="predictor mode: sliding window in tokens")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON here")
    p.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser("demo", help="the main job: the original model in DRAM, then the sparse model from flash under "
                                    "a DRAM budget (naive, hybrid, the paper's method with predictors, the oracle)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per row")
    p.add_argument("--prompt", default="The history of the printing press begins", metavar="TEXT", help="the prompt")
    p.add_argument("--dram-budget", type=fraction, default=0.5, metavar="F",
                   help="fraction of the model's weight bytes for the flash rows, in (0, 1]")
    p.add_argument("--model", default="smollm2-relu", choices=DEMO_MODELS,
                   help="smollm2-relu: the sparse model with its trained predictors; smollm2: the original under the "
                        "threshold rule, oracle only")
    p.add_argument("--resident-dtype", default="int8", choices=RESIDENT_DTYPES,
                   help="the sparse model's resident weights (attention, embeddings, head): int8 (a directory "
                        "converted with --resident-dtype int8, so that the budget leaves more to the neuron cache), "
                        "int4 (the same, a quarter of float32's bytes) or auto (float32, as stored)")
    p.add_argument("--json", metavar="OUT", help="write the result: one record per row")
    p.set_defaults(func=cmd_demo)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default=None, choices=MODES,
                   help="default: predictor when the model has default predictors (a converted alias) or --predictors "
                        "is given, else dense")
    p.add_argument("--dram-budget", type=fraction, default=0.5, metavar="F",
                   help="fraction of the model's weight bytes the engine may hold, in (0, 1]")
    p.add_argument("--window", type=int, default=5, metavar="K", help="sliding window in tokens (paper: 4-5)")
    p.add_argument("--cache-policy", default="window", choices=POLICIES,
                   help="sparse modes: which neurons the caches keep: window (the paper's), lru, hot (a hot set "
                        "pinned, measured on a short calibration text at start, plus the window) or lfu (the neurons "
                        "needed most often lately, use counts decaying per token)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="reader threads (parallel reads in flight; with io_uring, where the kernel allows it, at least "
                        "128 are in flight from one thread; 0 = auto: fit the free cores)")
    p.add_argument("--predictors", metavar="PATH", help="predictor directory (default: the model's own, if any)")
    p.add_argument("--sparsity", default="auto", choices=("auto", "relu", "threshold"), help=SPARSITY_HELP)
    p.add_argument("--threshold-sparsity", type=float, default=0.8, metavar="S", help="target sparsity of the threshold rule")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                   help="sparse modes: start reading the next layer's guessed neurons early (default: auto, on with "
                        "one compute thread on a quiet CPU of at most 2 cores while the caches hold less than a "
                        "token's expected set, off elsewhere)")
    p.add_argument("--lookahead-depth", type=int, default=1, metavar="D",
                   help="with lookahead: layers whose reads are in flight ahead of the one computing (layer l starts "
                        "layer l+D's reads)")
    p.add_argument("--compute-threads", type=int, default=0, metavar="N",
                   help="torch threads (0 = auto: every free core in the sparse modes, one there with lookahead on at "
                        "most 2 free cores)")
    p.add_argument("--predictor-dtype", default="int8", choices=PREDICTOR_DTYPES,
                   help="form the predictors are held in (int8: weight-only, the smallest and fastest)")
    p.add_argument("--cache-form", default="stored", choices=CACHE_FORMS,
                   help="int8/int4 directories: the neuron caches hold the rows as stored (DRAM per neuron at the "
                        "stored bits, dequantized for every matmul) or dequantized once when read (compute)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU: compute the FFN rows with the native sparse step and a Llama-family layer's "
                        "attention for one token with the native decode step (C++, built with g++ on first use; where "
                        "it cannot build: one warning and the Python path); --no-native: the Python reference path")
    p.add_argument("--masked-compute", action=argparse.BooleanOptionalAction, default=None,
                   help="sparse modes on a CUDA device: compute each layer over its whole device cache, the rows not "
                        "needed masked to zero (one CUDA graph per layer, no gathers; equal within rounding), instead "
                        "of gathering the needed rows (default: auto, on where the caches hold float rows)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where to compute: cpu or cuda[:N] (resident weights, neuron caches and predictors in "
                        "GPU memory; reads land in host buffers and are copied over)")
    p.add_argument("--stream-layers", type=int, default=-1, metavar="N",
                   help="sparse modes on the CPU: decoder layers whose attention weights are read from "
                        "flash every token (two or three slot buffers, the next layer's read in flight while a layer "
                        "computes) instead of staying resident, for budgets below the resident weights' share; -1 = "
                        "auto: none while the budget holds them and caches of a token's expected set, else the fewest "
                        "that leave the caches that; 0 = none")


def engine_config(args: argparse.Namespace, fd: Optional[FlashDir] = None) -> EngineConfig:
    """The engine's settings from the arguments; ``--mode`` left out picks the best mode ``fd`` supports."""
    if args.threads < 0:
        raise LLMFlashError("--threads must be 0 (auto) or more")
    if args.compute_threads < 0:
        raise LLMFlashError("--compute-threads must be 0 (auto) or more")
    mode = args.mode
    if mode is None:
        has_default = fd is not None and default_predictors(fd.manifest.model.source) is not None
        mode = "predictor" if args.predictors or has_default else "dense"
        log.info("mode %s (the best this directory supports)", mode)
    return EngineConfig(
        mode=mode, dram_budget=args.dram_budget, window=args.window, io_threads=args.threads,
        sparsity=args.sparsity, threshold_sparsity=args.threshold_sparsity, predictors=args.predictors,
        lookahead=args.lookahead, lookahead_depth=args.lookahead_depth, compute_threads=args.compute_threads,
        predictor_dtype=args.predictor_dtype,
        device=args.device, cache_policy=args.cache_policy, cache_form=args.cache_form, native=args.native,
        native_attention=args.native, masked_compute=args.masked_compute,
        stream_layers=args.stream_layers,
    )


# ------------------------------------------------------------------------------------------------------- handlers


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.model, Path(args.out), dtype=args.dtype, bundled=not args.no_bundling, force=args.force,
                  calibration_tokens=args.calibration_tokens, group_size=args.group_size,
                  resident_dtype=args.resident_dtype, gptq_tokens=args.gptq_tokens, int4_gate_up=args.int4_gate_up)
    fd = open_flash_dir(out)
    b = fd.manifest.bytes
    print(f"converted {args.model} -> {out}: {fmt_bytes(b.model)} of weights "
          f"({fmt_bytes(b.resident_tensors)} resident, {fmt_bytes(b.ffn_file)} in "
          f"{'bundled' if fd.layout.bundled else 'unbundled'} ffn.bin, "
          f"{fd.layout.neuron_stride_bytes} bytes per neuron)")
    return 0


def cmd_reorder(args: argparse.Namespace) -> int:
    from .reorder import reorder_flash_dir

    src = open_flash_dir(args.dir)
    if Path(args.out).expanduser().resolve() == src.path.resolve():
        raise LLMFlashError("--out must be another directory than DIR")
    out = reorder_flash_dir(src.path, Path(args.out), order=args.order, sparsity=args.sparsity,
                            threshold_sparsity=args.threshold_sparsity, source=args.text_file, max_tokens=args.max_tokens)
    order = open_flash_dir(out).manifest.neuron_order
    info = order.meta if order is not None else {}
    print(f"reordered {src.path} -> {out}: neurons by {info.get('kind')}, fitted on {info.get('tokens')} tokens of "
          f"{info.get('source')}")
    return 0


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise LLMFlashError(f"prompt file {path} does not exist")
    return path.read_text(encoding="utf-8")


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise LLMFlashError("the prompt is empty")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise LLMFlashError("--max-new-tokens must be at least 1")
    fd = open_flash_dir(args.dir)
    engine = Engine(fd, engine_config(args, fd))
    try:
        res = engine.generate(encode(engine.tokenizer, _prompt(args)), args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    finally:
        engine.close()
    print(res.text)
    print(summary_line(res))
    if args.json:
        write_json(args.json, res.to_json())
    return 0


def summary_line(res: GenerationResult) -> str:
    s = res.summary()
    if not s:
        return f"[{res.mode}] no token after the prompt"
    return (  # the first token comes with the prompt (prefill); the per-token figures are over the others
        f"[{res.mode}] {len(res.tokens)} tokens, {s['ms_per_token']:.1f} ms/token (io {s['io_ms']:.1f}, "
        f"mem {s['mem_ms']:.1f}, compute {s['compute_ms']:.1f}), {fmt_bytes(s['bytes_read_per_token'])} read/token "
        f"in {s['reads_per_token']:.0f} reads, DRAM {fmt_bytes(res.dram_bytes)} = "
        f"{res.dram_bytes / res.model_bytes:.0%} of the model" + _cache_line(s) + _stream_line(res)
    )


def _stream_line(res: GenerationResult) -> str:
    """The streamed layers (``layer_stream``), when the engine streamed any."""
    n = len(res.config.get("streamed_layers") or [])
    return f", {n} of {res.config.get('n_layers', '?')} layers' attention streamed" if n else ""


def _cache_line(s: dict) -> str:
    """The neuron caches' lookups per token, when the mode has caches."""
    if not s["cache_hits_per_token"] + s["cache_misses_per_token"]:
        return ""
    return (f", cache {s['cache_hit_rate']:.0%} hits ({s['cache_hits_per_token']:.0f} hits, "
            f"{s['cache_misses_per_token']:.0f} misses, {s['cache_evictions_per_token']:.0f} evictions per token)")


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    result = eval_ppl(args.model, args.text_file, max_tokens=args.max_tokens, seq_len=args.seq_len, mode=args.mode,
                      predictors=args.predictors, sparsity=args.sparsity, threshold_sparsity=args.threshold_sparsity,
                      window=args.window)
    print(f"{result['model']} [{args.mode}, {args.sparsity}]: perplexity {result['ppl']:.3f} over {result['tokens']} "
          f"tokens, FFN active fraction {result['ffn_active_fraction']:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0


def eval_ppl(
    spec: str, text_file: str, *, max_tokens: int = 8192, seq_len: int = 512, mode: str = "dense",
    predictors: Optional[str] = None, sparsity: str = "auto", threshold_sparsity: float = 0.8, window: int = 5,
) -> dict:
    """Perplexity of ``DIR`` or ``MODEL`` in DRAM, with the FFN computed under the mode's active set.

    ``dense`` and ``oracle`` compute the same thing (the rule's active neurons are exactly the true set);
    ``predictor``: a neuron is computed for token t only if predicted active for one of tokens t-k+1..t (by
    ``predictors``, else the model's default ones).
    """
    from .evaluate import perplexity
    from .models import load_any
    from .sparsity import rule_for
    from .text import load_texts

    docs = load_texts(text_file)
    lm = load_any(spec)
    if sparsity == "threshold" and lm.thresholds is None and (Path(spec).expanduser() / MANIFEST).is_file():
        from .sparsity import stored_thresholds

        lm.thresholds = stored_thresholds(open_flash_dir(spec))  # a one-line error: calibrated by convert only
    rule = rule_for(lm.model, lm.tokenizer, sparsity, threshold_sparsity, thresholds=lm.thresholds, cache_key=lm.name)
    mask_fn = None
    if mode == "predictor":
        if not predictors:
            is_flash_dir = (Path(spec).expanduser() / MANIFEST).is_file()
            found = default_predictors(open_flash_dir(spec).manifest.model.source if is_flash_dir else spec)
            if found is None:
                raise LLMFlashError(f"--mode predictor needs --predictors PATH: {lm.name} has no default predictors")
            predictors = str(found)
        from predictors.evaluate import window_mask_fn

        from .arch import adapter_for
        from .models import predictor_dir
        from .predictor import PredictorSet

        ps = PredictorSet.load(predictor_dir(predictors))
        spec_ffn = adapter_for(lm.model.config).ffn_spec(lm.model.config)
        ps.check_compatible(spec_ffn.n_layers, spec_ffn.d_model, spec_ffn.d_ffn, lm.name)
        mask_fn = window_mask_fn(ps, window)
    bos = getattr(lm.model.config, "model_type", "").startswith("gemma")
    out = perplexity(lm.model, lm.tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, rule=rule, mask_fn=mask_fn, bos=bos)
    return {"model": lm.name, "mode": mode, "sparsity": sparsity, "text_file": text_file, "seq_len": seq_len,
            "window": window if mode == "predictor" else None, **out}


def cmd_demo(args: argparse.Namespace) -> int:
    import sys

    from .demo import format_table, run_demo

    def progress(msg: str) -> None:
        print(f"llmflash demo: {msg}", file=sys.stderr, flush=True)

    result = run_demo(max_new_tokens=args.max_new_tokens, prompt=args.prompt, dram_budget=args.dram_budget,
                      model=args.model, progress=progress, resident_dtype=args.resident_dtype)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0
