"""bench/estimate.py's ESTIMATE arithmetic on one shape worked by hand."""
import pytest

from bench.estimate import estimate, estimate_rows


def test_old_plan_at_b1_by_hand():
    # H100, B = 1, H = 12, Lq = 25 (one 32-row tile), Lk = 577, old plan 10 x 64 keys: 120 CTAs in one wave of
    # 6 x 132; one tile per CTA at max(0.4 us, 120 x 16384 B / 3.35 TB/s = 0.5869 us); K/V 1,772,544 B, partials
    # 2 x 10 x 12 x 25 x 65 x 4 = 1,560,000 B, output 38,400 B (Q the same):
    # 1 us + 0.5869 us + 1.5 us + (1,560,000 + 38,400) B / 3.35 TB/s = 3.564 us; 3,409,344 B / 3.564 us = 28.6 %
    row = estimate("H100", 1, 25, 577, (10, 64))
    assert (row["ctas"], row["waves"], row["tiles_per_cta"], row["bytes"]) == (120, 1, 1, 3_409_344)
    assert row["estimate_us"] == pytest.approx(3.56, abs=0.01)
    assert row["estimate_hbm_percent"] == pytest.approx(28.6, abs=0.1)


def test_rows_label_every_estimate_and_put_the_old_plan_beside_the_new():
    rows = estimate_rows()
    assert all(row["label"].startswith("ESTIMATE") for row in rows)
    b1 = [(row["gpu"], row["plan"]) for row in rows if (row["batch"], row["q_len"]) == (1, 25)]
    assert b1 == [("H100", "old"), ("H100", "split_plan"), ("H200", "old"), ("H200", "split_plan")]


def test_connected_layer_compute_side_by_hand():
    # H100, B = 8, H = 12, Lq = Lk = 602, 128-row CTAs: 8 x 12 x 5 = 480 CTAs, the busiest SM runs ceil(480 / 132)
    # = 4 of 10 key tiles each; a tile's MMAs 4 x 128 x 64 x 64 flops at 660 TFLOP/s / 132 = 0.4194 us outlast its
    # ldmatrix reads (4 warps x 16 KiB at 128 B x 1.83 GHz = 0.2798 us): 1 us + 40 x 0.4194 us = 17.78 us.
    row = estimate("H100", 8, 602, 602, rows_per_cta=128)
    assert (row["rows_per_cta"], row["ctas"], row["kv_reads"], row["bound"]) == (128, 480, 5, "compute")
    assert row["estimate_us"] == pytest.approx(17.78, abs=0.01)
    # 64-row CTAs (before): 960 CTAs, 8 on the busiest SM, each tile's ldmatrix reads (0.2798 us) outlast its MMAs
    # (0.2097 us): 1 us + 80 x 0.2798 us = 23.38 us, and every key read 10 times
    before = estimate("H100", 8, 602, 602)  # what D = 64 launches (128-row CTAs only for D <= 32)
    assert (before["rows_per_cta"], before["ctas"], before["kv_reads"]) == (64, 960, 10)
    assert before["estimate_us"] == pytest.approx(23.38, abs=0.01)
