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
from ogclip_jobs.config import (
    AblationConfig,
    DenseConfig,
    EvalConfig,
    RetrievalConfig,
    SynthStreamConfig,
    TrainJobConfig,
)
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

# Each recipe's arms, in table order: what each changes in the budget's recipe config (None: nothing is trained,
# the budget's `pretrained` bundle is scored as it is).
ABLATIONS: dict[str, dict[str, dict[str, Any] | None]] = {
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
    # The paper's ablation: adapters (plain bottleneck, then G²A) on the frozen backbone trained with the global
    # contrastive term alone, then the maximum-response terms on the sub-perspectives, then the weighted triplet
    # (the whole method); the triplet averaged instead of summed; one MPR head instead of K, and the perspectives'
    # mean response instead of their maximum; full fine-tuning, the baseline the paper beats.
    # Sub-perspective fusion at inference and noisy masks are the retrieval columns (`retrieval.sub_perspectives`).
    "mps-clip": {
        "frozen backbone": None,
        "+bottleneck adapters": {"adapters": {"adapter": "bottleneck"}, "triplet_weight": 0.0,
                                 "perspective_weight": 0.0},
        "+G²A adapters": {"adapters": {"adapter": "g2a"}, "triplet_weight": 0.0, "perspective_weight": 0.0},
        "+multi-perspective contrastive": {"adapters": {"adapter": "g2a"}, "triplet_weight": 0.0},
        "+weighted triplet (MPS-CLIP)": {"adapters": {"adapter": "g2a"}},
        "MPS-CLIP, triplet averaged": {"adapters": {"adapter": "g2a"}, "triplet_reduction": "mean"},
        "MPS-CLIP, K = 1": {"adapters": {"adapter": "g2a", "perspectives": 1}},
        "MPS-CLIP, mean response": {"adapters": {"adapter": "g2a"}, "perspective_response": "mean"},
        "full fine-tuning": {"full_finetune": True},
    },
}
VARIANTS = ABLATIONS["og-clip"]
# A table column: its header and how to read its figure (a fraction; shown in %) from one seed's scores.
Column = tuple[str, Callable[[dict[str, Any]], float | None]]
# Which OG-CLIP arms give the accuracy-vs-dimension curves.
DIM_CURVES = {"Adaptive MRL": "+Adaptive MRL (OG-CLIP)", "plain MRL": "plain MRL", "naive truncation": "+ROI"}
# Training metrics averaged over a run and kept with its scores (DetailCLIP's share of kept patches on the target,
# and the targets' share of the image: at chance the first equals the second).
RUN_MEANS = ("kept_on_target", "target_share")


def arms_of(train: TrainJobConfig) -> dict[str, dict[str, Any] | None]:
    """The arms of the budget's recipe (ValueError for a recipe without an ablation)."""
    if train.recipe.kind not in ABLATIONS:
        raise ValueError(f"no ablation is defined for recipe {train.recipe.kind!r}; known: {sorted(ABLATIONS)}")
    return ABLATIONS[train.recipe.kind]


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested sections key by key (an arm that changes the adapter keeps the
    budget's adapter width)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _leaves(changes: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the settings an arm changes: 'adapters.adapter' for {"adapters": {"adapter": …}}."""
    return [name for key, value in changes.items()
            for name in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def variant_config(train: TrainJobConfig, name: str, seed: int | None = None) -> TrainJobConfig:
    """The training config of one arm: the shared budget, the arm's recipe changes, no export.

    ``seed`` (default: the budget's own) seeds the model, the sampling and a rendered stream's pictures."""
    arms = arms_of(train)
    if name not in arms:
        raise ValueError(f"{name!r} is not an arm of the {train.recipe.kind} ablation; its arms: {list(arms)}")
    seed = train.seed if seed is None else seed
    recipe = train.recipe.model_validate(_merged(train.recipe.model_dump(), arms[name] or {}))
    update: dict[str, Any] = {"name": f"{train.name}-{slug(name)}" + (f"-s{seed}" if seed != train.seed else ""),
                              "recipe": recipe, "export": False, "seed": seed}
    if isinstance(train.data, SynthStreamConfig) and seed != train.seed:
        update["data"] = train.data.model_copy(update={"seed": train.data.seed + seed - train.seed})
    return train.model_copy(update=update)


def arm_settings(train: TrainJobConfig, name: str) -> dict[str, Any]:
    """What an arm sets, by dotted name, as its recipe config has it (the table's first columns)."""
    recipe = variant_config(train, name).recipe.model_dump(mode="json")
    settings = {}
    for leaf in _leaves(arms_of(train)[name] or {}):
        value = recipe
        for part in leaf.split("."):
            value = value[part]
        settings[leaf] = value
    return settings


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


def retrieval_record(folder: Path, name: str, seed: int, train: TrainJobConfig, retrieval: RetrievalConfig
                     ) -> ScoreRecord:
    """Where an arm's retrieval scores for one seed are kept: valid for the same training config and scenes (the
    retrieval config without the bundle and output folder it does not read here)."""
    return ScoreRecord(folder / f"{slug(name)}-s{seed}-retrieval.json", {
        "train": train.model_dump(mode="json"),
        "retrieval": retrieval.model_dump(mode="json", exclude={"bundle", "output_dir"})})


def _int_dims(scores: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot scores read back from JSON, with the embedding sizes as ints again."""
    for block in (scores, *scores["mask_modes"].values()):
        block["macc_by_dim"] = {int(d): v for d, v in block["macc_by_dim"].items()}
    return scores


class ZeroShotScoring:
    """How OG-CLIP's and DetailCLIP's arms are scored: zero-shot mAcc on the unseen classes (every mask mode, seen
    and new looks, sizes) and, when the ablation configures it, the dense probe, each kept in its own record."""

    def __init__(self, cfg: AblationConfig, rows: list[dict[str, Any]], seen: list[bool] | None = None,
                 dense_targets: dict[str, TargetClass] | None = None) -> None:
        self.cfg, self.rows, self.seen, self.dense_targets = cfg, rows, seen, dense_targets or {}

    @classmethod
    def from_graph(cls, cfg: AblationConfig) -> ZeroShotScoring:
        from ogclip_jobs.runtime import open_graph

        with open_graph() as store:
            rows = eval_classes(store, cfg.eval)
            seen = seen_looks(rows, class_set_rows(store, cfg.eval.look_class_set))
            dense_rows = class_set_rows(store, cfg.dense.class_set) if cfg.dense is not None else []
        every = {row["key"]: TargetClass.from_facts(row) for row in dense_rows}
        dense = {k: every[k] for k in spread_classes(every, cfg.dense.classes, cfg.dense.seed)} if every else {}
        return cls(cfg, rows, seen, dense)

    def records(self, folder: Path, name: str, seed: int, train: TrainJobConfig) -> dict[str, ScoreRecord]:
        """The zero-shot record, then the dense probe's (when configured)."""
        records = {"zero_shot": zero_shot_record(folder, name, seed, train, variant_eval(self.cfg.eval, train))}
        if self.cfg.dense is not None:
            records["dense"] = dense_record(folder, name, seed, train, self.cfg.dense)
        return records

    def load(self, kind: str, record: ScoreRecord) -> dict[str, Any] | None:
        scores = record.load()
        return _int_dims(scores) if scores is not None and kind == "zero_shot" else scores

    def score(self, kind: str, model: OGCLIP, train: TrainJobConfig) -> dict[str, Any]:
        if kind == "dense":
            return dense_scores(model, self.dense_targets, self.cfg.dense)
        scores = evaluate_model(model, self.rows, variant_eval(self.cfg.eval, train), self.seen)
        scores["training"] = run_means(train.output_dir / train.name)
        return scores

    def line(self, run: dict[str, Any]) -> str:
        return ", ".join(f"{mode_label(mode, run['segmenter'])} mAcc {100 * m['macc']:.1f}%"
                         for mode, m in run["mask_modes"].items()) + (
            f", class mIoU {100 * run['dense']['class']['miou']:.1f}%" if "dense" in run else "")

    def summary(self, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {"macc": float(np.mean([r["macc"] for r in runs.values()])),
                "macc_std": float(np.std([r["macc"] for r in runs.values()])),
                "macc_by_dim": {d: float(np.mean([r["macc_by_dim"][d] for r in runs.values()]))
                                for d in next(iter(runs.values()))["macc_by_dim"]}}

    def caption(self) -> tuple[str, str]:
        classes = len(self.rows)
        return (f"on {classes} unseen classes (chance {100 / classes:.1f}%)",
                f"Super-categories, new looks (no training class has the look) and sizes with "
                f"{self.cfg.eval.mask_modes[0]} masks."
                + (" Dense: `ogclip eval dense`'s probe on the same scenes for every model." if self.cfg.dense else ""))

    def columns(self, runs: list[dict[str, Any]]) -> list[Column]:
        categories = sorted({k for r in runs for k in r["per_super_category"]})
        segmenter = runs[0]["segmenter"] if runs else "cpu"

        def dense(level: str, field: str) -> Callable[[dict[str, Any]], float | None]:
            return lambda run: (run["dense"][level] if field == "miou" else run["dense"][level]["instances"])[field]

        columns: list[Column] = [
            *((c, lambda run, c=c: run["per_super_category"].get(c, float("nan"))) for c in categories),
            *((f"mAcc % {mode_label(m, segmenter)}", lambda run, m=m: run["mask_modes"][m]["macc"])
              for m in self.cfg.eval.mask_modes),
            ("new-look mAcc %", lambda run: run["looks"]["new_look"]),
            ("mAcc % at D/8", lambda run: run["macc_by_dim"][sorted(run["macc_by_dim"])[0]]),
            ("mAcc % at D/4", lambda run: run["macc_by_dim"][sorted(run["macc_by_dim"])[1]])]
        if self.cfg.dense is not None:
            columns += [("class mIoU %", dense("class", "miou")),
                        ("super-category mIoU %", dense("super_category", "miou")),
                        ("small-target IoU %", dense("class", "small_iou")),
                        ("other-target IoU %", dense("class", "other_iou"))]
        means = [m for m in RUN_MEANS if any(m in run.get("training", {}) for run in runs)]
        return columns + [(f"{m.replace('_', ' ')} %", lambda run, m=m: run.get("training", {}).get(m))
                          for m in means]


class RetrievalScoring:
    """How MPS-CLIP's arms are scored: image–text retrieval (``ogclip eval retrieval``'s Recall@K and mR) on the
    ablation's ``retrieval`` scenes, under each of its sub-perspectives."""

    def __init__(self, cfg: AblationConfig, rows: dict[str, dict[str, Any]]) -> None:
        self.cfg, self.rows = cfg, rows
        self._scenes: dict[int, list[Any]] = {}

    @classmethod
    def from_graph(cls, cfg: AblationConfig) -> RetrievalScoring:
        from ogclip_jobs.runtime import open_graph

        with open_graph() as store:
            return cls(cfg, {row["key"]: row for row in class_set_rows(store, cfg.retrieval.class_set)})

    def records(self, folder: Path, name: str, seed: int, train: TrainJobConfig) -> dict[str, ScoreRecord]:
        return {"retrieval": retrieval_record(folder, name, seed, train, self.cfg.retrieval)}

    def load(self, kind: str, record: ScoreRecord) -> dict[str, Any] | None:
        return record.load()

    def score(self, kind: str, model: OGCLIP, train: TrainJobConfig) -> dict[str, Any]:
        from ogclip_jobs.retrieval import overhead_scenes, retrieval_scores

        cfg = self.cfg.retrieval
        size = cfg.image_size or model.cfg.image_size
        if size not in self._scenes:  # every arm is scored on the same scenes
            self._scenes[size] = overhead_scenes(self.rows, cfg.scenes, cfg.targets_per_scene, cfg.seed, cfg.split,
                                                 size)
        return {"sub_perspectives": retrieval_scores(model, self._scenes[size], cfg.sub_perspectives, self.rows,
                                                     cfg.batch_size),
                "training": run_means(train.output_dir / train.name)}

    def line(self, run: dict[str, Any]) -> str:
        return ", ".join(f"{mode} mR {scores['mR']:.1f}" for mode, scores in run["sub_perspectives"].items())

    def summary(self, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {stat: {mode: float(reduce([r["sub_perspectives"][mode]["mR"] for r in runs.values()]))
                       for mode in self.cfg.retrieval.sub_perspectives}
                for stat, reduce in (("mR", np.mean), ("mR_std", np.std))}

    def caption(self) -> tuple[str, str]:
        cfg = self.cfg.retrieval
        return (f"by image–text retrieval on {cfg.scenes} {cfg.split} scenes of class set '{cfg.class_set}'",
                "mR: the mean of I→T and T→I Recall@1/5/10, under each sub-perspective (`none`: the whole image; "
                "`targets`: fused with every visible target's exact mask; `segmenter`: the CPU segmenter's regions; "
                "`noisy`: the exact masks with a detector's mistakes); R@1 with the first of them.")

    def columns(self, runs: list[dict[str, Any]]) -> list[Column]:
        modes = self.cfg.retrieval.sub_perspectives
        first = modes[0]
        return [*((f"mR % {mode}", lambda run, m=mode: run["sub_perspectives"][m]["mR"] / 100) for mode in modes),
                (f"I→T R@1 % {first}", lambda run: run["sub_perspectives"][first]["i2t_r1"] / 100),
                (f"T→I R@1 % {first}", lambda run: run["sub_perspectives"][first]["t2i_r1"] / 100)]


Scoring = ZeroShotScoring | RetrievalScoring


def scoring_for(cfg: AblationConfig) -> Scoring:
    """What the budget's recipe is scored by: retrieval for MPS-CLIP, zero-shot classification for the others."""
    return (RetrievalScoring if cfg.train.recipe.kind == "mps-clip" else ZeroShotScoring).from_graph(cfg)


def backbone_model(train: TrainJobConfig) -> OGCLIP:
    """The budget's ``pretrained`` bundle itself: the untrained row of a recipe that adapts a backbone."""
    from ogclip.bundle import load_bundle

    if train.pretrained is None or not Path(train.pretrained).is_dir():
        raise ValueError("the 'frozen backbone' arm scores the budget's `pretrained` bundle as it is: give a bundle "
                         "folder there, or leave the arm out of `variants`")
    return load_bundle(train.pretrained)[0]


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] = _log.info,
                 trained: dict[str, OGCLIP] | None = None, scoring: Scoring | None = None) -> dict[str, Any]:
    """Train every arm of the budget's recipe with the same budget, once per seed, and score each.

    ``trained`` holds arms already trained by the caller with this budget and its own seed (the demo's main run is
    OG-CLIP). Each (arm, seed) is recorded under ``output_dir/runs`` as soon as it is scored (:class:`ScoreRecord`):
    run the same command again and only what is missing trains or is scored. Every figure of the table is the
    mean ± std over ``cfg.seeds``. An arm without changes (``None``, MPS-CLIP's frozen backbone) is not trained:
    the ``pretrained`` bundle is scored as it is, the same for every seed. ``scoring`` defaults to the recipe's
    (:func:`scoring_for`).
    """
    arms = arms_of(cfg.train)
    names = cfg.variants or list(arms)
    unknown = sorted(set(names) - set(arms))
    if unknown:
        raise ValueError(f"unknown ablation arms {unknown} for recipe {cfg.train.recipe.kind}; known: {list(arms)}")
    scoring = scoring or scoring_for(cfg)
    folder = cfg.output_dir / "runs"
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names, 1):
        runs: dict[int, dict[str, Any]] = {}
        for seed in cfg.seeds:
            # the untrained arm is the same model for every seed: one record
            train_cfg = variant_config(cfg.train, name, seed if arms[name] is not None else cfg.train.seed)
            records = scoring.records(folder, name, train_cfg.seed, train_cfg)
            model = (trained or {}).get(name) if seed == cfg.train.seed else None
            scores = {kind: scoring.load(kind, record) if model is None else None for kind, record in records.items()}
            if all(s is not None for s in scores.values()):
                log(f"[ablation {i}/{len(names)}] {name}, seed {seed}: scored by an earlier run with this budget "
                    f"and data ({next(iter(records.values())).path}), not retrained")
            else:
                if model is None and arms[name] is None:
                    model = backbone_model(cfg.train)
                elif model is None:
                    # A finished run's folder resumes at its last step: only what was never trained trains here.
                    log(f"[ablation {i}/{len(names)}] {'loading' if any(scores.values()) else 'training'} {name}, "
                        f"seed {seed}")
                    model, _ = run_training(train_cfg, log)
                for kind, record in records.items():
                    if scores[kind] is None:
                        scores[kind] = scoring.score(kind, model, train_cfg)
                        record.save(scores[kind])
            primary, *extra = records
            runs[seed] = {**scores[primary], **{kind: scores[kind] for kind in extra}}
            log(f"[ablation {i}/{len(names)}] {name}, seed {seed}: {scoring.line(runs[seed])}")
        results[name] = {"settings": arm_settings(cfg.train, name), "seeds": runs, **scoring.summary(runs)}
    text = ablation_markdown(cfg, results, scoring)
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


def ablation_markdown(cfg: AblationConfig, results: dict[str, dict[str, Any]], scoring: Scoring) -> str:
    """The ablation's table (one row per arm: what it changes, then every score as mean ± std over seeds) and, for
    OG-CLIP, mAcc against the embedding size."""
    first = next(iter(results.values()))["seeds"] if results else {}
    columns = scoring.columns(list(first.values()))
    settings = list(dict.fromkeys(k for r in results.values() for k in r["settings"]))
    table = markdown_table(
        ["model", *(s.replace("_", " ") for s in settings), *(label for label, _ in columns)],
        [[name, *(r["settings"].get(s, "") for s in settings),
          *(_spread([read(run) for run in r["seeds"].values()]) for _, read in columns)]
         for name, r in results.items()])
    budget = cfg.train.train
    where, what = scoring.caption()
    untrained = [name for name in results if arms_of(cfg.train)[name] is None]
    text = (f"# Ablation of {cfg.train.recipe.kind} {where}\n\n"
            f"Every model: {cfg.train.model}, {budget.steps} steps × {cfg.train.num_workers} worker(s) × "
            f"{budget.batch_size}, the same data; mean ± std over seeds {list(cfg.seeds)}"
            + (f" ({', '.join(untrained)}: the `pretrained` bundle as it is, not trained)" if untrained else "")
            + f". {what}\n\n{table}\n")
    curves = dim_curves(cfg, results)
    if curves:
        dims = sorted({d for c in curves.values() for d in c})
        text += ("\n## mAcc % vs embedding dimension (mean over seeds)\n\n"
                 + markdown_table(["", *map(str, dims)], [[label, *(100 * c[d] for d in dims)]
                                                          for label, c in curves.items()]) + "\n")
    return text
