"""Fuzzing the whole path of one delivery (``tests/fuzz``): the seeds that once crashed
workers, hypothesis over hostile MessagePack, JSON and AMQP properties, and a bounded run of
the coverage-guided fuzzer. CI tries ``FUZZ_EXAMPLES`` inputs per hypothesis test (1000 by
default) and ``ATHERIS_RUNS`` mutated inputs (20000); ``make fuzz`` runs both far longer."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic

from schemas.errors import StateError
from tests.fuzz import strategies
from tests.fuzz.seeds import DIRECTORY, seeds
from tests.fuzz.target import encode_input, one_delivery

FUZZ_EXAMPLES: Final = int(os.environ.get("PLUGIN_STATE_FUZZ_EXAMPLES", "1000"))
ATHERIS_RUNS: Final = int(os.environ.get("PLUGIN_STATE_FUZZ_RUNS", "20000"))
ATHERIS_SECONDS: Final = int(os.environ.get("PLUGIN_STATE_FUZZ_SECONDS", "0"))
ROOT: Final = Path(__file__).resolve().parent.parent
MSGPACK: Final = Basic.Properties(content_type="application/msgpack")
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_seed_files_are_the_seeds() -> None:
    on_disk = {path.name: path.read_bytes() for path in DIRECTORY.iterdir()}
    assert on_disk == seeds(), "tests/fuzz/seeds is stale: run `python -m tests.fuzz.seeds`"


@pytest.mark.parametrize(
    ("seed", "code"),
    [
        ("msgpack-bad-timestamp", "unsupported_value"),
        ("msgpack-map-key-map", "unsupported_value"),
        ("json-nul-and-bad-utf8", "invalid_message"),
    ],
)
def test_the_inputs_that_once_stopped_every_worker_get_their_codes(seed: str, code: str) -> None:
    outcome = one_delivery(seeds()[seed])
    assert isinstance(outcome, StateError) and outcome.code == code


@FUZZ
@given(body=strategies.msgpack_commands())
def test_any_messagepack_command_has_an_outcome(body: bytes) -> None:
    one_delivery(encode_input(body, MSGPACK))
    one_delivery(encode_input(body, MSGPACK, read=True))


@FUZZ
@given(body=strategies.json_commands())
def test_any_json_command_has_an_outcome(body: bytes) -> None:
    one_delivery(encode_input(body))
    one_delivery(encode_input(body, read=True))


@FUZZ
@given(
    blob=strategies.property_blobs(),
    body=st.sampled_from([b"{}", b'{"op":"get"}']) | strategies.json_commands(),
    flags=st.integers(0, 255),
)
def test_any_amqp_properties_have_an_outcome(blob: bytes, body: bytes, flags: int) -> None:
    one_delivery(bytes([flags]) + struct.pack(">H", len(blob)) + blob + body)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_at_all_have_an_outcome(data: bytes) -> None:
    one_delivery(data)


def test_coverage_guided_fuzzing_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    limit = [f"-max_total_time={ATHERIS_SECONDS}"] if ATHERIS_SECONDS else []
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_intake",
            f"-runs={ATHERIS_RUNS}",
            *limit,
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),  # new inputs go here, not into the seeds
            str(DIRECTORY),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800 if ATHERIS_SECONDS else 600,
        check=False,
    )
    tail = "\n".join(run.stderr.splitlines()[-25:])
    assert run.returncode == 0, f"the fuzzer found a crash:\n{tail}"
    assert "Done" in run.stderr, tail
    print(tail.splitlines()[-1])
