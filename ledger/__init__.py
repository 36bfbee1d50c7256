"""The ledger: value types (ledger.types) and the in-memory state machine (ledger.state).

Pure logic plus its log; it never imports `authsrv`.
"""

from ledger.state import ACCOUNTS_MAX as ACCOUNTS_MAX
from ledger.state import HISTORY_PER_ACCOUNT_MAX as HISTORY_PER_ACCOUNT_MAX
from ledger.state import HOLDS_PENDING_MAX as HOLDS_PENDING_MAX
from ledger.state import IDS_MAX as IDS_MAX
from ledger.state import IDS_RETENTION_NS as IDS_RETENTION_NS
from ledger.state import TRANSFERS_PER_BATCH_MAX as TRANSFERS_PER_BATCH_MAX
from ledger.state import ACCOUNTS_PER_BATCH_MAX as ACCOUNTS_PER_BATCH_MAX
from ledger.state import AccountView as AccountView
from ledger.state import BalanceView as BalanceView
from ledger.state import HistoryEntry as HistoryEntry
from ledger.state import HistoryKind as HistoryKind
from ledger.state import HoldState as HoldState
from ledger.state import HoldView as HoldView
from ledger.state import Ledger as Ledger
from ledger.state import LedgerInvariantError as LedgerInvariantError
from ledger.state import Side as Side
from ledger.state import Totals as Totals
from ledger.types import AMOUNT_MAX as AMOUNT_MAX
from ledger.types import ID_MAX as ID_MAX
from ledger.types import REFERENCE_LENGTH_MAX as REFERENCE_LENGTH_MAX
from ledger.types import AccountFlags as AccountFlags
from ledger.types import AccountKind as AccountKind
from ledger.types import AccountSpec as AccountSpec
from ledger.types import AccountStatus as AccountStatus
from ledger.types import Batch as Batch
from ledger.types import BatchResult as BatchResult
from ledger.types import TransferFlags as TransferFlags
from ledger.types import TransferSpec as TransferSpec
from ledger.types import TransferStatus as TransferStatus
