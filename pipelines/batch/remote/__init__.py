"""The batch job's servers: DICOMweb (:mod:`~pipelines.batch.remote.dicomweb`) and DICOM peers
(:mod:`~pipelines.batch.remote.dimse`, :mod:`~pipelines.batch.remote.dimse_get`), told apart once
(:class:`Endpoint`), and the retries of their transient failures (:mod:`~pipelines.batch.remote.retry`)."""

from __future__ import annotations

from .endpoint import Endpoint
from .retry import RetryPolicy, TransientError

__all__ = ["Endpoint", "RetryPolicy", "TransientError"]
