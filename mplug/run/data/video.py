"""Video frames as the authors load them (AliceMind mPLUG/dataset/videoqa_dataset.py and video_dataset.py,
``_load_video_from_path_decord`` with ``frm_sampling_strategy='uniform'``), decoded with PyAV (the ``[video]`` extra)
instead of decord: their frame indices, every frame resized to a square ``size x size`` (decord's
``VideoReader(width=size, height=size)``, aspect ratio not kept), pixels / 255 normalised with CLIP's mean / std
(their ``ImageNorm``). Their configs sample 8 frames for VATEX captions (``num_frm_test: 8``) and 12 for MSR-VTT
retrieval (``num_frm_test: 12``); their video QA dataset's default is 16.
"""
from __future__ import annotations

import math
from typing import List

import torch

from mplug.run.data.transforms import CLIP_MEAN, CLIP_STD

AUTHORS_NUM_FRAMES = {"videocaption": 8, "videoretrieval": 12, "videoqa": 16}


def import_av():
    """The ``av`` module (PyAV), or ImportError naming the ``[video]`` extra that installs it."""
    try:
        import av
    except ImportError as error:
        raise ImportError("reading videos needs PyAV: install the video extra, pip install 'mplug-kernels[video]' "
                          "(or pip install av)") from error
    return av


def authors_frame_indices(num_video_frames: int, num_frames: int) -> List[int]:
    """The frames their 'uniform' sampling reads: numpy.arange(0, n, n / T, dtype=int), whose integer dtype truncates
    the step before stepping, so index i is i * int(n / T) for ceil(n / (n / T)) indices (videoqa_dataset.py:80)."""
    if not isinstance(num_video_frames, int) or num_video_frames < 1 or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"need a video of >= 1 frame and >= 1 frame to sample, got {num_video_frames!r}, {num_frames!r}")
    step = num_video_frames / num_frames
    return [i * int(step) for i in range(math.ceil(num_video_frames / step))]


def _count_frames(av, path: str) -> int:
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def read_frames(path: str, indices: List[int], size: int) -> torch.Tensor:
    """Frames ``indices`` (0-based decode order, repeats allowed) of the video at path -> uint8 [T, 3, size, size]
    (RGB, each frame resized to size x size)."""
    av = import_av()
    wanted = set(indices)
    found = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        for position, frame in enumerate(container.decode(stream)):
            if position > max(wanted):
                break
            if position not in wanted:
                continue
            rgb = frame.to_ndarray(format="rgb24", width=size, height=size)
            found[position] = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    missing = [index for index in sorted(wanted) if index not in found]
    if missing:
        raise ValueError(f"{path}: frames {missing} could not be decoded (the video has {len(found)} of the wanted ones)")
    return torch.stack([found[index] for index in indices])


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [T, 3, S, S] -> float [T, 3, S, S]: / 255, minus CLIP's mean, over its std (their ImageNorm)."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (frames.float() / 255.0 - mean) / std


def load_video(path: str, num_frames: int, size: int) -> torch.Tensor:
    """The video at path as the authors feed it: their uniform frame indices, size x size, normalised ->
    float [T, 3, size, size] (T = num_frames, or fewer / repeated frames where their arange gives them)."""
    indices = authors_frame_indices(_count_frames(import_av(), path), num_frames)
    return normalise_frames(read_frames(path, indices, size))
