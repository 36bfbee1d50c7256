"""The card personalisation bureau simulator: physical card orders in, tracking numbers out.

`python -m simulators.bureau --port N --delay S`, or in-process `serve_bureau(port=, delay_s=)`.
"""

from simulators.bureau.server import BureauState, build_bureau_app, serve_bureau

__all__ = ["BureauState", "build_bureau_app", "serve_bureau"]
