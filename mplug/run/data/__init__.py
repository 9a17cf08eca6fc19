"""Data for mplug.run.train / mplug.run.evaluate: the authors' annotation formats, text cleaning, tokenizer, transforms, and
resumable distributed loading."""
from mplug.run.data.dataset import TaskDataset, build_dataset
from mplug.run.data.loader import ResumableDistributedSampler, build_loader
from mplug.run.data.text import check_vocabulary, clean_text, load_tokenizer

__all__ = ["TaskDataset", "build_dataset", "ResumableDistributedSampler", "build_loader", "check_vocabulary",
           "clean_text", "load_tokenizer"]
