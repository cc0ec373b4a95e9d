"""Data: the embedded captioned-shapes set, real-data loaders, the tokenizer and collation."""

from topoclip.data.collate import PairCollate, make_collate
from topoclip.data.datasets import (
    ClassificationSet,
    PairDataset,
    RetrievalSet,
    SkipStats,
    TensorClassificationSet,
    TensorPairSet,
    TensorRetrievalSet,
)
from topoclip.data.folder import DEFAULT_TEMPLATES, ImageFolderClassification
from topoclip.data.karpathy import KarpathyRetrieval
from topoclip.data.pairs import CsvPairs, PairsRetrieval, holdout_split
from topoclip.data.shapes import ShapesConfig, ShapesData, make_shapes
from topoclip.data.tokenizer import TextTokenizer, build_tokenizer
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, CorruptImageError, ImageTransform, load_image, normalize_uint8

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClassificationSet",
    "CorruptImageError",
    "CsvPairs",
    "PairsRetrieval",
    "holdout_split",
    "DEFAULT_TEMPLATES",
    "ImageFolderClassification",
    "ImageTransform",
    "KarpathyRetrieval",
    "PairCollate",
    "PairDataset",
    "RetrievalSet",
    "ShapesConfig",
    "ShapesData",
    "SkipStats",
    "TensorClassificationSet",
    "TensorPairSet",
    "TensorRetrievalSet",
    "TextTokenizer",
    "build_tokenizer",
    "load_image",
    "make_collate",
    "make_shapes",
    "normalize_uint8",
]
