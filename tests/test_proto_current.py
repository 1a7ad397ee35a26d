"""The committed protobuf code matches what the .proto source generates."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_proto_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location(
        "generate", ROOT / "proto" / "generate.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    committed = ROOT / "proto" / "python" / "_proto"
    stale = [
        p.name
        for p in sorted(tmp_path.iterdir())
        if (committed / p.name).read_text() != p.read_text()
    ]
    assert not stale, f"run 'make proto': {stale} differ from the .proto source"


def test_agent_and_broker_never_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gpufleet.agent.daemon, gpufleet.broker.server;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
