"""Video frames read as the authors read them (AliceMind mPLUG/dataset/videoqa_dataset.py:70-95, 'uniform'
sampling, ImageNorm), through PyAV: a tiny video of known solid colours is written and its sampled frames read back."""
import builtins
import sys

import pytest
import torch

from mplug.run.data import video as video_data
from mplug.run.data.video import authors_frame_indices, load_video, normalise_frames, read_frames

av = pytest.importorskip("av")

# Ten frames of distinct solid colours (RGB); frame i is COLOURS[i].
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250),
           (250, 0, 250), (250, 250, 250), (10, 10, 10), (130, 130, 130), (250, 130, 10)]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "colours.mp4")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.options = {"qscale": "1"}
        for colour in COLOURS:
            pixels = torch.tensor(colour, dtype=torch.uint8).view(1, 1, 3).expand(24, 32, 3).contiguous().numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_frame_indices_as_their_integer_arange():
    # Hand-worked from videoqa_dataset.py:80, np.arange(0, vlen, vlen / num_frm, dtype=int): the int dtype truncates
    # the step (10 / 4 = 2.5 -> 2), so 10 frames give 0, 2, 4, 6 (not 0, 2, 5, 7); fewer frames than wanted give
    # frame 0 repeated (step 7 / 8 -> 0).
    assert authors_frame_indices(10, 4) == [0, 2, 4, 6]
    assert authors_frame_indices(30, 8) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert authors_frame_indices(100, 12) == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88]
    assert authors_frame_indices(7, 8) == [0] * 8
    np = pytest.importorskip("numpy")
    for frames in range(1, 400):
        for wanted in (1, 4, 8, 12, 16):
            assert authors_frame_indices(frames, wanted) == np.arange(0, frames, frames / wanted, dtype=int).tolist()
    with pytest.raises(ValueError, match="at least|>= 1"):
        authors_frame_indices(0, 8)


def test_sampled_frames_are_the_known_colours(clip_path):
    frames = read_frames(clip_path, [0, 2, 4, 6], 16)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 3, 16, 16)
    for frame, index in zip(frames, [0, 2, 4, 6]):
        expected = torch.tensor(COLOURS[index], dtype=torch.float32).view(3, 1, 1)
        assert (frame.float() - expected).abs().max() <= 12, index  # mpeg4 + yuv420p rounding only


def test_load_video_samples_normalises_and_repeats(clip_path):
    # 10 frames, 4 wanted: frames 0, 2, 4, 6 (the truncated step), then (x / 255 - mean) / std as their ImageNorm.
    video = load_video(clip_path, 4, 8)
    assert video.shape == (4, 3, 8, 8) and video.dtype == torch.float32
    red = (0.98 - 0.48145466) / 0.26862954  # frame 0's red channel, 250 / 255 = 0.98
    assert abs(video[0, 0].mean().item() - red) < 0.2
    blue = (0.98 - 0.40821073) / 0.27577711  # frame 2 is blue
    assert abs(video[1, 2].mean().item() - blue) < 0.2
    torch.testing.assert_close(video, normalise_frames(read_frames(clip_path, [0, 2, 4, 6], 8)))
    # more frames wanted than the video has (16 > 10): their step 10 / 16 truncates to 0, frame 0 sixteen times
    many = load_video(clip_path, 16, 8)
    assert many.shape == (16, 3, 8, 8) and bool((many == many[0]).all())


def test_normalise_is_their_image_norm():
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = normalise_frames(frames)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-0.48145466 / 0.26862954, -0.4578275 / 0.26130258,
                                                              -0.40821073 / 0.27577711]))
    torch.testing.assert_close(out[1, 0, 0, 0], torch.tensor((1 - 0.48145466) / 0.26862954))


def test_missing_pyav_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_av(name, *args, **kw):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "av")
    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match=r"mplug-kernels\[video\]"):
        video_data.import_av()


def test_frames_past_the_end_are_an_error(clip_path):
    with pytest.raises(ValueError, match=r"frames \[12\]"):
        read_frames(clip_path, [0, 12], 8)
