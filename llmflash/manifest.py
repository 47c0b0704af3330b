"""The typed manifest of a flash directory (``manifest.json``).

On disk (``indent=1`` JSON; the same keys since format version 1)::

    format, format_version, llmflash_version
    model        {name, source, model_type}
    config       the Hugging Face config as a dict (``AutoConfig.for_model(model_type, **config)`` rebuilds it)
    dtype        float32 | float16 | bfloat16, or int8 | int4 (quantized FFN rows: format version 2)
    ffn          {gated, activation, layout: FlashLayout.to_json()}
    bytes        {model, resident_tensors, ffn_payload, ffn_file, resident_file}
    checksums    {"resident.safetensors": crc32, "ffn.bin": {"per_layer_segment_crc32": [[crc32 per layer] per segment]}}
    neuron_order (optional, a reordered copy) {file, crc32, kind, source, tokens, ...: how the order was chosen}
    thresholds   (optional) {source, tokens, seq_len, by_sparsity: {"0.8": [t per layer], ...}}: the threshold rule's
                 per-layer thresholds, calibrated by ``convert`` (CATS-style quantiles of |h|; see ``sparsity``)
    quantization (format version 2, quantized directories only) {ffn, group_size, scale_dtype, compute_dtype,
                 resident, rounding}: the FFN rows' format (``quant``, ``layout``), the dtype weights are dequantized to and
                 computed in, and the resident weights' stored form (a float dtype, or int8: weight-only, per-row
                 scales)

``thresholds`` was added to format version 1 as an optional key (no version bump: older readers ignore it, and
directories without it still open; they may carry the same table in a ``thresholds.json`` sidecar instead).

A float directory is written as format version 1 (its keys unchanged, so older readers open it); a quantized one
as version 2 (older readers refuse it: "written by a newer llmflash").

``Manifest.from_json`` checks every key and raises a one-line ``FlashFileError`` naming the first missing or
malformed one; ``Manifest.to_json`` writes back exactly these keys. ``flashdir.FlashDirWriter`` is the only writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from . import __version__
from .errors import FlashFileError
from .layout import FlashLayout

FORMAT = "llmflash-flash"
FORMAT_VERSION = 2  # the newest this reader knows; float directories are still written as 1
FLOAT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FFN_FILE = "ffn.bin"
ORDER_FILE = "permutation.npy"  # optional: int64 [n_layers, d_ffn], row j of layer l holds original neuron [l, j]
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
QUANT_DTYPES = ("int8", "int4")
DTYPES = FLOAT_DTYPES + QUANT_DTYPES
RESIDENT_DTYPES = FLOAT_DTYPES + ("int8", "int4")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # display name (alias, directory name, hub id)
    source: str  # what was converted (``MODEL`` as given, or ``synthetic:NAME``)
    model_type: str


@dataclass(frozen=True)
class ByteCounts:
    model: int  # resident_tensors + ffn_payload: what a budget fraction is a fraction of
    resident_tensors: int
    ffn_payload: int  # the FFN weights without row padding
    ffn_file: int  # ffn.bin's size (rows padded to the alignment)
    resident_file: int  # resident.safetensors's size


@dataclass(frozen=True)
class Checksums:
    resident_crc32: int
    ffn_crc32: tuple[tuple[int, ...], ...]  # [segment][layer]

    def to_json(self) -> dict:
        return {RESIDENT: self.resident_crc32, FFN_FILE: {"per_layer_segment_crc32": [list(s) for s in self.ffn_crc32]}}


@dataclass(frozen=True)
class NeuronOrder:
    """The FFN rows are stored in another order than the model's (``llmflash reorder``); ``meta`` says how it was
    chosen (``kind``, ``source``, ``tokens``, ``sparsity``, ...)."""

    file: str
    crc32: int
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> Optional[str]:
        return self.meta.get("kind")

    def to_json(self) -> dict:
        return {**self.meta, "file": self.file, "crc32": self.crc32}


@dataclass(frozen=True)
class CalibratedThresholds:
    """The threshold rule's per-layer thresholds for each target sparsity, and the text they were calibrated on."""

    by_sparsity: dict[str, tuple[float, ...]]  # "0.8" -> (t_0, ..., t_{L-1})
    source: str  # e.g. wiki:train
    tokens: int
    seq_len: int

    def table(self) -> dict[str, list[float]]:
        """The plain table ``sparsity.threshold_rule`` takes."""
        return {k: list(v) for k, v in self.by_sparsity.items()}

    def to_json(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "seq_len": self.seq_len, "by_sparsity": self.table()}


@dataclass(frozen=True)
class Quantization:
    """How a quantized directory stores its weights (``quant``: the codec)."""

    ffn: str  # int8 | int4: the FFN rows (groups of ``group_size`` values along d_model, float16 scales in the row)
    group_size: int
    compute_dtype: str  # what the weights are dequantized to and computed in: float32 | float16 | bfloat16
    resident: str  # the resident weights (attention, embeddings): a float dtype, int8 (weight-only, per-row scales)
    # or int4 (weight-only, float16 scales per ``resident_group_size`` values along each row: ``quant.QLinear``)
    scale_dtype: str = "float16"
    # how the FFN codes were chosen (informational: readers need not know it): "nearest" (round to nearest, the
    # scales by ``quant``'s clipping search), or "gptq:<tokens>:<source>" (``gptq``: error-aware rounding on the
    # inputs of that many calibration tokens); int4 adds ";codes -8..7" where the scale search used the 16th code
    rounding: str = "nearest"
    resident_group_size: int = 0  # int4 resident weights' group size (0 otherwise)

    def to_json(self) -> dict:
        d = {"ffn": self.ffn, "group_size": self.group_size, "scale_dtype": self.scale_dtype,
             "compute_dtype": self.compute_dtype, "resident": self.resident, "rounding": self.rounding}
        if self.resident_group_size:  # (the key of int4 resident weights only: older readers load the others)
            d["resident_group_size"] = self.resident_group_size
        return d


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    config: dict
    dtype: str
    gated: bool
    activation: str
    layout: FlashLayout
    bytes: ByteCounts
    checksums: Checksums
    neuron_order: Optional[NeuronOrder] = None
    thresholds: Optional[CalibratedThresholds] = None
    quantization: Optional[Quantization] = None
    format_version: int = FLOAT_FORMAT_VERSION
    llmflash_version: str = __version__

    def __post_init__(self) -> None:
        if self.quantization is not None and self.format_version < 2:  # readers of version 1 must refuse it
            object.__setattr__(self, "format_version", FORMAT_VERSION)

    @property
    def compute_dtype(self) -> str:
        """The float dtype the model computes in (the weights' own, or what quantized weights are dequantized to)."""
        return self.quantization.compute_dtype if self.quantization is not None else self.dtype

    def replace(self, **changes: Any) -> "Manifest":
        return replace(self, **changes)

    def to_json(self) -> dict:
        out: dict = {
            "format": FORMAT,
            "format_version": self.format_version,
            "llmflash_version": self.llmflash_version,
            "model": {"name": self.model.name, "source": self.model.source, "model_type": self.model.model_type},
            "config": self.config,
            "dtype": self.dtype,
            "ffn": {"gated": self.gated, "activation": self.activation, "layout": self.layout.to_json()},
            "bytes": {
                "model": self.bytes.model,
                "resident_tensors": self.bytes.resident_tensors,
                "ffn_payload": self.bytes.ffn_payload,
                "ffn_file": self.bytes.ffn_file,
                "resident_file": self.bytes.resident_file,
            },
            "checksums": self.checksums.to_json(),
        }
        if self.neuron_order is not None:
            out["neuron_order"] = self.neuron_order.to_json()
        if self.thresholds is not None:
            out["thresholds"] = self.thresholds.to_json()
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_json()
        return out

    @staticmethod
    def from_json(d: Any, where: str = MANIFEST) -> "Manifest":
        """Validate and type a parsed manifest; a one-line ``FlashFileError`` on the first missing or bad key."""

        def get(*keys: str) -> Any:
            cur = d
            for key in keys:
                if not isinstance(cur, dict) or key not in cur:
                    raise FlashFileError(f"{where} lacks {'/'.join(keys)!r}: the manifest is incomplete; re-run convert")
                cur = cur[key]
            return cur

        def num(*keys: str) -> int:
            v = get(*keys)
            if isinstance(v, bool) or not isinstance(v, int):
                raise FlashFileError(f"{where}: {'/'.join(keys)!r} is not an integer: the manifest is corrupt; re-run convert")
            return v

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FlashFileError(f"{where} is not an llmflash manifest (format tag): re-run convert")
        version = num("format_version")
        if version > FORMAT_VERSION:
            raise FlashFileError(f"{where} was written by a newer llmflash: upgrade llmflash")
        dtype = get("dtype")
        if dtype not in DTYPES:
            raise FlashFileError(f"{where}: unknown dtype {dtype!r}: the manifest is corrupt; re-run convert")
        config = get("config")
        if not isinstance(config, dict) or "model_type" not in config:
            raise FlashFileError(f"{where}: 'config' lacks 'model_type': the manifest is corrupt; re-run convert")
        try:
            layout = FlashLayout.from_json(get("ffn", "layout"))
        except FlashFileError:
            raise
        except Exception as err:  # noqa: BLE001 - any malformed layout
            raise FlashFileError(f"{where}: bad 'ffn.layout' ({err}): the manifest is corrupt; re-run convert") from None
        crcs = get("checksums", FFN_FILE)
        per_seg = crcs.get("per_layer_segment_crc32") if isinstance(crcs, dict) else None
        if not isinstance(per_seg, list) or len(per_seg) != len(layout.segments) or any(
            not isinstance(s, list) or len(s) != layout.n_layers for s in per_seg
        ):
            raise FlashFileError(f"{where}: the ffn.bin checksums do not match the layout: re-run convert")
        order = d.get("neuron_order")
        neuron_order = None
        if order:
            meta = {k: v for k, v in order.items() if k not in ("file", "crc32")}
            neuron_order = NeuronOrder(str(get("neuron_order", "file")), num("neuron_order", "crc32"), meta)
        thresholds = None
        if d.get("thresholds") is not None:
            by = get("thresholds", "by_sparsity")
            if not isinstance(by, dict) or any(
                not isinstance(v, list) or len(v) != layout.n_layers
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in v) for v in by.values()
            ):
                raise FlashFileError(f"{where}: 'thresholds.by_sparsity' is not a list of numbers per layer for each "
                                     "sparsity: the manifest is corrupt; re-run convert")
            thresholds = CalibratedThresholds({str(k): tuple(float(t) for t in v) for k, v in by.items()},
                                              str(get("thresholds", "source")), num("thresholds", "tokens"),
                                              num("thresholds", "seq_len"))
        quantization = None
        if d.get("quantization") is not None:
            qd = get("quantization")
            q = Quantization(str(get("quantization", "ffn")), num("quantization", "group_size"),
                             str(get("quantization", "compute_dtype")), str(get("quantization", "resident")),
                             str(qd.get("scale_dtype", "float16")) if isinstance(qd, dict) else "float16",
                             str(qd.get("rounding", "nearest")) if isinstance(qd, dict) else "nearest",
                             num("quantization", "resident_group_size") if isinstance(qd, dict)
                             and "resident_group_size" in qd else 0)
            rgs = q.resident_group_size
            if (q.ffn != dtype or q.group_size != layout.group_size or q.compute_dtype not in FLOAT_DTYPES
                    or q.resident not in RESIDENT_DTYPES or q.scale_dtype != "float16"
                    or (q.resident == "int4") != (rgs > 0) or rgs % 2):
                raise FlashFileError(f"{where}: 'quantization' does not match the dtype and layout: the manifest is "
                                     "corrupt; re-run convert")
            quantization = q
        elif dtype in QUANT_DTYPES:
            raise FlashFileError(f"{where} lacks 'quantization' (dtype {dtype}): the manifest is incomplete; re-run convert")
        if layout.dtype != dtype:
            raise FlashFileError(f"{where}: the layout's dtype is not the manifest's: the manifest is corrupt; re-run convert")
        return Manifest(
            model=ModelInfo(str(get("model", "name")), str(get("model", "source")), str(get("model", "model_type"))),
            config=config,
            dtype=dtype,
            gated=bool(get("ffn", "gated")),
            activation=str(get("ffn", "activation")),
            layout=layout,
            bytes=ByteCounts(num("bytes", "model"), num("bytes", "resident_tensors"), num("bytes", "ffn_payload"),
                             num("bytes", "ffn_file"), num("bytes", "resident_file")),
            checksums=Checksums(num("checksums", RESIDENT), tuple(tuple(int(c) for c in s) for s in per_seg)),
            neuron_order=neuron_order,
            thresholds=thresholds,
            quantization=quantization,
            format_version=version,
            llmflash_version=str(d.get("llmflash_version", "")),
        )
