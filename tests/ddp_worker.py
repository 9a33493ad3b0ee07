"""A few QAT steps of a zoo model, in one process or in each of torchrun's processes.

    python tests/ddp_worker.py MODEL OUT                     one process
    torchrun --nproc-per-node 2 tests/ddp_worker.py MODEL OUT  two

MODEL ``hutchinson`` computes HAWQ's Hessian traces instead (see ``traces``).

The model is the zoo's (QFX digits-cnn, BiPer binary-cnn: its stage-2 phase), trained
from the same float weights on the same 384 digits with global batch 96 for one epoch
(4 steps); each process saves its state_dict to OUT/rank<r>.pt (one process:
OUT/single.pt). ``tests/test_distributed.py`` compares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import qflow
from qflow import distributed
from qflow.methods import method_of
from qflow.train import calibrate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS

SAMPLES, BATCH = 384, 96


def traces(out: str) -> None:
    """Hutchinson traces of the float digits-cnn on 96 digits, 20 probes, saved as
    OUT/traces-rank<r>.pt (one process: traces-single.pt)."""
    from qflow.hawq.sensitivity import hutchinson_traces

    data = DATASETS["digits"]()
    seed_everything(0)
    model = MODELS["digits-cnn"].factory()
    x = torch.as_tensor(data.x_train[:BATCH], dtype=torch.float32)
    est = hutchinson_traces(model, x, torch.as_tensor(data.y_train[:BATCH]), min_probes=20,
                            max_probes=20)
    name = f"rank{distributed.rank()}" if distributed.active() else "single"
    torch.save({"traces": torch.tensor(list(est.traces.values()), dtype=torch.float64),
                "probes": torch.tensor(est.probes)}, Path(out) / f"traces-{name}.pt")


def main(model_name: str, out: str) -> None:
    distributed.start(torch.device("cpu"))
    torch.set_num_threads(1)
    if model_name == "hutchinson":
        traces(out)
        distributed.stop()
        return
    zoo = MODELS[model_name]
    data = DATASETS[zoo.data]()
    x, y = data.x_train[:SAMPLES], data.y_train[:SAMPLES]
    seed_everything(0)
    model = zoo.factory()
    config = qflow.QFXConfig() if zoo.method == "qfx" else qflow.BiPerConfig()
    qflow.quantize_(model, config)
    calibrate(model, x[:BATCH])
    phase = method_of(config).phases(config, 1)[-1]
    if phase.prepare is not None:
        phase.prepare(model)
    options = phase.fit_options(model, teacher=None)
    fit(model, x, y, epochs=1, lr=3e-3, batch_size=BATCH, seed=1, progress=False, **options)
    name = f"rank{distributed.rank()}.pt" if distributed.active() else "single.pt"
    torch.save(model.state_dict(), Path(out) / name)
    distributed.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
