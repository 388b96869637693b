"""Writes the small executable that starts a double: this Python, the doubles' folder on the path, one call."""

from __future__ import annotations

import stat
import sys
from pathlib import Path


def write_launcher(path: Path, module: str, call: str) -> Path:
    """`call`: the Python expression that runs the double, e.g. "main('/bin/llama-server', 3)"."""
    here = Path(__file__).resolve().parent
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                    f"from {module} import main\n{call}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
