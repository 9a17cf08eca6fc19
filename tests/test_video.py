"""Video on the tiny model (frame tokens concatenated into one vision memory, masked frames ignored) and the
co-attention / concat-attention kernels at the video lengths Lk = 9,232 (16 x 577) and 16,384."""
import pytest
import torch

import mplug_kernels
from attention_testing import low_precision_baseline, assert_within_budget, reference64, skip_unless_supported
from mplug import MPLUG, MPLUGConfig
from mplug.tasks.video import (
    answer_list_inputs, encode_video, encode_videos_in_chunks, rank_answers, vatex_caption, video_caption_generate, video_qa_generate, video_qa_rank,
    video_retrieval_scores,
)

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()


def video_batch(videos=2, frames=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randn(videos, frames, 3, 32, 32, generator=generator, dtype=torch.float64)
    ids = torch.randint(104, 200, (videos, 6), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return clips, ids, torch.ones(ids.shape, dtype=torch.bool)


def test_video_memory_is_the_frame_encodings_concatenated(model):
    clips, _, _ = video_batch()
    video = encode_video(model, clips)
    per_frame = [model.visual_encoder(clips[:, t]) for t in range(clips.shape[1])]
    tokens = model.config.num_visual_tokens
    assert video.embeds.shape == (2, 3 * tokens, model.config.hidden_size)
    torch.testing.assert_close(video.embeds, torch.cat(per_frame, dim=1), rtol=1e-10, atol=1e-10)
    assert video.mask.all()


def test_videos_encoded_in_chunks_equal_one_pass(model):
    """Retrieval encodes batch_size videos at a time: the same VideoMemory as one batched pass (3 videos, chunks 2 + 1)."""
    clips, _, _ = video_batch(videos=3)
    frame_mask = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])
    whole, chunked = encode_video(model, clips, frame_mask), encode_videos_in_chunks(model, clips, frame_mask, 2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_masked_frames_are_ignored(model):
    clips, ids, mask = video_batch(seed=1)
    frame_mask = torch.tensor([[True, False, True], [True, True, False]])
    changed = clips.clone()
    changed[0, 1] = torch.randn(3, 32, 32, dtype=torch.float64) * 5
    changed[1, 2] = float("nan")
    tokens = model.config.num_visual_tokens
    video = encode_video(model, clips, frame_mask)
    assert video.mask.tolist() == frame_mask.repeat_interleave(tokens, dim=1).tolist()
    for frames in (clips, changed):
        out = encode_video(model, frames, frame_mask)
        torch.testing.assert_close(out.embeds, video.embeds, rtol=0, atol=0)
        fused = model.fusion_encoder(out.embeds, out.mask, model.text_encoder(ids, mask), mask)[1]
        answers = video_qa_generate(model, frames, ids, mask, frame_mask, num_beams=1, max_length=2)
        scores = video_retrieval_scores(model, frames, ids, mask, frame_mask, k=1)
        if frames is clips:
            expected = fused, answers, scores
        else:
            torch.testing.assert_close(fused, expected[0], rtol=0, atol=0)
            assert answers.sequences.tolist() == expected[1].sequences.tolist()
            for got, want in zip(scores, expected[2]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # dropping the masked frames altogether gives the same video (frame 0 of video 0 = frames 0, 2)
    alone = encode_video(model, clips[:1, [0, 2]])
    kept = video.embeds[:1].view(1, 3, tokens, -1)[:, [0, 2]].flatten(1, 2)
    torch.testing.assert_close(kept, alone.embeds, rtol=1e-10, atol=1e-10)


def test_video_tasks_run_end_to_end(model):
    clips, ids, mask = video_batch(seed=2)
    captions = video_caption_generate(model, clips, num_beams=2, min_length=2, max_length=4)
    assert captions.sequences.shape[:2] == (2, 1) and captions.sequences.shape[2] <= 4
    scores = video_retrieval_scores(model, clips, ids, mask, k=1)
    assert scores.itc.shape == (2, 2) and torch.isfinite(scores.i2t).sum(1).tolist() == [1, 1]
    # the ITM logit of a pair equals the fused [CLS] of that video and text through itm_head
    video = encode_video(model, clips)
    best = scores.itc.argmax(1)
    for v in range(2):
        t = int(best[v])
        fused = model.fusion_encoder(video.embeds[v:v + 1], video.mask[v:v + 1], model.text_encoder(ids[t:t + 1], mask[t:t + 1]), mask[t:t + 1])[1]
        # their score of a candidate is ITM + ITC (retrieval_vid_mplug.py:97, 117: score + topk_sim)
        torch.testing.assert_close(scores.i2t[v, t], model.itm_head(fused[:, 0])[0, 1] + scores.itc[v, t])


class FixedDecoder:
    """A decoder whose next-token distribution is the same at every position: p(SEP) .4, p(x) .1, p(y) .3, p(z) .2."""

    PROBS = torch.tensor([1e-30, 0.4, 0.1, 0.3, 0.2], dtype=torch.float64)  # ids 0 [CLS], 1 [SEP], 2 x, 3 y, 4 z

    def __call__(self, ids, mask, memory, memory_masks):
        assert memory[0].shape[0] == ids.shape[0] and memory_masks[0].shape[0] == ids.shape[0]
        return self.PROBS.log().expand(ids.shape[0], ids.shape[1], 5)


class FixedModel:
    text_decoder = FixedDecoder()


def test_rank_answers_hand_worked():
    # model_vqa_mplug.py:185-242: score = log p(first token) + the answer's summed token log-probs, whose first term
    # is the first token again (labels = ids[:, 1:]). A = "x [SEP]": .1 * (.1 * .4) = .004; B = "y z [SEP]":
    # .3 * (.3 * .2 * .4) = .0072. Counted once A would win (.04 > .024); their double count makes it B, with
    # softmax probabilities .0072 / .0112 = 0.642857 and .004 / .0112 = 0.357143.
    answer_ids = torch.tensor([[0, 2, 1, 1], [0, 3, 4, 1]])
    answer_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    memory = (torch.zeros(2, 3, 4, dtype=torch.float64),)
    masks = (torch.ones(2, 3, dtype=torch.bool),)
    ranked = rank_answers(FixedModel(), memory, masks, answer_ids, answer_mask, k=128)
    assert ranked.ids.tolist() == [[1, 0], [1, 0]]
    torch.testing.assert_close(ranked.probs, torch.tensor([[0.0072 / 0.0112, 0.004 / 0.0112]] * 2, dtype=torch.float64))
    # k = 1 keeps the likeliest first token only (y, .3 > .1): B with probability 1
    one = rank_answers(FixedModel(), memory, masks, answer_ids, answer_mask, k=1)
    assert one.ids.tolist() == [[1], [1]] and one.probs.tolist() == [[1.0], [1.0]]
    with pytest.raises(ValueError, match="k must be a positive int"):
        rank_answers(FixedModel(), memory, masks, answer_ids, answer_mask, k=0)


def test_video_qa_rank_scores_each_answer_on_the_fused_video_and_question(model):
    clips, ids, mask = video_batch(seed=3)
    answers = torch.tensor([[CLS, 120, SEP, 0], [CLS, 130, 131, SEP], [CLS, 140, SEP, 0]])
    answer_mask = answers != 0
    ranked = video_qa_rank(model, clips, ids, mask, answers, answer_mask, k=3)
    assert ranked.ids.shape == (2, 3) and sorted(ranked.ids[0].tolist()) == [0, 1, 2]
    video = encode_video(model, clips)
    for b in range(2):
        fused = model.fusion_encoder(video.embeds[b:b + 1], video.mask[b:b + 1], model.text_encoder(ids[b:b + 1], mask[b:b + 1]), mask[b:b + 1])
        scores = []
        for a in range(3):
            length = int(answer_mask[a].sum())
            logits = model.text_decoder(answers[a:a + 1, :length], answer_mask[a:a + 1, :length], memory=fused,
                                        memory_masks=(video.mask[b:b + 1], mask[b:b + 1]))
            log_probs = logits[0].log_softmax(-1)
            tokens = sum(log_probs[t - 1, answers[a, t]] for t in range(1, length))
            scores.append(log_probs[0, answers[a, 1]] + tokens)
        expected = torch.stack(scores).softmax(0)
        torch.testing.assert_close(ranked.probs[b], expected[ranked.ids[b]], rtol=1e-8, atol=1e-10)
        assert bool((ranked.probs[b][:-1] >= ranked.probs[b][1:]).all())


def test_answer_list_and_vatex_caption_as_theirs():
    # videoqa_mplug.py:39: answer + "[SEP]" through the tokenizer, which adds its own [CLS] ... [SEP]
    class Tokenizer:
        def __call__(self, texts, padding, return_tensors):
            assert texts == ["yes[SEP]", "red car[SEP]"] and padding == "longest" and return_tensors == "pt"
            return {"input_ids": torch.tensor([[CLS, 7, SEP, SEP, 0], [CLS, 8, 9, SEP, SEP]]),
                    "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}

    ids, mask = answer_list_inputs(Tokenizer(), ["yes", "red car"])
    assert ids.shape == (2, 5) and mask.dtype == torch.bool and mask[0].tolist() == [True] * 4 + [False]
    assert vatex_caption(" a man is cooking ") == "a man is cooking ."  # videocap_mplug.py:59


def test_video_caption_starts_from_the_prompt(model):
    clips, _, _ = video_batch(seed=4)
    prompt = torch.tensor([[CLS, 150, 151, 152]] * 2)  # "[CLS] a picture of" (videocap_mplug.py:46)
    captions = video_caption_generate(model, clips, prompt_ids=prompt, num_beams=2, min_length=1, max_length=3)
    assert captions.sequences.shape[:2] == (2, 1)
    # the first generated token is the greedy-best continuation of the prompt over the frame tokens
    video = encode_video(model, clips)
    logits = model.text_decoder(prompt, torch.ones_like(prompt, dtype=torch.bool), memory=(video.embeds,), memory_masks=(video.mask,))
    greedy = video_caption_generate(model, clips, prompt_ids=prompt, num_beams=1, min_length=0, max_length=1)
    assert greedy.sequences[:, 0, 0].tolist() == logits[:, -1].argmax(-1).tolist()


def test_bad_frames_are_rejected(model):
    clips, ids, mask = video_batch()
    with pytest.raises(ValueError, match="T >= 1"):
        encode_video(model, clips[:, :0])
    with pytest.raises(ValueError, match=r"frames must be a float tensor \[B, T, 3, S, S\]"):
        encode_video(model, clips[:, 0])
    with pytest.raises(ValueError, match="frame_mask must be a bool tensor"):
        encode_video(model, clips, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"videos \[1\] have no frame"):
        encode_video(model, clips, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="question_ids"):
        video_qa_generate(model, clips, ids[:1], mask[:1])
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        video_caption_generate(model, clips, num_beams=0)


# The video lengths: 16 frames x 577 tokens (ViT-B/16 at 384) and 16,384. Cheap shapes: B = 1, a few queries,
# head dim 32; one head on the Triton interpreter, two on the cuda emulator.
VIDEO_LENGTHS = [9232, 16384]
HEADS = {"reference": 2, "triton": 1, "cuda": 2}
HEAD_DIM = 32


def _video_inputs(backend, length, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    heads = HEADS[backend]
    make = lambda n: torch.randn(1, n, heads, HEAD_DIM, generator=generator).to(dtype)
    q, k, v = make(5), make(length), make(length)
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[0, -577:] = False  # the last frame is missing
    return q, k, v, mask, make(20), make(20)


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("length", VIDEO_LENGTHS)
def test_co_attention_at_video_lengths(backend, length):
    q, k, v, mask, _, _ = _video_inputs(backend, length, _dtype(backend), seed=length)
    skip_unless_supported(backend, q, [k], [v], [mask])
    out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    _, _, _, out_ref, _ = reference64(q, [k], [v], [mask], HEAD_DIM ** -0.5)
    out_base, _ = low_precision_baseline(q, [k], [v], [mask], HEAD_DIM ** -0.5)
    assert_within_budget("out", out, out_ref, out_base, factor=2)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("length", VIDEO_LENGTHS)
def test_concat_attention_at_video_lengths(backend, length):
    """Text queries over [video; text] (the connected layer's text rows and the decoder's memory)."""
    q, k, v, mask, text_k, text_v = _video_inputs(backend, length, _dtype(backend), seed=length + 1)
    text_mask = torch.ones(1, 20, dtype=torch.bool)
    text_mask[0, 15:] = False
    skip_unless_supported(backend, q, [k, text_k], [v, text_v], [mask, text_mask])
    out = mplug_kernels.concat_attention(q, (k, text_k), (v, text_v), (mask, text_mask), backend=backend)
    _, _, _, out_ref, _ = reference64(q, [k, text_k], [v, text_v], [mask, text_mask], HEAD_DIM ** -0.5)
    out_base, _ = low_precision_baseline(q, [k, text_k], [v, text_v], [mask, text_mask], HEAD_DIM ** -0.5)
    assert_within_budget("out", out, out_ref, out_base, factor=2)
