"""Coverage-guided fuzzing of one delivery's whole handling (``target.one_delivery``).

    python -m tests.fuzz.atheris_intake [libFuzzer flags] [corpus dirs]

e.g. ``-runs=20000 tests/fuzz/seeds`` (what CI runs) or ``-max_total_time=3600`` (``make
fuzz``). Every module of the project is instrumented, so inputs that reach new branches of
the decoders, the validation or the intake are kept and mutated further. A ``Finding`` (an
outcome no rule foresaw) or any exception is a crash, saved by libFuzzer as ``crash-*``:
add it to ``seeds/`` once fixed.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["worker", "schemas", "tests.fuzz"]):
    from tests.fuzz.target import one_delivery


def test_one_input(data: bytes) -> None:
    one_delivery(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
