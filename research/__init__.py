"""Research code on top of the llmflash core: what the paper's figures and this repository's results need beyond
running a model.

- ``trace``       active-set statistics of real models, and the synthetic trace source (``TraceModel``,
                  ``TraceProvider``) that drives the scale model
- ``scale``       the OPT-6.7B-geometry scale model (synthetic weights written in the flash format)
- ``zeroshot``    BIG-bench multiple-choice tasks, scored by log-likelihood
- ``profile_io``  read throughput vs read size and parallel reads (``llmflash profile-io``)
- ``reproduce``   run every experiment script and write ``results/`` (``llmflash reproduce``)

Depends on ``llmflash`` (core and build) and ``predictors``; nothing in the core imports it.
"""
