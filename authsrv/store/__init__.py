"""Management state: the SQLite store (`db`), the in-memory card index the hot path reads
(`index`), and the offline commands built on them (`init`, `partners`, `seed`).

Import the submodules directly (`from authsrv.store.db import Store`); this package file stays
empty of imports so that `authsrv --help` and the hot path do not pay for what they do not use.
"""
