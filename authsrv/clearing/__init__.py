"""Clearing (issue 6, docs/contract.md, clearing file): matching clearing records to authorizations, posting
their holds, and the reconciliation summary. One engine (`engine.py`) behind two front doors:
`authsrv clearing ingest` (authsrv/clearing/cli.py) and `POST /admin/clearing`
(authsrv/rest/clearing_api.py)."""

from authsrv.clearing.engine import ClearingDeps as ClearingDeps
from authsrv.clearing.engine import apply_clearing as apply_clearing
from authsrv.clearing.engine import apply_clearing_offline as apply_clearing_offline
from authsrv.clearing.records import CLEARING_FILE_BYTES_MAX as CLEARING_FILE_BYTES_MAX
from authsrv.clearing.records import ClearingFileError as ClearingFileError
from authsrv.clearing.records import ClearingRecord as ClearingRecord
from authsrv.clearing.summary import ClearingSummary as ClearingSummary
