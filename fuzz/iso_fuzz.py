"""Coverage-guided fuzzing of the ISO 8583 edge (`make fuzz`): frame splitting, decoding, request
parsing and the answer built from them, with atheris (libFuzzer for Python).

Each input is one byte of mode, then data. Mode 0 mod 4: the data is a byte stream, fed to the
frame splitter in chunks of (mode // 4 + 1) bytes, and every frame it yields is checked. Otherwise
the data is one frame's payload. The check is `tests.isofuzz.answer`, the one the hypothesis
properties use: decode, parse and encode the answer, where only FramingError, IsoDecodeError and
FormatError are documented. Anything else escaping is a crash: libFuzzer stops and writes the input
to .fuzz/crash-<sha1> (replay it with `python fuzz/iso_fuzz.py .fuzz/crash-<sha1>`).

Settings (environment): FUZZ_RUNS inputs (default 1,000,000), FUZZ_SECONDS a time bound (default
3600), FUZZ_SEED, FUZZ_ENGINE=random to run the same checks over random mutations without atheris
(where it cannot be installed). The seed corpus (valid messages of every class) is written to
.fuzz/corpus, which libFuzzer then grows with the inputs that found new coverage.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = ROOT / ".fuzz"
MAX_LEN = 8192 + 1  # a mode byte and the largest frame payload


def _check(data: bytes, framing, answer) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode % 4:
        if rest:
            answer(rest[: framing.FRAME_SIZE_MAX])
        return
    splitter = framing.FrameSplitter(framing.FRAME_SIZE_MAX)
    step = mode // 4 + 1
    for start in range(0, len(rest), step):  # bounded by the input's length
        for payload in splitter.feed(rest[start:start + step]):
            answer(payload)
        if splitter.error is not None:
            assert isinstance(splitter.error, framing.FramingError)
            return


def _seed_corpus() -> Path:
    from tests import isofuzz

    corpus = WORK / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = isofuzz.seed_payloads(isofuzz.fake_cards())
    for number, seed in enumerate(seeds):
        (corpus / f"seed-{number:03d}").write_bytes(b"\x01" + seed)
    stream = b"".join(len(seed).to_bytes(2, "big") + seed for seed in seeds[:6])
    (corpus / "seed-stream").write_bytes(b"\x1c" + stream)  # chunks of 8 bytes
    return corpus


def run_atheris(runs: int, seconds: int, seed: int) -> None:
    import atheris

    with atheris.instrument_imports(include=["authsrv.iso", "iso8583"]):
        from authsrv.iso import codec, fields, framing, request  # noqa: F401 (instrumented)
    from tests.isofuzz import answer

    corpus = _seed_corpus()
    args = [sys.argv[0], *sys.argv[1:]]
    if len(args) == 1:  # not replaying a crash file: fuzz
        args += [f"-runs={runs}", f"-max_total_time={seconds}", f"-seed={seed}", f"-max_len={MAX_LEN}",
                 "-print_final_stats=1", f"-artifact_prefix={WORK}/", str(corpus)]
    atheris.Setup(args, lambda data: _check(data, framing, answer))
    atheris.Fuzz()


def run_random(runs: int, seconds: int, seed: int) -> None:
    """The same checks over isofuzz's random mutations, for where atheris cannot be installed."""
    from authsrv.iso import framing
    from tests import isofuzz

    rng = random.Random(seed)
    seeds = isofuzz.seed_payloads(isofuzz.fake_cards())
    started = time.monotonic()
    done = 0
    for data in isofuzz.hostile_payloads(rng, seeds, runs):
        _check(bytes([rng.randrange(256)]) + data, framing, isofuzz.answer)
        done += 1
        if time.monotonic() - started > seconds:
            break
    print(f"random engine: {done} inputs in {time.monotonic() - started:.0f} s, no crash")


def main() -> None:
    runs = int(os.environ.get("FUZZ_RUNS", "1000000"))
    seconds = int(os.environ.get("FUZZ_SECONDS", "3600"))
    seed = int(os.environ.get("FUZZ_SEED", "15"))
    if os.environ.get("FUZZ_ENGINE", "atheris") == "random":
        run_random(runs, seconds, seed)
        return
    try:
        import atheris  # noqa: F401
    except ImportError:
        sys.exit("atheris is not installed (make fuzz installs it); FUZZ_ENGINE=random runs without it")
    run_atheris(runs, seconds, seed)


if __name__ == "__main__":
    main()
