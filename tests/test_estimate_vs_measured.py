"""bench.estimate_vs_measured: split_plan's ESTIMATE paired with a GPU's measured cuda forward, shape by shape."""
import json

from bench import estimate_vs_measured as pairing
from bench.estimate import estimate_rows


def _measured(device: str, rows: list) -> dict:
    return {"environment": {"device": device}, "rows": rows}


def _row(batch, q_len, k_len, ms, backend="cuda", pass_name="fwd", **extra) -> dict:
    return {"backend": backend, "pass": pass_name, "dtype": "bfloat16", "heads": 12, "head_dim": 64, "batch": batch,
            "q_len": q_len, "k_len": k_len, "ms_median": ms, **extra}


def test_pairs_the_gpus_split_plan_estimate_with_the_cuda_forward(tmp_path):
    estimates = estimate_rows()
    (tmp_path / "estimate.json").write_text(json.dumps({"rows": estimates}))
    measured = _measured("NVIDIA H200", [
        _row(1, 25, 577, 0.012), _row(64, 25, 577, 0.250), _row(8, 602, 602, 0.900),
        _row(1, 25, 577, 0.001, backend="triton"), _row(1, 25, 577, 0.002, pass_name="bwd"),
        {key: value for key, value in _row(8, 25, 577, 0.3).items() if key != "ms_median"} | {"error": "RuntimeError"},
        _row(3, 25, 577, 0.5),  # measured, never estimated
    ])
    (tmp_path / "co.json").write_text(json.dumps(measured))
    rows, note = pairing.compare(tmp_path / "estimate.json", [tmp_path / "co.json"])
    assert note == ""
    assert [(r["batch"], r["q_len"], r["k_len"]) for r in rows] == [(1, 25, 577), (64, 25, 577), (8, 602, 602)]
    expected = {(e["batch"], e["q_len"], e["k_len"]): e["estimate_us"] for e in estimates
                if e["gpu"] == "H200" and e["plan"] == "split_plan"}
    first = rows[0]
    assert first["gpu"] == "H200" and first["measured_us"] == 12.0
    assert first["estimate_us"] == expected[(1, 25, 577)]
    assert first["measured_over_estimate"] == round(12.0 / expected[(1, 25, 577)], 2)
    assert "ESTIMATE us" in pairing.table(rows) and "| H200 | 8 | 602 | 602 |" in pairing.table(rows)


def test_a_cpu_result_pairs_nothing_and_says_why(tmp_path, capsys):
    (tmp_path / "estimate.json").write_text(json.dumps({"rows": estimate_rows()}))
    (tmp_path / "co.json").write_text(json.dumps(_measured("CPU (x86_64, 2 cores)", [_row(1, 25, 577, 3.0)])))
    out = tmp_path / "paired.json"
    assert pairing.main([str(tmp_path / "estimate.json"), str(tmp_path / "co.json"), str(tmp_path / "missing.json"),
                         "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["rows"] == [] and "CPU (x86_64, 2 cores)" in written["note"]
    assert "no shape both estimated and measured" in capsys.readouterr().out


def test_gpu_names_map_to_the_estimates_gpus():
    assert pairing.gpu_of("NVIDIA H100 80GB HBM3") == "H100"
    assert pairing.gpu_of("NVIDIA H200") == "H200"
    assert pairing.gpu_of("NVIDIA A100-SXM4-80GB") is None
