"""A predicted mask as a DICOM Segmentation object (highdicom), so that a DICOM viewer shows it on its image.

One binary segment, "Pneumothorax" (SNOMED CT 36118008, category "Morphologically Altered
Structure"), made by an automatic algorithm named after the experiment. The object references its
source image (study, series and SOP instance), copies its patient and study attributes, and has the
source's Rows x Columns. An empty mask is written as one empty frame: the object says "none found".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from pneumothorax.io import atomic, dicom

PNEUMOTHORAX = hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax")
ALTERED_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
SERIES_NUMBER = 9100  # far from the numbers modalities give their own series
# Type 2 attributes (present, may be empty) of the Patient and General Study modules that the SEG copies
# from its source. Files in the wild (and the synthetic worlds) often omit them; an empty value is what
# the standard asks for when they are unknown.
TYPE_2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _description(algorithm: str, version: str) -> hd.seg.SegmentDescription:
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="pneumothorax",
        segmented_property_category=ALTERED_STRUCTURE,
        segmented_property_type=PNEUMOTHORAX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
    )


def segmentation(source: pydicom.Dataset, mask: np.ndarray, algorithm: str, version: str) -> hd.seg.Segmentation:
    """The SEG object of boolean ``mask`` (source Rows x Columns) over image ``source``."""
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise ValueError(f"mask {mask.shape} is not the image's Rows x Columns {shape}")
    with warnings.catch_warnings():  # highdicom warns about the source's own attributes (names, empty IDs)
        warnings.simplefilter("ignore")
        return hd.seg.Segmentation(
            source_images=[source],
            pixel_array=mask.astype(bool),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(algorithm, version)],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            omit_empty_frames=False,  # one frame either way; an empty one is kept, not refused
            manufacturer="pneumothorax",
            manufacturer_model_name=algorithm,
            software_versions=version,
            device_serial_number="none",
        )


def write(source_path: Path, mask: np.ndarray, out_path: Path, algorithm: str, version: str) -> None:
    """Write the SEG of ``mask`` over the DICOM at ``source_path`` to ``out_path`` (atomically).

    Raises:
        dicom.DicomError: naming the source file and why no object could be made from it.
    """
    with dicom.lenient():
        try:
            source = pydicom.dcmread(source_path)
            for keyword in TYPE_2_COPIED:  # in memory only: the source file is never written
                if keyword not in source:
                    setattr(source, keyword, "")
            seg = segmentation(source, mask, algorithm, version)
        except Exception as exc:  # highdicom and pydicom raise many types on unusual sources
            raise dicom.DicomError(f"{source_path}: no DICOM SEG ({type(exc).__name__}: {exc})") from None
        with atomic.atomic_path(out_path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stage-2 files' "ID_..." SOPInstanceUID, referenced as it is
            seg.save_as(tmp, enforce_file_format=True)


def read_mask(path: Path) -> np.ndarray:
    """The boolean mask a SEG written by :func:`write` holds (its one frame), read back with pydicom."""
    ds = pydicom.dcmread(path)
    return np.asarray(ds.pixel_array, dtype=bool).reshape(int(ds.Rows), int(ds.Columns))
