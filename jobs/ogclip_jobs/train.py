"""Training: any recipe's step (:mod:`ogclip.recipes`; OG-CLIP by default) and the shared optimiser, run by Ray
Train over the curation pipeline's shards or the synthetic world rendered on the fly.

AdamW (decoupled weight decay on matrices only, as open_clip does: gains, biases and the logit scale are not
decayed), linear warm-up then cosine decay to ``min_lr``, global grad-norm clipping; the recipe computes the loss
terms and acts after each step.

The job (:func:`run_training`): Ray Data decodes the Parquet shards and streams them into each worker's
``get_dataset_shard``, which shuffles them through a local buffer afresh every epoch; a ``TorchTrainer`` runs
:func:`train_loop` on every worker (gloo on CPU, NCCL on GPU, bf16 autocast on GPU); rank 0 checkpoints every
``checkpoint_every`` steps and a failed worker restarts the group from the latest checkpoint (``FailureConfig``).
The best checkpoint becomes an export bundle and every class's prompts are embedded and written to the graph under
the bundle's model version, the contract with serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from PIL import Image
from torch import Tensor

from ogclip.bundle import export_bundle
from ogclip.config import PromptMode, TextSupervision
from ogclip.decode import decode_image
from ogclip.models import OGCLIP, CheckpointError, load_checkpoint, save_checkpoint
from ogclip.recipes import Recipe, TrainBatch, create_recipe
from ogclip.transforms import image_mask_transform
from ogclip_jobs.config import SceneStreamConfig, SynthStreamConfig, TrainConfig, TrainJobConfig

_log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "train_state.pt"


def build_optimizer(model: OGCLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on weight matrices only. Each group carries an
    ``lr_scale`` (timm's convention) that :func:`train_step` multiplies the scheduled rate by: 1, except the text
    projection's ``cfg.text_projection_lr_scale`` (frozen, not in the optimiser, at 0)."""
    text = {id(p) for p in model.text_projection_parameters()} if cfg.text_projection_lr_scale != 1.0 else set()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in text and cfg.text_projection_lr_scale == 0:
            param.requires_grad_(False)
            continue
        is_gain_or_bias = param.ndim < 2 or "bias" in name or name.endswith(("logit_scale", "embedding"))
        groups.setdefault((not is_gain_or_bias, id(param) in text), []).append(param)
    order = [(True, False), (False, False), (True, True), (False, True)]  # decay first, as checkpoints hold them
    return torch.optim.AdamW(
        [{"params": groups[key], "weight_decay": cfg.weight_decay if key[0] else 0.0,
          "lr_scale": cfg.text_projection_lr_scale if key[1] else 1.0} for key in order if key in groups], lr=cfg.lr)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def train_step(
    model: OGCLIP | torch.nn.Module,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    batch: TrainBatch,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One optimisation step of ``recipe`` on a batch; returns its loss terms (``loss`` is the one minimised).

    ``model`` may be the DDP wrapper of the recipe's model; ``autocast_dtype`` runs the forward pass under autocast
    (bf16 on GPU). After the optimiser step the recipe's ``after_step`` sees the unwrapped model.
    """
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg) * group.get("lr_scale", 1.0)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return (torch.autocast(batch.images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    terms = recipe.loss(model, batch, generator, autocast)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    optimizer.step()
    recipe.after_step(getattr(model, "module", model), step + 1, cfg.steps)
    return terms


def logged_terms(terms: Mapping[str, Tensor]) -> dict[str, float | list[float]]:
    """Loss terms as ``metrics.jsonl`` keeps them: scalars as floats, vectors (α) as lists."""
    return {name: float(value.detach()) if value.ndim == 0 else [round(float(v), 5) for v in value.detach()]
            for name, value in terms.items()}


# -- prompts ---------------------------------------------------------------------------------------------------


def contrast_prompts(facts: Mapping[str, Mapping[str, Any]], mode: PromptMode, seed: int = 0
                     ) -> Callable[[str], list[list[str]]]:
    """Class key → the prompt ensembles of every look one attribute away from the class's (computed once per
    class): the hard negatives of :func:`sample_texts`."""
    from ogclip_kg.prompts import contrast_looks, prompt_texts

    cache: dict[str, list[list[str]]] = {}

    def contrasts(key: str) -> list[list[str]]:
        if key not in cache:
            cache[key] = [prompt_texts(look, mode, seed) for look in contrast_looks(dict(facts[key]))]
        return cache[key]

    return contrasts


def sample_texts(labels: Sequence[str], captions: Sequence[Any], prompts: Mapping[str, Sequence[str]],
                 mode: PromptMode, rng: random.Random, caption_ratio: float = 0.5,
                 contrasts: Callable[[str], Sequence[Sequence[str]]] | None = None, negatives: int = 0,
                 ) -> tuple[list[str], list[int]]:
    """Each image's training text, as prompts and the image each prompt belongs to (``OGCLIP.forward``'s
    ``text_owner``): the ensemble of all its class's prompts, which is exactly the vector the class is classified
    by, or (KG-Aug) its own caption, for a share ``caption_ratio`` of the images that have one.

    Training on the class ensemble rather than on one random prompt matters when the prompts each describe one
    attribute (:func:`ogclip_kg.prompts.prompt_texts`): a single attribute is shared by many classes of a batch.

    With ``contrasts`` (class key → the prompt ensembles of looks one attribute away, see
    :func:`ogclip_kg.prompts.contrast_looks`) each image also brings ``negatives`` of them, drawn at random, as
    extra groups after the batch's own (owners ``len(labels)`` and up): hard negatives.
    """
    texts: list[str] = []
    owner: list[int] = []
    groups: list[Sequence[str]] = []
    for label, caption in zip(labels, captions, strict=True):
        if mode == "kg" and isinstance(caption, str) and caption and rng.random() < caption_ratio:
            groups.append([caption])
        else:
            groups.append(prompts[label])
    if contrasts is not None and negatives:
        for label in labels:
            options = contrasts(label)
            groups.extend(rng.sample(list(options), min(negatives, len(options))))
    for i, group in enumerate(groups):
        texts.extend(group)
        owner.extend([i] * len(group))
    return texts, owner


def scene_texts(captions: Sequence[Sequence[str]], per_image: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """``per_image`` of each scene's captions, drawn at random, and the scene each belongs to."""
    texts: list[str] = []
    owner: list[int] = []
    for i, options in enumerate(captions):
        chosen = rng.sample(list(options), min(per_image, len(options)))
        texts.extend(chosen)
        owner.extend([i] * len(chosen))
    return texts, owner


def train_batch(batch: Mapping[str, Any], model: OGCLIP, cfg: TrainJobConfig, prompts: Mapping[str, Sequence[str]],
                rng: random.Random, contrasts: Callable[[str], Sequence[Sequence[str]]] | None = None,
                device: str | torch.device = "cpu") -> TrainBatch:
    """A decoded batch (the columns of :class:`DecodeForTraining`, or of :class:`RenderScenesForTraining` with
    their sub-perspectives) and its training texts (:func:`sample_texts` as the run's recipe draws them; a scene's
    own captions, :func:`scene_texts`), as the step's tensors."""
    scenes = "captions" in batch
    if scenes:
        texts, owner = scene_texts(batch["captions"], cfg.data.captions_per_image, rng)
    else:
        texts, owner = sample_texts(batch["key"], batch["caption"], prompts, cfg.recipe.prompts, rng,
                                    cfg.recipe.caption_ratio, contrasts, cfg.recipe.hard_negatives)
    unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # prompts repeat: tokenise each sentence once
    tokens = model.tokenize(list(unique))[torch.tensor([unique[t] for t in texts], device=device)]
    parts = {"parts": torch.tensor(batch["part_image"], device=device),
             "part_masks": torch.tensor(batch["part_mask"], device=device),
             "part_owner": torch.tensor(batch["part_owner"], device=device)} if scenes else {}
    return TrainBatch(images=torch.tensor(batch["image"], device=device),  # Ray's batches are read-only: copy
                      masks=torch.tensor(batch["mask"], device=device), texts=tokens,
                      text_owner=torch.tensor(owner, device=device), labels=torch.tensor(batch["label"], device=device),
                      **parts)


# -- data ------------------------------------------------------------------------------------------------------


class DecodeForTraining:
    """Ray Data stage: PNG image and mask bytes → normalised (3,S,S) image and (1,S,S) mask, with the training
    augmentation drawn jointly for both; rows of classes the run does not know are dropped."""

    def __init__(self, preprocess: dict[str, Any], classes: Sequence[str], train: bool = True) -> None:
        from ogclip.config import PreprocessConfig

        self.transform = image_mask_transform(PreprocessConfig.model_validate(preprocess), train=train)
        self.size = int(preprocess["image_size"])
        self.index = {key: i for i, key in enumerate(classes)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, masks, labels, keys, captions = [], [], [], [], []
        for i, label in enumerate(batch["label"]):
            if str(label) not in self.index:
                continue
            mask = batch["mask"][i]
            mask_image = Image.open(io.BytesIO(bytes(mask))).convert("L") if mask is not None and len(mask) else None
            image, mask_t = self.transform(decode_image(bytes(batch["image"][i])), mask_image)
            images.append(image.numpy())
            masks.append(mask_t.numpy())
            labels.append(self.index[str(label)])
            keys.append(str(label))
            captions.append(str(batch["caption"][i] or ""))
        s = self.size
        return {"image": np.stack(images) if images else np.zeros((0, 3, s, s), np.float32),
                "mask": np.stack(masks) if masks else np.zeros((0, 1, s, s), np.float32),
                "label": np.asarray(labels, dtype=np.int64), "key": np.asarray(keys, dtype=object),
                "caption": np.asarray(captions, dtype=object)}


class RenderForTraining:
    """Row ids → fresh renders of the synthetic world, in the columns of :class:`DecodeForTraining` (the work of a
    :class:`RenderStream` actor).

    Row ``i`` draws its class and its render seed from a hash of (``seed``, ``i``): uniform over ``classes``,
    deterministic, and never the same picture twice. Renders come out at the model's input size and go through
    the evaluation's preprocessing (the ROI zoom where the model has one, then normalisation). The renderer already
    varies pose, scale, background, lighting and occlusion, so the training augmentation is not applied (a random
    crop would change the apparent size, an attribute the classes differ by). The caption is the template
    captioner's, as the curation pipeline writes it.
    """

    def __init__(self, preprocess: dict[str, Any], classes: dict[str, dict[str, Any]], seed: int) -> None:
        from ogclip.config import PreprocessConfig
        from ogclip.synth import TargetClass
        from ogclip_kg.prompts import description

        cfg = PreprocessConfig.model_validate(preprocess)
        self.size = cfg.image_size
        self.transform = image_mask_transform(cfg)
        self.keys = sorted(classes)
        self.targets = [TargetClass.from_facts(classes[key]) for key in self.keys]
        self.captions = [description(classes[key], seed) for key in self.keys]
        self.seed = seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ogclip.synth import render

        images, masks, labels = [], [], []
        for row in batch["id"]:
            draw = int.from_bytes(hashlib.sha256(f"{self.seed}:{int(row)}".encode()).digest()[:16], "big")
            labels.append(draw % len(self.keys))
            sample = render(self.targets[labels[-1]], seed=draw >> 64, size=self.size)
            image, mask = self.transform(sample.image, sample.mask)
            images.append(image.numpy())
            masks.append(mask.numpy())
        size = self.size
        return {"image": np.stack(images) if images else np.zeros((0, 3, size, size), np.float32),
                "mask": np.stack(masks) if masks else np.zeros((0, 1, size, size), np.float32),
                "label": np.asarray(labels, dtype=np.int64),
                "key": np.asarray([self.keys[i] for i in labels], dtype=object),
                "caption": np.asarray([self.captions[i] for i in labels], dtype=object)}


class RenderScenesForTraining:
    """Row ids → captioned overhead scenes (the ``train`` split of the retrieval world,
    :class:`ogclip_jobs.retrieval.SceneWorld`), for a :class:`RenderStream` actor: the whole image (no mask), its
    five captions, and its sub-perspectives (one per visible target, or per CPU-segmenter region), each as the image
    tower reads it (the model's preprocessing, the ROI zoom onto the part where the model has one). ``label`` is the
    row id (every scene is its own class). Row ``i`` is draw ``i`` (then ``i.1``, ``i.2``… in the vanishingly rare
    case that a draw's targets are all hidden)."""

    def __init__(self, preprocess: dict[str, Any], classes: dict[str, dict[str, Any]], seed: int,
                 per_scene: tuple[int, int], sub_perspectives: str) -> None:
        from ogclip.config import PreprocessConfig
        from ogclip_jobs.retrieval import SceneWorld

        cfg = PreprocessConfig.model_validate(preprocess)
        self.size = cfg.image_size
        self.transform = image_mask_transform(cfg)
        self.world = SceneWorld(classes, tuple(per_scene), seed, self.size)  # type: ignore[arg-type]
        self.sub_perspectives = sub_perspectives

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ogclip_jobs.retrieval import sub_perspective_masks

        images, masks, captions, part_images, part_masks, part_owner = [], [], [], [], [], []
        for i, row in enumerate(batch["id"]):
            attempt, drawn = 0, self.world.draw("train", int(row), int(row))
            while drawn is None:
                attempt += 1
                drawn = self.world.draw("train", f"{int(row)}.{attempt}", int(row))
            scene, texts, _ = drawn
            image, mask = self.transform(scene.image, None)
            images.append(image.numpy())
            masks.append(mask.numpy())
            captions.append(texts)
            for part in sub_perspective_masks(scene, self.sub_perspectives):
                image, mask = self.transform(scene.image, part.astype(np.uint8) * 255)
                part_images.append(image.numpy())
                part_masks.append(mask.numpy())
                part_owner.append(i)
        size = self.size
        return {"image": np.stack(images), "mask": np.stack(masks),
                "label": np.asarray(batch["id"], dtype=np.int64), "captions": captions,
                "part_image": np.stack(part_images) if part_images else np.zeros((0, 3, size, size), np.float32),
                "part_mask": np.stack(part_masks) if part_masks else np.zeros((0, 1, size, size), np.float32),
                "part_owner": np.asarray(part_owner, dtype=np.int64)}


class RenderStream:
    """The synthetic world as one training worker's batches, rendered ahead by a pool of Ray actors.

    Batch ``b`` of rank ``r`` in a ``world``-rank run holds the rows ``(b · world + r) · batch_size …`` of the
    infinite stream, so every rank sees different renders, a resumed run continues the stream where its checkpoint
    left it, and the same seed always gives the same batches. Each rank keeps ``prefetch`` batches requested from
    the actors (round robin): the one its next step waits for and ``prefetch - 1`` rendered while a step runs. With
    ``prefetch=1`` rendering never overlaps a step: on a machine whose cores the step's threads already use, a
    renderer running beside them slows the step by more than the rendering takes (2 cores, og-clip-tiny, batch 64,
    two torch threads: 205 samples/s rendering between steps, 184 alongside).

    Plain actors rather than a Ray Data pipeline: a stream with no end and a consumer far slower than its producer
    leaves Ray Data's streaming executor backpressured, and its scheduling loop then spins, taking half a core from
    the step it feeds on a small machine (measured: 70 samples/s against 150 for the same step). The actors cost
    nothing while they wait.
    """

    def __init__(self, renderers: Sequence[Any], batch_size: int, rank: int = 0, world: int = 1,
                 prefetch: int | None = None) -> None:
        if not renderers:
            raise ValueError("a render stream needs at least one renderer")
        self.renderers = list(renderers)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.prefetch = prefetch or 2 * len(self.renderers)

    @staticmethod
    def start_renderers(cfg: TrainJobConfig, preprocess: dict[str, Any],
                        facts: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        """``cfg.data.render_tasks`` renderer actors of ``cfg.data.render_cpus`` CPUs each, for ``facts``' classes:
        single targets (:class:`RenderForTraining`) or captioned scenes (:class:`RenderScenesForTraining`)."""
        if not isinstance(cfg.data, SynthStreamConfig):
            raise ValueError("renderers draw the synthetic world (data: {kind: synth} or {kind: scenes})")
        classes = {key: dict(row) for key, row in facts.items()}
        if isinstance(cfg.data, SceneStreamConfig):
            actor = ray.remote(num_cpus=cfg.data.render_cpus)(RenderScenesForTraining)
            args: tuple[Any, ...] = (preprocess, classes, cfg.data.seed, cfg.data.targets_per_scene,
                                     cfg.data.sub_perspectives)
        else:
            actor = ray.remote(num_cpus=cfg.data.render_cpus)(RenderForTraining)
            args = (preprocess, classes, cfg.data.seed)
        return [actor.remote(*args) for _ in range(cfg.data.render_tasks)]

    def _rows(self, batch: int) -> np.ndarray:
        start = (batch * self.world + self.rank) * self.batch_size
        return np.arange(start, start + self.batch_size)

    def batches(self, first: int, last: int) -> Iterator[dict[str, Any]]:
        """Batches ``first`` … ``last - 1`` of this rank, in order."""
        pending: list[Any] = []
        submitted = first
        for _ in range(first, last):
            while submitted < last and len(pending) < self.prefetch:
                actor = self.renderers[submitted % len(self.renderers)]
                pending.append(actor.__call__.remote({"id": self._rows(submitted)}))
                submitted += 1
            yield ray.get(pending.pop(0))


def training_dataset(cfg: TrainJobConfig, preprocess: dict[str, Any], classes: Sequence[str]) -> ray.data.Dataset:
    """The stored training rows as a streaming Ray Dataset: the curation pipeline's shards, decoded and augmented
    (the synthetic world streams through :class:`RenderStream` instead)."""
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"training data {cfg.data} does not exist; run `ogclip data pipeline` first")
    columns = ["image", "mask", "label", "caption"]
    # The one-time decode of cache_decoded runs before the workers start, on every CPU: a whole CPU per task, since
    # a fraction only starts more worker processes, each importing torch (2,048 rows on 3 CPUs: 18 s against 78 s).
    cpus = 1.0 if cfg.cache_decoded else cfg.data_cpus
    ds = ray.data.read_parquet(str(cfg.data), columns=columns, num_cpus=cpus).map_batches(
        DecodeForTraining(preprocess, classes), batch_size=64, num_cpus=cpus, batch_format="numpy")
    return ds.materialize() if cfg.cache_decoded else ds


def shard_batches(shard: Any, cfg: TrainJobConfig, rank: int, step: int) -> Iterator[dict[str, Any]]:
    """A worker's shard of the stored rows, epoch after epoch, shuffled afresh each epoch through a local buffer."""
    while True:
        yield from shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=cfg.shuffle_buffer,
                                      local_shuffle_seed=cfg.seed * 1000 + rank + step)
        step += 1  # a different shuffle next epoch


def data_labels(path: Path) -> list[str]:
    """The distinct class keys of a shard folder (read from the label column only)."""
    import pyarrow.parquet as pq

    files = sorted(Path(path).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {path}")
    return sorted({str(v) for f in files for v in pq.read_table(f, columns=["label"]).column("label").to_pylist()})


def stream_classes(store: Any, cfg: SynthStreamConfig) -> list[str]:
    """The classes the synthetic stream renders: the class set, or ``max_classes`` of it spread over the looks."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = [r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key=cfg.class_set)]
    if not keys:
        raise ValueError(f"class set {cfg.class_set!r} is empty or unknown")
    if cfg.max_classes is None or cfg.max_classes >= len(keys):
        return sorted(keys)
    from ogclip.synth import TargetClass, spread_classes

    targets = {row["key"]: TargetClass.from_facts(row) for row in fetch_class_facts(store, keys)}
    return spread_classes(targets, cfg.max_classes, cfg.seed)


# -- the training loop (runs on every Ray Train worker) ---------------------------------------------------------


def build_model(cfg: TrainJobConfig, device: str | torch.device = "cpu") -> OGCLIP:
    """The run's model: the registry architecture as the run's recipe changes it, the optional local checkpoint."""
    return create_recipe(cfg.recipe).build_model(cfg.model, cfg.pretrained, device)


def _save(model: OGCLIP, optimizer: torch.optim.Optimizer, step: int, loss_ema: float, folder: Path) -> None:
    save_checkpoint(model, folder / WEIGHTS)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "loss_ema": loss_ema}, folder / STATE)


def _restore(model: OGCLIP, optimizer: torch.optim.Optimizer, folder: Path) -> tuple[int, float]:
    load_checkpoint(model, folder / WEIGHTS)
    state = torch.load(folder / STATE, weights_only=True, map_location=model.device)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["loss_ema"])


def _autocast_dtype(cfg: TrainJobConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop: resume, stream batches, step, log, checkpoint, until ``train.steps``."""
    import ray.train.torch

    cfg = TrainJobConfig.model_validate(config["job"])
    recipe = create_recipe(cfg.recipe)
    prompts: dict[str, list[str]] = config["prompts"]
    contrasts = contrast_prompts(config["facts"], cfg.recipe.prompts, cfg.seed) if config.get("facts") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, math.ceil(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = recipe.build_model(cfg.model, cfg.pretrained, device)
    if cfg.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg.train)
    step, loss_ema = 0, float("nan")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, loss_ema = _restore(model, optimizer, Path(folder))
        if rank == 0:
            with (Path(config["run_dir"]) / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"event": "resumed", "step": step, "checkpoint": checkpoint.path,
                                         "time": time.time()}) + "\n")
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    autocast_dtype = _autocast_dtype(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)  # a resumed run draws afresh
    rng = random.Random(cfg.seed * 1000 + rank + step)
    log_path = Path(config["run_dir"]) / "metrics.jsonl"
    # samples/s over the steps since the previous logged line (start-up and the first batch's wait fall in the first
    # interval only; a checkpoint's cost falls in the interval after it)
    interval_started, interval_steps = time.perf_counter(), 0
    batch_size = cfg.train.batch_size
    if config.get("renderers"):
        batches = RenderStream(config["renderers"], batch_size, rank, world, cfg.data.prefetch).batches(
            step, cfg.train.steps)
    else:
        batches = shard_batches(ray.train.get_dataset_shard("train"), cfg, rank, step)
    for batch in batches if step < cfg.train.steps else ():
        inputs = train_batch(batch, model, cfg, prompts, rng, contrasts, device)
        terms = train_step(wrapped, recipe, optimizer, step, cfg.train, inputs, generator, autocast_dtype)
        step += 1
        interval_steps += 1
        loss = float(terms["loss"].detach())
        loss_ema = loss if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss
        if step % cfg.log_every and step % cfg.checkpoint_every and step < cfg.train.steps:
            continue
        now = time.perf_counter()
        rate = interval_steps * batch_size * world / (now - interval_started)
        interval_started, interval_steps = now, 0
        metrics = {"step": step, **logged_terms(terms), "loss_ema": loss_ema, "lr": learning_rate(step - 1, cfg.train),
                   "samples_per_s": rate, "workers": world, "time": time.time()}
        if rank == 0:  # the driver prints these lines (follow_metrics)
            metrics["eta_s"] = (cfg.train.steps - step) * batch_size * world / max(rate, 1e-9)
            with log_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        # Ray Train's controller takes one report per worker health check (2 s) and a report waits until the one
        # before it is taken: reporting every logged line held a fast loop to `log_every` steps per 2 s. Reports go
        # with checkpoints; the progress lines are metrics.jsonl's.
        if step % cfg.checkpoint_every == 0 or step >= cfg.train.steps:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    _save(model, optimizer, step, loss_ema, Path(folder))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                                 if rank == 0 else None)
        if step >= cfg.train.steps:
            break


# -- the job (driver side) ---------------------------------------------------------------------------------------


def metrics_line(row: Mapping[str, Any], steps: int) -> str:
    """One line of ``metrics.jsonl`` as the job prints it."""
    if row.get("event") == "resumed":
        return f"resumed from step {row['step']} ({row.get('checkpoint', 'latest checkpoint')})"
    parts = [f"{name.removeprefix('loss_')} {value:.3f}" for name, value in row.items()
             if name.startswith("loss_") and name != "loss_ema"]  # the recipe's terms, whatever they are
    terms = ", ".join([f"ema {row['loss_ema']:.3f}", *parts])
    return (f"step {row['step']:5d}/{steps}  loss {row['loss']:.3f} ({terms})  lr {row['lr']:.2e}  "
            f"{row['samples_per_s']:.0f} samples/s  ETA {row.get('eta_s', 0):.0f}s")


@contextlib.contextmanager
def follow_metrics(path: Path, steps: int, log: Callable[[str], None], every_s: float = 1.0) -> Iterator[None]:
    """Print the lines rank 0 appends to ``path`` (``metrics.jsonl``, in the run's storage) while the body runs:
    the training progress reaches the console once, from the driver, however Ray forwards worker output."""
    start = path.stat().st_size if path.exists() else 0
    stop = threading.Event()

    def pump() -> None:
        nonlocal start
        if not path.exists():
            return
        with path.open() as handle:
            handle.seek(start)
            for line in iter(handle.readline, ""):
                if not line.endswith("\n"):
                    break  # a line still being written: read it next time
                start += len(line.encode())
                log(metrics_line(json.loads(line), steps))

    def run() -> None:
        while not stop.wait(every_s):
            pump()

    thread = threading.Thread(target=run, name="follow-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        pump()


def _use_gpu(cfg: TrainJobConfig) -> bool:
    if cfg.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= cfg.num_workers
    return bool(cfg.use_gpu)


def fit(cfg: TrainJobConfig, prompts: dict[str, list[str]], classes: list[str],
        facts: Mapping[str, dict[str, Any]] | None = None, log: Callable[[str], None] = _log.info) -> ray.train.Result:
    """Run the TorchTrainer, printing its progress lines through ``log``; a run folder that already holds
    checkpoints is resumed, not restarted."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = (cfg.output_dir / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    preprocess = build_model_config_preprocess(cfg)
    use_gpu = _use_gpu(cfg)
    if isinstance(cfg.data, SynthStreamConfig):
        if facts is None:
            raise ValueError("rendering the synthetic world needs the classes' graph facts")
        renderers, datasets = RenderStream.start_renderers(cfg, preprocess, {key: facts[key] for key in classes}), {}
    else:
        renderers, datasets = None, {"train": training_dataset(cfg, preprocess, classes)}
    # the facts the hard negatives are made from (looks one attribute away)
    hard_negatives = (isinstance(cfg.recipe, TextSupervision) and cfg.recipe.hard_negatives > 0
                      and cfg.recipe.prompts == "kg")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": cfg.model_dump(mode="json"), "prompts": prompts, "run_dir": str(run_dir),
                           "renderers": renderers,
                           "facts": dict(facts or {}) if hard_negatives else None},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu
                                                                                          else {})}),
        datasets=datasets,
        run_config=RunConfig(
            name="ray", storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="loss_ema",
                                               checkpoint_score_order="min"),
        ),
    )
    try:
        with follow_metrics(run_dir / "metrics.jsonl", cfg.train.steps, log):
            return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        # A run folder whose checkpoints another architecture wrote (the config's model changed since) cannot be
        # resumed: say so, as a refused input, rather than as a worker's traceback.
        cause = next((e for e in exc.worker_failures.values() if isinstance(e, CheckpointError)), None)
        if cause is None:
            raise
        raise CheckpointError(f"{run_dir} holds checkpoints that do not fit {cfg.model}: give the run another "
                              f"name, or remove the folder to train afresh ({cause})") from exc
    finally:
        for renderer in renderers or ():
            ray.kill(renderer)


def build_model_config_preprocess(cfg: TrainJobConfig) -> dict[str, Any]:
    """The preprocessing of the run's architecture, without building the model."""
    from ogclip.models import get_model_config

    return get_model_config(cfg.model, **create_recipe(cfg.recipe).model_overrides()).preprocess.model_dump(
        mode="json")


def best_model(cfg: TrainJobConfig, result: ray.train.Result, rows: Mapping[str, Mapping[str, Any]] | None = None,
               ) -> tuple[OGCLIP, dict[str, Any]]:
    """The run's best checkpoint, loaded on CPU, and how it was chosen: by retrieval mR on the scene world's val
    split (scene data with ``val_scenes``; ``rows``: the classes' graph facts), else the lowest smoothed loss (the
    latest checkpoint if none was scored)."""
    kept = list(result.best_checkpoints or [])
    if not kept:
        if result.checkpoint is None:
            raise RuntimeError(f"training run {cfg.name} produced no checkpoint")
        kept = [(result.checkpoint, {})]
    model = build_model(cfg)

    def load(checkpoint: ray.train.Checkpoint) -> OGCLIP:
        with checkpoint.as_directory() as folder:
            load_checkpoint(model, Path(folder) / WEIGHTS)
        return model.eval()

    if isinstance(cfg.data, SceneStreamConfig) and cfg.data.val_scenes and rows:
        from ogclip_jobs.retrieval import overhead_scenes, retrieval_scores

        scenes = overhead_scenes(rows, cfg.data.val_scenes, cfg.data.targets_per_scene, cfg.data.seed, "val",
                                 model.cfg.image_size)
        scores = {int(metrics.get("step", 0)): retrieval_scores(load(checkpoint), scenes,
                                                                [cfg.data.sub_perspectives])[cfg.data.sub_perspectives]["mR"]
                  for checkpoint, metrics in kept}
        step = max(scores, key=lambda s: (scores[s], s))
        chosen = next(c for c, m in kept if int(m.get("step", 0)) == step)
        return load(chosen), {"selected_by": f"val mR ({cfg.data.val_scenes} scenes)", "step": step,
                              "val_mR": {str(k): round(v, 2) for k, v in sorted(scores.items())}}
    loss, chosen, step = min(((m.get("loss_ema", math.inf), c, m.get("step")) for c, m in kept),
                             key=lambda item: item[0])
    return load(chosen), {"selected_by": "lowest smoothed loss", "step": step}


def export_run(cfg: TrainJobConfig, model: OGCLIP, store: Any, trained: Sequence[str],
               log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Bundle ``model`` and write class embeddings under its model version: the ``trained`` classes and every
    class of ``export_class_sets`` (the unseen test set, typically)."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import embed_classes, fetch_class_facts

    bundle = export_bundle(model, cfg.output_dir / cfg.name / "bundle", recipe=cfg.recipe.kind)
    keys = sorted(set(trained) | {r["key"] for name in cfg.export_class_sets
                                  for r in store.read(cypher.CLASS_SET_KEYS, key=name)})
    started = time.perf_counter()
    prompts, vectors = embed_classes(model, fetch_class_facts(store, keys), cfg.recipe.prompts, cfg.seed)
    written = store.write_embeddings(bundle.model_version, {k: v.tolist() for k, v in zip(prompts, vectors,
                                                                                         strict=True)}, prompts)
    log(f"exported bundle {bundle.model_version} to {bundle.path}; embedded {len(prompts)} classes' prompts in "
        f"{time.perf_counter() - started:.1f}s and wrote {written} class embeddings to the graph")
    return {"model_version": bundle.model_version, "bundle": str(bundle.path), "class_embeddings": written}


def run_training(cfg: TrainJobConfig, log: Callable[[str], None] = _log.info) -> tuple[OGCLIP, dict[str, Any]]:
    """The whole job: class prompts from the graph, Ray Train, then (optionally) export.

    Returns the best checkpoint's model (eval mode, CPU) and the run's summary (also in ``summary.json``).
    """
    from ogclip_jobs.runtime import ensure_ray, open_graph
    from ogclip_kg.prompts import fetch_class_facts, prompts_for

    ensure_ray(cfg.ray_num_cpus)
    with open_graph() as store:
        classes = stream_classes(store, cfg.data) if isinstance(cfg.data, SynthStreamConfig) else data_labels(cfg.data)
        rows = fetch_class_facts(store, classes)
        prompts = prompts_for(rows, cfg.recipe.prompts, cfg.seed)
        source = (f"{cfg.data.class_set!r} rendered on the fly" if isinstance(cfg.data, SynthStreamConfig)
                  else str(cfg.data))
        settings = ", ".join(f"{k} {v if v is not None else 'default'}" for k, v in cfg.recipe if k != "kind")
        log(f"training {cfg.model}, recipe {cfg.recipe.kind} ({settings}) on {len(classes)} classes from {source}: "
            f"{cfg.train.steps} steps × {cfg.num_workers} worker(s) × {cfg.train.batch_size}")
        started = time.perf_counter()
        result = fit(cfg, prompts, classes, {row["key"]: row for row in rows}, log)
        summary: dict[str, Any] = {"name": cfg.name, "seconds": round(time.perf_counter() - started, 1),
                                   "final_metrics": result.metrics, "run_dir": str(cfg.output_dir / cfg.name)}
        model, summary["selection"] = best_model(cfg, result, {row["key"]: row for row in rows})
        log(f"exporting the checkpoint of step {summary['selection']['step']} "
            f"({summary['selection']['selected_by']})")
        if cfg.export:
            summary.update(export_run(cfg, model, store, classes, log))
    (cfg.output_dir / cfg.name / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return model, summary
