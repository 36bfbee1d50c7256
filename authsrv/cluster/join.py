"""`authsrv cluster join --data NEWDIR --from DIR --node NAME`: a standby's data directory.

It takes from DIR what every node of a shard must share -- the keys (PAN, PIN, CVC2, KYC, JWE),
the development PKI, the admin password and the settings -- and gives the copy its own node name.
It takes no state: the new node restores the shard's newest snapshot and the stream after it when
it starts (authsrv/cluster/node.py), and it never starts a shard's history itself.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from authsrv.cluster.node import JOINED_MARKER
from authsrv.config import CONFIG_FILE_NAME, ConfigError, decode_config

SHARED_DIRS = ("keys", "pki")
SHARED_FILES = ("admin-password", "fx-rates.json")
_NODE_LINE = re.compile(r'^(\s*node\s*=\s*)"[^"]*"', re.MULTILINE)
_TABLE = re.compile(r"^\s*\[([^\]]+)\]", re.MULTILINE)


class JoinError(Exception):
    pass


def with_node_name(text: str, node: str) -> str:
    """authsrv.toml with `node` in its [cluster] table set to `node` (the rest as it was)."""
    tables = list(_TABLE.finditer(text))
    for i, table in enumerate(tables):
        if table.group(1).strip() != "cluster":
            continue
        end = tables[i + 1].start() if i + 1 < len(tables) else len(text)
        body = text[table.end():end]
        if _NODE_LINE.search(body):
            body = _NODE_LINE.sub(lambda m: f'{m.group(1)}"{node}"', body, count=1)
        else:
            body = f'\nnode = "{node}"' + body
        return text[:table.end()] + body + text[end:]
    raise JoinError("the source's authsrv.toml has no [cluster] table: add one first (docs/operations.md)")


def join(new_dir: Path, source: Path, node: str) -> None:
    new_dir, source = Path(new_dir), Path(source)
    if not (source / CONFIG_FILE_NAME).exists():
        raise JoinError(f"{source} is not a data directory (no {CONFIG_FILE_NAME})")
    if new_dir.exists() and any(new_dir.iterdir()):
        raise JoinError(f"{new_dir} exists and is not empty")
    text = (source / CONFIG_FILE_NAME).read_text()
    try:
        config = decode_config(text.encode(), source=str(source / CONFIG_FILE_NAME))
    except ConfigError as error:
        raise JoinError(str(error)) from None
    if config.cluster is None:
        raise JoinError("the source's authsrv.toml has no [cluster] table: add one first (docs/operations.md)")
    if node == config.cluster.node:
        raise JoinError(f"node name {node!r} is the source's own: each node of a shard needs its own")
    text = with_node_name(text, node)
    try:
        joined = decode_config(text.encode())
    except ConfigError as error:
        raise JoinError(f"node name {node!r}: {error}") from None
    assert joined.cluster is not None and joined.cluster.node == node
    new_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in SHARED_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, new_dir / name, copy_function=shutil.copy2)
    for name in SHARED_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, new_dir / name)
    (new_dir / CONFIG_FILE_NAME).write_text(text)
    marker = new_dir / JOINED_MARKER
    marker.write_text(f"joined from {source.resolve()} as node {node}\n")
    os.chmod(marker, 0o600)
