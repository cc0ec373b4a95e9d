"""Data: the embedded captioned-shapes set, real-data loaders, the tokenizer and collation.

Names are imported on first use, so that a config (which needs ``ShapesConfig`` only) does not
load every loader.
"""

from topoclip._lazy import exported, lazy_attributes

_WHERE = exported({
    "topoclip.data.collate": ["PairCollate", "make_collate"],
    "topoclip.data.datasets": ["ClassificationSet", "PairDataset", "RetrievalSet", "SkipStats", "TensorClassificationSet", "skip_totals",
                               "TensorPairSet", "TensorRetrievalSet"],
    "topoclip.data.folder": ["DEFAULT_TEMPLATES", "ImageFolderClassification"],
    "topoclip.data.karpathy": ["KarpathyRetrieval"],
    "topoclip.data.pairs": ["CsvPairs", "PairsRetrieval", "holdout_split"],
    "topoclip.data.shapes": ["ShapesData", "make_shapes"],
    "topoclip.data.shapes_config": ["ShapesConfig"],
    "topoclip.data.tokenizer": ["TextTokenizer", "build_tokenizer"],
    "topoclip.data.transforms": ["CLIP_MEAN", "CLIP_STD", "CorruptImageError", "ImageTransform", "load_image", "to_rgb",
                                 "normalize_uint8"],
})
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = sorted(_WHERE)
