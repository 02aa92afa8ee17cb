"""DICOM reading on the three real SIIM files, and errors on broken ones."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pneumothorax import dicom, rle

from .conftest import DCM_301, DCM_6904, DCM_MONO1


def test_real_file_and_meta():
    pixels, meta = dicom.read(DCM_301)
    assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
    assert meta["image_id"] == DCM_301.stem == meta["sop_instance_uid"]
    assert (meta["sex"], meta["age"], meta["view"]) == ("F", 50, "PA")
    assert meta["rows"] == meta["columns"] == 1024
    assert meta["pixel_spacing"] == pytest.approx(0.143)
    _, meta2 = dicom.read(DCM_6904)
    assert (meta2["sex"], meta2["age"], meta2["view"]) == ("M", 62, "PA")


def test_fast_decoder_matches_pydicom():
    pixels, _ = dicom.read(DCM_6904)
    reference = pydicom.dcmread(DCM_6904).pixel_array
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1


def test_monochrome1_is_inverted():
    original, _ = dicom.read(DCM_6904)
    inverted, _ = dicom.read(DCM_MONO1)
    assert (inverted.astype(int) == 255 - original.astype(int)).all()


def test_mask_bounding_box_of_301(real_labels):
    mask = rle.decode_union(real_labels[DCM_301.stem])
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 10_133 and (rows.min(), rows.max(), cols.min(), cols.max()) == (94, 403, 193, 469)


def _write_raw(path, pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2", age: str = "062Y"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.PatientAge = age
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_twelve_bits_scaled_and_age_with_unit(tmp_path):
    pixels = np.array([[0, 4095], [2048, 1024]], dtype=np.uint16)
    _write_raw(tmp_path / "x.dcm", pixels, 12)
    out, meta = dicom.read(tmp_path / "x.dcm")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 255], [128, 64]]
    assert meta["age"] == 62 and meta["image_id"] == "x"
    _write_raw(tmp_path / "y.dcm", pixels, 12, "MONOCHROME1")
    inv, _ = dicom.read(tmp_path / "y.dcm")
    assert inv.tolist() == [[255, 0], [127, 191]]


def test_broken_files_name_path_and_reason(tmp_path):
    text = tmp_path / "text.dcm"
    text.write_text("not a dicom")
    with pytest.raises(dicom.DicomError, match="text.dcm"):
        dicom.read(text)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(DCM_301.read_bytes()[:20_000])
    with pytest.raises(dicom.DicomError, match="truncated.dcm"):
        dicom.read(truncated)
    missing = tmp_path / "missing.dcm"
    with pytest.raises(dicom.DicomError, match="missing.dcm"):
        dicom.read(missing)
