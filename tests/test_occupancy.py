"""The occupancy model and the split-KV rule both kernel backends share, against hand-computed cases."""
import pytest

from mplug_kernels.occupancy import ctas_per_sm, num_splits_for_occupancy

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


def test_mplug_b1_fills_a_wave_of_sms():
    # B = 1, H = 12, Lq = 25 (one query tile), Lk = 577 in 32-key pieces: 19 splits, 228 CTAs >= 132 SMs.
    splits = num_splits_for_occupancy(ctas=12, ctas_per_sm=2, sm_count=H100_SMS, key_tiles=19)
    assert splits == 19 and 12 * splits >= H100_SMS


@pytest.mark.parametrize("ctas, per_sm, key_tiles, expected", [
    (768, 2, 19, 1),    # B = 64: 3 waves x 19 tiles = 57, within 10% of the best (19 splits: 56 waves x 1)
    (300, 2, 19, 5),    # 2 waves x 19 = 38; 5 splits: 6 waves x 4 = 24, within 10% of 19 splits' 22
    (200, 2, 19, 5),    # more CTAs than SMs but under a wave of 264: 1 x 19 vs 4 waves x 4 = 16 (best 15)
    (12, 4, 19, 19),    # all key tiles, still under one wave of 528
    (12, 2, 10, 10),    # never more splits than key tiles
    (0, 2, 19, 1),      # empty batch
    (12, 2, 1, 1),
    (12, 2, 0, 1),
])
def test_num_splits_hand_computed(ctas, per_sm, key_tiles, expected):
    assert num_splits_for_occupancy(ctas, per_sm, H100_SMS, key_tiles) == expected


def test_num_splits_capped_and_even():
    # 200 tiles cut into at most 64 splits: 4 tiles per split, so 50 splits (never an empty split).
    assert num_splits_for_occupancy(ctas=1, ctas_per_sm=1, sm_count=H100_SMS, key_tiles=200) == 50
    assert num_splits_for_occupancy(ctas=1, ctas_per_sm=1, sm_count=H100_SMS, key_tiles=200, max_splits=8) == 8
