"""A ReLU folded into its cast must not overwrite a tensor that another node still reads
(the pre-activation residual block ``x + f(relu(x))``)."""

import numpy as np
import pytest
from binary_graphs import ACT, Maker

from qflow.graph import Emulator
from qflow.numerics import FixedType, to_codes


@pytest.mark.parametrize("arithmetic", ["float32", "float64", "int64"])
def test_relu_cast_leaves_its_shared_input_intact(arithmetic):
    m = Maker(FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>"), (6,))
    m.add("scale_shift", scale=[3, -5, 7, 1, -2, 9], scale_frac=[2] * 6,
          shift=[1, -3, 0, 2, -1, 4], shift_frac=[3] * 6)
    shared = m.cast(ACT)
    m.add("relu")
    branch = m.cast(FixedType.parse("ap_ufixed<6,2,AP_RND_CONV,AP_SAT>"))
    m.add("add", inputs=[shared, branch])
    m.cast(FixedType.parse("ap_fixed<10,4,AP_RND_CONV,AP_SAT>"))
    graph = m.graph()
    x = np.random.default_rng(0).uniform(-4, 4, (500, 6))
    codes = to_codes(x, graph.input_type)
    want = Emulator(graph, "int64").run_codes(codes, keep=True)[graph.output]
    got = Emulator(graph, arithmetic).run_codes(codes)
    assert int((got != want).any(axis=1).sum()) == 0
