"""`--mode eval` (flash_jax/eval/evaluate.py `run_evaluation`) on tiny random models: rows per run ×
steps × prompt set, resume, mean ± std over runs, plots, grids; the comparison sweep's jobs; and
notebooks/evaluate.ipynb run headless (its code cells executed in order in one namespace: nbclient
is not a dependency, and the notebook needs no kernel features)."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import optax
import pytest

from configs.shapes import comparison
from configs.shapes import teacher as teacher_config
from flash_jax.config import ConfigError
from flash_jax.eval import evaluate, generation, metrics, reporting
from flash_jax.train import checkpoint
from flash_jax.train.state import init_state

ROOT = Path(__file__).resolve().parents[1]


def test_seed_diversity_closed_form():
    f = np.zeros((3, 2, 4))
    f[1, :, 0] = 3.0  # seed 1 is 3 away from seed 0, seed 2 = seed 0
    assert metrics.seed_diversity(f[:2]) == pytest.approx(3.0)
    assert metrics.seed_diversity(f) == pytest.approx((3.0 + 0.0 + 3.0) / 3)
    assert metrics.seed_diversity(np.repeat(f[:1], 4, axis=0)) == 0.0
    with pytest.raises(ValueError, match="S >= 2"):
        metrics.seed_diversity(f[:1])


def test_initial_noise_does_not_depend_on_batching():
    shape = (4, 4, 4)
    whole = generation.initial_noise(3, 0, 5, shape)
    np.testing.assert_array_equal(generation.initial_noise(3, 2, 3, shape), whole[2:])
    one = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 4), shape)
    np.testing.assert_array_equal(whole[4], one)


def test_summarize_mean_and_sample_std_over_runs():
    rows = {
        "a|1|eval": dict(label="A", run="a", steps=1, prompt_set="eval", fd_judge=1.0, nfe=1),
        "b|1|eval": dict(label="A", run="b", steps=1, prompt_set="eval", fd_judge=3.0, nfe=1),
        "c|1|eval": dict(label="C", run="c", steps=1, prompt_set="eval", fd_judge=5.0, nfe=2),
    }
    a, c = reporting.summarize(rows)
    assert (a["label"], a["n"], a["fd_judge"]) == ("A", 2, 2.0)
    assert a["fd_judge_std"] == pytest.approx(math.sqrt(2.0))
    assert (c["n"], c["fd_judge_std"], c["nfe"]) == (1, 0.0, 2)
    table = reporting.summary_markdown([a, c], "eval")
    assert "| A | 1 | 1 | 2 | 2.00 ± 1.41 |" in table and "| C | 1 | 2 | 1 | 5.00 |" in table


def eval_config(assets: Path, student: Path):
    """The tiny comparison eval config with runs that need no training: the tiny teacher twice
    (two "runs" of one label), and LCM, step distillation (a guidance-conditioned copy of the
    teacher, `student`) and ADD students, each sampled by its method's own `generate`."""
    config = comparison.get_config(f"tiny,assets={assets}")
    frozen = {
        "autoencoder_workdir": str(assets / "autoencoder.msgpack"),
        "teacher_workdir": str(assets / "teacher.msgpack"),
    }
    teacher = dict(
        label="Teacher",
        config="configs/shapes/teacher.py:tiny",
        workdir=str(assets / "teacher.msgpack"),
        steps=[1, 2],
        overrides={"autoencoder_workdir": frozen["autoencoder_workdir"]},
    )
    with config.unlocked():
        config.prompt_sets = ("eval",)
        config.reference = "Teacher@1"
        config.teacher_reference = "teacher_a@2"
        config.claims = {"distillation": "Step distillation", "absent": "No such row"}
        config.runs = [
            dict(teacher, name="teacher_a", seed=0),
            dict(teacher, name="teacher_b", steps=[1], seed=1),
            dict(
                label="LCM",
                name="lcm",
                config="configs/shapes/lcm.py:tiny",
                workdir=str(student),
                steps=[2],
                overrides=frozen,
            ),
            dict(
                label="Step distillation",
                name="step_distill",
                config="configs/shapes/step_distill.py:tiny",
                workdir=str(student),
                steps=[1],
                overrides=frozen,
            ),
            dict(
                label="ADD",
                name="add",
                config="configs/shapes/add.py:tiny",
                workdir=str(assets / "teacher.msgpack"),
                steps=[2],
                overrides=frozen,
            ),
        ]
    return config


@pytest.fixture(scope="module")
def guided_student(tiny_assets, tmp_path_factory):
    """The tiny teacher's UNet with a zero guidance projection (w_embedding_dim 8), as a params file."""
    from configs.shapes import lcm as lcm_config
    from flash_jax.methods import common
    from flash_jax.t2i import T2I

    model = T2I.from_config(lcm_config.get_config("tiny"))
    unet = checkpoint.load_params(tiny_assets / "teacher.msgpack")["unet"]
    params = {"unet": common.student_from_teacher(common.with_guidance_input(model, 8), unet)}
    path = tmp_path_factory.mktemp("student") / "student.msgpack"
    path.write_bytes(flax.serialization.msgpack_serialize(params))
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_assets, guided_student, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval")
    config = eval_config(tiny_assets, guided_student)
    return config, workdir, evaluate.run_evaluation(config, workdir)


def test_rows_cover_runs_steps_and_the_real_reference(evaluated):
    _, workdir, rows = evaluated
    assert sorted(rows) == sorted(
        [
            "real|0|eval",
            "teacher_a|1|eval",
            "teacher_a|2|eval",
            "teacher_b|1|eval",
            "lcm|2|eval",
            "step_distill|1|eval",
            "add|2|eval",
        ]
    )
    for key, row in rows.items():
        assert math.isfinite(row["fd_judge"]) and row["fd_judge"] >= 0, key
        assert 0.0 <= row["mean"] <= 1.0, key
        if key != "real|0|eval":
            assert len(row["fd_judge_per_seed"]) == 2 and row["diversity"] > 0, key
    assert rows["teacher_a|2|eval"]["nfe"] == 4 and rows["lcm|2|eval"]["nfe"] == 2
    assert rows["step_distill|1|eval"]["nfe"] == 1 and rows["add|2|eval"]["nfe"] == 2
    # Same prompts and noise for every run: identical runs give identical images.
    tiles = {k: np.load(evaluate._tile_path(workdir / "evaluation", k)) for k in rows}
    assert all(t.shape == (4, 16, 16, 3) for t in tiles.values())
    np.testing.assert_array_equal(tiles["teacher_a|1|eval"], tiles["teacher_b|1|eval"])
    saved = json.loads((workdir / "evaluation" / "results.json").read_text())["rows"]
    assert saved == json.loads(json.dumps(rows))


def test_report_has_mean_std_table_plots_and_grids(evaluated):
    _, workdir, _ = evaluated
    out = workdir / "evaluation"
    text = (out / "results.md").read_text()
    assert "## Prompt set `eval`" in text
    assert "| Teacher | 1 | 2 | 2 |" in text and " ± " in text  # two runs: mean ± std
    assert "| LCM | 2 | 2 | 1 |" in text and "| Step distillation | 1 | 1 | 1 |" in text
    for name in ("plots_eval.png", "samples_eval.png"):
        assert (out / name).stat().st_size > 1000


def test_paired_comparison_against_the_reference_row(evaluated):
    """comparison.md and results.json's "compared": per row and metric the per-seed values and
    the paired 95 % interval of the difference to the reference row (Teacher @ 1, two seeds);
    the teacher-relative metrics are 0 for the teacher's own images."""
    _, workdir, _ = evaluated
    out = workdir / "evaluation"
    saved = json.loads((out / "results.json").read_text())
    compared = {(e["label"], e["steps"]): e for e in saved["compared"]["eval"]}
    assert set(compared) == {
        ("Teacher", 1),
        ("Teacher", 2),
        ("LCM", 2),
        ("Step distillation", 1),
        ("ADD", 2),
    }
    reference = compared[("Teacher", 1)]
    assert reference["seeds"] == [0, 1] and reference["metrics"]["fd_judge"]["ci95"] == [0.0, 0.0]
    assert len(reference["metrics"]["fd_judge"]["seeds"]) == 2
    for key, entry in compared.items():
        for m, cell in entry["metrics"].items():
            assert math.isfinite(cell["mean"]), (key, m)
            if key != ("Teacher", 1) and math.isfinite(cell["diff"]):
                low, high = cell["ci95"]
                assert low <= high, (key, m)
    own = compared[("Teacher", 2)]["metrics"]
    assert own["teacher_dist"]["mean"] == 0.0 and own["fd_teacher"]["mean"] < 1e-6
    assert not compared[("LCM", 2)]["paired_by_seed"]  # one seed against two
    noise = saved["evaluation_noise"]["eval"]
    assert noise["noise_seeds"] >= 0 and noise["real_sets"] >= 0
    assert "Teacher@1" in (out / "comparison.md").read_text()
    (claim,) = saved["claims"]["eval"]  # the claim whose row was not evaluated is left out
    assert claim["claim"] == "distillation" and claim["row"] == "Step distillation"
    for m, cell in claim["metrics"].items():  # the claim reads the compared row's interval
        row = compared[("Step distillation", 1)]["metrics"][m]
        assert cell["ci95"] == row["ci95"] and cell["diff"] == row["diff"]
        assert cell["verdict"] in ("confirmed", "refuted", "not resolved")


def test_rerun_skips_done_rows_and_recomputes_missing_ones(evaluated, monkeypatch):
    config, workdir, rows = evaluated
    results = workdir / "evaluation" / "results.json"
    calls = []
    original = generation.generate_batched

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_batched", counting)
    again = evaluate.run_evaluation(config, workdir)
    assert calls == [] and again == json.loads(results.read_text())["rows"]

    data = json.loads(results.read_text())
    del data["rows"]["teacher_a|2|eval"]
    results.write_text(json.dumps(data))
    redone = evaluate.run_evaluation(config, workdir)
    assert len(calls) == len(config.noise_seeds)  # one generation per noise seed, one row
    np.testing.assert_allclose(
        redone["teacher_a|2|eval"]["fd_judge"], rows["teacher_a|2|eval"]["fd_judge"], rtol=1e-5
    )


def test_eval_config_errors_name_the_problem(tiny_assets, tmp_path):
    config = eval_config(tiny_assets, tmp_path / "unused.msgpack")
    with config.unlocked():
        config.runs = [dict(config.runs[0], name="x", overrides={"sample.no_such_key": 1})]
    with pytest.raises(ConfigError, match=r"sample\.no_such_key"):
        evaluate.run_evaluation(config, tmp_path)
    with config.unlocked():
        config.runs = [dict(label="A", name="x", workdir="nowhere", steps=[1])]
    with pytest.raises(FileNotFoundError, match="run 'x': 'nowhere' not found"):
        evaluate.run_evaluation(config, tmp_path)


@pytest.mark.slow
def test_cli_eval_mode_resumes_a_finished_evaluation(evaluated, tmp_path):
    """`python -m flash_jax.main --mode eval` with an eval config file: every row is already in
    results.json, so it only rewrites the report."""
    config, workdir, _ = evaluated
    config_file = tmp_path / "eval_config.py"
    config_file.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    (workdir / "evaluation" / "results.md").unlink()
    command = [sys.executable, "-m", "flash_jax.main", "--mode=eval", f"--config={config_file}"]
    subprocess.run(
        [*command, f"--workdir={workdir}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    text = (workdir / "evaluation" / "results.md").read_text()
    assert "| Teacher | 1 | 2 | 2 |" in text and "| Teacher | 2 | 4 | 1 |" in text


def load_sweep():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    return sweep


def test_sweep_jobs_load_their_configs_and_chain_step_distillation():
    """Every job's config file and --config.* overrides are valid (a typo fails here, not hours
    into the sweep); `after` only names earlier jobs; the evaluation lists the trained runs."""
    sweep = load_sweep()
    points = comparison.get_hyper(sweep.Hyper(""))
    jobs = sweep.commands("configs/shapes/comparison.py", "R", "local", points, [])
    names = [job["name"] for job, _ in jobs]
    assert len(names) == len(set(names)) == 5 * (len(comparison.RUNS) + 4) + 1
    sweep.check_jobs({}, [sweep.split_point(p, "unused", "R") for p in points])
    for job, argv in jobs:
        assert argv[:3] == ["launch/local.sh", job["config"], job["workdir"]]
        assert job["workdir"] == ("R" if job["mode"] == "eval" else f"R/{job['name']}")
    by_name = {job["name"]: (job, argv) for job, argv in jobs}
    sd4, argv = by_name["step_distill_4_s1"]
    assert sd4["after"] == ("step_distill_8_s1",)
    assert "--config.step_distill.previous_workdir=R/step_distill_8_s1" in argv
    evaluation, argv = by_name["evaluate"]
    assert argv[-1] == "--mode=eval" and set(evaluation["after"]) == set(names[:-1])
    eval_runs = {r["name"] for r in comparison.get_config("").runs}
    eval_workdirs = {r["workdir"] for r in comparison.get_config("").runs if r["name"] != "teacher"}
    trained = {job["name"] for job, _ in jobs if job["mode"] == "train"}
    assert eval_workdirs <= trained
    assert {"if3_no_srl_s0", "lcm_s1", "step_distill_4_s0", "add_s1"} <= eval_runs


def test_comparison_only_trains_and_evaluates_the_chosen_runs():
    points = comparison.get_hyper(load_sweep().Hyper("seeds=2,only=if3+step_distill"))
    chain = [f"step_distill_{stage}" for stage in comparison.step_distill.CHAIN]
    assert [p["name"] for p in points] == [
        f"{name}_s{seed}" for seed in (0, 1) for name in ["if3", *chain]
    ] + ["evaluate"]
    assert points[-1]["config"].endswith(":seeds=2,assets=assets/shapes,only=if3+step_distill")
    runs = [r["name"] for r in comparison.get_config("seeds=2,only=if3+step_distill").runs]
    assert runs == [
        *(
            "teacher",
            "if3_s0",
            "if3_nc_off_s0",
            "step_distill_4_s0",
            "if3_s1",
            "if3_nc_off_s1",
            "step_distill_4_s1",
        )
    ]
    with pytest.raises(ValueError, match=r"only= names \['if9'\]"):
        comparison.get_config("only=if3+if9")


def test_sweep_dry_run_of_the_comparison_with_slurm_dependencies():
    result = subprocess.run(
        [sys.executable, "launch/sweep.py", "--config", "configs/shapes/comparison.py:seeds=1",
         "--workdir", "runs/c", "--launcher", "slurm", "--dry-run"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    n = len(comparison.RUNS) + len(comparison.step_distill.CHAIN) + 1  # one seed, + evaluation
    assert f"# {n} jobs (slurm)" in result.stderr and len(lines) == n
    sd8 = next(line for line in lines if "--job-name=flash-jax-step_distill_8_s0" in line)
    assert (
        sd8[2] == "--dependency=afterok:step_distill_16_s0" and sd8[5] == "runs/c/step_distill_8_s0"
    )
    assert lines[-1][-3:] == ["configs/shapes/comparison.py:seeds=1,assets=assets/shapes",
                              "runs/c", "--mode=eval"]  # fmt: skip
    with pytest.raises(ValueError, match="not earlier jobs"):
        load_sweep().commands("c.py", "R", "local", [{"name": "a", "after": ["b"]}], [])


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


@pytest.mark.slow
def test_evaluate_notebook_runs_headless(evaluated, tiny_assets, tmp_path, monkeypatch):
    """The notebook loads a run folder (config.json + an Orbax checkpoint, as training writes
    them; here the tiny teacher's params), draws a grid, scores it and plots `evaluated`."""
    _, eval_workdir, _ = evaluated
    config = teacher_config.get_config("tiny")
    with config.unlocked():
        config.autoencoder_workdir = str(tiny_assets / "autoencoder.msgpack")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json())
    params = checkpoint.load_params(tiny_assets / "teacher.msgpack")
    manager = checkpoint.make_manager(run / "checkpoints", async_save=False)
    checkpoint.save(manager, init_state(params, optax.identity(), jax.random.PRNGKey(0)), {})
    manager.close()
    out = tmp_path / "out"
    env = {
        "FLASH_JAX_WORKDIR": str(run),
        "FLASH_JAX_EVAL_DIR": str(eval_workdir / "evaluation"),
        "FLASH_JAX_JUDGE": str(tiny_assets / "judge.msgpack"),
        "FLASH_JAX_STEPS": "1",
        "FLASH_JAX_NUM_IMAGES": "4",
        "FLASH_JAX_OUT": str(out),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)

    namespace: dict = {}
    for i, source in enumerate(code_cells(ROOT / "notebooks" / "evaluate.ipynb")):
        exec(compile(source, f"evaluate.ipynb cell {i}", "exec"), namespace)

    assert namespace["images"].shape == (4, 16, 16, 3)
    assert set(namespace["rows"]) == {"real", "denoising 1"}
    assert 0.0 <= namespace["rows"]["denoising 1"]["mean"] <= 1.0
    for name in ("grid.png", "plots_eval.png"):
        assert (out / name).stat().st_size > 0
