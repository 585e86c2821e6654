"""The distribution installs under one namespace (sae_cache.*) and never shadows or mixes with other packages:
Hugging Face's `evaluate` (in the test extra on purpose) stays importable as `evaluate` beside ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, evaluate
import sae_cache.evaluate.run, sae_cache.harvest.run, sae_cache.train.run, sae_cache.sae_common.cli
print(json.dumps({"hf": evaluate.__file__, "hf_has_load": hasattr(evaluate, "load"),
                  "hf_has_run": hasattr(evaluate, "run"),
                  "ours": {m: sys.modules[m].__file__ for m in ("sae_cache.evaluate.run", "sae_cache.harvest.run",
                                                                 "sae_cache.train.run")},
                  "bare": [m for m in ("harvest", "train") if m in sys.modules]}))
"""


def probe(cwd: Path, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_installed_project_and_hugging_face_evaluate_import_side_by_side(tmp_path):
    found = probe(tmp_path)  # a working directory outside the repository, as a user's would be
    assert found["hf_has_load"] and not found["hf_has_run"], found
    assert "site-packages" in found["hf"] and not Path(found["hf"]).is_relative_to(ROOT / "evaluate")
    for module, file in found["ours"].items():
        assert Path(file).is_relative_to(ROOT / module.split(".")[1]), (module, file)
    assert found["bare"] == []


@pytest.mark.slow
def test_wheel_holds_only_the_namespace_and_imports_beside_hugging_face_evaluate(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("sae_cache-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"sae_cache", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "sae_cache/sae_common/assets/tiny-stdlib-gpt2/model.safetensors" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    found = probe(tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert found["hf_has_load"] and not found["hf_has_run"], found
    for module, file in found["ours"].items():
        assert Path(file).is_relative_to(target / "sae_cache"), (module, file)
