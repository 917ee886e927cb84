"""Data for multi-scenario CTR models: a synthetic generator, an Ali-CCP CSV loader, batches in the layers' layout."""
from .ali_ccp import AliCCPFormatError, AliCCPVocab, load_ali_ccp
from .batch import Batch, CTRData, FeatureSpec, SequenceSpec
from .synthetic import make_synthetic, synthetic_features

__all__ = ["Batch", "CTRData", "FeatureSpec", "SequenceSpec", "make_synthetic", "synthetic_features",
           "load_ali_ccp", "AliCCPVocab", "AliCCPFormatError"]
