"""llmflash: run language models larger than DRAM by reading sparse FFN neurons from flash.

Reference implementation of "LLM in a flash" (Alizadeh et al., 2023). The map of the house, in layers; a module
imports only from its own layer and the layers listed before it (``tests/test_layers.py`` enforces it):

Core (this package)
    ``errors``     user-facing errors (one line, no traceback in the CLI)
    ``paths``      atomic files and directories, the cache directory
    ``storage``    aligned buffers and the parallel direct-I/O reader
    ``threads``    reader and compute thread counts chosen from the cores free at start
    ``layout``     the ``ffn.bin`` layout (row-column bundles, 4 KiB aligned; quantized rows 512 B) and read plans
    ``quant``      group-wise int8/int4 codec of quantized FFN rows, int8 resident weights (``Int8Linear``)
    ``manifest``   the typed ``Manifest`` of a flash directory
    ``flashdir``   the flash format: its one writer (``write_flash_dir``), its reader (``open_flash_dir``), the skeleton
    ``layer_stream`` streamed layers: decoder layers' resident weights read from flash every token into slot buffers
                   (budgets below the resident weights' share)
    ``ffn``        FFN math shared by every path: weights, activation, sparsity rules, ``DenseFFN``
    ``arch``       architecture adapters (Llama family, OPT family): where the FFN lives
    ``models``     model resolution (aliases, hub ids, local dirs, GGUF) and loading, a flash directory in memory
    ``budget``     the DRAM budget planner (pure arithmetic: the caches' rows, the reserve, the minimum)
    ``cache_policy`` which neurons a layer's cache keeps: sliding window (default), LRU, pinned hot set + window
    ``cache``      the preallocated neuron cache (slots and a free list, hit/miss/eviction counters; membership: its
                   policy)
    ``native``     the native sparse step's C++ source and its loader (built with g++ on first use, cached; None and
                   one warning where it cannot build)
    ``step``       the sparse step's reads into cache slots (``slot_plan``) and its native compute (``NativeRows``)
    ``decode_step`` a Llama-family layer's attention for one token in native code, in front of transformers' forward
    ``graph_step`` on a GPU, an OPT or Llama-family layer's attention and the predictor's network over a static
                   key/value buffer, one CUDA graph per layer
    ``predictor``  the predictor runtime (``PredictorSet``: load, predict; low-rank and low-bit sets)
    ``provider``   active-set providers (``ActiveSetProvider`` declares every capability; oracle, predictor)
    ``masked``     a layer's FFN over its whole device cache, unneeded rows masked, as one CUDA graph per layer
    ``backend``    where the model computes: the CPU, or an accelerator the host copies rows to (pinned buffers,
                   asynchronous copies, one wait per layer for the active set)
    ``metrics``, ``hooks``: one per-token record (``TokenStats``) and run result; observer hooks for experiments
    ``engine``     the inference engine (dense, naive, hybrid, oracle, predictor modes)
    ``sparsity``, ``text``, ``corpora``, ``evaluate``, ``report``: thresholds, text sources, perplexity, JSON/format helpers
    ``sparse_model``, ``relufy_v1_format``: loading a trained sparse model (``llmflash-sparse/1``; the first
                   relufication's ``llmflash-relufy/1``, loading only)
Build
    ``convert``    a model into a flash directory (thresholds calibrated and stored in the manifest)
    ``gptq``       error-aware rounding of quantized FFN rows on calibration text (convert's int8/int4 codes)
    ``reorder``    a copy whose neurons that fire together are neighbours (after Ripple)
Training
    the top-level ``predictors`` and ``sparsetrain`` packages (``sparsetrain.relufy_v1``: the first relufication)
Research
    the top-level ``research`` package (trace source, scale model, zero-shot, profile-io, reproduce)
Command line
    ``cli``, ``commands``, ``demo``: the thin layer over all of the above
"""

__version__ = "0.1.0"
