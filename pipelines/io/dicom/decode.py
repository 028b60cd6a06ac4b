"""Stored pixel values of one slice: read straight from the file, or decoded by a decoder that raises.

Compressed transfer syntaxes are decoded by pydicom's plugins, each syntax by one that reports a
damaged codestream as an exception: JPEG 2000 by OpenJPEG (``pylibjpeg-openjpeg``), JPEG-LS by
CharLS (``pyjpegls``), JPEG by GDCM (``python-gdcm``), RLE by pydicom itself. GDCM is not asked for
JPEG 2000 or JPEG-LS: on a codestream with a damaged header it throws a C++ exception that nothing
catches, and the whole process aborts (SIGABRT), taking every other case of a run with it.

A multi-frame or tiled (MOSAIC, grid) file is decoded once and its frames or tiles are cut from the
cached result.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import UID

from pipelines.io.dicom.scan import SliceRecord
from pipelines.io.errors import CorruptFileError, MissingDecoderError

try:
    from pydicom.pixels import get_decoder
except ImportError:  # pydicom 2, as in the MONAI Label environment: its pixel data handlers are asked instead
    get_decoder = None

__all__ = ["decode_slice", "decoding_plugin"]

_DECODER_PACKAGES = {
    "pylibjpeg": "pylibjpeg and pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)",
    "pyjpegls": "pyjpegls (pip install pyjpegls)",
    "gdcm": "python-gdcm (pip install python-gdcm)",
}
_CODEC_NAMES = {"pylibjpeg": "JPEG 2000", "pyjpegls": "JPEG-LS", "gdcm": "JPEG"}


def decoding_plugin(uid: UID) -> str | None:
    """The pydicom decoding plugin used for a compressed syntax (None: pydicom's own choice)."""
    if uid in pydicom.uid.JPEG2000TransferSyntaxes:
        return "pylibjpeg"
    if uid in pydicom.uid.JPEGLSTransferSyntaxes:
        return "pyjpegls"
    if uid in pydicom.uid.JPEGTransferSyntaxes:
        return "gdcm"
    return None


def _check_decoder(record: SliceRecord) -> str | None:
    """The plugin to decode ``record`` with; raises when none is installed."""
    uid = UID(record.transfer_syntax)
    if not uid.is_compressed:
        return None
    plugin = decoding_plugin(uid)
    if get_decoder is None:  # pydicom 2: any available handler
        handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(uid)]
        if not handlers:
            raise MissingDecoderError(f"{record.path}: no decoder exists for transfer syntax {uid.name} ({uid})")
        if not any(h.is_available() for h in handlers):
            raise MissingDecoderError(
                f"{record.path}: pixel data in transfer syntax {uid.name} ({uid}) needs a decoder: "
                f"install {_DECODER_PACKAGES['gdcm']}"
            )
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise MissingDecoderError(f"{record.path}: no decoder exists for transfer syntax {uid.name} ({uid})") from exc
    available = decoder.is_available if plugin is None else plugin in getattr(decoder, "available_plugins", ())
    if not available:
        raise MissingDecoderError(
            f"{record.path}: pixel data in transfer syntax {uid.name} ({uid}) needs a decoder: "
            f"install {_DECODER_PACKAGES.get(plugin, _DECODER_PACKAGES['gdcm'])}"
        )
    return plugin


def _decode_file(record: SliceRecord, plugin: str | None) -> np.ndarray:
    """Every frame of the file: ``(rows, columns)`` or ``(frames, rows, columns)``."""
    ds = pydicom.dcmread(record.path)
    if plugin is not None:
        ds.pixel_array_options(decoding_plugin=plugin)
    try:
        return ds.pixel_array
    except StopIteration as exc:  # pydicom's frame generator runs out: fewer fragments than frames
        frames = ds.get("NumberOfFrames", 1)
        raise CorruptFileError(f"{record.path}: pixel data holds fewer frames than NumberOfFrames ({frames})") from exc


def decode_slice(record: SliceRecord, cache: dict) -> np.ndarray:
    """Stored pixel values of one slice ``(rows, columns)``; a multi-frame or tiled file is decoded
    once into ``cache`` (which holds one file at a time)."""
    if record.pixel_offset is not None and record.tile is None:
        return _read_direct(record, record.rows, record.columns)
    plugin = _check_decoder(record)
    whole = record.frame is not None or record.tile is not None
    try:
        if not whole:
            array = _read_direct(record, record.rows, record.columns) if record.pixel_offset is not None \
                else _decode_file(record, plugin)
        else:
            if record.path not in cache:
                cache.clear()
                cache[record.path] = _stored_frames(record, plugin)
            array = cache[record.path]
            if record.frame is not None:
                if array.ndim != 3 or record.frame >= array.shape[0]:
                    raise CorruptFileError(
                        f"{record.path}: pixel data holds {1 if array.ndim == 2 else array.shape[0]} frame(s), "
                        f"frame {record.frame + 1} is missing"
                    )
                array = array[record.frame]
            if record.tile is not None:
                t = record.tile
                array = array[t.row:t.row + t.rows, t.column:t.column + t.columns]
    except (MissingDecoderError, CorruptFileError):
        raise
    except Exception as exc:  # decoders raise many types for damaged or inconsistent pixel data
        codec = _CODEC_NAMES.get(plugin or "")
        what = f"corrupt {codec} pixel data" if codec else "unreadable pixel data"
        raise CorruptFileError(f"{record.path}: {what} ({type(exc).__name__}: {exc})") from exc
    if array.shape != (record.rows, record.columns):
        raise CorruptFileError(
            f"{record.path}: pixel data of shape {array.shape}, expected one {record.rows}x{record.columns} plane"
        )
    return array


def _stored_frames(record: SliceRecord, plugin: str | None) -> np.ndarray:
    if record.pixel_offset is not None:  # a tiled frame stored uncompressed
        ds = pydicom.dcmread(record.path, stop_before_pixels=True)
        return _read_direct(record, int(ds.Rows), int(ds.Columns))
    return _decode_file(record, plugin)


def _read_direct(record: SliceRecord, rows: int, columns: int) -> np.ndarray:
    """Uncompressed little-endian pixels read at the offset found by the scan; bits above BitsStored
    shifted out (masked when unsigned, sign-extended when signed)."""
    count = rows * columns
    array = np.fromfile(record.path, dtype=record.pixel_dtype, count=count, offset=record.pixel_offset)
    if array.size != count:
        raise CorruptFileError(f"{record.path}: unreadable pixel data (file ends after {array.size} of {count} pixels)")
    if record.pixel_unused_bits:
        np.left_shift(array, record.pixel_unused_bits, out=array)
        np.right_shift(array, record.pixel_unused_bits, out=array)
    return array.reshape(rows, columns)
