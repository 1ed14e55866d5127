"""The generated protobuf code checked in beside protos/ must equal a fresh `make proto`."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "loramerge" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    src = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", src, ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(p) for p in (src / "loramerge" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={src}",
            f"--pyi_out={src}",
            f"--grpc_python_out={src}",
            *protos,
        ],
        check=True,
    )
    generated = sorted(p.name for p in (src / "loramerge" / "v1").glob("*_pb2*"))
    checked_in = sorted(p.name for p in PROTO_DIR.glob("*_pb2*"))
    assert generated == checked_in, "run `make proto`: generated files differ from those checked in"
    stale = [
        n for n in generated if not filecmp.cmp(src / "loramerge" / "v1" / n, PROTO_DIR / n, shallow=False)
    ]
    assert not stale, f"run `make proto`: stale generated files {stale}"
