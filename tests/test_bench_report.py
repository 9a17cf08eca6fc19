"""The main job's report tells the truth at a glance: what a CPU run measures, the verdict, labels, units, names."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bench import __main__ as main_job
from bench import common, fusion_report, model_bench, tables

THREADS = torch.get_num_threads()

COMMITTED = Path(__file__).resolve().parent.parent / "bench" / "results" / "cpu" / "fusion.json"


@pytest.fixture
def committed():
    """The committed CPU run, written before "coattn" was renamed "two_way"."""
    return tables.load(COMMITTED)


def test_old_result_files_read_coattn_as_two_way(committed):
    assert "coattn" in COMMITTED.read_text()
    assert {row["variant"] for row in committed["rows"]} == {"skip", "connected", "two_way"}
    assert {ratio["ratio"] for ratio in committed["ratios"]} >= {"connected/skip", "two_way/skip"}
    assert "two_way_over_skip" in committed["flop_ratios"]["577"] and "two_way" in committed["paper_ms_per_100"]
    assert "coattn" not in fusion_report.fusion_table(committed)


def test_cpu_table_says_our_kernels_did_not_run(committed):
    text = fusion_report.fusion_table(committed)
    assert "On a CPU our Triton and CUDA kernels do not run" in text.split("| pass |")[0]
    gpu = copy.deepcopy(committed)
    gpu["environment"]["device_type"] = "cuda"
    assert fusion_report.what_was_measured(gpu) == ""


def test_verdict_asks_for_a_rerun_when_most_cells_are_noisy(committed):
    committed["environment"].update(cells=18, noisy_cells=10, load_average_before=5.25, load_average_after=6.0)
    line = fusion_report.verdict(committed)
    assert "rerun on an idle machine" in line and "load average 5.2 before, 6.0 after" in line


def test_verdict_compares_the_ratios_with_the_paper_when_most_cells_are_quiet(committed):
    committed["environment"].update(cells=18, noisy_cells=9)
    line = fusion_report.verdict(committed)
    assert "rerun" not in line
    assert "connected/skip 2.57-4.04x (paper ~4.0x, FLOP ratio 3.09-3.34x)" in line and "two_way/skip" in line


def test_times_switch_to_per_sample_units_past_1e5_ms_per_100():
    assert tables.time_unit([99_999.0]) == ("ms/100 samples", 1.0)
    assert tables.time_unit([100_000.0]) == ("ms/sample", 0.01)
    assert tables.time_unit([1e8]) == ("s/sample", 1e-5)


def test_committed_table_uses_ms_per_sample(committed):
    unit, scale = fusion_report.fusion_unit(committed)
    assert (unit, scale) == ("ms/sample", 1.0)  # batch 1: ms per call = ms per sample
    assert "skip ms/sample" in fusion_report.fusion_table(committed)


@pytest.mark.parametrize("setup, ran, label", [
    ("fused", ["sdpa"], "sdpa (none of our kernels ran), KV cache"),
    ("fused", ["sdpa", "triton"], "our kernels (sdpa+triton), KV cache"),
    ("fused", [], "no attention call seen (none of our kernels ran), KV cache"),
    ("eager", ["reference"], "eager math (reference), no KV cache"),
])
def test_model_rows_are_named_by_the_kernels_that_ran(setup, ran, label):
    assert tables.model_label({"task": "vqa_generate", "setup": setup, "attention_backends": ran}) == label
    assert tables.model_label({"task": "train_step", "setup": setup, "attention_backends": ran}) == label.rsplit(",", 1)[0]


def test_every_run_gets_its_own_folder(tmp_path):
    first = common.new_run_dir(tmp_path)
    first.mkdir()
    second = common.new_run_dir(tmp_path)
    assert second != first and second.parent == tmp_path and not second.exists()


def test_plot_has_a_ratio_panel_and_a_time_panel(committed, tmp_path, monkeypatch):
    panels = []
    monkeypatch.setattr(fusion_report, "save_figure", lambda figure, path, title: panels.extend(figure.axes) or path)
    fusion_report.plot_fusion(committed, tmp_path / "fusion.png")
    ratio_panel, time_panel = panels
    ratio_labels = ratio_panel.get_legend_handles_labels()[1]
    assert "paper, Figure 1: connected/skip ~4.0x" in ratio_labels and "FLOP ratio two_way/skip (same backend)" in ratio_labels
    assert not any("paper" in label for label in time_panel.get_legend_handles_labels()[1])
    assert time_panel.get_ylabel().startswith("ms/sample")


def test_main_job_help_states_the_defaults_the_run_uses(capsys):
    with pytest.raises(SystemExit):
        main_job.parse_args(["--help"], torch.device("cpu"))
    text = " ".join(capsys.readouterr().out.split())
    default = main_job.parse_args([], torch.device("cpu"))
    quick = main_job.parse_args(["--quick"], torch.device("cpu"))
    torch.set_num_threads(THREADS)  # --quick set one thread for this process
    assert default.model_batch == 1 and "on the CPU 1 in the default run" in text
    assert quick.model_batch is None and model_bench.CPU_BATCH == 2 and "and 2 with --quick or --full" in text
    assert (quick.threads, quick.budget) == (1, 0.0) and "1 with --quick" in text and "0 with --quick" in text
    assert default.backends == ["reference", "sdpa"] and "reference and sdpa in the CPU default run" in text
    assert default.json_dir.parent == common.RESULTS_DIR and default.json_dir.name[:8].isdigit()


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_results goes through a temporary file and os.replace: a failed write leaves the earlier file intact."""
    run = common.Run(torch.device("cpu"), common.TimingPolicy.for_device(torch.device("cpu")))
    path = common.write_results("rows", run, [{"a": 1}], tmp_path)
    before = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(common.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        common.write_results("rows", run, [{"a": 2}], tmp_path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]
