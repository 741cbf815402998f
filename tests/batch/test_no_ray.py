"""Ray is the `scale` extra: `mar-rt run` and `import mar_rt.batch` never import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.batch._inputs import phantom
from tests.runtime._runtime_bundles import micro_bundle

RUN = """
import sys
from typer.testing import CliRunner
from mar_rt.cli import app
import mar_rt.batch
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def test_mar_rt_run_never_imports_ray(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    bundle = micro_bundle(tmp_path_factory)
    image = tmp_path / "slice.npy"
    np.save(image, phantom(1, metal=True)[0])
    args = ["run", str(image), "--bundle", str(bundle), "--units", "mu", "--steps", "1"]
    args += ["--backend", "torch", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(list((tmp_path / "out").iterdir())) == 1  # the run did write its output
