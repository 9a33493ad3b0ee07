"""Benchmark data-parallel QAT: QAT throughput of one process against two (torchrun, gloo).

What it measures
    QFX 4-bit QAT of a zoo model (default digits-cnn) on its data set at one global
    batch size (default 256), for ``--epochs`` epochs after one warm-up epoch, in three
    set-ups run one after another on this machine:

    * 1 process, 1 thread          (``OMP_NUM_THREADS=1``)
    * 1 process, N threads         (N = ``--procs``: the same cores as the next row)
    * N processes, 1 thread each   (``torchrun --standalone --nproc-per-node N``)

    Each set-up is a fresh process (or group) that trains through ``qflow.train.fit`` as
    ``qflow quantize`` does and reports the median samples per second of the timed
    epochs (rank 0's clock; every rank waits for the others in each step). The table
    gives each row's throughput and its ratio to the first row.

Run it
    . .venv/bin/activate
    python scripts/bench_ddp.py                     # digits-cnn, batch 256, 2 processes
    python scripts/bench_ddp.py --model jet-mlp --batch-size 1024 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import qflow
from qflow import distributed
from qflow.train import calibrate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS


def worker(args: argparse.Namespace) -> None:
    """One set-up: train and print one JSON line (rank 0)."""
    distributed.start(torch.device("cpu"))
    zoo = MODELS[args.model]
    data = DATASETS[zoo.data]()
    seed_everything(0)
    model = qflow.quantize_(zoo.factory(), qflow.QFXConfig.with_bits(4))
    calibrate(model, data.x_train[: args.batch_size])
    rates = []
    for epoch in range(args.epochs + 1):  # the first is a warm-up
        started = time.perf_counter()
        fit(model, data.x_train, data.y_train, epochs=1, lr=1e-3, batch_size=args.batch_size,
            seed=epoch, progress=False)
        if epoch:
            rates.append(len(data.x_train) / (time.perf_counter() - started))
    if distributed.is_main():
        print(json.dumps({"samples_per_s": statistics.median(rates),
                          "processes": distributed.world_size(),
                          "threads": torch.get_num_threads()}), flush=True)
    distributed.stop()


def _run(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench_ddp: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-cnn", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after a warm-up)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
          "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    n = args.procs
    rows = [("1 process, 1 thread", _run(me, 1)),
            (f"1 process, {n} threads", _run(me, n)),
            (f"{n} processes (torchrun, gloo), 1 thread each",
             _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(n), *me[1:]], 1))]
    base = rows[0][1]["samples_per_s"]
    print(f"QFX 4-bit QAT of {args.model}, global batch {args.batch_size}, median of "
          f"{args.epochs} epochs, torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| set-up | samples/s | vs 1 process, 1 thread |\n|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['samples_per_s']:.0f} | {row['samples_per_s'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
