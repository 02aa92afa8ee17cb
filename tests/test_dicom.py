"""DICOM reading on the three real SIIM files, and errors on broken ones."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pneumothorax.io import dicom, rle

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
    ds = _clinical(pixels, bits, PhotometricInterpretation=photometric, PatientAge=age)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
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


# --- clinical DICOMs: LUTs, signed values, compressed transfer syntaxes -----------------------------------
SIIM_PIXEL_SHA1 = {  # dicom.read of the real files before LUTs were applied: their caches must not move
    DCM_301: "0a9705268853d214a312631b5cf9302b973277c2",
    DCM_6904: "6b526aedbb7cb573df099febab51fb723a871962",
    DCM_MONO1: "52d3ec8216d9d61c026b931ee4f3073267c0eb84",
}


def _clinical(pixels: np.ndarray, bits: int, signed: bool = False, **tags) -> pydicom.Dataset:
    """An uncompressed single-frame 16-bit-allocated DICOM with ``tags`` (windows, rescale, photometric)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4.5"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, tags.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def _ramp(low: int, high: int, shape=(64, 48)) -> np.ndarray:
    return np.linspace(low, high, num=shape[0] * shape[1]).round().astype(np.int64).reshape(shape)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window onto 0-255, written out independently of the reader."""
    out = np.where(
        values <= center - 0.5 - (width - 1) / 2,
        0.0,
        np.where(values > center - 0.5 + (width - 1) / 2, 1.0, (values - (center - 0.5)) / (width - 1) + 0.5),
    )
    return np.rint(out * 255).astype(np.uint8)


def test_the_real_siim_files_keep_their_exact_pixels():
    import hashlib

    for path, sha1 in SIIM_PIXEL_SHA1.items():
        assert hashlib.sha1(dicom.read(path)[0].tobytes()).hexdigest() == sha1, path.name


def test_twelve_bits_with_a_window_show_what_a_viewer_shows(tmp_path):
    stored = _ramp(0, 4095)
    _clinical(stored, 12, WindowCenter=1000, WindowWidth=400).save_as(tmp_path / "w.dcm", enforce_file_format=True)
    out, _ = dicom.read(tmp_path / "w.dcm")
    expected = _window(stored, 1000, 400)
    assert np.array_equal(out, expected)
    assert (out == 0).mean() > 0.15 and (out == 255).mean() > 0.6  # the window clips both ends
    several = _clinical(
        stored, 12, WindowCenter=[1000, 2000], WindowWidth=[400, 800], PhotometricInterpretation="MONOCHROME1"
    )
    several.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    assert np.array_equal(dicom.read(tmp_path / "m1.dcm")[0], 255 - expected)  # the first window, inverted


def test_signed_sixteen_bits_with_a_rescale(tmp_path):
    stored = _ramp(-2000, 3000)
    hu = stored * 2 - 1024  # RescaleSlope 2, RescaleIntercept -1024
    rescaled = _clinical(stored, 16, signed=True, RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US")
    windowed = _clinical(
        stored, 16, signed=True, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    rescaled.save_as(tmp_path / "r.dcm", enforce_file_format=True)
    windowed.save_as(tmp_path / "rw.dcm", enforce_file_format=True)
    assert np.array_equal(dicom.read(tmp_path / "rw.dcm")[0], _window(hu, 40, 400))  # the window is in rescaled units
    stretched = np.rint((hu - hu.min()) * (255.0 / (hu.max() - hu.min()))).astype(np.uint8)
    assert np.array_equal(dicom.read(tmp_path / "r.dcm")[0], stretched)  # no window: min to max


def test_compressed_syntaxes_decode_to_the_uncompressed_pixels(tmp_path):
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    stored = (_ramp(0, 4095) * 7 % 4096).astype(np.uint16)  # not a smooth ramp: compressors must earn it
    plain = _clinical(stored, 12, WindowCenter=2048, WindowWidth=4096)
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    expected, _ = dicom.read(tmp_path / "plain.dcm")
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds = pydicom.dcmread(tmp_path / "plain.dcm")
        ds.compress(syntax)
        ds.save_as(tmp_path / f"{syntax.name[:8]}.dcm", enforce_file_format=True)
        again = pydicom.dcmread(tmp_path / f"{syntax.name[:8]}.dcm")
        assert again.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(dicom.read(tmp_path / f"{syntax.name[:8]}.dcm")[0], expected), syntax.name


def test_jpeg_lossless_decodes_to_the_uncompressed_pixels(tmp_path):
    gdcm = pytest.importorskip("gdcm")  # the encoder (make install puts it in .venv): pylibjpeg only decodes
    stored = (_ramp(0, 4095) * 7 % 4096).astype(np.uint16)
    _clinical(stored, 12, WindowCenter=2048, WindowWidth=4096).save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(tmp_path / "plain.dcm"))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "lossless.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    syntax = pydicom.dcmread(tmp_path / "lossless.dcm").file_meta.TransferSyntaxUID
    assert syntax == "1.2.840.10008.1.2.4.70"  # JPEG Lossless, first-order prediction
    assert np.array_equal(dicom.read(tmp_path / "lossless.dcm")[0], dicom.read(tmp_path / "plain.dcm")[0])


def test_a_syntax_without_a_decoder_is_named(tmp_path):
    from pydicom.encaps import encapsulate

    ds = _clinical(_ramp(0, 255), 8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no plugin decodes it
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    named = r"mpeg.dcm: no decoder for its transfer syntax MPEG2 Main Profile / Main Level "
    named += r"\(1\.2\.840\.10008\.1\.2\.4\.100\)"
    with pytest.raises(dicom.DicomError, match=named):
        dicom.read(tmp_path / "mpeg.dcm")
