"""The occupancy model and the split-KV rule both kernel backends share, against hand-computed cases."""
import pytest

import itertools
import json
from pathlib import Path

from mplug_kernels.occupancy import (
    CUDA_FORWARD_CTAS_PER_SM, KEY_TILE, MAX_SPLITS, PARTIAL_BUDGET, ctas_per_sm, default_ctas_per_sm,
    forward_rows_per_cta, split_cost, split_keys, split_plan,
)

H100_SMS = 132


@pytest.mark.parametrize("registers, shared, threads, arch, expected", [
    (128, 0, 128, 90, 4),            # 4096 registers per warp: 4 warps per sub-partition, 16 per SM
    (255, 0, 128, 90, 2),            # rounded to 256 per thread: 2 warps per sub-partition
    (32, 0, 256, 80, 8),             # thread limit: 2048 / 256
    (32, 0, 32, 80, 32),             # CTA limit
    (64, 102400, 128, 80, 1),        # 164 KB // (100 KB + 1 KB reserved)
    (64, 102400, 128, 90, 2),        # 228 KB // 101 KB
    (64, 219136, 128, 80, 0),        # 214 KB does not fit an A100's 163 KB per CTA
    (64, 219136, 128, 90, 1),
    (256, 0, 128, 90, 0),            # more than 255 registers per thread cannot launch
])
def test_ctas_per_sm(registers, shared, threads, arch, expected):
    assert ctas_per_sm(registers, shared, threads, arch) == expected


# ---------------------------------------------------------------- split_plan

BATCHES = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256)
Q_LENS = (1, 25, 33, 80, 257, 602)
K_LENS = (25, 64, 127, 257, 577, 602, 1025, 4096, 16384)
HEAD_DIMS = (32, 64, 96, 128)
BACKENDS = (("cuda", 2), ("triton", 2), ("triton", 4))
STATIC_REPORT = Path(__file__).resolve().parent.parent / "bench" / "results" / "static" / "kernels.json"


def _shapes():
    for (backend, element_bytes), q_len, k_len, head_dim in itertools.product(BACKENDS, Q_LENS, K_LENS, HEAD_DIMS):
        yield backend, element_bytes, q_len, k_len, head_dim


def _model(backend, batch, q_len, head_dim, element_bytes):
    """The split_cost keywords split_plan uses by default (sm_90, 132 SMs, 3.35 TB/s)."""
    return dict(rows_per_cta=forward_rows_per_cta(backend, q_len, head_dim, element_bytes),
                ctas_per_sm=default_ctas_per_sm(backend, 90, q_len, head_dim, element_bytes), sm_count=132,
                bandwidth=3.35e12, stored_dim=head_dim if backend == "cuda" else max(16, 1 << (head_dim - 1).bit_length()))


def test_done_when_shapes():
    assert split_plan(1, 12, 25, 577, 64, 2)[0] > 1          # mPLUG VQA, one image: split
    assert split_plan(64, 12, 25, 577, 64, 2)[0] == 1        # 768 CTAs fill a wave of 6 x 132: not split
    num_splits, split_size = split_plan(2, 12, 602, 602, 64, 2)
    cost = split_cost(2, 12, 602, 602, 64, 2, num_splits, split_size, **_model("cuda", 2, 602, 64, 2))
    assert cost.partial_bytes < cost.kv_bytes / 2


@pytest.mark.parametrize("k_len", [1, 25, 63, 64, 65, 127, 128, 577, 602, 1025, 16384])
@pytest.mark.parametrize("wanted", [1, 2, 3, 9, 10, 64])
def test_split_keys_whole_tiles_no_sliver(k_len, wanted):
    num_splits, split_size = split_keys(k_len, wanted)
    assert 1 <= num_splits <= wanted and split_size > 0 and split_size % KEY_TILE == 0
    last = k_len - (num_splits - 1) * split_size
    assert last >= min(k_len, KEY_TILE)                  # covered, and the last split holds a whole tile
    assert num_splits == 1 or last < 2 * split_size       # the merged sliver is under one tile


def test_split_keys_merges_a_one_key_sliver():
    assert split_keys(577, 10) == (9, 64)                 # 577 = 9 x 64 + 1: the last split takes keys 512..576
    assert split_keys(577, 5) == (5, 128)                 # the last split: 65 keys, a whole tile
    with pytest.raises(ValueError, match="wanted_splits"):
        split_keys(577, MAX_SPLITS + 1)


def test_split_plan_whole_tiles_and_small_partials():
    """Over B 1-256, Lq 1-602, Lk 25-16384, D 32-128: split_size whole key tiles, no split under a tile, at most
    MAX_SPLITS, and the fp32 partials (written and read) below PARTIAL_BUDGET of the K/V bytes."""
    for backend, element_bytes, q_len, k_len, head_dim in _shapes():
        for batch in BATCHES:
            plan = split_plan(batch, 12, q_len, k_len, head_dim, element_bytes, backend=backend)
            num_splits, split_size = plan
            assert split_size % KEY_TILE == 0 and 1 <= num_splits <= MAX_SPLITS, plan
            assert (num_splits - 1) * split_size + min(k_len, KEY_TILE) <= k_len or num_splits == 1, plan
            if num_splits > 1:
                cost = split_cost(batch, 12, q_len, k_len, head_dim, element_bytes, *plan,
                                  **_model(backend, batch, q_len, head_dim, element_bytes))
                assert cost.partial_bytes < PARTIAL_BUDGET * cost.kv_bytes, (backend, batch, q_len, k_len, plan)


def test_split_plan_never_splits_a_full_grid_and_never_grows_with_batch():
    splits_seen = 0
    for backend, element_bytes, q_len, k_len, head_dim in _shapes():
        previous = MAX_SPLITS
        for batch in BATCHES:
            num_splits = split_plan(batch, 12, q_len, k_len, head_dim, element_bytes, backend=backend)[0]
            assert num_splits <= previous, (backend, batch, q_len, k_len, head_dim)
            previous = num_splits
            model = _model(backend, batch, q_len, head_dim, element_bytes)
            ctas = batch * 12 * -(-q_len // model["rows_per_cta"])
            if ctas >= model["ctas_per_sm"] * 132:
                assert num_splits == 1, (backend, batch, q_len, k_len, head_dim)
            splits_seen += num_splits > 1
    assert splits_seen > 100  # the grid does exercise split plans


def test_split_plan_takes_the_fastest_modelled_plan_or_fewer_splits():
    """The chosen plan is within 10% of every candidate's modelled time (and beats the unsplit one where it splits)."""
    for batch, q_len, k_len in [(1, 25, 577), (2, 25, 577), (1, 1, 16384), (8, 80, 1025)]:
        plan = split_plan(batch, 12, q_len, k_len, 64, 2)
        model = _model("cuda", batch, q_len, 64, 2)
        chosen = split_cost(batch, 12, q_len, k_len, 64, 2, *plan, **model).seconds
        for wanted in range(1, MAX_SPLITS + 1):
            other = split_cost(batch, 12, q_len, k_len, 64, 2, *split_keys(k_len, wanted), **model)
            if other.partial_bytes < PARTIAL_BUDGET * other.kv_bytes or other.num_splits == 1:
                assert chosen <= 1.1 * other.seconds
        if plan[0] > 1:
            assert chosen < split_cost(batch, 12, q_len, k_len, 64, 2, *split_keys(k_len, 1), **model).seconds


def test_split_cost_hand_computed():
    """B = 1, H = 12, Lq = 25, Lk = 577, D = 64 bf16 on sm_90 (6 CTAs/SM, 132 SMs, 3.35 TB/s), 5 splits of 128 keys:
    60 CTAs < one wave; the last split has 65 keys, 2 tiles; a tile's 16 KiB of K/V at 60 CTAs' rate
    (60 x 16384 / 3.35e12 = 0.29 us) is under the 0.4 us latency; 1 + 2 x 0.4 = 1.8 us; partials 2 x 5 x 12 x 25 x
    65 x 4 = 780000 B, output 12 x 25 x 64 x 2 = 38400 B: + 1.5 us + 818400 / 3.35e12 = 3.5443 us."""
    cost = split_cost(1, 12, 25, 577, 64, 2, 5, 128, **_model("cuda", 1, 25, 64, 2))
    assert (cost.ctas, cost.waves, cost.tiles_per_cta) == (60, 1, 2)
    assert cost.kv_bytes == 12 * 577 * 64 * 2 * 2 and cost.partial_bytes == 780000
    assert cost.seconds == pytest.approx(1.8e-6 + 1.5e-6 + 818400 / 3.35e12)


def _cuda_forward_rows(config: str) -> int:
    """Query rows per CTA of forward_kernel<T, D, warps[, row blocks]> from its template arguments."""
    arguments = config.split(", ")
    return 16 * int(arguments[2]) * (int(arguments[3]) if len(arguments) > 3 else 1)


def test_cuda_ctas_per_sm_table_matches_the_static_report():
    if not STATIC_REPORT.exists():
        pytest.skip("no static report")
    rows = json.loads(STATIC_REPORT.read_text())["rows"]
    found = {(row["arch"], row["head_dim"], _cuda_forward_rows(row["config"])): row["ctas_per_sm"]
             for row in rows if row["backend"] == "cuda" and row["kernel"] == "forward_kernel"}
    assert found and {key: CUDA_FORWARD_CTAS_PER_SM[key] for key in found} == found
