"""Data for mplug.train / mplug.evaluate: the authors' annotation formats, text cleaning, tokenizer, transforms, and
resumable distributed loading."""
from mplug.data.dataset import TaskDataset, build_dataset
from mplug.data.loader import ResumableDistributedSampler, build_loader
from mplug.data.text import check_vocabulary, clean_text, load_tokenizer

__all__ = ["TaskDataset", "build_dataset", "ResumableDistributedSampler", "build_loader", "check_vocabulary",
           "clean_text", "load_tokenizer"]
