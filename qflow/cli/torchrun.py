"""torchrun as ``qflow quantize --nproc N`` starts it: torch's own launcher, whose own
failures end in one line and an exit code instead of its traceback.

    python -m qflow.cli.torchrun [torchrun options] -m qflow quantize ...

Exit codes: 0 done; a failed process's own code (2 for bad input, which that process
has already explained); 128 + N when the launcher got signal N (130 after Ctrl-C,
with each process's progress kept for ``--resume``).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        print(f"qflow quantize: training process {rank} failed with exit code {code} (its "
              "message is above)", file=sys.stderr)
        return code if 0 < code < 128 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
