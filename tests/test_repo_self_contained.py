"""The repository documents itself: no tracked file sends a reader to a document outside it.

What authsrv promises (commands, wire profile, clearing file, REST conventions, ...) is written in
docs/contract.md, and code, tests and docs cite its sections. A reference to the development
workspace's own contract or notes would point a user of a clone at something they do not have.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built by concatenation, so that this file does not mention them itself.
OUTSIDE_REFERENCES = tuple(
    part.encode()
    for part in ("CONTRACT" + ".md", ".." + "/shared", "/work" + "/shared")
)
FILE_BYTES_MAX = 64 * 1024 * 1024  # larger tracked files (none today) are not read


def tracked_files() -> list[Path]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    done = subprocess.run([git, "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.decode(errors='replace').strip()[:200]}")
    return [REPO / name for name in done.stdout.decode().split("\0") if name]


def test_no_tracked_file_mentions_a_document_outside_the_repository() -> None:
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    found = []
    for path in files:
        if not path.is_file() or path.stat().st_size > FILE_BYTES_MAX:
            continue  # deleted in the working tree and not yet committed, or huge
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            for reference in OUTSIDE_REFERENCES:
                if reference in line:
                    found.append(f"{path.relative_to(REPO)}:{number}: {reference.decode()}")
    assert not found, "cite docs/contract.md (by section) instead:\n" + "\n".join(found)


def test_the_contract_page_has_the_sections_the_code_cites() -> None:
    text = (REPO / "docs" / "contract.md").read_text(encoding="utf-8")
    headings = {line.lstrip("#").strip().lower() for line in text.splitlines() if line.startswith("#")}
    for section in ("commands", "listeners", "partner settings", "files", "durability", "wire profile",
                    "message classes", "fields", "response codes (field 39)", "latency budget", "clearing file",
                    "rest conventions", "benchmark output", "operating limits", "cluster"):  # fmt: skip
        assert section in headings, section
