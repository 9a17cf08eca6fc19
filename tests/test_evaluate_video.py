"""python -m mplug.run.evaluate --task videoqa / video_caption / video_retrieval end to end on two tiny videos written
with PyAV, annotations in the authors' MSRVTT-QA (JSON lines), VATEX (JSON list) and MSR-VTT retrieval (JSON lines)
formats, a tiny random model saved as mplug.run.train saves it; each metric recomputed from the model's own methods."""
import json

import pytest
import torch
import yaml

from mplug.run import caption_eval, evaluate, evaluate_rows, metrics
from mplug.run.data.text import load_tokenizer
from mplug.run.data.video import load_video
from mplug.run.evaluate_video import VIDEO_CONFIGS, config_source
from mplug.run.run_config import load_config
from mplug.run.runtime import CHECKPOINT_FORMAT, build_model
from mplug.tasks.video import answer_list_inputs, vatex_caption
from distributed import evaluate_two_processes
from tiny_dataset import write_vocab

av = pytest.importorskip("av", reason="PyAV (the [video] extra) writes and reads the test videos")
pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red_clip": [(220, 30, 30), (200, 40, 40)], "blue_clip": [(40, 60, 220), (30, 30, 250)]}
MODEL_TASK = {"videoqa": "vqa", "video_caption": "caption", "video_retrieval": "retrieval"}


def write_video(path, colours, frames=6):
    """An mpeg4 clip of ``frames`` 32x24 frames alternating the solid colours."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            pixels = torch.tensor(colours[i % 2], dtype=torch.uint8).view(1, 1, 3).expand(24, 32, 3).contiguous().numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def video_run(root, task):
    """Videos, annotations, vocab, config.yaml (tiny model, 32 px frames, 4 frames) and a checkpoint of the video
    task's model -> (config path, checkpoint path)."""
    (root / "videos").mkdir(parents=True)
    for name, colours in COLOURS.items():
        write_video(root / "videos" / f"{name}.mp4", colours)
    paths = {"image_root": "videos", "test_file": "test.json"}
    if task == "videoqa":
        write_jsonl(root / "test.json", [{"video_id": "red_clip", "question": "what color is the shape?", "answer": "red"},
                                         {"video_id": "blue_clip", "question": "how many shapes are there?", "answer": "two"}])
        (root / "ans2label.json").write_text(json.dumps({"red": 0, "blue": 1, "two": 2, "circle": 3}))
        paths["answer_list"] = "ans2label.json"
    elif task == "video_caption":
        (root / "test.json").write_text(json.dumps([
            {"videoID": "red_clip", "enCap": ["A red square on a red background.", "Red shapes."]},
            {"videoID": "blue_clip", "enCap": ["Blue circles.", "A picture of blue shapes!"]}]))
    else:
        write_jsonl(root / "test.json", [{"clip_name": "red_clip", "caption": "Red shapes, big."},
                                         {"clip_name": "blue_clip", "caption": ["blue circles", "a blue image"]}])
    write_vocab(root / "vocab.txt")
    config = {"task": MODEL_TASK[task], "model": "tiny", "image_size": 32, "batch_size_test": 2, "num_workers": 0,
              "num_beams": 2, "min_length": 1, "max_length": 5, "k_test": 3, "num_frames": 4, "max_tokens": 16,
              "vocab": "vocab.txt", **paths}
    if task == "video_caption":
        config.update(prompt="a picture of", prompt_mode="vatex")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(str(root / "config.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), MODEL_TASK[task])
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": cfg}, root / "checkpoint.pth")
    return root / "config.yaml", root / "checkpoint.pth", model.eval()


def run_cli(task, config, checkpoint, output, *extra):
    return evaluate.main(["--task", task, "--config", str(config), "--checkpoint", str(checkpoint), "--output", str(output), *extra])


def frames_of(root, names):
    return torch.stack([load_video(str(root / "videos" / f"{name}.mp4"), 4, 32) for name in names])


def test_videoqa_ranks_the_answer_list_and_scores_exact_matches(tmp_path):
    config, checkpoint, model = video_run(tmp_path / "data", "videoqa")
    scores = run_cli("videoqa", config, checkpoint, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "videoqa_result.json").read_text())
    assert [entry["question_id"] for entry in results] == [0, 1]
    answers = ["red", "blue", "two", "circle"]
    tokenizer = load_tokenizer(str(tmp_path / "data" / "vocab.txt"))
    questions = tokenizer(["what color is the shape?", "how many shapes are there?"], padding="longest", return_tensors="pt")
    ranked = model.video_qa_rank(frames_of(tmp_path / "data", COLOURS), questions["input_ids"], questions["attention_mask"].bool(),
                                 *answer_list_inputs(tokenizer, answers), k=3)
    assert [entry["answer"] for entry in results] == [answers[i] for i in ranked.ids[:, 0].tolist()]
    expected = sum(entry["answer"] == label for entry, label in zip(results, ["red", "two"])) / 2
    assert scores["accuracy"] == expected and scores["questions"] == 2
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == scores


def test_video_caption_feeds_the_prompt_and_writes_vatex_captions(tmp_path, monkeypatch):
    config, checkpoint, model = video_run(tmp_path / "data", "video_caption")
    seen = []
    original = type(model).video_caption_generate

    def recording(self, frames, frame_mask=None, **kw):
        seen.append(kw["prompt_ids"])
        return original(self, frames, frame_mask, **kw)

    monkeypatch.setattr(type(model), "video_caption_generate", recording)
    scored = []  # the java COCO evaluation itself is tested in test_evaluate.py / test_caption_eval.py
    monkeypatch.setattr(caption_eval, "unavailable_reason", lambda: None)
    monkeypatch.setattr(caption_eval, "coco_caption_scores", lambda *args: scored.append(args) or {"CIDEr": 0.5})
    scores = run_cli("video_caption", config, checkpoint, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "video_caption_result.json").read_text())
    tokenizer = load_tokenizer(str(tmp_path / "data" / "vocab.txt"))
    assert tokenizer.decode(seen[0][0]) == "[CLS] a picture of" and seen[0].shape[0] == 2
    output = model.video_caption_generate(frames_of(tmp_path / "data", COLOURS), prompt_ids=seen[0], num_beams=2,
                                          min_length=1, max_length=5)
    expected = [vatex_caption(text) for text in evaluate_rows.decode(tokenizer, output.sequences[:, 0], 102)]
    assert results == [{"video_id": "red_clip", "caption": expected[0]}, {"video_id": "blue_clip", "caption": expected[1]}]
    assert all(entry["caption"].endswith(" .") for entry in results)
    references = [["A red square on a red background.", "Red shapes."], ["Blue circles.", "A picture of blue shapes!"]]
    assert scored == [(expected, references)] and scores["CIDEr"] == 0.5 and scores["videos"] == 2


def test_video_retrieval_recall_equals_the_models_scores(tmp_path):
    config, checkpoint, model = video_run(tmp_path / "data", "video_retrieval")
    scores = run_cli("video_retrieval", config, checkpoint, tmp_path / "out")
    assert (scores["videos"], scores["texts"]) == (2, 3)
    tokenizer = load_tokenizer(str(tmp_path / "data" / "vocab.txt"))
    texts = tokenizer(["red shapes big", "blue circles", "a blue image"], padding="longest", return_tensors="pt")
    direct = model.video_retrieval_scores(frames_of(tmp_path / "data", COLOURS), texts["input_ids"],
                                          texts["attention_mask"].bool(), k=3, batch_size=2)
    expected = metrics.retrieval_recall(direct.i2t, direct.t2i, [0, 1, 1])
    assert {key: scores[key] for key in expected} == pytest.approx(expected)
    assert scores["i2t_r5"] == scores["t2i_r5"] == 100.0, "2 videos: every match is in the top 5"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == scores


def test_missing_video_is_named_or_skipped(tmp_path, capsys):
    config, checkpoint, _ = video_run(tmp_path / "data", "videoqa")
    (tmp_path / "data" / "videos" / "blue_clip.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"test.json: record 1: cannot read video .*blue_clip.mp4"):
        run_cli("videoqa", config, checkpoint, tmp_path / "strict")
    scores = run_cli("videoqa", config, checkpoint, tmp_path / "out", "--skip-bad-records")
    assert scores["skipped_records"] == 1 and scores["questions"] == 1
    assert "skipped 1 bad records whose video could not be used" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--task 'video_caption' \\(model task 'caption'\\) does not match the config"):
        run_cli("video_caption", config, checkpoint, tmp_path / "other")


@pytest.mark.parametrize("name", VIDEO_CONFIGS)
def test_shipped_video_configs_load_by_name_with_the_authors_frames(name):
    cfg = load_config(config_source(name))
    assert (cfg["task"], cfg["num_frames"], cfg["image_size"]) == {
        "videoqa_base": ("vqa", 16, 480), "video_caption_large": ("caption", 8, 448),
        "video_retrieval_large": ("retrieval", 12, 224)}[name]


def test_videoqa_on_two_gloo_ranks_equals_one_process(tmp_path):
    config, checkpoint, _ = video_run(tmp_path / "data", "videoqa")
    one = run_cli("videoqa", config, checkpoint, tmp_path / "one")
    evaluate_two_processes("videoqa", config, checkpoint, tmp_path / "two", "--set", "batch_size_test=1")
    assert (tmp_path / "two" / "videoqa_result.json").read_text() == (tmp_path / "one" / "videoqa_result.json").read_text()
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == one
