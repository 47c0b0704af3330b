"""The flash directory format: its one writer (``write_flash_dir``), its reader (``open_flash_dir``), and the model
skeleton rebuilt from it (resident weights loaded, FFN rows left on flash).

Contents of ``DIR``::

    manifest.json             format, model config, dtype, byte counts, FFN layout, checksums (``manifest.Manifest``)
    resident.safetensors      embeddings, attention, norms, per-neuron FFN biases (everything that stays in DRAM)
    ffn.bin                   the FFN neurons (see ``layout``), 4096-byte aligned rows
    tokenizer files           saved by the tokenizer
    thresholds.json           (directories converted before the manifest kept them) the threshold rule's thresholds

Writing is atomic (a temporary sibling directory renamed at the end); ``convert``, ``reorder`` and the research scale
model all write through ``write_flash_dir``, which builds the manifest from what was written. ``ffn.bin`` is checked against per-layer
CRC32s once after any change (the result is remembered in ``.verified``, keyed by size and mtime).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import Adapter, HFModel, adapter_for
from .errors import FlashFileError
from .ffn import FFNWeights
from .layout import FlashLayout
from .manifest import (
    FFN_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ORDER_FILE,
    RESIDENT,
    ByteCounts,
    CalibratedThresholds,
    Checksums,
    Manifest,
    ModelInfo,
    NeuronOrder,
    Quantization,
)
from .paths import atomic_dir
from .quant import QROWS, QSCALE, QWEIGHT, install_quantized_resident, part_rows, storage_dtype
from .storage import ALIGN_BYTES, READ_RANGE_CHUNK_BYTES, FlashReader, align_up, aligned_buffer, read_range

log = logging.getLogger(__name__)

THRESHOLDS = "thresholds.json"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACT_BIAS = "llmflash.ffn.{}.act_bias"
OUT_BIAS = "llmflash.ffn.{}.out_bias"


def _crc(buf: Any) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


# -------------------------------------------------------------------------------------------------------------- open


@dataclass
class FlashDir:
    """An opened, validated flash directory."""

    path: Path
    manifest: Manifest
    layout: FlashLayout
    resident_buffer: Optional[mmap.mmap] = None  # the aligned buffer resident tensors view (after read_resident)
    # keep the resident tensors after the first read_resident and hand the same ones to every later caller (several
    # engines on one directory in one process: each would otherwise read them again)
    keep_resident: bool = False
    _order: Optional[np.ndarray] = None  # neuron_order, once loaded and checked
    _resident: Optional[dict[str, Tensor]] = None  # kept resident tensors (keep_resident)

    @property
    def name(self) -> str:
        return self.manifest.model.name

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (quantized weights are dequantized to it)."""
        return TORCH_DTYPES[self.manifest.compute_dtype]

    @property
    def row_dtype(self) -> torch.dtype:
        """The dtype of tensors over ``ffn.bin``'s rows: the compute dtype, or uint8 for quantized rows."""
        return storage_dtype(self.layout, self.dtype)

    @property
    def model_bytes(self) -> int:
        return self.manifest.bytes.model

    @property
    def ffn_path(self) -> Path:
        return self.path / FFN_FILE

    @property
    def resident_path(self) -> Path:
        return self.path / RESIDENT

    @property
    def activation(self) -> str:
        return self.manifest.activation

    @property
    def gated(self) -> bool:
        return self.manifest.gated

    @property
    def neuron_order(self) -> Optional[np.ndarray]:
        """int64 [n_layers, d_ffn] when the FFN rows are stored in another order than the model's (``llmflash
        reorder``): row j of layer l holds original neuron ``order[l, j]``; None for the model's own order."""
        info = self.manifest.neuron_order
        if info is None:
            return None
        if self._order is None:
            f = self.path / ORDER_FILE
            lay = self.layout
            try:
                order = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise FlashFileError(f"{f} is missing or corrupt ({str(err)[:80]}): re-run reorder") from None
            if order.shape != (lay.n_layers, lay.d_ffn) or _crc(np.ascontiguousarray(order, np.int64).data) != info.crc32:
                raise FlashFileError(f"{f} does not match the manifest (shape {order.shape}, or its checksum): re-run reorder")
            if not (np.sort(order, axis=1) == np.arange(lay.d_ffn)).all():
                raise FlashFileError(f"{f} is not a permutation of each layer's neurons: re-run reorder")
            self._order = order.astype(np.int64)
        return self._order

    def config(self) -> Any:
        from transformers import AutoConfig

        cfg = dict(self.manifest.config)
        model_type = cfg.pop("model_type")
        return AutoConfig.for_model(model_type, **cfg)

    def gate_dir(self) -> Optional[Path]:
        """A gated sparse model's gate (a predictor set directory in the model's neuron order), or None."""
        spec = self.manifest.config.get("llmflash_sparsity") or {}
        if not spec.get("gate"):
            return None
        path = self.path / spec["gate"]
        if not path.is_dir():
            raise FlashFileError(f"{path} is missing (the model's gate): re-run convert")
        return path

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as err:  # noqa: BLE001
            raise FlashFileError(f"{self.path}: cannot load the tokenizer ({str(err).splitlines()[0][:150]}); re-run convert") from None

    def thresholds(self) -> Optional[dict[str, list[float]]]:
        """The threshold rule's calibrated table {"0.8": [t per layer], ...} (``convert`` stores it in the manifest;
        older directories may have a ``thresholds.json`` sidecar instead), or None when the directory has none."""
        if self.manifest.thresholds is not None:
            return self.manifest.thresholds.table()
        p = self.path / THRESHOLDS
        if not p.is_file():
            return None
        try:
            table = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise FlashFileError(f"{p} is corrupt ({str(err)[:80]}): re-run convert") from None
        if not isinstance(table, dict):
            raise FlashFileError(f"{p} is not a table of thresholds: re-run convert")
        return table

    # -- checks

    def verify_ffn(self, progress: bool = False) -> None:
        """Check ``ffn.bin`` against the manifest's per-layer CRC32s (skipped if unchanged since the last check)."""
        st = self.ffn_path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{_file_crc_manifest(self.manifest)}"
        marker = self.path / ".verified"
        if marker.is_file() and marker.read_text() == stamp:
            return

        expected = self.manifest.checksums.ffn_crc32
        for layer in tqdm(range(self.layout.n_layers), desc="verifying ffn.bin", disable=not progress):
            for s, seg in enumerate(self.layout.segments):
                nbytes = seg.stride_bytes * self.layout.d_ffn
                buf = read_range(self.ffn_path, seg.layer_offsets[layer], nbytes)
                if _crc(memoryview(buf)[:nbytes]) != expected[s][layer]:
                    raise FlashFileError(
                        f"checksum error in {self.ffn_path} (layer {layer}): the file is corrupt; re-run convert"
                    )
        try:
            marker.write_text(stamp)
        except OSError:
            pass

    def read_resident(self, holes: Sequence[tuple[int, int]] = ()) -> dict[str, Tensor]:
        """Load resident weights with direct I/O (no page cache), checksum-verified. Tensors view one aligned buffer
        (naive mode re-reads the file into this same buffer every token).

        ``holes``: sorted, page-aligned byte ranges [a, b) of the file not to hold (``layer_stream``: streamed
        layers' tensors). Their pages of the buffer are never touched, so they take no DRAM; the file is still read
        whole for its checksum (the holes through a small bounce buffer). The tensors over them are not to be used, and
        such a buffer is neither kept (``keep_resident``) nor named ``resident_buffer`` (naive mode's re-reads)."""
        if self._resident is not None and not holes:
            return self._resident
        size = self.resident_path.stat().st_size
        if holes:
            buf = _read_with_holes(self.resident_path, size, holes, self.manifest.checksums.resident_crc32)
        else:
            buf = read_range(self.resident_path, 0, size)
            if _crc(memoryview(buf)[:size]) != self.manifest.checksums.resident_crc32:
                raise FlashFileError(f"checksum error in {self.resident_path}: the file is corrupt; re-run convert")
        tensors = parse_safetensors(buf, size)
        if not holes:
            self.resident_buffer = buf
            if self.keep_resident:
                self._resident = tensors
        return tensors


def _read_with_holes(path: Path, size: int, holes: Sequence[tuple[int, int]], crc32: int) -> mmap.mmap:
    """``read_resident`` with holes: the file in order, each part read straight into the (lazily faulted) buffer, or
    for a hole into a bounce buffer, the checksum taken over every byte."""
    total = align_up(size)
    buf = aligned_buffer(total, populate=False)
    bounce = aligned_buffer(READ_RANGE_CHUNK_BYTES * 4)
    parts, at = [], 0
    for a, b in holes:
        if a % ALIGN_BYTES or b % ALIGN_BYTES or not at <= a < b <= total:
            raise ValueError(f"holes must be sorted, disjoint, page-aligned ranges within the file: {(a, b)}")
        parts += [(at, a, False), (a, b, True)]
        at = b
    parts.append((at, total, False))
    crc = 0
    with FlashReader(path, n_threads=4) as reader:
        for a, b, hole in parts:
            for off in range(a, b, len(bounce)):
                n = min(len(bounce), b - off)
                dest, base = (bounce, off) if hole else (buf, 0)
                starts = np.arange(0, n, READ_RANGE_CHUNK_BYTES, dtype=np.int64)
                reader.read(dest, starts + off, np.minimum(READ_RANGE_CHUNK_BYTES, n - starts), starts + off - base)
                valid = max(0, min(n, size - off))
                crc = zlib.crc32(memoryview(dest)[off - base : off - base + valid], crc)
    bounce.close()
    if crc & 0xFFFFFFFF != crc32:
        raise FlashFileError(f"checksum error in {path}: the file is corrupt; re-run convert")
    return buf


def _file_crc_manifest(manifest: Manifest) -> int:
    return _crc(json.dumps(manifest.checksums.to_json(), sort_keys=True).encode())


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "I8": torch.int8, "U8": torch.uint8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype (safetensors' name: "F32", "U8", ...), shape and absolute byte
    range [start, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def view(self, buf: Any, offset: int) -> Tensor:
        """The tensor over ``buf`` (no copy), its bytes at ``offset`` there."""
        dt = SAFETENSORS_DTYPES[self.dtype]
        count = (self.end - self.start) // torch.empty(0, dtype=dt).element_size()
        t = torch.frombuffer(buf, dtype=dt, count=count, offset=offset) if count else torch.empty(0, dtype=dt)
        return t.view(self.shape)


def safetensors_entries(head: Callable[[int, int], bytes]) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file from its header; ``head(offset, n)`` gives the file's bytes there."""
    (header_len,) = struct.unpack("<Q", head(0, 8))
    header = json.loads(head(8, header_len))
    base = 8 + header_len
    return {name: TensorEntry(info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0],
                              base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def parse_safetensors(buf: Any, size: int) -> dict[str, Tensor]:
    """Zero-copy tensors over a safetensors file held in ``buf`` (the file's first ``size`` bytes)."""
    mv = memoryview(buf)
    entries = safetensors_entries(lambda off, n: bytes(mv[off : off + n]))
    return {name: e.view(buf, e.start) for name, e in entries.items()}


def open_flash_dir(path: str | Path) -> FlashDir:
    """Open and validate ``DIR`` (manifest, file sizes, format). One-line ``FlashFileError`` on any problem."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FlashFileError(f"flash directory {path} does not exist: create it with `llmflash convert MODEL --out {path}`")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FlashFileError(f"{path} has no {MANIFEST}: not a flash directory (run `llmflash convert MODEL --out {path}`)")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError) as err:
        raise FlashFileError(f"{mpath} is corrupt ({str(err)[:80]}): re-run convert") from None
    manifest = Manifest.from_json(raw, str(mpath))
    layout = manifest.layout
    for fname, expected in ((FFN_FILE, layout.file_bytes), (RESIDENT, manifest.bytes.resident_file)):
        f = path / fname
        if not f.is_file():
            raise FlashFileError(f"{f} is missing: re-run convert")
        if f.stat().st_size != expected:
            raise FlashFileError(
                f"{f} has {f.stat().st_size} bytes but the manifest expects {expected}: the file is truncated or from "
                f"another model; re-run convert"
            )
    fd = FlashDir(path, manifest, layout)
    if manifest.config.get("num_hidden_layers") != layout.n_layers:
        raise FlashFileError(f"{mpath}: config and layout disagree on the number of layers: re-run convert")
    return fd


# ------------------------------------------------------------------------------------------------------- the writer


class FlashDirWriter:
    """Fills one flash directory (``dir``, a temporary sibling until the ``write_flash_dir`` block ends).

    ``ffn.bin`` comes layer by layer and segment by segment in file order through ``write_ffn`` (CRC32s kept), or
    from elsewhere (``ffn_written``: a hard link, with its known CRC32s); ``resident.safetensors`` through
    ``save_resident`` or ``resident_written``; other files (tokenizer, sidecars) go straight into ``dir``. ``finish``
    checks that everything is there, writes ``manifest.json`` and returns the ``Manifest``.
    """

    def __init__(self, tmp: Path, layout: FlashLayout) -> None:
        self.dir = tmp
        self.layout = layout
        self.manifest: Optional[Manifest] = None
        self._ffn: Optional[IO[bytes]] = None
        self._ffn_crc: list[list[int]] = [[] for _ in layout.segments]
        self._ffn_external = False
        self._resident_tensor_bytes: Optional[int] = None
        self._resident_crc: Optional[int] = None

    def write_ffn(self, layer: int, segment: int, data: Any) -> None:
        """The rows of one layer's segment (``stride_bytes * d_ffn`` bytes), in file order."""
        if self._ffn is None:
            self._ffn = open(self.dir / FFN_FILE, "wb")
        seg = self.layout.segments[segment]
        gap = seg.layer_offsets[layer] - self._ffn.tell()
        if 0 < gap < ALIGN_BYTES:  # a quantized layout's layer starts on the next page: zeros between
            self._ffn.write(bytes(gap))
        if self._ffn.tell() != seg.layer_offsets[layer] or memoryview(data).nbytes != seg.stride_bytes * self.layout.d_ffn:
            raise ValueError(f"ffn.bin: layer {layer} segment {segment} out of order or of the wrong size")
        self._ffn.write(data)
        self._ffn_crc[segment].append(_crc(data))

    def ffn_written(self, crc32: Sequence[Sequence[int]]) -> None:
        """``dir/ffn.bin`` was put there by the caller (e.g. a hard link); ``crc32[segment][layer]``."""
        self._ffn_crc = [list(s) for s in crc32]
        self._ffn_external = True

    def save_resident(self, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.dir / RESIDENT), metadata={"format": "pt"})
        self._resident_tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def resident_written(self, tensor_bytes: int, crc32: Optional[int] = None) -> None:
        """``dir/resident.safetensors`` was written (or copied) by the caller; its CRC32 is computed if not given."""
        self._resident_tensor_bytes = tensor_bytes
        self._resident_crc = crc32

    def close(self) -> None:
        if self._ffn is not None:
            if 0 < self.layout.file_bytes - self._ffn.tell() < ALIGN_BYTES and all(
                    len(c) == self.layout.n_layers for c in self._ffn_crc):  # complete: pad the last page
                self._ffn.write(bytes(self.layout.file_bytes - self._ffn.tell()))
            self._ffn.flush()
            os.fsync(self._ffn.fileno())
            self._ffn.close()
            self._ffn = None

    def finish(self, model: ModelInfo, config: dict, dtype: str, gated: bool, activation: str,
               neuron_order: Optional[NeuronOrder] = None, thresholds: Optional[CalibratedThresholds] = None,
               quantization: Optional[Quantization] = None) -> Manifest:
        """``quantization``: required when the layout is quantized (the manifest is then format version 2)."""
        self.close()
        lay = self.layout
        ffn_path, res_path = self.dir / FFN_FILE, self.dir / RESIDENT
        if any(len(c) != lay.n_layers for c in self._ffn_crc) or not ffn_path.is_file():
            raise ValueError("ffn.bin is incomplete: every layer of every segment must be written")
        if ffn_path.stat().st_size != lay.file_bytes:
            raise ValueError(f"ffn.bin has {ffn_path.stat().st_size} bytes, the layout {lay.file_bytes}")
        if self._resident_tensor_bytes is None or not res_path.is_file():
            raise ValueError("resident.safetensors was not written")
        resident_crc = self._resident_crc if self._resident_crc is not None else _file_crc(res_path)
        payload = lay.neuron_payload_bytes * lay.d_ffn * lay.n_layers
        manifest = Manifest(
            model=model, config=config, dtype=dtype, gated=gated, activation=activation, layout=lay,
            bytes=ByteCounts(model=self._resident_tensor_bytes + payload, resident_tensors=self._resident_tensor_bytes,
                             ffn_payload=payload, ffn_file=lay.file_bytes, resident_file=res_path.stat().st_size),
            checksums=Checksums(resident_crc, tuple(tuple(c) for c in self._ffn_crc)),
            neuron_order=neuron_order,
            thresholds=thresholds,
            quantization=quantization,
        )
        if (lay.quantized and quantization is None) or (quantization is not None and (
                quantization.ffn != lay.dtype or quantization.group_size != lay.group_size or dtype != lay.dtype)):
            raise ValueError("a quantized layout needs its quantization (same dtype and group size)")
        if thresholds is not None and any(len(t) != lay.n_layers for t in thresholds.by_sparsity.values()):
            raise ValueError("thresholds: one per layer for each sparsity")
        (self.dir / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1, default=str))
        self.manifest = manifest
        return manifest


@contextmanager
def write_flash_dir(out: Path, layout: FlashLayout) -> Iterator[FlashDirWriter]:
    """The one writer of flash directories: yields a ``FlashDirWriter``; the directory appears at ``out`` (replacing
    what was there) only when the block ends without an error and ``finish`` was called."""
    with atomic_dir(Path(out), overwrite=True) as tmp:
        w = FlashDirWriter(tmp, layout)
        try:
            yield w
        finally:
            w.close()
        if w.manifest is None:
            raise ValueError(f"{out}: the flash directory was left without finish()")


# ----------------------------------------------------------------------------------------------------- the skeleton


def build_skeleton(fd: FlashDir, resident: dict[str, Tensor]) -> tuple[HFModel, Adapter, dict[int, tuple]]:
    """The Hugging Face model with resident weights loaded and FFN weights absent (to be provided by FFN modules).

    Returns (model, adapter, ffn_biases) with ffn_biases[layer] = (act_bias or None, out_bias or None).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = fd.config()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=fd.dtype, attn_implementation="sdpa")
    adapter = adapter_for(config)
    biases = {}
    state = {}
    # int8 / int4 resident weights (``quant``): installed as their modules below
    quantized = {n for n in resident if n.endswith((QWEIGHT.format(""), QSCALE.format(""), QROWS.format("")))}
    for name, t in resident.items():
        if name.startswith("llmflash.ffn.") or name in quantized:
            continue
        state[name] = t
    for layer in range(fd.layout.n_layers):
        biases[layer] = (resident.get(ACT_BIAS.format(layer)), resident.get(OUT_BIAS.format(layer)))
        adapter.install_ffn(model, layer, nn.Identity())  # placeholder, replaced by the engine's FFN modules
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shapes that differ: the manifest's config is not the one the weights were saved with
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))[:200]
        raise FlashFileError(f"{fd.path / MANIFEST}: its config does not fit {fd.resident_path.name} ({first}): "
                             "the manifest is corrupt; re-run convert") from None
    if unexpected:
        raise FlashFileError(f"{fd.resident_path} has tensors this model does not ({unexpected[:3]}...): re-run convert")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if quantized:
        q = fd.manifest.quantization
        # modules over the tensors (a tied head shares the rows)
        install_quantized_resident(model, resident, tied, q.resident_group_size if q is not None else 0, fd.dtype)
    if tied and isinstance(getattr(model.get_output_embeddings(), "weight", None), nn.Parameter):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise FlashFileError(f"{fd.resident_path} lacks weights {still_meta[:3]}: re-run convert")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, adapter, biases


def ffn_weights_from_rows(fd: FlashDir, rows: list[Tensor], biases: tuple) -> FFNWeights:
    """gate/up/down of per-segment row tensors [n, stride_elems] (as read from ``ffn.bin``): views of float rows, the
    dequantized values (in the compute dtype) of quantized ones."""

    def part(p: str) -> Tensor:
        return part_rows(fd.layout, rows, p, 0, rows[0].shape[0], fd.dtype)

    return FFNWeights(part("gate") if fd.gated else None, part("up"), part("down"), biases[0], biases[1])


__all__ = ["open_flash_dir", "write_flash_dir", "FlashDir", "FlashDirWriter", "Manifest", "build_skeleton", "ALIGN_BYTES",
           "FORMAT", "FORMAT_VERSION", "MANIFEST", "RESIDENT", "FFN_FILE", "ORDER_FILE"]
