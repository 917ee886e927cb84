"""Integer codes shared by the Python front ends and the C++/CUDA/Triton kernels. The C++ side is
``csrc/include/saml_common.h``; ``tests/test_codes.py`` checks the two agree."""
from __future__ import annotations

#: pooling of a bag: sum, mean, or none (one row per bag, fixed length)
POOLING = {"sum": 0, "mean": 1, "none": 2}
#: activation after the branch GEMMs (leaky_relu slope LEAKY_RELU_SLOPE; gelu is the exact erf form)
ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "silu": 4}
LEAKY_RELU_SLOPE = 0.01
#: similarity of the mutual unit
SIMILARITIES = {"cosine": 0, "dot": 1}
#: fused embedding optimizers
FUSED_OPTIMIZERS = {"sgd": 1, "rowwise_adagrad": 2}
#: slots of the float64 hyper-parameter tensor the fused update reads on the device
HPARAMS = {"lr": 0, "eps": 1, "weight_decay": 2, "apply": 3, "stochastic_rounding": 4, "seed": 5, "step": 6}
