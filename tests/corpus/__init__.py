"""A corpus of small models written the way users write them (one file each, a comment
naming the pattern it covers), with generated data and what each target must do with
them: verify with 0 mismatching samples, or refuse with a one-line error.

``tests/test_corpus.py`` runs every model through ``qflow quantize`` -> ``qflow export``
(onnx, ultra96 in io_parallel and io_stream, cpu) -> ``qflow verify``;
``scripts/support_matrix.py`` prints the README's support matrix from this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: column name -> (qflow export arguments)
TARGETS = {
    "onnx": ["--target", "onnx"],
    "ultra96 io_parallel": ["--target", "ultra96", "--io-type", "parallel"],
    "ultra96 io_stream": ["--target", "ultra96", "--io-type", "stream"],
    "cpu": ["--target", "cpu"],
}


@dataclass(frozen=True)
class CorpusModel:
    """One corpus model and what qflow must do with it."""

    file: str  # module file in this folder holding ``build()``
    pattern: str  # what it covers, for the support matrix
    input_shape: tuple[int, ...] = (1, 8, 8)
    classes: int = 10
    #: inputs are drawn from [0, input_scale) (or +-input_scale when signed_input)
    input_scale: float = 1.0
    signed_input: bool = False
    #: "quantize" or a TARGETS column -> words of the expected one-line refusal
    refused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """The ``--model`` argument."""
        return f"{HERE / self.file}:build"

    def data(self, n_train: int = 256, n_test: int = 96, seed: int = 0) -> dict:
        """Generated arrays for ``--data``: labels from a fixed random linear teacher, so
        that there is something to learn."""
        rng = np.random.default_rng(seed)
        shape = (n_train + n_test, *self.input_shape)
        if self.signed_input:
            x = rng.uniform(-self.input_scale, self.input_scale, shape)
        else:
            x = rng.uniform(0, self.input_scale, shape)
        x = x.astype(np.float32)
        teacher = rng.normal(size=(int(np.prod(self.input_shape)), self.classes))
        y = (x.reshape(len(x), -1) @ teacher).argmax(axis=1)
        return {"x_train": x[:n_train], "y_train": y[:n_train],
                "x_test": x[n_train:], "y_test": y[n_train:]}


MODELS: dict[str, CorpusModel] = {
    "plain_mlp": CorpusModel("plain_mlp.py", "unnamed `nn.Sequential` MLP"),
    "odd_widths_no_bias": CorpusModel(
        "odd_widths_no_bias.py", "`bias=False`, odd widths 29 → 13 → 7 → 3",
        input_shape=(29,), classes=3, signed_input=True),
    "lenet5": CorpusModel("lenet5.py", "LeNet-5: conv, max pool, `x.view`, `F.relu`"),
    "conv_flatten_linear": CorpusModel("conv_flatten_linear.py",
                                       "conv → relu → flatten → linear"),
    "resnet_style": CorpusModel(
        "resnet_style.py", "ResNet-style: stride-2 stem, `out + identity`, `F.relu`, 1×1 "
        "projection, global average pool over 3×3"),
    "mobilenet_block": CorpusModel("mobilenet_block.py",
                                   "depthwise-separable block (groups = channels, then 1×1)"),
    "batchnorm1d_mlp": CorpusModel("batchnorm1d_mlp.py", "BatchNorm1d MLP"),
    "deep_narrow": CorpusModel("deep_narrow.py", "deep narrow net (12 linear layers)"),
    "maxpool_padding": CorpusModel("maxpool_padding.py", "max pooling with padding"),
    "cat_branches": CorpusModel("cat_branches.py", "`torch.cat` of two branches"),
    "wide_input_range": CorpusModel("wide_input_range.py", "inputs of about ±1e3",
                                    input_shape=(12,), classes=4, input_scale=1e3,
                                    signed_input=True),
    "residual_mlp": CorpusModel("residual_mlp.py", "functional skip `x + f(x)` in an MLP",
                                input_shape=(16,), classes=5, signed_input=True),
    "tanh_mlp": CorpusModel("tanh_mlp.py", "a Tanh layer (no exact fixed-point form)",
                            refused={"quantize": ("2 (Tanh)", "no exact fixed-point form")}),
}
