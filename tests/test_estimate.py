"""bench/estimate.py's ESTIMATE arithmetic on shapes worked by hand: the old code (when issue 20 was filed) beside
today's at B = 1."""
import pytest

from bench.estimate import combine_round_trips, estimate, estimate_rows, old_split_count


def test_old_code_at_b1_co_attention_by_hand():
    # H100, B = 1, H = 12, Lq = 25 (one 32-row tile), Lk = 577 (10 key tiles). The old split count: 12 CTAs, a wave
    # of 6 x 132; 10 splits take 1 wave x 1 tile, 5 take 1 x 2: 10 x 64 keys. 120 CTAs in one wave; one tile per
    # CTA at max(0.4 us, 120 x 16384 B / 3.35 TB/s = 0.5869 us); K/V 1,772,544 B, partials 2 x 10 x 12 x 25 x 65 x 4
    # = 1,560,000 B, output 38,400 B (Q the same): 1 us + 0.5869 us + 1.5 us + (1,560,000 + 38,400) B / 3.35 TB/s
    # = 3.564 us, plus the old combine's 2 x 10 L2 round trips of 0.2 us = 7.564 us; 3,409,344 B / 7.564 us = 13.5 %
    assert old_split_count(12, 6, 132, 10) == 10
    row = estimate("H100", 1, 25, 577, old=True)
    assert (row["num_splits"], row["split_size"], row["ctas"], row["waves"], row["tiles_per_cta"], row["bytes"]) == (
        10, 64, 120, 1, 1, 3_409_344)
    assert row["estimate_us"] == pytest.approx(7.56, abs=0.01)
    assert row["estimate_hbm_percent"] == pytest.approx(13.5, abs=0.1)
    # today: split_plan's 5 x 128 keys, and the combine's lse loads then one batch of 5 partial chunks: 2 round trips
    today = estimate("H100", 1, 25, 577)
    assert (today["num_splits"], today["split_size"]) == (5, 128) and combine_round_trips(5, old=False) == 2
    assert today["estimate_us"] < row["estimate_us"]


def test_old_code_at_b1_connected_layer_by_hand():
    # H100, B = 1, Lq = Lk = 602, old 64-row CTAs: 120 CTAs, a wave of 3 x 132 = 396, 10 key tiles. Old split count
    # (waves x tiles): 1 -> 10, 2 -> 5, 3 -> 1 x 4, 4 -> 2 x 3, 5 -> 2 x 2, 10 -> 4 x 1: best 4, fewest within 10 %: 3
    # splits of 256 keys (the last 90). Memory: 1 wave of 1 us + 4 tiles x 0.4 us, the combine's 1.5 us and
    # (11,269,440 B partials + 924,672 B output) / 3.35 TB/s = 3.640 us: 7.740 us > compute (3 CTAs x 4 tiles x
    # 0.2798 us ldmatrix + 1 us = 4.357 us); plus 2 x 3 round trips of 0.2 us: 8.94 us, K/V read 10 times.
    assert old_split_count(120, 3, 132, 10) == 3
    old = estimate("H100", 1, 602, 602, old=True)
    assert (old["rows_per_cta"], old["num_splits"], old["split_size"], old["kv_reads"]) == (64, 3, 256, 10)
    assert old["estimate_us"] == pytest.approx(8.94, abs=0.01)
    # today: 128-row CTAs, no split: 60 CTAs, 1 per SM, 10 tiles x max(MMA 4 x 128 x 64 x 64 flops at 660 TFLOP/s /
    # 132 = 0.4194 us, ldmatrix 0.2798 us) + 1 us = 5.19 us, K/V read 5 times
    today = estimate("H100", 1, 602, 602)
    assert (today["rows_per_cta"], today["num_splits"], today["kv_reads"], today["bound"]) == (128, 1, 5, "compute")
    assert today["estimate_us"] == pytest.approx(5.19, abs=0.01)


def test_connected_layer_compute_side_by_hand():
    # H100, B = 8, H = 12, Lq = Lk = 602, 128-row CTAs: 8 x 12 x 5 = 480 CTAs, the busiest SM runs ceil(480 / 132)
    # = 4 of 10 key tiles each; a tile's MMAs 4 x 128 x 64 x 64 flops at 660 TFLOP/s / 132 = 0.4194 us outlast its
    # ldmatrix reads (4 warps x 16 KiB at 128 B x 1.83 GHz = 0.2798 us): 1 us + 40 x 0.4194 us = 17.78 us.
    row = estimate("H100", 8, 602, 602)
    assert (row["rows_per_cta"], row["ctas"], row["kv_reads"], row["bound"]) == (128, 480, 5, "compute")
    assert row["estimate_us"] == pytest.approx(17.78, abs=0.01)


@pytest.mark.parametrize("splits, old, trips", [(1, True, 0), (1, False, 0), (10, True, 20), (8, False, 2),
                                                (9, False, 3), (64, False, 9)])
def test_combine_round_trips(splits, old, trips):
    assert combine_round_trips(splits, old) == trips


def test_rows_label_every_estimate_and_put_the_old_code_beside_the_new_at_b1():
    rows = estimate_rows()
    assert all(row["label"].startswith("ESTIMATE") for row in rows)
    for q_len in (25, 602):
        b1 = [(row["gpu"], row["plan"]) for row in rows if (row["batch"], row["q_len"]) == (1, q_len)]
        assert b1 == [("H100", "old"), ("H100", "split_plan"), ("H200", "old"), ("H200", "split_plan")]
        old, new = [row for row in rows if (row["batch"], row["q_len"]) == (1, q_len)][:2]
        assert new["estimate_us"] < old["estimate_us"]
