"""Smoke test of the benchmarks on a tiny grid: the main job, the kernel benchmark, the report and the profiler
run end to end and write JSON/PNG/trace files (numbers are not checked: timings belong to bench/, not tests)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from bench import __main__ as main_job
from bench import bench_co_attention, common, fusion, profile, report
from bench.common import default_device
from mplug_kernels import co_attention, profiling

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


TIMING_FIELDS = {"ms_median", "ms_min", "ms_max", "repeats", "noisy"}
RATIO_FIELDS = {"ratio_median", "ratio_low", "ratio_high", "repeats"}
HEADER_FIELDS = {"device", "torch", "triton", "commit", "command", "date", "load_average_before", "load_average_after",
                 "cells", "noisy_cells", "wall_s", "timing"}


def check_schema(payload: dict, min_repeats: int) -> None:
    """Every row and ratio row in the issue's schema, consistent, and the header complete."""
    assert HEADER_FIELDS <= set(payload["environment"])
    assert payload["environment"]["noisy_cells"] == sum(row["noisy"] for row in payload["rows"])
    for row in payload["rows"]:
        assert TIMING_FIELDS <= set(row), row
        assert row["repeats"] == len(row["samples_ms"]) >= min_repeats
        assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["noisy"] == ((row["ms_max"] - row["ms_min"]) / row["ms_median"] > 0.2)
    for ratio in payload["ratios"]:
        assert RATIO_FIELDS <= set(ratio), ratio
        assert ratio["ratio_low"] <= ratio["ratio_median"] <= ratio["ratio_high"]
    assert "auto" not in json.dumps(payload.get("resolved_backends", []))


@pytest.mark.parametrize("argv, groups, backends", [
    ([], main_job.CPU_DEFAULT_GROUPS, list(main_job.CPU_DEFAULT_BACKENDS)),
    (["--vision-lens", "577"], (("forward", 577), ("train", 577)), list(main_job.CPU_DEFAULT_BACKENDS)),
    (["--passes", "forward", "--backends", "reference"], (("forward", 577), ("forward", 1025)), ["reference"]),
    (["--full"], tuple(itertools.product(fusion.PASSES, fusion.VISION_LENS)), None),
])
def test_cpu_default_grid_and_its_overrides(argv, groups, backends):
    args = main_job.parse_args(argv, torch.device("cpu"))
    assert (tuple(args.groups), args.backends) == (tuple(groups), backends)


def test_main_job_times_every_variant_backend_and_pass(main_job_results):
    payload = report.load(main_job_results / "fusion.json")
    check_schema(payload, 3)
    measured = {(r["variant"], r["backend"], r["pass"]) for r in payload["rows"]}
    backends = payload["resolved_backends"]
    assert {"reference", "sdpa"} <= set(backends)
    assert measured == {(v, b, p) for v in fusion.VARIANTS for b in backends for p in fusion.PASSES}
    assert all(r["attention_backends"] == [r["backend"]] for r in payload["rows"])
    assert payload["environment"]["device_type"] == default_device().type
    assert payload["batch"] >= 1 and payload["config"] == "tiny" and payload["dtype"] == "float32"
    assert (main_job_results / "fusion.png").read_bytes().startswith(PNG_MAGIC)


def test_main_job_ratios_are_paired_per_round(main_job_results):
    payload = report.load(main_job_results / "fusion.json")
    rows = {(r["variant"], r["backend"], r["pass"]): r for r in payload["rows"]}
    names = {ratio["ratio"] for ratio in payload["ratios"]}
    assert {"connected/skip", "two_way/skip", "reference/sdpa"} <= names
    for ratio in payload["ratios"]:
        if ratio["ratio"] == "connected/skip":
            connected, skip = rows[("connected", ratio["backend"], ratio["pass"])], rows[("skip", ratio["backend"], ratio["pass"])]
            per_round = sorted(a / b for a, b in zip(connected["samples_ms"], skip["samples_ms"]))
            assert ratio["ratio_low"] == per_round[0] and ratio["ratio_high"] == per_round[-1]


def test_main_job_model_rows(main_job_results):
    payload = report.load(main_job_results / "model.json")
    check_schema(payload, 3)
    assert [r.get("error") for r in payload["rows"]] == [None] * 4
    assert {r["task"] for r in payload["ratios"]} == {"train_step", "vqa_generate"}
    assert payload["resolved_backends"]["eager"] == ["reference"] and payload["resolved_backends"]["fused"]
    assert not any("auto" in r["label"] for r in payload["rows"])


def test_fusion_table_has_ratios_and_paper_figures(main_job_results):
    text = report.fusion_table(report.load(main_job_results / "fusion.json"))
    assert "connected/skip" in text and "paper (Figure 1" in text and "eager math (reference backend)" in text
    assert "cells noisy" in text and "load average" in text


def test_noisy_cells_are_marked_in_the_table():
    quiet = {"ms_median": 10.0, "ms_min": 9.5, "ms_max": 10.5, "noisy": False}
    assert report.timing_cell(quiet) == "10.00 [9.50-10.50]"
    assert report.timing_cell(quiet | {"ms_max": 13.0, "noisy": True}).endswith(" noisy")


def test_measure_interleaves_with_rotated_order_and_pairs_ratios():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    policy = common.TimingPolicy(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)
    timings = common.measure(functions, torch.device("cpu"), policy)
    assert all(t.error is None and len(t.samples_ms) == 3 for t in timings.values())
    runs = [name for name, _ in itertools.groupby(calls)]  # a sample may hold several calls of one function
    assert runs == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]  # warm-ups, 3 rotated rounds
    ratio = common.paired_ratio(common.Timing([2.0, 4.0, 9.0]), common.Timing([1.0, 1.0, 3.0])).row()
    assert (ratio["ratio_median"], ratio["ratio_low"], ratio["ratio_high"], ratio["repeats"]) == (3.0, 2.0, 4.0, 3)
    assert common.fastest_per_round([common.Timing([2.0, 1.0]), common.Timing([1.0, 3.0])]).samples_ms == [1.0, 1.0]


def test_cpu_peak_memory_and_attention_backend_are_measured():
    def allocate():
        block = torch.ones(10 * 2**20)  # 40 MiB held while a second 4 MiB block is made
        return block.sum() + torch.ones(2**20).sum()

    peak, backends = common.profile_call(allocate, torch.device("cpu"))
    assert 44 <= peak < 46 and backends == []
    q = torch.randn(1, 5, 2, 16)
    _, backends = common.profile_call(lambda: co_attention(q, q, q, backend="sdpa"), torch.device("cpu"))
    assert backends == ["sdpa"]


def test_failing_function_is_recorded_not_fatal():
    def fail():
        raise RuntimeError("out of memory\nmore")

    timings = common.measure({"ok": lambda: None, "bad": fail}, torch.device("cpu"), common.TimingPolicy(1, 3, 3, 0.0))
    assert timings["bad"].row() == {"error": "RuntimeError: out of memory"} and timings["ok"].row()["repeats"] == 3


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
    assert ratios["two_way_over_skip"] == pytest.approx(4.0, abs=0.05)
    assert ratios["connected_over_skip_absorbed"] == pytest.approx(3.9, abs=0.05)
    assert ratios["two_way_over_skip_absorbed"] == pytest.approx(5.1, abs=0.05)


def test_kernel_benchmark_writes_json_and_png(tmp_path):
    assert bench_co_attention.main(["--quick", "--threads", "1", "--budget", "0", "--json-dir", str(tmp_path)]) == 0
    payload = report.load(tmp_path / "co_attention.json")
    check_schema(payload, 3)
    assert {"sdpa", "reference"} <= {r["backend"] for r in payload["rows"]}
    for row in payload["rows"]:
        shape = bench_co_attention.Shape(row["batch"], row["heads"], row["head_dim"], row["q_len"], row["k_len"])
        assert row["tflops"] == pytest.approx(shape.flops(row["pass"]) / row["ms_median"] / 1e9)
    assert {r["ratio"] for r in payload["ratios"]} == {"reference/best sdpa"}
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
