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

Two entry points:
- `evaluate` + `write_report`: in-memory UNet params × samplers (the demo).
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
import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from flash_jax import methods, parallel, sampling
from flash_jax.config import load_config_file, read_json, set_dotted
from flash_jax.data import shapes
from flash_jax.eval import judge, metrics, paired
from flash_jax.pipeline import T2I
from flash_jax.train import checkpoint

log = logging.getLogger(__name__)

COLUMNS = ("fd_judge", *shapes.CATEGORIES, "mean", "chroma", "contrast", "diversity", "nfe")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One generator to evaluate: a UNet's params and how to sample from it."""

    name: str
    unet_params: Any
    sampler: sampling.SamplerConfig


def nfe(sampler: sampling.SamplerConfig) -> int:
    """Network evaluations per image."""
    return sampler.num_steps * (2 if sampler.guidance_scale != 1.0 else 1)


def judge_image_size(path: str | Path) -> int | None:
    """The image side the judge at `path` was trained on: `data.image_size` of its run's
    config.json, or for a params file the `image_size` of the JSON file beside it
    (`judge.msgpack` -> `judge.json`); None when neither exists."""
    path = Path(path)
    if path.suffix != ".msgpack":
        return int(read_json(path / "config.json")["data"]["image_size"])
    sidecar = path.with_suffix(".json")
    return int(read_json(sidecar)["image_size"]) if sidecar.is_file() else None


def check_judge_size(path: str | Path, image_size: int) -> None:
    """Refuses a judge trained on another image size than the evaluation's: it would score those
    images without complaint, and wrongly."""
    trained = judge_image_size(path)
    if trained is None:
        log.warning("%s records no image size (no %s): cannot check it against %dpx images",
                    path, Path(path).with_suffix(".json").name, image_size)  # fmt: skip
    elif trained != image_size:
        raise ValueError(
            f"the judge {path} was trained on {trained}px images, but the evaluation's images are "
            f"{image_size}px (image_size): give a judge trained on {image_size}px images"
        )


def load_judge(path: str | Path, image_size: int | None = None) -> tuple[Any, judge.JudgeConfig]:
    """The judge's params and config from a run directory or a shipped `.msgpack` (assets/);
    with `image_size`, first `check_judge_size`."""
    if image_size is not None:
        check_judge_size(path, image_size)
    if Path(path).suffix == ".msgpack":
        params = checkpoint.load_params(path)
        return params, judge.config_from_params(params)
    params, config, _ = judge.load_judge(path)
    return params, config


def initial_noise(seed: int, start: int, count: int, latent_shape: Sequence[int]) -> jax.Array:
    """x_T `(count, *latent_shape)` of images `start .. start+count−1` for `seed`: image i starts
    from `normal(fold_in(PRNGKey(seed), i))`, whatever the batching."""
    key = jax.random.PRNGKey(seed)
    indices = jnp.arange(start, start + count)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), latent_shape))(indices)


def generate_batched(
    generate_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    params: Any,
    tokens: np.ndarray,
    latent_shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images `(N, H, W, 3)` of `generate_fn(params, tokens, x_T, rng)` over token ids
    `(N, L)` in batches, with `initial_noise(seed, ...)`; `rng` (stochastic samplers' noise)
    depends on (seed, batch start), so those samplers also depend on `batch_size`.

    Each batch is split over this process's devices (`parallel.local_batch_mesh`: the most that
    divide it) with `params` replicated on them: the images are those of one device, up to float
    summation order (a 2-core CPU as two devices samples 1.6× faster: docs/performance.md).
    """
    sampler_key = jax.random.fold_in(jax.random.PRNGKey(seed), 2**31 - 1)
    placed: dict[int, Any] = {}  # params replicated, per mesh size
    out = []
    for start in range(0, len(tokens), batch_size):
        tok = tokens[start : start + batch_size]
        mesh = parallel.local_batch_mesh(len(tok))
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        if mesh.size not in placed:
            placed[mesh.size] = jax.device_put(params, replicated)
        x_T = jax.device_put(initial_noise(seed, start, len(tok), latent_shape), rows)
        rng = jax.device_put(jax.random.fold_in(sampler_key, start), replicated)
        tok = jax.device_put(np.asarray(tok), rows)
        out.append(np.asarray(generate_fn(placed[mesh.size], tok, x_T, rng)))
    return np.concatenate(out)


def generate(
    model: T2I,
    unet_params: Any,
    text_params: Any,
    vae_params: Any,
    tokens: np.ndarray,
    sampler: sampling.SamplerConfig,
    image_size: int,
    seed: int = 0,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images `(N, H, W, 3)` for token ids `(N, L)`; image i's noise depends on (seed, i)."""
    empty = model.tokenizer()([""])[0]

    @jax.jit
    def run(unet, text, vae, tok, x_T, rng):
        uncond = jnp.broadcast_to(empty, tok.shape)
        return model.generate({"unet": unet, "text": text}, vae, tok, uncond, x_T, sampler, rng)

    def generate_fn(params, tok, x_T, rng):  # params are jit arguments, never baked in
        return run(*params, tok, x_T, rng)

    shape = model.latent_shape(1, image_size)[1:]
    params = (unet_params, text_params, vae_params)
    return generate_batched(generate_fn, params, tokens, shape, seed, batch_size)


def score(
    images: np.ndarray | Sequence[np.ndarray],
    labels: dict[str, np.ndarray],
    judge_params: Any,
    judge_config: judge.JudgeConfig,
    real_features: np.ndarray,
    outputs: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Metrics of generated (or real) images `(N, H, W, 3)`, or of one such array per noise seed,
    against the prompts' labels and the real images' judge features. fd_judge is the mean over
    seeds (`fd_judge_per_seed` lists them), alignment and colour statistics are pooled, and with
    several seeds `diversity` is `metrics.seed_diversity` of their judge features. `outputs`: the
    judge's outputs of each seed's images when already computed."""
    per_seed = [images] if isinstance(images, np.ndarray) else list(images)
    if outputs is None:
        outputs = [judge.predict(judge_params, im, judge_config) for im in per_seed]
    table = metrics.alignment_table([judge.alignment(out, labels) for out in outputs])
    row: dict[str, Any] = {k: v["accuracy"] for k, v in table.items() if k != "all"}
    fds = [metrics.frechet_distance_from_features(o["features"], real_features) for o in outputs]
    row["fd_judge"] = float(np.mean(fds))
    row |= {
        k: v
        for k, v in metrics.colour_statistics(np.concatenate(per_seed)).items()
        if k != "lightness"
    }
    if len(per_seed) > 1:
        row["fd_judge_per_seed"] = fds
        row["diversity"] = metrics.seed_diversity(np.stack([o["features"] for o in outputs]))
    return row


def evaluate(
    model: T2I,
    entries: Sequence[Entry],
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
    judge_params, judge_config = load_judge(judge_workdir, image_size)
    real, labels = judge.real_examples(split, num_images, data_seed, image_size)
    captions = [str(c) for c in labels["caption"]]
    tokens = model.tokenizer()(captions)
    real_features = judge.predict(judge_params, real, judge_config)["features"]
    rows = {"real": score(real, labels, judge_params, judge_config, real_features)}
    images = {"real": real}
    for entry in tqdm(entries, desc="evaluate"):
        gen = generate(
            model,
            entry.unet_params,
            text_params,
            vae_params,
            tokens,
            entry.sampler,
            image_size,
            seed,
        )
        rows[entry.name] = score(gen, labels, judge_params, judge_config, real_features)
        rows[entry.name]["nfe"] = nfe(entry.sampler)
        images[entry.name] = gen
    return rows, images, captions


def sample_grid(
    images: dict[str, np.ndarray], captions: Sequence[str], num: int = 8, scale: int = 3
) -> Image.Image:
    """Rows = entries (labelled), columns = the first `num` prompts (captioned on top)."""
    names = list(images)
    num = min(num, len(captions))
    h, w = next(iter(images.values())).shape[1:3]
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=11)
    label_w, head_h = 150, 40
    sheet = Image.new("RGB", (label_w + num * (cw + 4), head_h + len(names) * (ch + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for j in range(num):
        words, lines = captions[j].split(), [""]
        for word in words:
            lines[-1] = f"{lines[-1]} {word}".strip()
            if draw.textlength(lines[-1], font=font) > cw:
                lines[-1] = lines[-1].rsplit(" ", 1)[0]
                lines.append(word)
        for k, text in enumerate(lines[:3]):
            draw.text((label_w + j * (cw + 4), 2 + 12 * k), text, fill="black", font=font)
    for i, name in enumerate(names):
        y = head_h + i * (ch + 4)
        draw.text((4, y + ch // 2 - 6), name, fill="black", font=font)
        for j in range(num):
            tile = Image.fromarray(images[name][j]).resize((cw, ch), Image.NEAREST)
            sheet.paste(tile, (label_w + j * (cw + 4), y))
    return sheet


def write_report(
    rows: dict[str, dict[str, float]],
    images: dict[str, np.ndarray],
    captions: Sequence[str],
    out_dir: str | Path,
) -> str:
    """Writes `results.md`, `results.json` and `samples.png` to `out_dir`; returns the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = metrics.markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows.values())])
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    sample_grid(images, captions).save(out_dir / "samples.png")
    return table


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


@dataclasses.dataclass(frozen=True)
class Generator:
    """A trained run ready to sample: its config, `Method`, frozen models and (EMA) params."""

    config: ml_collections.ConfigDict
    method: methods.Method
    frozen: Any
    params: Any

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: str | Path) -> Generator:
        """The method of `config`, its frozen models, and the params of `workdir` (a run
        directory: the newest checkpoint's EMA params; or a params file)."""
        method = methods.get(config.method)(config)
        if method.generate is None:
            raise ValueError(f"config.method={config.method!r} has no generate(): cannot sample")
        return cls(config, method, method.load_frozen(), checkpoint.load_params(workdir))

    @functools.cached_property
    def _generate_jit(self) -> Callable:
        return jax.jit(self.method.generate, static_argnums=5)

    def nfe(self, steps: int) -> int:
        """Network calls per image: 2 per step when the run's sampler uses CFG (a teacher)."""
        sample = self.config.get("sample")
        return steps * (2 if sample is not None and sample.get("guidance_scale", 1.0) != 1 else 1)

    def images(
        self, captions: Sequence[str], steps: int, seed: int = 0, batch_size: int = 50
    ) -> np.ndarray:
        """uint8 images `(N, H, W, 3)` for the captions with `initial_noise(seed, ...)`."""
        model = T2I.from_config(self.config)
        tokens = model.tokenizer()(list(captions))
        shape = model.latent_shape(1, self.config.data.image_size)[1:]
        fn = functools.partial(_call_generate, self._generate_jit, steps)
        return generate_batched(fn, (self.params, self.frozen), tokens, shape, seed, batch_size)


def row_key(name: str, steps: int | str, prompt_set: str) -> str:
    return f"{name}|{steps}|{prompt_set}"


def _tile_path(out_dir: Path, key: str, folder: str = "tiles", suffix: str = ".npy") -> Path:
    return out_dir / folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + suffix)


def _record_path(out_dir: Path, key: str) -> Path:
    """The per-image record (`paired.Record`) of a row, for the paired intervals."""
    return _tile_path(out_dir, key, "records", ".npz")


@dataclasses.dataclass
class PromptSet:
    """Prompts of one Shapes split with their real images, labels and judge features."""

    name: str
    captions: list[str]
    labels: dict[str, np.ndarray]
    real: np.ndarray
    real_features: np.ndarray
    other_real_features: np.ndarray  # a disjoint real draw of the same size (evaluation noise)


def load_prompt_set(
    name: str, num: int, data_seed: int, image_size: int, judge_params, judge_config
) -> PromptSet:
    real, labels = judge.real_examples(name, num, data_seed, image_size)
    features = judge.predict(judge_params, real, judge_config)["features"]
    other, _ = judge.real_examples(name, num, data_seed, image_size, start=num)
    other_features = judge.predict(judge_params, other, judge_config)["features"]
    captions = [str(c) for c in labels["caption"]]
    return PromptSet(name, captions, labels, real, features, np.asarray(other_features))


def real_row(prompts: PromptSet, judge_params, judge_config) -> dict[str, Any]:
    """The reference row: alignment of the real images, and the FD of a disjoint real draw of
    the same size (the floor every generator's fd_judge is compared with)."""
    row = score(prompts.real, prompts.labels, judge_params, judge_config, prompts.real_features)
    row["fd_judge"] = metrics.frechet_distance_from_features(
        prompts.other_real_features, prompts.real_features
    )
    return row | {"label": "real", "run": "real", "steps": 0, "prompt_set": prompts.name}


def generated_row(
    images: Sequence[np.ndarray], prompts: PromptSet, judge_params, judge_config
) -> tuple[dict[str, Any], paired.Record]:
    """The metrics row of one generator's images (one array per noise seed) and its per-image
    record. `fd_judge_other_real` is its FD to the disjoint real draw: how much the choice of
    real set moves the FD (evaluation noise)."""
    outputs = [judge.predict(judge_params, im, judge_config) for im in images]
    row = score(images, prompts.labels, judge_params, judge_config, prompts.real_features, outputs)
    row["fd_judge_other_real"] = float(
        np.mean(
            [
                metrics.frechet_distance_from_features(o["features"], prompts.other_real_features)
                for o in outputs
            ]
        )
    )
    correct = [judge.alignment(o, prompts.labels)["all"] for o in outputs]
    record = paired.make_record(
        images, [o["features"] for o in outputs], correct, prompts.labels["category"]
    )
    return row, record


def _call_generate(generate_jit, steps, params_and_frozen, tokens, x_T, rng):
    # params and frozen models go in as jit arguments (never baked into the program)
    return generate_jit(*params_and_frozen, tokens, x_T, rng, steps)


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
    judge_params, judge_config = load_judge(judge_path, config.image_size)
    seeds = [int(s) for s in config.noise_seeds]
    out_dir = root / config.out_dir
    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    rows = _done_rows(results_path)

    prompt_sets = {
        name: load_prompt_set(
            name, config.num_images, config.data_seed, config.image_size, judge_params, judge_config
        )
        for name in config.prompt_sets
    }
    (out_dir / "records").mkdir(exist_ok=True)
    for p in prompt_sets.values():
        key = row_key("real", 0, p.name)
        if key not in rows:
            rows[key] = real_row(p, judge_params, judge_config)
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
        generator = Generator.load(configs[run.name], workdir_of_run)
        for steps, prompt_set in pending:
            progress.set_postfix(run=run.name, steps=steps, prompts=prompt_set)
            prompts = prompt_sets[prompt_set]
            images = [
                generator.images(prompts.captions, steps, s, config.batch_size) for s in seeds
            ]
            row, record = generated_row(images, prompts, judge_params, judge_config)
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


def evaluation_noise(rows: dict[str, dict[str, Any]], prompt_set: str) -> dict[str, float]:
    """How much FD-judge moves with the evaluation's own choices, over the generated rows of a
    prompt set: `noise_seeds` the mean |FD(seed a) − FD(seed b)| over pairs of noise seeds;
    `real_sets` the mean |FD(prompts' real images) − FD(a disjoint real draw)|."""
    seed_gaps, real_gaps = [], []
    for r in rows.values():
        if r["prompt_set"] != prompt_set or r["run"] == "real":
            continue
        per_seed = r.get("fd_judge_per_seed", [])
        seed_gaps += [abs(a - b) for i, a in enumerate(per_seed) for b in per_seed[i + 1 :]]
        if "fd_judge_other_real" in r:
            real_gaps.append(abs(r["fd_judge"] - r["fd_judge_other_real"]))
    return {
        "noise_seeds": float(np.mean(seed_gaps)) if seed_gaps else float("nan"),
        "real_sets": float(np.mean(real_gaps)) if real_gaps else float("nan"),
    }


def paired_comparison(
    rows: dict[str, dict[str, Any]],
    config: ml_collections.ConfigDict,
    out_dir: Path,
    prompt_sets: dict[str, PromptSet],
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
        noise[name] = evaluation_noise(rows, name)
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


SUMMARY_COLUMNS = ("fd_judge", *shapes.CATEGORIES, "mean", "chroma", "contrast", "diversity")


def summarize(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (prompt set, label, steps), in first-appearance order: `n` (runs), `nfe` and
    per metric `<m>` (mean over runs) and `<m>_std` (sample std over runs; 0 for one run)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows.values():
        groups.setdefault((row["prompt_set"], row["label"], row["steps"]), []).append(row)
    out = []
    for (prompt_set, label, steps), members in groups.items():
        entry = {"prompt_set": prompt_set, "label": label, "steps": steps, "n": len(members)}
        entry["nfe"] = members[0].get("nfe", 0)
        for m in SUMMARY_COLUMNS:
            values = np.array([r[m] for r in members if m in r], np.float64)
            if values.size:
                entry[m] = float(values.mean())
                entry[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out.append(entry)
    return out


def _mean_std(entry: dict[str, Any], m: str) -> str:
    if m not in entry:
        return ""
    mean, std = entry[m], entry[f"{m}_std"]
    fmt = (lambda v: f"{v:.3f}") if abs(mean) <= 1.0 else (lambda v: f"{v:.2f}")
    return fmt(mean) + (f" ± {fmt(std)}" if entry["n"] > 1 else "")


def summary_markdown(summary: list[dict[str, Any]], prompt_set: str) -> str:
    """The mean ± std table of one prompt set (± over the runs of a label: training seeds)."""
    columns = [m for m in SUMMARY_COLUMNS if any(m in e for e in summary)]
    lines = [
        "| method | steps | nfe | runs | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for e in summary:
        if e["prompt_set"] == prompt_set:
            label, steps = (e["label"], e["steps"]) if e["label"] != "real" else ("real", "–")
            cells = [label, str(steps), str(e["nfe"]), str(e["n"])]
            lines.append("| " + " | ".join(cells + [_mean_std(e, m) for m in columns]) + " |")
    return "\n".join(lines)


def plot_metrics(
    summary: list[dict[str, Any]], prompt_set: str, metric_names: Sequence[str], path: Path
) -> None:
    """Metric vs steps, one line per method label (error bars: std over runs); the real
    reference as a dashed line. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary if e["prompt_set"] == prompt_set]
    labels = list(dict.fromkeys(e["label"] for e in entries if e["label"] != "real"))
    real = next((e for e in entries if e["label"] == "real"), None)
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.6))
    axes = np.atleast_1d(axes)
    all_steps = sorted({e["steps"] for e in entries if e["label"] != "real"})
    for ax, m in zip(axes, metric_names, strict=True):
        for label in labels:
            pts = sorted(
                (e["steps"], e[m], e[f"{m}_std"]) for e in entries if e["label"] == label and m in e
            )
            if pts:
                x, y, err = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        if real is not None and m in real:
            ax.axhline(real[m], color="gray", linestyle="--", label="real")
        ax.set_xscale("log")
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(m)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prompt set: {prompt_set}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(
    rows: dict[str, dict[str, Any]],
    config: ml_collections.ConfigDict,
    out_dir: Path,
    captions: Sequence[Sequence[str]],
) -> str:
    """results.md, plots_<set>.png and samples_<set>.png from all rows; returns the Markdown."""
    summary = summarize(rows)
    parts = ["# Evaluation", ""]
    runs = [RunSpec.from_dict(dict(r)) for r in config.runs]
    for prompt_set, set_captions in zip(config.prompt_sets, captions, strict=True):
        set_rows = {k: r for k, r in rows.items() if r["prompt_set"] == prompt_set}
        parts += [f"## Prompt set `{prompt_set}`", "", summary_markdown(summary, prompt_set), ""]
        per_row = {f"{r['run']} @ {r['steps']}": r for r in set_rows.values()}
        columns = [c for c in COLUMNS if any(c in r for r in per_row.values())]
        parts += ["Every run:", "", metrics.markdown_table(per_row, columns), ""]
        plot_metrics(
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
            sample_grid(grid, set_captions, num=config.grid_prompts).save(
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
