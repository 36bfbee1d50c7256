"""docs/api.md works as printed: its shell blocks run, in order, against a real `authsrv serve`.

The first block (init and serve) is what this test does itself; every later block runs in one bash
with `set -euo pipefail`, so any failing curl (`--fail-with-body`) or missing value fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from authsrv.store.init import init_data_dir
from tests.conftest import ServerProcess

DOC = Path(__file__).parent.parent / "docs" / "api.md"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
pytestmark = pytest.mark.timeout(180)


def shell_blocks() -> list[str]:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 8 and "authsrv init" in blocks[0], "docs/api.md starts with the set-up block"
    return blocks[1:]


def test_api_doc_commands_run_as_printed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    process = ServerProcess(data_dir).start()
    try:
        script = "\n".join(shell_blocks())
        default = "export API=https://127.0.0.1:8443"
        assert default in script
        script = script.replace(default, f"export API=https://127.0.0.1:{process.rest_port}")
        result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path,
                                capture_output=True, text=True, timeout=150,
                                env={**os.environ, "PATH": f"{tmp_path / '.venv' / 'bin'}:{os.environ['PATH']}"})
        assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
        out = result.stdout
        assert "customer 1" in out and "SUCCESS" in out
        card = (tmp_path / "card.json").read_text()
        assert '"cardNo":"535522' in card.replace(" ", "")
        pan = re.search(r'"cardNo":\s*"(\d+)"', card).group(1)
        assert pan not in process.read_log(), "a card number reached the server log"
        assert "4321" not in process.read_log()
    finally:
        process.terminate()
