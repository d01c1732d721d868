"""The HTTP API's request and response bodies (pydantic; published in the OpenAPI document).

``/v1/embeddings`` follows the OpenAI embeddings API (``model``, ``input``, ``dimensions``, ``encoding_format``) so
standard clients work; an input string that is a ``data:image/...;base64,`` URL is embedded as an image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- /v1/classify ------------------------------------------------------------------------------------------------


class ImageInput(_Strict):
    """One image to classify, with an optional region: a mask or a box (not both)."""

    image: str = Field(description="the encoded image (PNG, JPEG, WebP, ...) as base64 or a data: URL")
    mask: str | None = Field(default=None, description="the target's mask, same size as the image, as base64 PNG "
                             "(white = target); makes the ROI channel real")
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = Field(
        default=None, description="the target's box [x0, y0, x1, y1] in pixels; the ROI mask is the box, or what "
        "the segmenter finds inside it when one is configured")


class ClassifyRequest(_Strict):
    images: list[ImageInput] = Field(min_length=1, description="one or more images")
    class_set: str | None = Field(default=None, description="a served class set (default: the configured one)")
    labels: list[str] | None = Field(default=None, min_length=1,
                                     description="explicit candidate classes (graph target keys) instead of a set")
    dim: int | None = Field(default=None, description="embedding size to classify at (default: the full size)")
    top_k: int = Field(default=5, ge=1)
    segment: bool | None = Field(default=None, description="ask the configured segmenter for a mask when the image "
                                 "brings none (default: yes when one is configured)")


class LabelScore(BaseModel):
    label: str = Field(description="the class's graph key")
    name: str
    super_category: str | None
    score: float = Field(description="softmax probability over the candidates at the model's logit scale")
    similarity: float = Field(description="cosine similarity of image and class embeddings at ``dim``")


class ImageResult(BaseModel):
    index: int
    mask_source: Literal["mask", "box", "cpu", "sam2", "none"]
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str | None
    model_version: str
    class_set: str | None = Field(description="the class set used; null for explicit labels")
    class_set_revision: str = Field(description="revision of the class embeddings the answer used")
    dim: int
    results: list[ImageResult]


# -- /v1/retrieve ------------------------------------------------------------------------------------------------


class RetrieveRequest(_Strict):
    """A text to find images for, or an image to find captions for (exactly one of the two)."""

    text: str | None = Field(default=None, description="text → the collection's images that match it best")
    image: ImageInput | None = Field(default=None, description="image → the collection's captions that match it best")
    top_k: int = Field(default=10, ge=1)
    dim: int | None = Field(default=None, description="embedding size to search at (default: the full size)")


class RetrievedItem(BaseModel):
    rank: int
    id: str = Field(description="the collection item's id (for image → text: the item whose caption it is)")
    label: str
    caption: str
    similarity: float = Field(description="cosine similarity of query and item at ``dim``")


class RetrieveResponse(BaseModel):
    model_version: str
    collection_revision: str
    direction: Literal["text_to_image", "image_to_text"]
    dim: int
    items: int = Field(description="items in the collection")
    results: list[RetrievedItem]


# -- /v1/classes, /readyz ----------------------------------------------------------------------------------------


class ClassInfoOut(BaseModel):
    key: str
    name: str
    super_category: str | None


class ClassSetSummary(BaseModel):
    name: str
    classes: int
    missing: list[str] = Field(description="members without an embedding (only when embed_missing is off)")
    members: list[ClassInfoOut] | None = None


class ClassesResponse(BaseModel):
    model_version: str
    revision: str
    dims: list[int]
    default_class_set: str
    class_sets: list[ClassSetSummary]


class CollectionStatus(BaseModel):
    revision: str | None = Field(description="the collection revision /v1/retrieve serves (None: none yet)")
    items: int
    failed_revision: str | None = Field(description="the newest revision that could not be loaded (the one "
                                        "before stays served)")
    error: str | None


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model: str | None
    model_version: str
    revision: str
    classes: dict[str, int]
    dims: list[int]
    snapshot_age_s: float
    last_sync_error: str | None
    collection: CollectionStatus | None = Field(default=None, description="with retrieval.collection configured")


# -- /v1/embeddings (OpenAI shape) -------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    # Unknown keys are ignored, not refused: OpenAI clients may send fields added to the API after this was written.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model's name or model_version")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, or a data:image/...;base64, URL for an image; or a list of them")
    dimensions: int | None = Field(default=None, description="embedding size (default: the full size)")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ogclip"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
