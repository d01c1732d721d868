"""The core's config schemas (pydantic, ``extra="forbid"``): what several subsystems read — model architectures,
MRL, preprocessing, the training recipes' settings — and the YAML loader every command uses. Each subsystem owns
the rest: the jobs' schemas are ``ogclip_jobs.config``, the service's ``ogclip_serve.config``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Literal

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
    roi_orient: bool = Field(
        default=False,
        description="Turn the object upright before the zoom's window is cut (its mask's long axis vertical, the "
        "way up set by the mask's third moments): an outline drawn at any rotation reaches the model in one pose. "
        "Images without a mask, or with an all-ones or empty one, are never turned.",
    )


# The preprocessing of a model that reads no mask: zooming onto the object or turning it upright would hand the
# model the mask's location and outline.
MASK_FREE_PREPROCESS: dict[str, Any] = {"roi_zoom": 1.0, "roi_orient": False}


def _open_clip_fields(tower: Literal["vision", "text"]) -> set[str]:
    """The keys open_clip accepts in a tower config (imported here, not at module level: it pulls in torch)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {f.name for f in dataclasses.fields(CLIPVisionCfg if tower == "vision" else CLIPTextCfg)}


class DetailConfig(StrictModel):
    """The training-only parts of a ``detail-clip`` architecture (DetailCLIP): the prototype head shared by CLS and
    patch tokens, and the one-block decoder (as wide as the encoder)."""

    head_hidden: int = Field(default=2048, ge=1)
    head_bottleneck: int = Field(default=256, ge=1)
    prototypes: int = Field(default=8192, ge=2)
    decoder_heads: int = Field(default=16, ge=1, description="must divide the encoder's width")


class MPSConfig(StrictModel):
    """The trainable parts of an ``mps-clip`` architecture (MPS-CLIP): an adapter after every block of both towers
    and the MPR heads. The authors' ViT-B/32 values: bottleneck 128, 8 heads, kernel 5, dropout and drop path 0.1,
    gate 0.6, 4 perspectives."""

    adapter: Literal["g2a", "bottleneck"] = Field(
        default="g2a", description="G²A (bottleneck + global attention + gate) or a plain residual bottleneck")
    dim: int = Field(default=128, ge=1, description="the adapters' bottleneck width")
    heads: int = Field(default=8, ge=1, description="attention heads in a G²A adapter (must divide dim)")
    kernel: int = Field(default=5, ge=1, description="the G²A FFN's depthwise convolution over tokens (odd)")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    drop_path: float = Field(default=0.1, ge=0, lt=1)
    gate_init: float = Field(default=0.6, gt=0, lt=1, description="σ(g) of every G²A gate at the start")
    perspectives: int = Field(default=4, ge=1, description="K, the MPR heads")

    @model_validator(mode="after")
    def _check(self) -> MPSConfig:
        if self.dim % self.heads:
            raise ValueError(f"adapter heads {self.heads} do not divide the bottleneck width {self.dim}")
        if self.kernel % 2 == 0:
            raise ValueError(f"the adapter's token convolution needs an odd kernel, got {self.kernel}")
        return self


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
    stem: Literal["patch", "conv"] = Field(
        default="patch", description="How the image tower turns the image and its mask into patch tokens: "
        "``patch``, CLIP's patch conv with the paper's ROI conv beside it (non-overlapping, one cell per patch; what "
        "a CLIP checkpoint loads into); ``conv``, convolutional stems of 3×3 stride-2 layers for both (a power-of-two "
        "patch size; for towers trained from scratch, which read outlines far sooner through it)")
    preprocess_cfg: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of mean/std/interpolation/roi_zoom; image_size comes from vision_cfg.",
    )
    detail: DetailConfig | None = Field(default=None, description="a detail-clip architecture's training parts")
    mps: MPSConfig | None = Field(default=None, description="an mps-clip architecture's adapters and MPR heads")

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


VisualPromptName = Literal["roi", "none", "red_circle", "background_mask"]
PromptMode = Literal["kg", "label"]


class ClassPrompts(StrictModel):
    """How every recipe puts its classes into words: the export's class embeddings, the evaluation and the
    service's class sets all embed the classes this way."""

    prompts: PromptMode = Field(default="kg", description="'kg': graph prompts + captions (KG-Aug); 'label': names")


class TextSupervision(ClassPrompts):
    """What a recipe that trains on single targets contrasts each image with: its class's prompt ensemble or its
    caption, and looks one attribute away as hard negatives."""

    caption_ratio: float = Field(
        default=0.5, ge=0, le=1, description="with 'kg' prompts, the share of images trained against their own "
        "caption instead of their class's prompt ensemble")
    hard_negatives: int = Field(
        default=0, ge=0, description="with 'kg' prompts, the looks one visual attribute away from an image's class "
        "that join the batch's texts as extra negatives, per image")


class OGCLIPRecipeConfig(TextSupervision):
    """The OG-CLIP recipe (``recipe: {kind: og-clip, …}`` in a training config): ROI mask, KG-Aug prompts, Adaptive
    MRL + BPA. What the method changes in the training step lives here; the loop, the optimiser and the data are
    shared by every recipe (:mod:`ogclip.recipes`)."""

    kind: Literal["og-clip"] = "og-clip"
    visual_prompt: VisualPromptName = "roi"
    hybrid_ratio: float = Field(default=0.1, ge=0, le=1, description="r_s: share of batches with an all-ones mask")
    mrl: Literal["adaptive", "uniform", "none"] | None = Field(
        default=None, description="override the architecture's MRL weighting (ablations)")


class DetailCLIPRecipeConfig(TextSupervision):
    """The DetailCLIP recipe (``recipe: {kind: detail-clip, …}``): CLIP plus an EMA teacher's CLS and patch
    distillation and MAE reconstruction of the patches removed where the teacher's attention is lowest."""

    kind: Literal["detail-clip"] = "detail-clip"
    removal: float = Field(default=0.5, ge=0, lt=1, description="share of patch blocks the student does not see")
    removal_mode: Literal["attention", "random", "inverted"] = Field(
        default="attention", description="which blocks go: the teacher's lowest CLS attention (the method), random, "
        "or the highest (ablation arms)")
    block: int = Field(default=2, ge=1, description="removal works on block × block patches")
    alpha_cls: float = Field(default=1.0, ge=0)
    alpha_patch: float = Field(default=1.0, ge=0)
    alpha_rec: float = Field(default=1.0, ge=0)
    teacher_momentum: float = Field(default=0.996, ge=0, le=1, description="λ at step 0; cosine to 1 at the end")
    teacher_temp_cls: float = Field(default=0.04, gt=0)
    teacher_temp_patch: float = Field(default=0.07, gt=0)
    student_temp: float = Field(default=0.1, gt=0)
    center_momentum: float = Field(default=0.9, ge=0, le=1)
    crop_scale: tuple[float, float] = Field(default=(0.14, 1.0), description="each view's random resized crop")
    head: DetailConfig = DetailConfig()


class MPSCLIPRecipeConfig(ClassPrompts):
    """The MPS-CLIP recipe (``recipe: {kind: mps-clip, …}``): a frozen backbone (the run's ``pretrained``
    checkpoint) with adapters on both towers, trained on captioned multi-target scenes and their sub-perspectives
    (each scene against its own captions, so it has no caption share or hard negatives):
    L = L_con + w_tri · L_tri + w_mp · (L_MPC + w_tri · L_MPT) (:mod:`ogclip.recipes.mps_clip`)."""

    kind: Literal["mps-clip"] = "mps-clip"
    adapters: MPSConfig = MPSConfig()
    full_finetune: bool = Field(default=False, description="train the whole image tower and the text projection "
                                "too (the baseline the method is compared with); the frozen text transformer stays "
                                "frozen")
    temperature: float = Field(default=0.07, gt=0, description="τ of the global contrastive term (fixed)")
    perspective_scale: float = Field(default=100.0, gt=0, description="logit scale of L_MPC (the frozen CLIP's)")
    margin: float = Field(default=0.2, ge=0, description="the triplet terms' margin m")
    gamma: float = Field(default=2.0, ge=0, description="focal weight (1 − e^(−c))^γ of a triplet violation c")
    triplet_reduction: Literal["sum", "mean"] = Field(
        default="sum", description="'sum' over all negatives, as the authors' code; 'mean' over them (ablation)")
    triplet_weight: float = Field(default=1.0, ge=0, description="w_tri (0: no triplet terms)")
    perspective_weight: float = Field(default=0.2, ge=0, description="w_mp, the maximum-response terms' weight "
                                      "(0: no MPR training)")
    perspective_response: Literal["max", "mean"] = Field(
        default="max", description="how an image's K perspectives answer a caption in L_MPC and L_MPT: the best "
        "of them (the method's maximum response) or their mean (ablation)")


# Every recipe's config, told apart by ``kind``.
RecipeConfig = Annotated[OGCLIPRecipeConfig | DetailCLIPRecipeConfig | MPSCLIPRecipeConfig,
                         Field(discriminator="kind")]


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
