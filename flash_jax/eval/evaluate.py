"""Evaluate generators side by side on the Shapes testbed: FD-judge, alignment, colour statistics,
diversity.

Every generator samples the SAME prompts from the SAME initial noise (image i of seed s starts
from `normal(fold_in(PRNGKey(s), i))`). Metrics per generator and step count:
  fd_judge   Fréchet distance to the real images of the prompts in the judge's feature space (FID
             analog; lower is better), the mean over noise seeds;
  <category> alignment accuracy per caption category and `mean` over categories (CompBench analog),
             pooled over noise seeds;
  chroma / contrast   mean CIELAB chroma and RMS contrast (noise correction's effect);
  diversity  mean judge-feature distance between the images of one prompt across noise seeds;
  nfe        network evaluations per image (CFG counts two).
The real images' row ("real") is the reference: its alignment is the judge's ceiling, its fd_judge
the floor (a disjoint draw of real images of the same split against the reference set).

The pieces live in generation.py (sampling the same noise for every generator), scoring.py (the
metrics against the prompts' real images) and reporting.py (tables, plots, grids); this module
runs them. Two entry points:
- `evaluate` + `reporting.write_report`: in-memory UNet params × samplers (the demo).
- `run_evaluation` (`python -m flash_jax.main --mode eval --config configs/shapes/comparison.py
  --workdir RUNS`): trained runs (checkpoints of any method, sampled by the method's own
  `Method.generate`) × step counts × prompt sets × noise seeds. Writes under WORKDIR/<out_dir>:
  results.json (one row per run, steps and prompt set; rows already there are skipped, so an
  interrupted evaluation resumes), results.md (per prompt set: the table of mean ± std over the
  runs of each method label, i.e. over training seeds, then every row), plots_<set>.png (metrics
  vs steps per method), samples_<set>.png (side-by-side grids: one row per method and step count,
  the same prompts and noise) and tiles/ (the grid images of each row).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from flash_jax.config import load_config_file, read_json, set_dotted
from flash_jax.eval import generation, judge, metrics, paired, reporting, scoring
from flash_jax.t2i import T2I


def evaluate(
    model: T2I,
    entries: Sequence[generation.Entry],
    text_params: Any,
    vae_params: Any,
    judge_workdir: str | Path,
    *,
    split: str = "eval",
    num_images: int = 500,
    data_seed: int = 0,
    seed: int = 0,
    image_size: int = 32,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray], list[str]]:
    """`(rows, images, captions)`: a metrics row and the generated images per entry (plus "real")."""
    judge_params, judge_config = judge.load_judge(judge_workdir, image_size)
    real, labels = judge.real_examples(split, num_images, data_seed, image_size)
    captions = [str(c) for c in labels["caption"]]
    tokens = model.tokenizer()(captions)
    real_features = judge.predict(judge_params, real, judge_config)["features"]
    rows = {"real": scoring.score(real, labels, judge_params, judge_config, real_features)}
    images = {"real": real}
    for entry in tqdm(entries, desc="evaluate"):
        gen = generation.generate(
            model,
            entry.unet_params,
            text_params,
            vae_params,
            tokens,
            entry.sampler,
            image_size,
            seed,
        )
        rows[entry.name] = scoring.score(gen, labels, judge_params, judge_config, real_features)
        rows[entry.name]["nfe"] = generation.nfe(
            entry.sampler.num_steps, entry.sampler.guidance_scale
        )
        images[entry.name] = gen
    return rows, images, captions


# ------------------------------------------------------------ trained runs × steps (--mode eval)

EVAL_KEYS = {
    "judge": "judge run directory or params file (assets/shapes/judge.msgpack, its image size in "
    "judge.json beside it); must have been trained on image_size images",
    "num_images": "prompts per prompt set (one image per prompt and noise seed)",
    "prompt_sets": "Shapes splits whose captions are the prompts ('eval', 'heldout')",
    "noise_seeds": "initial-noise seeds (>= 2 for the diversity column)",
    "data_seed": "Shapes generator seed of the prompts and real images",
    "image_size": "image side; every run must generate this size",
    "batch_size": "images per generate call",
    "grid_prompts": "prompts (columns) in the side-by-side sample grids",
    "plot_metrics": "metrics plotted against steps",
    "out_dir": "output folder under --workdir",
    "runs": "list of run dicts (see `RunSpec`)",
    "reference": "'label@steps' of the row every other row is compared with ('' for none)",
    "teacher_reference": "'run name@steps' whose images the teacher-relative metrics use",
    "num_resamples": "bootstrap resamples of the paired 95 % intervals",
    "claims": "{claim: label of the row without that component}, judged against the reference",
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One trained generator, evaluated at several step counts.

    label: the method's name in tables and plots; runs with the same label (training seeds) are
      aggregated to mean ± std.
    name: unique name of the run (row keys, tile files).
    workdir: the run directory (config.json + checkpoints/; its EMA params are evaluated) or a
      params file; relative paths are looked up under the evaluation's --workdir, then from the
      current directory.
    steps: step counts to sample with.
    config: `config.py[:variants]` to build the method from, when `workdir` has no config.json.
    overrides: dotted config keys to set after loading (e.g. `{"sample.noise_correction": False}`).
    seed: the training seed; rows of two labels are paired run by run when their seeds match.
    """

    label: str
    name: str
    workdir: str
    steps: tuple[int, ...]
    config: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        missing = {"label", "name", "workdir", "steps"} - set(d)
        if unknown or missing:
            raise ValueError(
                f"eval config runs entry {d.get('name', d)!r}: unknown keys {sorted(unknown)}, "
                f"missing keys {sorted(missing)} (expected {sorted(fields)})"
            )
        d = dict(d)
        d["steps"] = tuple(int(n) for n in d["steps"])
        if not d["steps"] or min(d["steps"]) < 1:
            raise ValueError(f"eval config run {d['name']!r}: steps={d['steps']} must be >= 1")
        d["overrides"] = tuple(sorted(dict(d.get("overrides") or {}).items()))
        return cls(**d)


def _resolve(path: str, root: Path, what: str) -> Path:
    p = Path(path)
    candidates = [p] if p.is_absolute() else [root / p, p]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"{what}: {path!r} not found (looked at {[str(c) for c in candidates]})"
    )


def run_config(run: RunSpec, root: Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (its config.json, or `run.config`) plus `run.overrides`."""
    workdir = _resolve(run.workdir, root, f"run {run.name!r}")
    if run.config:
        config = load_config_file(run.config)
    elif (workdir / "config.json").is_file():
        config = ml_collections.ConfigDict(read_json(workdir / "config.json"))
    else:
        raise FileNotFoundError(
            f"run {run.name!r}: {workdir} has no config.json; give the run a 'config' file"
        )
    for key, value in run.overrides:
        set_dotted(config, key, value)
    return config


def row_key(name: str, steps: int | str, prompt_set: str) -> str:
    return f"{name}|{steps}|{prompt_set}"


def _tile_path(out_dir: Path, key: str, folder: str = "tiles", suffix: str = ".npy") -> Path:
    return out_dir / folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + suffix)


def _record_path(out_dir: Path, key: str) -> Path:
    """The per-image record (`paired.Record`) of a row, for the paired intervals."""
    return _tile_path(out_dir, key, "records", ".npz")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted write never leaves a truncated file


def _done_rows(results_path: Path) -> dict[str, dict]:
    """The rows an earlier evaluation wrote to `results_path` (none if it does not exist)."""
    if not results_path.is_file():
        return {}
    hint = "move it away to recompute every row"
    data = read_json(results_path, hint)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), dict):
        raise ValueError(f"{results_path}: no 'rows' object; {hint}")
    return data["rows"]


def run_evaluation(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict]:
    """Evaluates `config.runs` (see `EVAL_KEYS`, `RunSpec`) under `workdir`; returns the rows.

    Rows already in `<out_dir>/results.json` are not recomputed; each new row is written as soon
    as it is done. Then writes the Markdown tables, plots and sample grids from all rows.
    """
    unknown = set(config) - set(EVAL_KEYS)
    missing = set(EVAL_KEYS) - set(config)
    if unknown or missing:
        raise ValueError(f"eval config: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    root = Path(workdir)
    runs = [RunSpec.from_dict(dict(r)) for r in config.runs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"eval config: run names must be unique, got {names}")
    configs = {r.name: run_config(r, root) for r in runs}  # every config checked before compute
    for r in runs:
        if configs[r.name].data.image_size != config.image_size:
            raise ValueError(
                f"run {r.name!r} generates {configs[r.name].data.image_size}px images; "
                f"eval config image_size={config.image_size}"
            )
    judge_path = _resolve(config.judge, root, "eval config judge")
    judge_params, judge_config = judge.load_judge(judge_path, config.image_size)
    seeds = [int(s) for s in config.noise_seeds]
    out_dir = root / config.out_dir
    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    rows = _done_rows(results_path)

    prompt_sets = {
        name: scoring.load_prompt_set(
            name, config.num_images, config.data_seed, config.image_size, judge_params, judge_config
        )
        for name in config.prompt_sets
    }
    (out_dir / "records").mkdir(exist_ok=True)
    for p in prompt_sets.values():
        key = row_key("real", 0, p.name)
        if key not in rows:
            rows[key] = scoring.real_row(p, judge_params, judge_config)
            np.save(_tile_path(out_dir, key), p.real[: config.grid_prompts])
            _write_json(results_path, {"rows": rows})

    todo = [
        (r, n, p)
        for r in runs
        for n in r.steps
        for p in prompt_sets
        if row_key(r.name, n, p) not in rows
        or not _record_path(out_dir, row_key(r.name, n, p)).is_file()
    ]
    total = sum(len(r.steps) for r in runs) * len(prompt_sets)
    progress = tqdm(total=total, initial=total - len(todo), desc="evaluate")
    for run in runs:
        pending = [(n, p) for r, n, p in todo if r is run]
        if not pending:
            continue
        workdir_of_run = _resolve(run.workdir, root, f"run {run.name!r}")
        generator = generation.Generator.load(configs[run.name], workdir_of_run)
        for steps, prompt_set in pending:
            progress.set_postfix(run=run.name, steps=steps, prompts=prompt_set)
            prompts = prompt_sets[prompt_set]
            images = [
                generator.images(prompts.captions, steps, s, config.batch_size) for s in seeds
            ]
            row, record = scoring.generated_row(images, prompts, judge_params, judge_config)
            row |= {
                "label": run.label,
                "run": run.name,
                "seed": run.seed,
                "steps": steps,
                "prompt_set": prompt_set,
                "nfe": generator.nfe(steps),
            }
            key = row_key(run.name, steps, prompt_set)
            np.save(_tile_path(out_dir, key), images[0][: config.grid_prompts])
            record.save(_record_path(out_dir, key))
            rows[key] = row
            _write_json(results_path, {"rows": rows})
            progress.update()
        del generator  # frees its frozen models before the next run's
    progress.close()
    write_comparison(rows, config, out_dir, [p.captions for p in prompt_sets.values()])
    if config.reference:
        compared = paired_comparison(rows, config, out_dir, prompt_sets)
        _write_json(results_path, {"rows": rows, **compared})
    return rows


def _at(spec: str, what: str) -> tuple[str, int]:
    name, at, steps = spec.rpartition("@")
    if not at or not steps.isdigit():
        raise ValueError(f"eval config {what}={spec!r}: expected 'NAME@STEPS'")
    return name, int(steps)


def paired_comparison(
    rows: dict[str, dict[str, Any]],
    config: ml_collections.ConfigDict,
    out_dir: Path,
    prompt_sets: dict[str, scoring.PromptSet],
) -> dict[str, Any]:
    """`{"compared": {prompt set: paired.compare(...)}, "evaluation_noise": {...}}` of the rows,
    grouped by (label, steps) over training seeds, against `config.reference`; also written as
    comparison.md."""
    reference = _at(config.reference, "reference")
    teacher_run, teacher_steps = _at(config.teacher_reference, "teacher_reference")
    compared, noise, verdicts, parts = {}, {}, {}, ["# Paired comparison", ""]
    for name, prompts in prompt_sets.items():
        groups: dict[tuple[str, int], list[dict]] = {}
        for key, r in rows.items():
            if r["prompt_set"] == name and r["run"] != "real":
                groups.setdefault((r["label"], r["steps"]), []).append(r | {"key": key})
        teacher = paired.Record.load(
            _record_path(out_dir, row_key(teacher_run, teacher_steps, name))
        )
        compare_rows = []
        for (label, steps), members in groups.items():
            members = sorted(members, key=lambda r: r.get("seed", 0))
            compare_rows.append(
                paired.Row(
                    label,
                    steps,
                    tuple(r.get("seed", 0) for r in members),
                    tuple(paired.Record.load(_record_path(out_dir, r["key"])) for r in members),
                    members[0].get("nfe", 0),
                )
            )
        compared[name] = paired.compare(
            compare_rows,
            reference,
            prompts.real_features,
            teacher,
            num_resamples=config.num_resamples,
        )
        noise[name] = scoring.evaluation_noise(rows, name)
        verdicts[name] = paired.claim_verdicts(compared[name], dict(config.claims), reference[1])
        parts += [
            f"## Prompt set `{name}`",
            "",
            f"Each cell: mean over training seeds (difference to {config.reference} "
            "[paired bootstrap 95 % interval]; * the interval excludes 0). Evaluation noise of "
            f"FD-judge: noise seeds {noise[name]['noise_seeds']:.3f}, real sets "
            f"{noise[name]['real_sets']:.3f}.",
            "",
            paired.markdown(compared[name], paired.METRICS),
            "",
            *(
                f"- {v['claim']} ({v['row']}, {v['seeds']} seeds): "
                + "; ".join(f"{m} {c['verdict']}" for m, c in v["metrics"].items())
                for v in verdicts[name]
            ),
            "",
        ]
    (out_dir / "comparison.md").write_text("\n".join(parts))
    return {"compared": compared, "evaluation_noise": noise, "claims": verdicts}


def write_comparison(
    rows: dict[str, dict[str, Any]],
    config: ml_collections.ConfigDict,
    out_dir: Path,
    captions: Sequence[Sequence[str]],
) -> str:
    """results.md, plots_<set>.png and samples_<set>.png from all rows; returns the Markdown."""
    summary = reporting.summarize(rows)
    parts = ["# Evaluation", ""]
    runs = [RunSpec.from_dict(dict(r)) for r in config.runs]
    for prompt_set, set_captions in zip(config.prompt_sets, captions, strict=True):
        set_rows = {k: r for k, r in rows.items() if r["prompt_set"] == prompt_set}
        parts += [
            f"## Prompt set `{prompt_set}`",
            "",
            reporting.summary_markdown(summary, prompt_set),
            "",
        ]
        per_row = {f"{r['run']} @ {r['steps']}": r for r in set_rows.values()}
        columns = [c for c in scoring.COLUMNS if any(c in r for r in per_row.values())]
        parts += ["Every run:", "", metrics.markdown_table(per_row, columns), ""]
        reporting.plot_metrics(
            summary, prompt_set, list(config.plot_metrics), out_dir / f"plots_{prompt_set}.png"
        )
        # Grid rows: the real images, then the first run of each label at each of its steps.
        grid: dict[str, np.ndarray] = {}
        first_runs = {}
        for r in runs:
            first_runs.setdefault(r.label, []).append(r)
        tile = _tile_path(out_dir, row_key("real", 0, prompt_set))
        if tile.is_file():
            grid["real"] = np.load(tile)
        for label, label_runs in first_runs.items():
            for r in label_runs:
                for n in r.steps:
                    tile = _tile_path(out_dir, row_key(r.name, n, prompt_set))
                    name = f"{label}, {n}"
                    if tile.is_file() and name not in grid:
                        grid[name] = np.load(tile)
        if grid:
            reporting.sample_grid(grid, set_captions, num=config.grid_prompts).save(
                out_dir / f"samples_{prompt_set}.png"
            )
            parts += [
                f"![metrics](plots_{prompt_set}.png)",
                f"![samples](samples_{prompt_set}.png)",
                "",
            ]
    text = "\n".join(parts)
    (out_dir / "results.md").write_text(text)
    return text
