"""llmflash: run language models larger than DRAM by reading sparse FFN neurons from flash.

Reference implementation of "LLM in a flash" (Alizadeh et al., 2023). One concept per module:

- ``errors``   user-facing errors (one line, no traceback in the CLI)
- ``models``   model resolution (aliases, hub ids, local dirs, GGUF) and loading
- ``arch``     architecture adapters (Llama family, OPT family): where the FFN lives
- ``ffn``      FFN math shared by every path: weights, activation, sparsity rules
- ``layout``   the flash file layout (row-column bundles, 4 KiB aligned) and manifest
- ``convert``  writing a flash directory atomically
- ``storage``  aligned buffers and the parallel direct-I/O reader
- ``cache``    the preallocated sliding-window neuron cache
- ``engine``   the inference engine (dense, naive, hybrid, oracle, predictor modes)
- ``cli``      the thin command-line layer
"""

__version__ = "0.1.0"
