"""The ablation (``ogclip eval ablation``): a recipe's arms trained with one budget, several seeds each, and scored
alike: zero-shot on the unseen classes always, and the dense probe (:mod:`.dense`) when configured.

An arm is a change to the budget's recipe config. OG-CLIP's arms are the paper's building blocks (Table 3) and the
baselines the platform can build on the same base model; DetailCLIP's switch its losses on one at a time and then
change how patches are removed (the budget's recipe is the full method; an arm turns terms off or changes the
removal).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ogclip.models import OGCLIP
from ogclip.synth import TargetClass, spread_classes
from ogclip_jobs.config import AblationConfig, DenseConfig, EvalConfig, SynthStreamConfig, TrainJobConfig
from ogclip_jobs.dense import dense_scores
from ogclip_jobs.evaluate import (
    class_set_rows,
    eval_classes,
    evaluate_model,
    markdown_table,
    mode_label,
    plot_curves,
    seen_looks,
    slug,
)
from ogclip_jobs.train import run_training

_log = logging.getLogger(__name__)

# Each recipe's arms, in table order: what each changes in the budget's recipe config.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "og-clip": {
        "CLIP": {"prompts": "label", "visual_prompt": "none", "mrl": "none"},
        "+KG-Aug": {"prompts": "kg", "visual_prompt": "none", "mrl": "none"},
        "+ROI": {"prompts": "kg", "visual_prompt": "roi", "mrl": "none"},
        "+Adaptive MRL (OG-CLIP)": {"prompts": "kg", "visual_prompt": "roi", "mrl": "adaptive"},
        "plain MRL": {"prompts": "kg", "visual_prompt": "roi", "mrl": "uniform"},
        "Red-Circle": {"prompts": "kg", "visual_prompt": "red_circle", "mrl": "none"},
        "Mask-adapted CLIP": {"prompts": "kg", "visual_prompt": "background_mask", "mrl": "none"},
    },
    "detail-clip": {
        "CLIP": {"alpha_cls": 0.0, "alpha_patch": 0.0, "alpha_rec": 0.0, "removal": 0.0},
        "+reconstruction, random removal": {"alpha_cls": 0.0, "alpha_patch": 0.0, "removal_mode": "random"},
        "+reconstruction, attention removal": {"alpha_cls": 0.0, "alpha_patch": 0.0, "removal_mode": "attention"},
        "+L_CLS": {"alpha_patch": 0.0, "removal_mode": "attention"},
        "+L_Patch (DetailCLIP)": {"removal_mode": "attention"},
        "DetailCLIP, random removal": {"removal_mode": "random"},
        "DetailCLIP, inverted removal": {"removal_mode": "inverted"},
    },
}
VARIANTS = ABLATIONS["og-clip"]
# Which OG-CLIP arms give the accuracy-vs-dimension curves.
DIM_CURVES = {"Adaptive MRL": "+Adaptive MRL (OG-CLIP)", "plain MRL": "plain MRL", "naive truncation": "+ROI"}
# Training metrics averaged over a run and kept with its scores (DetailCLIP's share of kept patches on the target,
# and the targets' share of the image: at chance the first equals the second).
RUN_MEANS = ("kept_on_target", "target_share")


def arms_of(train: TrainJobConfig) -> dict[str, dict[str, Any]]:
    """The arms of the budget's recipe (ValueError for a recipe without an ablation)."""
    if train.recipe.kind not in ABLATIONS:
        raise ValueError(f"no ablation is defined for recipe {train.recipe.kind!r}; known: {sorted(ABLATIONS)}")
    return ABLATIONS[train.recipe.kind]


def variant_config(train: TrainJobConfig, name: str, seed: int | None = None) -> TrainJobConfig:
    """The training config of one arm: the shared budget, the arm's recipe changes, no export.

    ``seed`` (default: the budget's own) seeds the model, the sampling and a rendered stream's pictures."""
    arms = arms_of(train)
    if name not in arms:
        raise ValueError(f"{name!r} is not an arm of the {train.recipe.kind} ablation; its arms: {list(arms)}")
    seed = train.seed if seed is None else seed
    recipe = train.recipe.model_validate({**train.recipe.model_dump(), **arms[name]})
    update: dict[str, Any] = {"name": f"{train.name}-{slug(name)}" + (f"-s{seed}" if seed != train.seed else ""),
                              "recipe": recipe, "export": False, "seed": seed}
    if isinstance(train.data, SynthStreamConfig) and seed != train.seed:
        update["data"] = train.data.model_copy(update={"seed": train.data.seed + seed - train.seed})
    return train.model_copy(update=update)


def variant_eval(cfg: EvalConfig, train: TrainJobConfig) -> EvalConfig:
    """The zero-shot evaluation of an arm: its prompts, and its visual prompt (none for recipes that never read
    the mask); no comparison with other prompt sources (the arms are the comparison)."""
    return cfg.model_copy(update={"prompts": train.recipe.prompts, "compare_prompts": [],
                                  "visual_prompt": getattr(train.recipe, "visual_prompt", "none")})


def _spread(values: list[float | None]) -> str:
    """'mean ± std' in percent over seeds (population std; the mean alone for one seed)."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "–"
    mean = 100 * float(np.mean(values))
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values)):.1f}"


def run_means(run_dir: Path, names: tuple[str, ...] = RUN_MEANS) -> dict[str, float]:
    """The mean of each of ``names`` over a run's logged steps (``metrics.jsonl``), for those it logged."""
    sums: dict[str, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        row = json.loads(line)
        for name in names:
            if isinstance(row.get(name), (int, float)):
                sums.setdefault(name, []).append(float(row[name]))
    return {name: float(np.mean(values)) for name, values in sums.items()}


@dataclass(frozen=True)
class ScoreRecord:
    """Scores kept on disk beside the inputs they were made from (configs, test shards): :meth:`load` gives them
    back only for the same inputs, so a stopped ablation resumes where it stopped and a changed input scores anew.
    """

    path: Path
    inputs: dict[str, Any]

    def load(self) -> dict[str, Any] | None:
        """The stored scores, or None when there are none for these inputs (or the file is unreadable)."""
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != self.inputs:
            return None
        return stored["scores"]

    def save(self, scores: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.inputs, "scores": scores}))
        tmp.replace(self.path)


def zero_shot_record(folder: Path, name: str, seed: int, train: TrainJobConfig, eval: EvalConfig) -> ScoreRecord:
    """Where an arm's zero-shot scores for one seed are kept: valid for the same training and evaluation configs
    and the same test shards (their names, sizes and modification times)."""
    shards = sorted(p for p in Path(eval.data).rglob("*") if p.is_file())
    # compare_prompts is left out: an arm's evaluation never has it (variant_eval), and records scored before the
    # field existed stay valid.
    return ScoreRecord(folder / f"{slug(name)}-s{seed}.json", {
        "train": train.model_dump(mode="json"), "eval": eval.model_dump(mode="json", exclude={"compare_prompts"}),
        "data": [[str(p.relative_to(eval.data)), p.stat().st_size, p.stat().st_mtime_ns] for p in shards]})


def dense_record(folder: Path, name: str, seed: int, train: TrainJobConfig, dense: DenseConfig) -> ScoreRecord:
    """Where an arm's dense-probe scores for one seed are kept (apart from the zero-shot ones, so adding the probe
    to an ablation keeps what it already scored): valid for the same training and probe configs."""
    return ScoreRecord(folder / f"{slug(name)}-s{seed}-dense.json",
                       {"train": train.model_dump(mode="json"), "dense": dense.model_dump(mode="json")})


def _int_dims(scores: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot scores read back from JSON, with the embedding sizes as ints again."""
    for block in (scores, *scores["mask_modes"].values()):
        block["macc_by_dim"] = {int(d): v for d, v in block["macc_by_dim"].items()}
    return scores


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] = _log.info,
                 trained: dict[str, OGCLIP] | None = None) -> dict[str, Any]:
    """Train every arm of the budget's recipe with the same budget, once per seed, and score each.

    ``trained`` holds arms already trained by the caller with this budget and its own seed (the demo's main run is
    OG-CLIP). Each (arm, seed) is recorded under ``output_dir/runs`` as soon as it is scored (:class:`ScoreRecord`):
    run the same command again and only what is missing trains or is scored. Every figure of the table is the
    mean ± std over ``cfg.seeds``.
    """
    from ogclip_jobs.runtime import open_graph

    arms = arms_of(cfg.train)
    names = cfg.variants or list(arms)
    unknown = sorted(set(names) - set(arms))
    if unknown:
        raise ValueError(f"unknown ablation arms {unknown} for recipe {cfg.train.recipe.kind}; known: {list(arms)}")
    with open_graph() as store:
        rows = eval_classes(store, cfg.eval)
        seen = seen_looks(rows, class_set_rows(store, cfg.eval.look_class_set))
        dense_rows = class_set_rows(store, cfg.dense.class_set) if cfg.dense is not None else []
    every = {row["key"]: TargetClass.from_facts(row) for row in dense_rows}
    dense_targets = {k: every[k] for k in spread_classes(every, cfg.dense.classes, cfg.dense.seed)} if every else {}
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names, 1):
        runs: dict[int, dict[str, Any]] = {}
        for seed in cfg.seeds:
            train_cfg = variant_config(cfg.train, name, seed)
            eval_cfg = variant_eval(cfg.eval, train_cfg)
            model = (trained or {}).get(name) if seed == cfg.train.seed else None
            zero_shot = zero_shot_record(cfg.output_dir / "runs", name, seed, train_cfg, eval_cfg)
            dense = dense_record(cfg.output_dir / "runs", name, seed, train_cfg, cfg.dense) if cfg.dense else None
            scores = zero_shot.load() if model is None else None
            dense_scored = dense.load() if dense is not None and model is None else None
            if scores is not None and (dense is None or dense_scored is not None):
                log(f"[ablation {i}/{len(names)}] {name}, seed {seed}: scored by an earlier run with this budget "
                    f"and data ({zero_shot.path}), not retrained")
                runs[seed] = {**_int_dims(scores), **({"dense": dense_scored} if dense else {})}
                continue
            if model is None:
                # A finished run's folder resumes at its last step: only what was never trained trains here.
                log(f"[ablation {i}/{len(names)}] {'training' if scores is None else 'loading'} {name}, seed {seed}")
                model, _ = run_training(train_cfg, log)
            if scores is None:
                scores = evaluate_model(model, rows, eval_cfg, seen)
                scores["training"] = run_means(train_cfg.output_dir / train_cfg.name)
                zero_shot.save(scores)
            runs[seed] = scores
            if dense is not None:
                runs[seed]["dense"] = dense_scored or dense_scores(model, dense_targets, cfg.dense)
                dense.save(runs[seed]["dense"])
            log(f"[ablation {i}/{len(names)}] {name}, seed {seed}: " + ", ".join(
                f"{mode_label(mode, scores['segmenter'])} mAcc {100 * m['macc']:.1f}%"
                for mode, m in scores["mask_modes"].items())
                + (f", class mIoU {100 * runs[seed]['dense']['class']['miou']:.1f}%" if dense else ""))
        changed = variant_config(cfg.train, name).recipe
        results[name] = {"settings": {k: getattr(changed, k) for k in arms[name]}, "seeds": runs,
                         "macc": float(np.mean([r["macc"] for r in runs.values()])),
                         "macc_std": float(np.std([r["macc"] for r in runs.values()])),
                         "macc_by_dim": {d: float(np.mean([r["macc_by_dim"][d] for r in runs.values()]))
                                         for d in next(iter(runs.values()))["macc_by_dim"]}}
    text = ablation_markdown(cfg, results, len(rows))
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "ablation.md").write_text(text)
    (cfg.output_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    curves = dim_curves(cfg, results)
    if curves:
        plot_curves(curves, cfg.output_dir / "macc_by_dim.png", "Adaptive MRL vs plain MRL vs naive truncation")
    log(text)
    return results


def dim_curves(cfg: AblationConfig, results: dict[str, dict[str, Any]]) -> dict[str, dict[int, float]]:
    """OG-CLIP's mAcc-vs-dimension curves (mean over seeds) of the arms that ran; none for other recipes."""
    if cfg.train.recipe.kind != "og-clip":
        return {}
    return {label: results[name]["macc_by_dim"] for label, name in DIM_CURVES.items() if name in results}


def ablation_markdown(cfg: AblationConfig, results: dict[str, dict[str, Any]], classes: int) -> str:
    """The ablation's table (one row per arm: what it changes, then every score as mean ± std over seeds) and, for
    OG-CLIP, mAcc against the embedding size."""
    first = next(iter(results.values()))["seeds"] if results else {}
    runs = list(first.values())
    categories = sorted({k for r in runs for k in r["per_super_category"]})
    modes = list(cfg.eval.mask_modes)
    segmenter = runs[0]["segmenter"] if runs else "cpu"
    settings = list(dict.fromkeys(k for r in results.values() for k in r["settings"]))
    means = [m for m in RUN_MEANS if any(m in run.get("training", {}) for run in runs)]

    def over_seeds(result: dict[str, Any], read: Callable[[dict[str, Any]], float | None]) -> str:
        return _spread([read(run) for run in result["seeds"].values()])

    def dense(level: str, field: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda run: (run["dense"][level] if field == "miou" else run["dense"][level]["instances"])[field]

    columns: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
        *((c, lambda run, c=c: run["per_super_category"].get(c, float("nan"))) for c in categories),
        *((f"mAcc % {mode_label(m, segmenter)}", lambda run, m=m: run["mask_modes"][m]["macc"]) for m in modes),
        ("new-look mAcc %", lambda run: run["looks"]["new_look"]),
        ("mAcc % at D/8", lambda run: run["macc_by_dim"][sorted(run["macc_by_dim"])[0]]),
        ("mAcc % at D/4", lambda run: run["macc_by_dim"][sorted(run["macc_by_dim"])[1]])]
    if cfg.dense is not None:
        columns += [("class mIoU %", dense("class", "miou")),
                    ("super-category mIoU %", dense("super_category", "miou")),
                    ("small-target IoU %", dense("class", "small_iou")),
                    ("other-target IoU %", dense("class", "other_iou"))]
    columns += [(f"{m.replace('_', ' ')} %", lambda run, m=m: run.get("training", {}).get(m)) for m in means]
    table = markdown_table(
        ["model", *(s.replace("_", " ") for s in settings), *(label for label, _ in columns)],
        [[name, *(r["settings"].get(s, "") for s in settings), *(over_seeds(r, read) for _, read in columns)]
         for name, r in results.items()])
    budget = cfg.train.train
    text = (f"# Ablation of {cfg.train.recipe.kind} on {classes} unseen classes (chance {100 / classes:.1f}%)\n\n"
            f"Every model: {cfg.train.model}, {budget.steps} steps × {cfg.train.num_workers} worker(s) × "
            f"{budget.batch_size}, the same data; mean ± std over seeds {list(cfg.seeds)}. Super-categories, new "
            f"looks (no training class has the look) and sizes with {modes[0]} masks."
            + (" Dense: `ogclip eval dense`'s probe on the same scenes for every model." if cfg.dense else "")
            + f"\n\n{table}\n")
    curves = dim_curves(cfg, results)
    if curves:
        dims = sorted({d for c in curves.values() for d in c})
        text += ("\n## mAcc % vs embedding dimension (mean over seeds)\n\n"
                 + markdown_table(["", *map(str, dims)], [[label, *(100 * c[d] for d in dims)]
                                                          for label, c in curves.items()]) + "\n")
    return text
