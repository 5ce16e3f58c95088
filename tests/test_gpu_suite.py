"""bench/gpu_suite.py checked on the demo models (any machine): every section runs and lands in
the JSON file and the markdown table. Its real numbers need a GPU (python bench/gpu_suite.py)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_the_suite_runs_every_section_on_the_demo_models(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("gpu_suite", None)
    import gpu_suite

    assert gpu_suite.main(["--demo", "--out", str(tmp_path), "--repeats", "1", "--steps", "2", "--warmup", "1"]) == 0
    results = json.loads((tmp_path / "gpu_suite_demo.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"sdxl_generation", "sdxl_training", "anima", "tagger"}
    assert all("rows" in section for section in sections.values()), sections
    assert len(sections["sdxl_training"]["rows"]) == 4 and sections["sdxl_training"]["rows"][2]["fp8_base"]
    table = (tmp_path / "gpu_suite_demo.md").read_text()
    assert "### sdxl_training" in table and "| batch | checkpointing | fp8_base |" in table
