"""`make demo` end to end on tiny models: every stage trains, the student is distilled and evaluated."""

import json
import math

import pytest

from flash_jax import demo


@pytest.mark.slow
def test_demo_pipeline_on_tiny_models(tmp_path):
    rows = demo.run_demo(tmp_path, distill_steps=2, num_images=4, variant="tiny", assets=None)
    names = ["real", "teacher 25 (CFG)", "teacher 3 (CFG)", "student 1", "student 2", "student 3"]
    assert list(rows)[:6] == names and "student 3, no NC" in rows
    assert all(math.isfinite(r["fd_judge"]) and 0.0 <= r["mean"] <= 1.0 for r in rows.values())
    assert rows["real"]["fd_judge"] < 1e-3  # the real images against themselves
    assert rows["teacher 25 (CFG)"]["nfe"] == 50 and rows["student 3"]["nfe"] == 3
    report = tmp_path / "report"
    assert json.loads((report / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert (report / "samples.png").stat().st_size > 0
    assert "| student 3 |" in (report / "results.md").read_text()
