"""The jobs' config schemas (pydantic, ``extra="forbid"``): the curation pipeline and its stages, the crawler, a
training run (its recipe's settings are the core's, :mod:`ogclip.config`), evaluation, probes, the ablation and the
demo. Validated wherever a config is read (``ogclip.config.load_yaml_config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from ogclip.config import OGCLIPRecipeConfig, PromptMode, RecipeConfig, StrictModel, VisualPromptName


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
    text_projection_lr_scale: float = Field(
        default=1.0, ge=0, description="the text tower's trainable projection learns at this multiple of ``lr`` "
        "(its own optimiser group, as timm's ``lr_scale``); 0 keeps it at its initialisation, the text tower then "
        "wholly fixed as the paper fixes CLIP's text encoder")


class StageResources(StrictModel):
    """Ray resources of one stage; on a 2-core machine give actors fractional CPUs."""

    num_cpus: float = Field(default=0.5, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    concurrency: int = Field(default=1, ge=1, description="most actors in the pool of a stage that loads a model "
                             "(it starts with one and grows while blocks wait), tasks at once of a weight-free one")
    batch_size: int = Field(default=32, ge=1)


class SourceConfig(StrictModel):
    """What every source has: the resources of the ingest stage (reading or rendering, then the decode check)."""

    resources: StageResources = StageResources(num_cpus=0.5, batch_size=16)


class SynthSourceConfig(SourceConfig):
    """Render the synthetic target world for the graph's class set."""

    kind: Literal["synth"] = "synth"
    class_set: Literal["train", "test"] = "train"
    max_classes: int | None = Field(default=None, ge=1,
                                    description="N classes spread over the visual attributes (synth.spread_classes)")
    per_class: int = Field(default=4, ge=1)
    image_size: int = Field(default=64, ge=16)
    seed: int = 0


class FolderSourceConfig(SourceConfig):
    """Images under ``path/<class key>/*``; the folder name is the class."""

    kind: Literal["folder"] = "folder"
    path: Path


class ParquetSourceConfig(SourceConfig):
    """img2dataset-style Parquet: image bytes, a caption and a label per row."""

    kind: Literal["parquet"] = "parquet"
    path: Path
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"


class WebDatasetSourceConfig(SourceConfig):
    """WebDataset tars (``key.jpg|png`` + ``key.txt`` + ``key.cls`` or ``key.json`` with a label)."""

    kind: Literal["webdataset"] = "webdataset"
    path: Path


class DedupConfig(StrictModel):
    enabled: bool = True
    max_hamming: int = Field(default=3, ge=0, le=32, description="64-bit dHash distance counted as a near duplicate")
    resources: StageResources = StageResources(num_cpus=0.5, batch_size=64)


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


class CrawlSourceConfig(SourceConfig):
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


def _scene_range(value: tuple[int, int]) -> tuple[int, int]:
    if not 1 <= value[0] <= value[1]:
        raise ValueError(f"targets_per_scene must be (fewest, most) with 1 <= fewest <= most, got {value}")
    return value


SceneRange = Annotated[tuple[int, int], AfterValidator(_scene_range)]  # targets per rendered scene: (fewest, most)


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


class SceneStreamConfig(SynthStreamConfig):
    """Captioned overhead scenes rendered on the fly (the retrieval world of ``ogclip eval retrieval``, its
    ``train`` split): ``targets_per_scene`` targets of ``class_set`` on one background, five captions from their
    graph facts and the layout, and one sub-perspective per visible target (``sub_perspectives``: its exact mask, or
    the regions the CPU segmenter finds). Each scene brings ``captions_per_image`` of its captions to a step, all of
    them its positives. What MPS-CLIP trains on; checkpoints are chosen on the val split, never on test."""

    kind: Literal["scenes"] = "scenes"  # type: ignore[assignment]
    targets_per_scene: SceneRange = Field(default=(2, 5), description="fewest and most targets per scene")
    captions_per_image: int = Field(default=2, ge=1, le=5, description="captions per scene in a step's texts")
    sub_perspectives: Literal["targets", "segmenter"] = Field(
        default="targets", description="each visible target's exact mask, or the CPU segmenter's regions")
    val_scenes: int = Field(default=200, ge=0, description="the run's checkpoints are scored by retrieval mR on "
                            "this many scenes of the val split (sub-perspectives as above) and the best is exported; "
                            "0: the lowest smoothed loss, as for other data")


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
    data: Path | SynthStreamConfig | SceneStreamConfig = Field(
        default=Path("outputs/data/stages/shards/parquet"),
        description="Parquet training shards (a folder), or {kind: synth, ...} to render the synthetic world on the "
        "fly, or {kind: scenes, ...} for captioned multi-target scenes")
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
    data_cpus: float = Field(default=0.25, gt=0, description="CPUs per Ray Data decoding task while the rows stream "
                             "beside the workers (cache_decoded decodes before they start, one CPU per task)")
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

    @model_validator(mode="after")
    def _recipe_fits_data(self) -> TrainJobConfig:
        scenes = isinstance(self.data, SceneStreamConfig)
        if scenes != (self.recipe.kind == "mps-clip"):
            raise ValueError("captioned scenes (data: {kind: scenes}) are what the mps-clip recipe trains on, and "
                             f"only it, not {self.recipe.kind!r}" if scenes else
                             "the mps-clip recipe trains on captioned scenes with sub-perspectives: set data: "
                             "{kind: scenes}")
        return self


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
    compare_prompts: list[PromptMode] = Field(
        default=[], description="also score the same image features (first mask mode) against class embeddings "
        "built from these prompt sources, e.g. ['label'] for the class names alone: the KG-Aug comparison at the "
        "cost of embedding the prompts, in the report's 'by_prompts'")
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
        default=160, ge=1, description="train classes the image probes are fitted on, spread over the attribute "
        "values (synth.spread_classes with ``seed``); None: all of them (slower: renders_per_class renders each). "
        "The text probes always fit on every class of train_class_set")
    renders_per_class: int = Field(default=8, ge=1)
    image_size: int = Field(default=64, ge=16, description="render size (then the bundle's own preprocessing)")
    prompt_seed: int = Field(default=0, description="seed of the graph prompts, as export and evaluation use")
    regularisation: list[Annotated[float, Field(ge=0)]] = Field(
        default=[1e-4, 1e-3, 1e-2], min_length=1, description="L2 strengths on the probe's weights (standardised "
        "inputs, mean cross-entropy, as in ``ogclip eval dense``); each probe takes the one that scores best on a "
        "quarter of its training classes held out, then refits on all of them")
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0


class DenseConfig(StrictModel):
    """``ogclip eval dense``: a linear per-patch probe of a bundle's frozen image tower on multi-target scenes
    (segmentation mIoU, small targets apart), with the bundle's zero-shot mAcc beside it."""

    bundle: Path = Path("outputs/train/og-clip/bundle")
    output_dir: Path = Path("outputs/dense")
    class_set: str = Field(default="test", description="the graph class set the scenes' targets come from")
    classes: int | None = Field(default=24, ge=1, description="how many of its classes (synth.spread_classes with "
                                "``seed``, covering the attribute values evenly); None: all")
    targets_per_scene: SceneRange = Field(default=(2, 4), description="fewest and most targets per scene")
    fit_scenes: int = Field(default=1500, ge=1, description="scenes the probe is fitted on")
    pixels_per_scene: int = Field(default=64, ge=1, description="random pixels of each fitting scene the probe "
                                  "is fitted on (patch features interpolated there)")
    eval_scenes: int = Field(default=500, ge=1, description="other scenes it is scored on")
    small_area: float = Field(default=0.01, gt=0, lt=1, description="a target is small under this share of the "
                              "image (the renderer's distant targets)")
    regularisation: float = Field(default=1e-4, ge=0, description="L2 on the probe's weights (standardised inputs)")
    zero_shot: EvalConfig | None = Field(
        default=EvalConfig(mask_modes=["exact"]), description="the zero-shot mAcc reported beside the probe (the "
        "bundle is set from ``bundle``); null to skip it")
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0


class RetrievalConfig(StrictModel):
    """``ogclip eval retrieval``: image→text and text→image Recall@1/5/10 and mR of a bundle on captioned overhead
    scenes of a graph class set (see ``ogclip_jobs.retrieval``)."""

    bundle: Path = Path("outputs/train/og-clip/bundle")
    output_dir: Path = Path("outputs/retrieval")
    class_set: str = Field(default="test", description="the graph class set the scenes' targets come from")
    split: Literal["train", "val", "test"] = Field(default="test", description="which deterministic set of scenes")
    scenes: int = Field(default=500, ge=2, description="images in the gallery (five captions each)")
    targets_per_scene: SceneRange = Field(default=(2, 5), description="fewest and most targets per scene")
    image_size: int | None = Field(default=None, ge=16, description="render size; None: the bundle's input size")
    sub_perspectives: list[Literal["none", "targets", "segmenter", "noisy", "captions"]] = Field(
        default=["none", "targets", "segmenter"], min_length=1, description="image embeddings scored: the whole "
        "image; the whole image fused with every visible target read through its exact mask; the same with every "
        "region the CPU segmenter finds instead; 'noisy': the exact masks with a detector's mistakes (missed, "
        "dilated or eroded, false ones); 'captions': with the targets the scene's own captions name (the authors' "
        "test-time variant: it leaks the test captions into the image side, reported apart)")
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0


class IndexBuildConfig(StrictModel):
    """``ogclip index build``: the retrieval collection ``/v1/retrieve`` searches, embedded from Parquet shards
    with a bundle (see ``ogclip_jobs.index``)."""

    bundle: Path = Path("outputs/demo/train/og-clip-tiny-demo/bundle")
    data: Path = Field(default=Path("outputs/demo/data-test/stages/shards/parquet"),
                       description="the curation pipeline's Parquet shards (image, mask, label, caption; id optional)")
    output_dir: Path = Field(default=Path("outputs/collection"), description="the collection (a new revision)")
    encoders: int = Field(default=1, ge=1, description="actors holding the model")
    cpus_per_encoder: float = Field(default=1.0, gt=0, description="also each encoder's torch threads")
    batch_size: int = Field(default=128, ge=1)
    ray_num_cpus: int | None = Field(default=None, ge=1, description="local Ray's CPUs when no cluster is set")


class AblationConfig(StrictModel):
    """``ogclip eval ablation``: the arms of ``train``'s recipe (OG-CLIP's building blocks and baselines,
    DetailCLIP's losses and removal modes, MPS-CLIP's adapters and loss terms), each trained with ``train``'s
    budget; OG-CLIP and DetailCLIP scored zero-shot (``eval``, and ``dense``), MPS-CLIP by retrieval
    (``retrieval``)."""

    train: TrainJobConfig
    eval: EvalConfig = EvalConfig()
    variants: list[str] | None = Field(default=None, description="subset of the arms (default: all)")
    seeds: list[int] = Field(default=[0], min_length=1, description="every variant is trained once per seed; the "
                             "table gives mean ± std (3 seeds or more before calling one variant better)")
    dense: DenseConfig | None = Field(default=None, description="also score every model with the dense probe "
                                      "(`ogclip eval dense`; its zero_shot section is not read: `eval` is)")
    retrieval: RetrievalConfig = Field(default=RetrievalConfig(), description="what MPS-CLIP's arms are scored by "
                                       "instead of `eval` (its bundle and output_dir are not read)")
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
