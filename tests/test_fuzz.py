"""Hostile files, bounded: only LoraColabError comes out, nothing hangs, nothing allocates much.
Longer runs: python bench/fuzz.py."""

import os
import resource

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import parse_bytes, parse_header, parse_lora

# bench/fuzz.py raises the budget; each case must still end within the deadline
FAST = settings(max_examples=int(os.environ.get("LORA_COLAB_FUZZ_EXAMPLES", "150")), deadline=1000,
                suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from(["F32", "BF16", "F16", "I8", "BOOL", "F8_E4M3", "F64", "Q9", "", None, 3])
NUMBERS = st.one_of(st.integers(-5, 64), st.just(2**63), st.just(10**12), st.just(2**64 + 1), st.floats(),
                    st.text(max_size=3), st.none())
ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": DTYPES, "shape": st.one_of(st.lists(NUMBERS, max_size=4), NUMBERS),
    "data_offsets": st.one_of(st.lists(NUMBERS, max_size=3), NUMBERS)})
HEADER = st.dictionaries(st.text(max_size=12), st.one_of(ENTRY, NUMBERS, st.lists(NUMBERS, max_size=2)), max_size=6)


@FAST
@given(st.binary(max_size=512))
def test_random_bytes(data):
    parse_bytes(data)


@FAST
@given(HEADER, st.integers(0, 256))
def test_random_headers(header, data_len):
    parse_header(header, data_len)


@FAST
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_header_length_claims(claim, rest):
    import struct
    parse_bytes(struct.pack("<Q", claim) + rest)


SUFFIXES = st.sampled_from([".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha",
                            ".lora_mid.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                            ".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".diff", ".dora_scale", ".x",
                            ".lora.down.weight", ".lora.up.weight", ""])


@FAST
@given(st.lists(st.tuples(st.sampled_from(["lora_unet_a", "lora_te1_b", "c.d", "", "lora_unet_a.lora_down"]),
                          SUFFIXES), max_size=10, unique=True))
def test_random_lora_layouts(parts):
    parse_lora(sorted({name + suffix for name, suffix in parts}))


def test_a_header_claiming_huge_sizes_allocates_nothing_big():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parse_header({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, 16)
    parse_header({"w": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 2**64]}}, 16)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
