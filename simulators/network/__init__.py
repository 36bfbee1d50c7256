"""The card-network simulator: an independent ISO 8583 peer that drives open-loop load.

Library use:

    report = await run_load(LoadConfig(cards_path=..., port=8583, rate_per_s=1000, duration_s=30))
    print(report.render())
    open("report.json", "wb").write(report.to_json())

Command line: `python -m simulators.network --help`.
"""

from simulators.network.cards import SimCard as SimCard
from simulators.network.cards import load_cards as load_cards
from simulators.network.cards import write_synthetic_cards as write_synthetic_cards
from simulators.network.codec import Codec as Codec
from simulators.network.load import LoadConfig as LoadConfig
from simulators.network.load import LoadError as LoadError
from simulators.network.load import Progress as Progress
from simulators.network.load import run_load as run_load
from simulators.network.mix import Amounts as Amounts
from simulators.network.mix import HotCards as HotCards
from simulators.network.mix import Kind as Kind
from simulators.network.mix import MixWeights as MixWeights
from simulators.network.report import LatencySummary as LatencySummary
from simulators.network.report import LoadReport as LoadReport
