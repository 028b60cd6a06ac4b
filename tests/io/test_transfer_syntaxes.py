from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from pipelines.io import MissingDecoderError, load_volume
from pipelines.io.dicom import decode as dicom_decode
from tests.conftest import shared_data_dir
from tests.io.dicom_factory import SeriesSpec, write_series

SYNTAXES = shared_data_dir() / "dicom_transfer_syntaxes"
needs_syntaxes = pytest.mark.skipif(
    not (SYNTAXES / "1.dcm").is_file(), reason=f"shared DICOM transfer syntax files not found at {SYNTAXES}"
)


@needs_syntaxes
def test_all_nine_transfer_syntaxes_load_bit_identical():
    volumes = {n: load_volume(SYNTAXES / f"{n}.dcm") for n in range(1, 10)}
    syntaxes = {str(pydicom.dcmread(SYNTAXES / f"{n}.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for n in range(1, 10)}
    assert len(syntaxes) == 7  # explicit/implicit/big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000
    reference = volumes[1]
    # the slice is a Siemens MOSAIC of 64x64 tiles: the volume's slices are its tiles, in order along the normal
    raw = pydicom.dcmread(SYNTAXES / "1.dcm").pixel_array
    size = reference.shape[1]
    tiles = [raw[r:r + size, c:c + size] for r in range(0, raw.shape[0], size) for c in range(0, raw.shape[1], size)]
    slices = [reference[0, :, :, z].numpy().T for z in range(reference.shape[-1])]  # (rows, columns)
    tiles = tiles[:len(slices)]  # the grid's last places stay empty
    assert len(slices) > 1 and any(
        all(np.array_equal(a, b) for a, b in zip(order, slices)) for order in (tiles, tiles[::-1])
    )
    for n, volume in volumes.items():
        assert torch_equal(volume, reference), f"{n}.dcm differs"
        assert np.allclose(volume.affine, reference.affine)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


@needs_syntaxes
def test_missing_decoder_names_syntax_and_package(monkeypatch):
    class Unavailable:
        is_available = False

    monkeypatch.setattr(dicom_decode, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(MissingDecoderError, match=r"9\.dcm: pixel data in transfer syntax JPEG 2000 .*install pylibjpeg and pylibjpeg-openjpeg"):
        load_volume(SYNTAXES / "9.dcm")
    load_volume(SYNTAXES / "1.dcm")  # uncompressed data needs no decoder


def test_syntax_without_any_decoder(tmp_path):
    (path,) = write_series(tmp_path, SeriesSpec(slice_positions=[0.0]))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no pixel decoder exists
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MissingDecoderError, match=r"no decoder exists for transfer syntax MPEG2"):
        load_volume(path)
