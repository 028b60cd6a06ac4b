"""Private DICOM elements, found by their creator as PS3.5 7.8.1 reserves them."""

from __future__ import annotations

import pydicom

__all__ = ["private_value"]


def private_value(ds: pydicom.Dataset, group: int, creator: str, offset: int):
    """The value of private element ``offset`` in ``creator``'s block of ``group``, or None.
    (``Dataset.private_block`` does the same by slicing the dataset, which costs as much as a
    tenth of reading the header.)"""
    for slot in range(0x10, 0x100):
        tag = (group << 16) | slot
        if tag in ds and str(ds[tag].value).strip() == creator:
            element = (group << 16) | (slot << 8) | offset
            return ds[element].value if element in ds else None
    return None
