"""Which kind of server a batch input or ``--push`` destination names, decided once: a DICOMweb
service root (``http(s)://...``) or a DICOM peer (``dicom://AET@host:port``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipelines.batch.remote.dimse import DimsePeer

__all__ = ["Endpoint"]


@dataclass(frozen=True)
class Endpoint:
    """A server the batch job reads studies from or stores results on.

    Attributes:
        kind: ``"dicomweb"`` or ``"dimse"``.
        url: as given (a DICOM peer's in its canonical form, ``dicom://AET@host:port``).
        peer: the DICOM peer, for ``"dimse"``.
    """

    kind: Literal["dicomweb", "dimse"]
    url: str
    peer: DimsePeer | None = None

    @classmethod
    def parse(cls, text: str | os.PathLike) -> Endpoint | None:
        """The server ``text`` names, or None for a path.

        Raises:
            ValueError: a ``dicom://`` address that is not ``dicom://AET@host:port``.
        """
        text = str(text)
        if text.startswith(("http://", "https://")):
            return cls("dicomweb", text)
        if text.startswith("dicom://"):
            peer = DimsePeer.parse(text)
            return cls("dimse", str(peer), peer)
        return None

    def __str__(self) -> str:
        return self.url
