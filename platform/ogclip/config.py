"""Config schemas (pydantic, ``extra="forbid"``): one per component, validated wherever a config is read."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, so a typo in a YAML file never passes silently."""

    model_config = ConfigDict(extra="forbid")


class MRLConfig(StrictModel):
    """Matryoshka head: ``granularities`` nested prefixes D/G, 2D/G, ..., D of the joint embedding."""

    granularities: int = Field(default=8, ge=1, le=64)
    weighting: Literal["adaptive", "uniform", "none"] = Field(
        default="adaptive",
        description="'adaptive': OG-CLIP's dimension attention α and BPA loss; 'uniform': plain MRL (equal "
        "fixed weights, no BPA), the baseline the paper compares against; 'none': no L_MRL at all, so smaller "
        "sizes are naive truncations of a model trained only at D.",
    )
    bpa_weight: float = Field(default=0.2, ge=0.0, description="Weight of L_BPA in L_total (paper: 0.2).")
    alpha_momentum: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="EMA momentum of α across steps; 0 uses each batch's α as is."
    )
    alpha_score_noise: float = Field(
        default=0.05, ge=0.0, description="Spread of the granularity scores H_g·C_g (each in [0, 1]) below which "
        "α treats their differences as noise: the Gaussian fusion standardises by sqrt(σ² + this²), so alike "
        "scores give a near-uniform α instead of a full ramp. 0 is the paper's plain σ.",
    )
    alpha_uniform_mix: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Share of α taken from the uniform 1/G; every α_g ≥ this / G, so "
        "no granularity is starved of training signal. 0 uses the fused weights alone.",
    )


# OpenAI CLIP's normalisation, which OpenCLIP checkpoints expect (open_clip.constants.OPENAI_DATASET_MEAN/STD;
# written out here so validating a config does not import torch).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PreprocessConfig(StrictModel):
    """How images are turned into tensors; travels with every export bundle."""

    image_size: int = Field(gt=0)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    roi_zoom: float = Field(
        default=1.0, ge=1.0, le=8.0,
        description="Zoom onto the object before resizing: a square window of 1/roi_zoom of the short side (larger "
        "if the object's box needs it) centred on the mask's box; 1 keeps the whole frame. Images without a mask, "
        "or with an all-ones or empty one, are never zoomed.",
    )


def _open_clip_fields(tower: Literal["vision", "text"]) -> set[str]:
    """The keys open_clip accepts in a tower config (imported here, not at module level: it pulls in torch)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {f.name for f in dataclasses.fields(CLIPVisionCfg if tower == "vision" else CLIPTextCfg)}


class ModelConfig(StrictModel):
    """A model architecture: ``architecture`` names the class that builds it (``og-clip`` for OG-CLIP, the default,
    so configs and bundles written before the key read as OG-CLIP), open_clip's ``vision_cfg``/``text_cfg`` layout
    plus the OG-CLIP parts.

    ``embed_dim`` is the joint space D. The image tower projects into it; the frozen text tower reaches it through
    its trainable projection (see ``ogclip.models.ogclip.OGCLIP``).
    """

    architecture: str = Field(default="og-clip", description="the model class that builds this config, from the "
                              "architecture registry (``ogclip.models.register_architecture``)")
    embed_dim: int = Field(gt=0)
    vision_cfg: dict[str, Any]
    text_cfg: dict[str, Any]
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    mrl: MRLConfig = MRLConfig()
    preprocess_cfg: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of mean/std/interpolation/roi_zoom; image_size comes from vision_cfg.",
    )

    @field_validator("vision_cfg")
    @classmethod
    def _check_vision(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - _open_clip_fields("vision")
        if unknown:
            raise ValueError(f"unknown vision_cfg keys: {sorted(unknown)}")
        if value.get("timm_model_name") or isinstance(value.get("layers", 12), (list, tuple)):
            raise ValueError("OG-CLIP needs an open_clip VisionTransformer (its ROI module sits beside conv1)")
        return value

    @field_validator("text_cfg")
    @classmethod
    def _check_text(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - _open_clip_fields("text")
        if unknown:
            raise ValueError(f"unknown text_cfg keys: {sorted(unknown)}")
        return value

    @model_validator(mode="after")
    def _check_dims(self) -> ModelConfig:
        if self.embed_dim % self.mrl.granularities:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by {self.mrl.granularities} MRL granularities"
            )
        PreprocessConfig(image_size=self.image_size, **self.preprocess_cfg)
        return self

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)  # open_clip's default
        return size if isinstance(size, int) else int(size[0])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, **self.preprocess_cfg)


class TrainConfig(StrictModel):
    """The optimiser and its schedule, the same for every recipe; the defaults are the OG-CLIP paper's (AdamW 5e-5,
    wd 0.05, warm-up then cosine to 5e-6)."""

    lr: float = Field(default=5e-5, gt=0)
    min_lr: float = Field(default=5e-6, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=10_000, ge=0)
    steps: int = Field(default=100_000, gt=0)
    grad_clip_norm: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=32, gt=0, description="Per worker; the paper runs 8 workers × 32 = 256.")


class StageResources(StrictModel):
    """Ray resources of one stage; on a 2-core machine give actors fractional CPUs."""

    num_cpus: float = Field(default=0.5, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    concurrency: int = Field(default=1, ge=1, description="actors in the stage's pool")
    batch_size: int = Field(default=32, ge=1)


class SynthSourceConfig(StrictModel):
    """Render the synthetic target world for the graph's class set."""

    kind: Literal["synth"] = "synth"
    class_set: Literal["train", "test"] = "train"
    max_classes: int | None = Field(default=None, ge=1,
                                    description="N classes spread over the visual attributes (synth.spread_classes)")
    per_class: int = Field(default=4, ge=1)
    image_size: int = Field(default=64, ge=16)
    seed: int = 0


class FolderSourceConfig(StrictModel):
    """Images under ``path/<class key>/*``; the folder name is the class."""

    kind: Literal["folder"] = "folder"
    path: Path


class ParquetSourceConfig(StrictModel):
    """img2dataset-style Parquet: image bytes, a caption and a label per row."""

    kind: Literal["parquet"] = "parquet"
    path: Path
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"


class WebDatasetSourceConfig(StrictModel):
    """WebDataset tars (``key.jpg|png`` + ``key.txt`` + ``key.cls`` or ``key.json`` with a label)."""

    kind: Literal["webdataset"] = "webdataset"
    path: Path


class DedupConfig(StrictModel):
    enabled: bool = True
    max_hamming: int = Field(default=3, ge=0, le=32, description="64-bit dHash distance counted as a near duplicate")


class QualityFilterConfig(StrictModel):
    """Image embeddings + DBSCAN per category; outliers go to a review file (and, if asked, out of the shards)."""

    enabled: bool = True
    model: str = Field(default="og-clip-tiny", description="an export bundle path (a trained model: the filter "
                       "acts); a registry name has fresh random weights, whose clusters are noise, so the stage "
                       "passes every row through and records that the filter is off")
    eps: float = Field(default=0.15, gt=0, description="DBSCAN radius in cosine distance")
    min_samples: int = Field(default=3, ge=1)
    drop_outliers: bool = False
    resources: StageResources = StageResources()


class MaskConfig(StrictModel):
    """'provided': masks that come with the data; 'cpu': a weight-free segmenter; 'sam2': SAM2 from a checkpoint."""

    method: Literal["provided", "cpu", "sam2"] = "provided"
    sam2_checkpoint: Path | None = None
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    prompt: Literal["centre", "auto"] = "centre"
    device: str = "auto"
    resources: StageResources = StageResources()

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> MaskConfig:
        if self.method == "sam2" and self.sam2_checkpoint is None:
            raise ValueError("masks.method 'sam2' needs masks.sam2_checkpoint (a local path)")
        return self


class CaptionConfig(StrictModel):
    """'template': captions rendered from graph facts; 'vlm': a vision-language model via vLLM from a local path."""

    method: Literal["template", "vlm"] = "template"
    vlm_model_path: Path | None = None
    max_tokens: int = Field(default=96, ge=8)
    seed: int = 0
    resources: StageResources = StageResources()

    @model_validator(mode="after")
    def _needs_model(self) -> CaptionConfig:
        if self.method == "vlm" and self.vlm_model_path is None:
            raise ValueError("captions.method 'vlm' needs captions.vlm_model_path (a local path)")
        return self


class WriterConfig(StrictModel):
    formats: list[Literal["parquet", "webdataset"]] = ["parquet"]
    rows_per_shard: int = Field(default=1000, ge=1)


ROBOTS_CACHE_MAX_S = 86_400  # RFC 9309 §2.4: crawlers SHOULD NOT use a cached robots.txt for more than 24 hours


def normalise_host(host: str) -> str:
    """Host names compare lower-case, without a trailing dot or IPv6 brackets."""
    return host.strip().lower().rstrip(".").strip("[]")


class CrawlConfig(StrictModel):
    """How the crawler identifies itself, how hard it may push a host and what it refuses to fetch or keep."""

    user_agent: str = "ogclip-crawler/0.1 (+https://example.invalid/ogclip)"
    timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    allowed_content_types: list[str] = Field(
        default_factory=lambda: ["image/jpeg", "image/png", "image/webp", "image/gif"]
    )
    min_host_interval_s: float = Field(1.0, ge=0)
    retries: int = Field(3, ge=0)  # extra attempts after the first one
    backoff_s: float = Field(0.5, ge=0)  # first retry waits backoff_s, then 2x, 4x, ...
    robots_cache_s: float = Field(86_400, gt=0)
    max_redirects: int = Field(5, ge=0)
    allow_loopback: bool = False
    allow_private: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)  # exact names exempt from the loopback/private check

    @field_validator("robots_cache_s")
    @classmethod
    def _robots_cache_within_rfc(cls, value: float) -> float:
        if value > ROBOTS_CACHE_MAX_S:
            raise ValueError(f"robots_cache_s must be <= {ROBOTS_CACHE_MAX_S} (RFC 9309 caps caching at 24 hours)")
        return value

    @field_validator("allowed_content_types")
    @classmethod
    def _lower_content_types(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]

    @field_validator("allowed_hosts")
    @classmethod
    def _normalise_hosts(cls, value: list[str]) -> list[str]:
        return [normalise_host(v) for v in value]

    @property
    def robots_token(self) -> str:
        """The product token (``ogclip-crawler``) that robots.txt groups and X-Robots-Tag prefixes address."""
        return self.user_agent.split("/", 1)[0].strip().lower()


class CrawlSourceConfig(StrictModel):
    """Crawl a URL manifest: a text file of ``url<TAB>label`` lines (``#`` starts a comment)."""

    kind: Literal["crawl"] = "crawl"
    manifest: Path
    crawl: CrawlConfig = CrawlConfig()


class DataPipelineConfig(StrictModel):
    """``ogclip data pipeline``: ingest → dedup → quality filter → masks → captions → training shards."""

    output_dir: Path = Path("outputs/data")
    source: (SynthSourceConfig | FolderSourceConfig | ParquetSourceConfig | WebDatasetSourceConfig
             | CrawlSourceConfig) = Field(
        default_factory=SynthSourceConfig, discriminator="kind")
    dedup: DedupConfig = DedupConfig()
    quality: QualityFilterConfig = QualityFilterConfig()
    masks: MaskConfig = MaskConfig()
    captions: CaptionConfig = CaptionConfig()
    writer: WriterConfig = WriterConfig()
    ray_num_cpus: int | None = Field(default=None, ge=1, description="local Ray's CPUs (default: all)")


VisualPromptName = Literal["roi", "none", "red_circle", "background_mask"]
PromptMode = Literal["kg", "label"]


class SynthStreamConfig(StrictModel):
    """Training data rendered on the fly from the synthetic world by Ray actors, instead of stored shards.

    The world is infinite: every training sample is a fresh render at the model's input size (a random class of
    ``class_set``, a random pose, scale, background and lighting), so the image tower never sees the same picture
    twice. Zero-shot on unseen classes is limited by the variety of looks and renders seen in training far more
    than by the model (a few hundred stored renders are memorised within minutes). Deterministic in ``seed``.
    """

    kind: Literal["synth"] = "synth"
    class_set: str = Field(default="train", description="graph class set whose classes are rendered")
    max_classes: int | None = Field(default=None, ge=1, description="spread this many classes over the looks")
    seed: int = 0
    render_cpus: float = Field(default=0.5, gt=0, description="CPUs of each renderer actor")
    render_tasks: int = Field(default=1, ge=1, description="renderer actors, shared by the training workers")
    prefetch: int | None = Field(
        default=None, ge=1,
        description="batches each worker keeps requested from the renderers (default 2 per renderer): the one the "
                    "next step waits for plus those rendered while a step runs; 1 renders only between steps, for "
                    "a machine whose cores the step already uses")


class OGCLIPRecipeConfig(StrictModel):
    """The OG-CLIP recipe (``recipe: {kind: og-clip, …}`` in a training config): ROI mask, KG-Aug prompts, Adaptive
    MRL + BPA. What the method changes in the training step lives here; the loop, the optimiser and the data are
    shared by every recipe (:mod:`ogclip.recipes`)."""

    kind: Literal["og-clip"] = "og-clip"
    prompts: PromptMode = Field(default="kg", description="'kg': graph prompts + captions (KG-Aug); 'label': names")
    caption_ratio: float = Field(
        default=0.5, ge=0, le=1, description="with 'kg' prompts, the share of images trained against their own "
        "caption instead of their class's prompt ensemble")
    hard_negatives: int = Field(
        default=0, ge=0, description="with 'kg' prompts, the looks one visual attribute away from an image's class "
        "that join the batch's texts as extra negatives, per image")
    visual_prompt: VisualPromptName = "roi"
    hybrid_ratio: float = Field(default=0.1, ge=0, le=1, description="r_s: share of batches with an all-ones mask")
    mrl: Literal["adaptive", "uniform", "none"] | None = Field(
        default=None, description="override the architecture's MRL weighting (ablations)")


# Every recipe's config, told apart by ``kind``; a discriminated union (``Field(discriminator="kind")``, as
# ``DataPipelineConfig.source``) once there is a second recipe.
RecipeConfig = OGCLIPRecipeConfig


class TrainJobConfig(StrictModel):
    """``ogclip train``: a recipe (OG-CLIP by default) on Ray Train over the curation pipeline's Parquet shards or
    the synthetic world rendered on the fly, then export.

    The defaults are the paper's 8-GPU run (8 workers × 32 = 256 per step); the shipped CPU configs shrink it.
    ``name`` names the run under ``output_dir``: running a name again resumes from its latest checkpoint.
    """

    name: str = Field(default="og-clip", pattern=r"^[A-Za-z0-9._-]+$")
    model: str = "og-clip-vit-l-14"
    pretrained: Path | None = Field(default=None, description="local OpenCLIP/OG-CLIP checkpoint to start from")
    recipe: RecipeConfig = Field(default_factory=OGCLIPRecipeConfig, description="the method and its settings")
    data: Path | SynthStreamConfig = Field(
        default=Path("outputs/data/stages/shards/parquet"),
        description="Parquet training shards (a folder), or {kind: synth, ...} to render the synthetic world on the "
        "fly")
    train: TrainConfig = TrainConfig()
    num_workers: int = Field(default=8, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0, description="also the worker's torch threads (rounded up)")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="'auto': when the cluster has the GPUs")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="'auto': bf16 on GPU, else fp32")
    grad_checkpointing: bool = False
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=3, ge=-1, description="worker failures survived by resuming; -1 = always")
    log_every: int = Field(default=10, ge=1)
    data_cpus: float = Field(default=0.25, gt=0, description="CPUs per Ray Data decoding task")
    cache_decoded: bool = Field(
        default=False, description="decode and augment once, keep the result in Ray's object store and replay it "
        "every epoch (small corpora: skips the per-epoch decode; each image keeps one augmentation draw)")
    shuffle_buffer: int = Field(
        default=1024, ge=1, description="rows each worker shuffles its stream over, afresh every epoch: the shards "
        "keep a class's images together, so without it a batch holds a few neighbouring classes, always the same")
    seed: int = 0
    output_dir: Path = Path("outputs/train")
    export: bool = Field(default=True, description="bundle the best checkpoint and write class embeddings")
    export_class_sets: list[str] = Field(default=["test"], description="class sets embedded beside the trained "
                                         "classes; the whole train set of the seed graph is 3,200 classes")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="local Ray's CPUs when no cluster is set")


MaskMode = Literal["exact", "predicted", "box"]


class EvalSegmenterConfig(StrictModel):
    """What predicts the ``predicted`` mask mode's masks: the weight-free CPU segmenter, or SAM2 from a local
    checkpoint (used only when the ``sam2`` package is installed and the checkpoint exists; otherwise the CPU
    segmenter stands in and the report says so)."""

    method: Literal["cpu", "sam2"] = "cpu"
    sam2_checkpoint: Path | None = None
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    prompt: Literal["centre", "auto"] = "centre"
    device: str = "auto"
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs of the Ray Data stage that segments (SAM2)")

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> EvalSegmenterConfig:
        if self.method == "sam2" and self.sam2_checkpoint is None:
            raise ValueError("segmenter.method 'sam2' needs segmenter.sam2_checkpoint (a local path)")
        return self


class EvalConfig(StrictModel):
    """``ogclip eval``: zero-shot classification of the unseen test classes with an exported bundle."""

    bundle: Path = Path("outputs/train/og-clip/bundle")
    data: Path = Field(default=Path("outputs/data-test/stages/shards/parquet"), description="test shards")
    class_set: str = "test"
    prompts: PromptMode = "kg"
    visual_prompt: VisualPromptName = "roi"
    mask_modes: list[MaskMode] = Field(
        default=["exact", "predicted", "box"], min_length=1,
        description="where each test image's ROI mask comes from, each scored separately: 'exact' the mask shipped "
        "with the data (the renderer's own), 'predicted' a segmenter's (as the paper segments at inference), "
        "'box' the filled bounding box of the exact mask (a client giving a box). The first is the headline mAcc")
    segmenter: EvalSegmenterConfig = EvalSegmenterConfig()
    look_class_set: str = Field(
        default="train", description="a test class whose look (silhouette, colour, size, pattern, accent) some class "
        "of this set shares counts as 'seen look'; the rest are new combinations, true compositional zero-shot")
    batch_size: int = Field(default=128, ge=1)
    cost_batch: int = Field(default=8, ge=1, description="batch of the images/s measurement in the cost table")
    output_dir: Path = Path("outputs/eval")
    seed: int = 0

    @field_validator("mask_modes")
    @classmethod
    def _distinct_modes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"mask_modes repeats a mode: {value}")
        return value


class ProbeConfig(StrictModel):
    """``ogclip eval probe``: linear probes of the visual attributes on a bundle's image and text features.

    A probe is fitted on renders (image side) or prompts (text side) of ``train_class_set`` classes and scored on
    the held-out ``test_class_set`` classes, so it measures what the features encode about each attribute in a
    form that carries over to combinations of values never seen together.
    """

    bundle: Path = Path("outputs/train/og-clip/bundle")
    output_dir: Path = Path("outputs/probe")
    train_class_set: str = "train"
    test_class_set: str = "test"
    train_classes: int | None = Field(
        default=160, ge=1, description="train classes the probes are fitted on, spread over the attribute values "
        "(synth.spread_classes with ``seed``); None: all of them (slower: renders_per_class renders each)")
    renders_per_class: int = Field(default=8, ge=1)
    image_size: int = Field(default=64, ge=16, description="render size (then the bundle's own preprocessing)")
    prompt_seed: int = Field(default=0, description="seed of the graph prompts, as export and evaluation use")
    regularisation: float = Field(default=0.1, gt=0, description="C of the logistic regression (inverse L2 "
                                  "strength, on standardised features)")
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0


class AblationConfig(StrictModel):
    """``ogclip eval ablation``: the building blocks and baselines, each trained with ``train``'s budget."""

    train: TrainJobConfig
    eval: EvalConfig = EvalConfig()
    variants: list[str] | None = Field(default=None, description="subset of the variants (default: all)")
    seeds: list[int] = Field(default=[0], min_length=1, description="every variant is trained once per seed; the "
                             "table gives mean ± std (3 seeds or more before calling one variant better)")
    output_dir: Path = Path("outputs/ablation")


class DemoConfig(StrictModel):
    """``make demo``: graph → synthetic world → curation pipeline → Ray Train → zero-shot eval → ablation → export.

    The stage sections are the same schemas as the stand-alone commands; the demo points their inputs and outputs
    at folders under ``output_dir``.
    """

    output_dir: Path = Path("outputs/demo")
    train_data: DataPipelineConfig | None = Field(
        default=None, description="curate a stored training corpus and train on its shards; without it the training "
        "step reads `train.data` (typically the synthetic world rendered on the fly)")
    test_data: DataPipelineConfig = DataPipelineConfig()
    train: TrainJobConfig = TrainJobConfig(model="og-clip-tiny", num_workers=1)
    eval: EvalConfig = EvalConfig()
    probe: ProbeConfig = Field(default=ProbeConfig(), description="the attribute probes of step 4 (their bundle "
                               "and output folder are the demo's)")
    ablation: bool = True
    ray_num_cpus: int | None = Field(default=None, ge=1)


# -- serving (ogclip_serve) -------------------------------------------------------------------------------------


class ServeAutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of the classifier replicas (``autoscaling_config``)."""

    min_replicas: int = Field(default=1, ge=1, description="kept warm: a cold replica loads the model and index")
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0, description="per replica, what Serve scales towards")
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ServeAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


class ServeDeploymentConfig(StrictModel):
    """Resources and admission control of the classifier deployment."""

    name: str = Field(default="OGClipClassifier", pattern=r"^[A-Za-z0-9_-]+$")
    num_cpus: float = Field(default=1.0, gt=0, description="per replica; also its torch threads (rounded up)")
    num_gpus: float = Field(default=0.0, ge=0)
    autoscaling: ServeAutoscalingConfig = ServeAutoscalingConfig()
    max_ongoing_requests: int = Field(default=16, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(
        default=64, ge=1, description="requests waiting for a replica; beyond this the service answers 503 at once "
        "(back-pressure) instead of letting latency grow without bound")
    health_check_period_s: float = Field(default=10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    access_log: bool = Field(default=True, description="Serve's per-request access log lines in the replica logs")


class ServeBatchingConfig(StrictModel):
    """Dynamic batching across requests (``@serve.batch``): images (and texts) of concurrent requests share one
    forward pass."""

    enabled: bool = True
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="how long a partial batch waits to fill")


class ServeLimitsConfig(StrictModel):
    """Input limits: anything over them is a 4xx answer, never work for the replica."""

    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="a request body, in bytes")
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="encoded bytes of one image or mask")
    max_pixels: int = Field(default=16_000_000, ge=1, description="width × height; larger is refused before decoding")
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=4096, ge=1)
    max_labels: int = Field(default=512, ge=1, description="explicit candidate labels in one request")
    max_top_k: int = Field(default=100, ge=1)


class ServeClassesConfig(StrictModel):
    """Which class embeddings a replica serves and how it follows the graph."""

    class_sets: list[str] = Field(default=["test"], min_length=1, description="graph class sets to serve")
    default_class_set: str | None = Field(default=None, description="when a request names none (default: first)")
    poll_interval_s: float = Field(default=5.0, gt=0, description="how often a replica checks the graph for changes")
    full_refresh_s: float = Field(default=600.0, gt=0, description="reload everything even without a change seen")
    embed_missing: bool = Field(
        default=True, description="embed classes that have no stored embedding with the bundle's own text tower "
        "(prompts from the graph's facts), instead of leaving them out")
    write_back: bool = Field(default=True, description="store those on-demand embeddings in the graph")
    prompts: Literal["kg", "label"] = Field(default="kg", description="prompt mode, as the export step used")
    prompt_seed: int = Field(default=0, description="seed of the graph prompts, as the export step used")

    @model_validator(mode="after")
    def _default_is_served(self) -> ServeClassesConfig:
        if self.default_class_set is not None and self.default_class_set not in self.class_sets:
            raise ValueError(f"default_class_set {self.default_class_set!r} is not in class_sets {self.class_sets}")
        return self

    @property
    def default(self) -> str:
        return self.default_class_set or self.class_sets[0]


class ServeMaskConfig(StrictModel):
    """Where the ROI mask comes from when a request brings none: 'none' (all ones, the plain-CLIP reading), 'cpu'
    (the weight-free segmenter) or 'sam2' (a local checkpoint, prompted with the request's box when there is one)."""

    segmenter: Literal["none", "cpu", "sam2"] = "none"
    sam2_checkpoint: Path | None = None
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> ServeMaskConfig:
        if self.segmenter == "sam2" and self.sam2_checkpoint is None:
            raise ValueError("masks.segmenter 'sam2' needs masks.sam2_checkpoint (a local path)")
        return self


class ServeConfig(StrictModel):
    """``ogclip serve up``: the classification service (Ray Serve), one app serving one export bundle."""

    bundle: Path = Path("outputs/demo/train/og-clip-tiny-demo/bundle")
    model_version: str | None = Field(
        default=None, description="the version the bundle must have; a different bundle is refused at start")
    app_name: str = Field(default="ogclip", pattern=r"^[A-Za-z0-9_-]+$")
    host: str = Field(default="127.0.0.1", description="HTTP address of the Serve proxy")
    port: int = Field(default=8000, gt=0, lt=65536)
    route_prefix: str = Field(default="/", pattern=r"^/")
    dims: list[int] | None = Field(default=None, description="served embedding sizes (default: all of the model's)")
    device: str = "auto"
    deployment: ServeDeploymentConfig = ServeDeploymentConfig()
    batching: ServeBatchingConfig = ServeBatchingConfig()
    limits: ServeLimitsConfig = ServeLimitsConfig()
    classes: ServeClassesConfig = ServeClassesConfig()
    masks: ServeMaskConfig = ServeMaskConfig()
    ray_num_cpus: int | None = Field(default=None, ge=1, description="local Ray's CPUs when no cluster is set")
    metrics_port: int | None = Field(
        default=None, gt=0, lt=65536, description="local Ray's Prometheus export port (on a cluster: "
        "`ray start --metrics-export-port`)")


class ConfigError(ValueError):
    """A config file that cannot be used (missing, not YAML, not valid for its schema); the message names the file."""


def load_yaml_config(path: str | Path, schema: type[StrictModel]) -> StrictModel:
    """Read a YAML file and validate it against ``schema``; every error is a :class:`ConfigError` whose one-line
    message names the file and the offending keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a directory, not a YAML file' if path.is_dir() else 'no such file'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(part) for part in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(f"{path}: {'; '.join(problems[:3])}{more}") from None
