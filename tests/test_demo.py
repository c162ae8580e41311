"""`make demo` end to end on tiny models: a missing stage trains, the student is distilled and
evaluated."""

import json
import math
import shutil

import pytest

from flash_jax import demo
from flash_jax.config import ConfigError


@pytest.mark.slow
def test_demo_pipeline_on_tiny_models(tmp_path, tiny_assets):
    """Shipped teacher and judge (tiny random ones), no autoencoder: the demo trains that stage
    first, then distils from the teacher on its latents. With `latents="f2"` it takes the f2
    teacher, never the other latent space's (a corrupt decoy here), and the one judge."""
    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copy(tiny_assets / "teacher.msgpack", assets / "teacher_f2.msgpack")
    shutil.copy(tiny_assets / "judge.msgpack", assets)
    (assets / "teacher.msgpack").write_bytes(b"the f4 teacher: not for f2 latents")
    workdir = tmp_path / "demo"
    rows = demo.run_demo(
        workdir, distill_steps=2, num_images=4, variant="tiny", assets=assets, latents="f2"
    )
    assert (workdir / "autoencoder" / "checkpoints").is_dir()
    assert not (workdir / "teacher").exists() and not (workdir / "judge").exists()
    names = ["real", "teacher 25 (CFG)", "teacher 3 (CFG)", "student 1", "student 2", "student 3"]
    assert list(rows)[:6] == names and "student 3, no NC" in rows
    assert all(math.isfinite(r["fd_judge"]) and 0.0 <= r["mean"] <= 1.0 for r in rows.values())
    assert rows["real"]["fd_judge"] < 1e-3  # the real images against themselves
    assert rows["teacher 25 (CFG)"]["nfe"] == 50 and rows["student 3"]["nfe"] == 3
    report = workdir / "report"
    assert json.loads((report / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert (report / "samples.png").stat().st_size > 0
    assert "| student 3 |" in (report / "results.md").read_text()


def test_a_bad_override_fails_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match=r"imagine_flash\.nope"):
        demo.run_demo(
            tmp_path, 2, 4, variant="tiny", assets=None, overrides=["imagine_flash.nope=1"]
        )
    assert not any(tmp_path.iterdir())
