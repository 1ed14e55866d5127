"""The generated protobuf code checked in under clients/ must equal a fresh `make proto` of protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "clients" / "loramerge" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    src = ROOT / "protos"
    out = tmp_path / "generated"
    out.mkdir()
    protos = sorted(str(p) for p in (src / "loramerge" / "v1").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
    )
    generated = sorted(p.name for p in (out / "loramerge" / "v1").glob("*_pb2*"))
    checked_in = sorted(p.name for p in PROTO_DIR.glob("*_pb2*"))
    assert generated == checked_in, "run `make proto`: generated files differ from those checked in"
    stale = [
        n for n in generated if not filecmp.cmp(out / "loramerge" / "v1" / n, PROTO_DIR / n, shallow=False)
    ]
    assert not stale, f"run `make proto`: stale generated files {stale}"
