"""Print the README's model support matrix from the corpus table (tests/corpus).

Each cell is what tests/test_corpus.py checks in CI for that model and target: "0
mismatches" (exported and verified, every artifact equal to the emulator) or the
refusal the command gives. Usage: python scripts/support_matrix.py [--check README.md]
(--check exits 1 when the README's table differs from this one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corpus import MODELS, TARGETS  # noqa: E402

BEGIN, END = "<!-- corpus matrix: scripts/support_matrix.py -->", "<!-- end corpus matrix -->"


def _cell(model, column: str) -> str:
    if "quantize" in model.refused:
        return "refused by `quantize_`" if column == "onnx" else "—"
    if column in model.refused:
        return f"refused: {model.refused[column][0]}"
    return "0 mismatches"


def matrix() -> str:
    """The markdown table, between its marker comments."""
    columns = list(TARGETS)
    lines = [BEGIN, "| pattern (tests/corpus) | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for model in MODELS.values():
        lines.append(f"| {model.pattern} | " + " | ".join(_cell(model, c) for c in columns)
                     + " |")
    return "\n".join([*lines, END])


def readme_matrix(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="README",
                        help="exit 1 when this README's matrix differs")
    args = parser.parse_args()
    if args.check:
        same = readme_matrix(args.check) == matrix()
        print("support matrix up to date" if same else "support matrix differs: run "
              "python scripts/support_matrix.py and paste it into the README")
        return 0 if same else 1
    print(matrix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
