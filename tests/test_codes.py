"""The integer codes of saml_kernels/_codes.py agree with csrc/include/saml_common.h."""
import pathlib
import re

from saml_kernels import _codes

HEADER = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include" / "saml_common.h").read_text()


def _enum(name: str) -> dict:
    body = re.search(r"enum " + name + r"\s*:\s*\w+\s*\{([^}]*)\}", HEADER).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(",") if "=" in item)}


def test_activation_codes():
    c = _enum("Activation")
    assert {"kActNone": 0, "kActRelu": 1, "kActLeakyRelu": 2, "kActGelu": 3, "kActSilu": 4} == c
    assert c["kActRelu"] == _codes.ACTIVATIONS["relu"] and c["kActGelu"] == _codes.ACTIVATIONS["gelu"]
    assert c["kActLeakyRelu"] == _codes.ACTIVATIONS["leaky_relu"] and c["kActSilu"] == _codes.ACTIVATIONS["silu"]
    assert float(re.search(r"kLeakyReluSlope = ([0-9.]+)", HEADER).group(1)) == _codes.LEAKY_RELU_SLOPE


def test_other_codes():
    assert _enum("Pooling") == {"kSum": _codes.POOLING["sum"], "kMean": _codes.POOLING["mean"],
                                "kNone": _codes.POOLING["none"]}
    assert _enum("Similarity") == {"kSimCosine": _codes.SIMILARITIES["cosine"], "kSimDot": _codes.SIMILARITIES["dot"]}
    assert _enum("FusedOptimizer") == {"kFusedSgd": _codes.FUSED_OPTIMIZERS["sgd"],
                                       "kFusedRowwiseAdagrad": _codes.FUSED_OPTIMIZERS["rowwise_adagrad"]}
    hp = _enum("FusedHparam")
    assert {k: hp["k" + "".join(w.capitalize() for w in k.split("_"))] for k in _codes.HPARAMS} == _codes.HPARAMS
