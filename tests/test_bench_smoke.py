"""Smoke test of the benchmarks on a tiny grid: the main job, the kernel benchmark, the report and the profiler
run end to end and write JSON/PNG/trace files (numbers are not checked: timings belong to bench/, not tests)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as main_job
from bench import bench_co_attention, fusion, profile, report
from bench.common import default_device
from mplug_kernels import profiling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """The benchmarks' --threads flag sets a process-wide value: give other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def main_job_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main_job.main(["--quick", "--vision-lens", "17", "--threads", "1", "--json-dir", str(out)]) == 0
    return out


def test_main_job_times_every_variant_backend_and_pass(main_job_results):
    payload = report.load(main_job_results / "fusion.json")
    measured = {(r["variant"], r["backend"], r["pass"]) for r in payload["rows"] if r.get("ms", 0) > 0}
    backends = payload["backend_labels"]
    assert {"reference", "sdpa"} <= set(backends)
    assert measured == {(v, b, p) for v in fusion.VARIANTS for b in backends for p in fusion.PASSES}
    assert payload["environment"]["device_type"] == default_device().type
    assert payload["batch"] >= 1 and payload["config"] == "tiny"
    assert (main_job_results / "fusion.png").read_bytes().startswith(PNG_MAGIC)


def test_main_job_model_rows(main_job_results):
    payload = report.load(main_job_results / "model.json")
    assert [r.get("error") for r in payload["rows"]] == [None] * 4
    assert set(payload["speedups"]) == {"train_step", "vqa_generate"}


def test_fusion_table_has_ratios_and_paper_figures(main_job_results):
    text = report.fusion_table(report.load(main_job_results / "fusion.json"))
    assert "connected/skip" in text and "paper (Figure 1" in text and "eager math (reference backend)" in text


@pytest.mark.parametrize("variant", fusion.VARIANTS)
def test_fusion_flop_model_matches_flop_counter(variant):
    config = fusion.CONFIGS["tiny"]()
    network = fusion.build_fusion(config, variant, "reference", torch.device("cpu"), torch.float32)
    inputs = fusion.fusion_inputs(config, 2, 33, 7, torch.device("cpu"), torch.float32)
    counted = fusion.counted_flops(fusion.step_function(network, inputs, "forward"))
    assert counted == 2 * fusion.fusion_flops(config.replace(fusion=variant), 33, 7)


def test_flop_ratios_reproduce_the_issue_figures_for_base():
    ratios = fusion.flop_ratios(fusion.CONFIGS["base"](), (577,), 25)["577"]
    assert ratios["connected_over_skip"] == pytest.approx(3.1, abs=0.05)
    assert ratios["coattn_over_skip"] == pytest.approx(4.0, abs=0.05)
    assert ratios["connected_over_skip_absorbed"] == pytest.approx(3.9, abs=0.05)
    assert ratios["coattn_over_skip_absorbed"] == pytest.approx(5.1, abs=0.05)


def test_kernel_benchmark_writes_json_and_png(tmp_path):
    assert bench_co_attention.main(["--quick", "--threads", "1", "--min-run-time", "0.01", "--json-dir", str(tmp_path)]) == 0
    payload = report.load(tmp_path / "co_attention.json")
    assert {"sdpa", "reference"} <= {r["backend"] for r in payload["rows"]}
    for row in payload["rows"]:
        shape = bench_co_attention.Shape(row["batch"], row["heads"], row["head_dim"], row["q_len"], row["k_len"])
        for pass_name in bench_co_attention.PASSES:
            assert row[f"{pass_name}_tflops"] == pytest.approx(shape.flops(pass_name) / row[f"{pass_name}_ms"] / 1e9)
    assert set(payload["environment"]) >= {"device", "torch", "triton", "commit", "date"}
    assert (tmp_path / "co_attention.png").read_bytes().startswith(PNG_MAGIC)


def test_readme_block_is_generated_from_results(main_job_results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_START}\nstale\n{report.README_END}\ntail\n")
    assert report.update_readme(readme, main_job_results)
    text = readme.read_text()
    assert "stale" not in text and "fusion.json" in text and "model.json" in text and text.endswith("tail\n")
    assert not report.update_readme(readme, main_job_results)


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="bench-results:start"):
        report.update_readme(readme, tmp_path)


def test_profile_writes_a_trace_with_named_ranges(tmp_path):
    assert profile.main(["--config", "tiny", "--torch-profiler", "--out", str(tmp_path)]) == 0
    (trace,) = tmp_path.glob("*.trace.json")
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"train_step", "vqa_generate", "fusion.layer0", "text_decoder", "decoder.step"} <= names
    assert any(name.startswith("attention.") for name in names if name)
    assert not profiling.nvtx_enabled()


def _range_names(function) -> set:
    with torch.profiler.profile() as profiler:
        function()
    return {event.name for event in profiler.events()}


def test_ranges_are_off_by_default_and_on_with_one_switch():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    handles = profiling.add_module_ranges(module, r"0")

    def run():
        with profiling.nvtx_range("outer"):
            module(torch.randn(2, 4))

    assert not profiling.nvtx_enabled()
    assert not {"outer", "0"} & _range_names(run)
    profiling.enable_nvtx()
    try:
        assert {"outer", "0"} <= _range_names(run)
    finally:
        profiling.enable_nvtx(False)
    for handle in handles:
        handle.remove()
