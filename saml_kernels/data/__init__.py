"""Data for multi-scenario CTR models: a synthetic generator, an Ali-CCP CSV loader, MovieLens-100K as three
scenarios, batches in the layers' layout."""
from .ali_ccp import AliCCPFormatError, AliCCPVocab, load_ali_ccp
from .batch import Batch, CTRData, FeatureSpec, SequenceSpec
from .movielens import MovieLensFormatError, MovieLensSplits, MovieLensUnavailable, load_movielens
from .synthetic import make_synthetic, synthetic_features

__all__ = ["Batch", "CTRData", "FeatureSpec", "SequenceSpec", "make_synthetic", "synthetic_features",
           "load_ali_ccp", "AliCCPVocab", "AliCCPFormatError",
           "load_movielens", "MovieLensSplits", "MovieLensUnavailable", "MovieLensFormatError"]
