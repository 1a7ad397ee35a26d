"""Runs the Triton kernels in the interpreter, on the CPU, with a fresh cache.

``TRITON_INTERPRET`` must be set before a ``@triton.jit`` decorator runs,
that is before ``gpufleet.kernels.matmul`` and its siblings are imported.
pytest imports this file before any test module of this folder, so setting
it here, at import time, is early enough unless a module collected earlier
(another test folder) already imported a kernel module compiled for a GPU;
then every test here is skipped with that reason instead of failing on a
CPU tensor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Triton decorates its own standard library (tl.cdiv, tl.sigmoid, ...) when it
# is imported: imported before this line, those helpers need a GPU.
_TRITON_PRELOADED = "triton" in sys.modules and os.environ.get(
    "TRITON_INTERPRET", ""
) not in ("1", "true", "on")
os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError as exc:
    TRITON_MISSING: str | None = f"Triton cannot be imported ({exc})"
else:
    TRITON_MISSING = None

# Without Triton the test modules cannot even be imported. Locally they are
# left out with a note in the header; where CI is set, the import errors
# fail the run, because CI must test the kernels.
collect_ignore_glob = ["*.py"] if TRITON_MISSING and not os.environ.get("CI") else []


def pytest_report_header(config: pytest.Config) -> str | None:
    if collect_ignore_glob:
        return f"tests/kernels left out: {TRITON_MISSING}; pip install triton"
    return None


KERNEL_MODULES = (
    "gpufleet.kernels.matmul",
    "gpufleet.kernels.elementwise",
    "gpufleet.kernels.softmax",
    "gpufleet.kernels.norms",
)


def _compiled_for_gpu() -> list[str]:
    """Kernel modules imported before this file, with GPU (not interpreted) kernels."""
    if TRITON_MISSING:
        return []
    from triton.runtime.jit import JITFunction

    found = []
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        for value in vars(module).values():
            fn = getattr(value, "fn", value)
            if isinstance(value, JITFunction) or isinstance(fn, JITFunction):
                found.append(name)
                break
    return found


_TOO_LATE = _compiled_for_gpu() + (["triton"] if _TRITON_PRELOADED else [])


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not _TOO_LATE:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            f"{', '.join(_TOO_LATE)} imported before tests/kernels set "
            "TRITON_INTERPRET=1; import Triton lazily in the test that did it"
        )
    here = Path(__file__).parent
    skip = pytest.mark.skip(
        reason=f"{', '.join(_TOO_LATE)} were imported before TRITON_INTERPRET=1 "
        "was set (by a test module collected earlier), so their kernels need a "
        "GPU; run tests/kernels on its own"
    )
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh cache per test, no agent settings, clean tuner state."""
    from gpufleet.kernels import autotune, elementwise, matmul

    monkeypatch.setenv("GPUFLEET_KERNEL_CACHE", str(tmp_path / "kernel-cache"))
    monkeypatch.delenv("GPUFLEET_KERNEL_FINGERPRINT", raising=False)
    monkeypatch.delenv("GPUFLEET_KERNEL_MODULES", raising=False)
    kernels = [
        matmul.matmul_kernel,
        elementwise.add_kernel,
        elementwise.add_inplace_kernel,
        elementwise.lion_kernel,
    ]
    for kernel in kernels:
        kernel.reset()
    autotune.set_bench(None)
    yield
    autotune.set_bench(None)
    for kernel in kernels:
        kernel.reset()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """The cache folder the kernels use in this test (GPUFLEET_KERNEL_CACHE)."""
    return tmp_path / "kernel-cache"
