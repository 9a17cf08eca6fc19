"""The samples of a task's split: the annotation records through their task's parser (mplug.run.data.records), or
a nocaps file's images (mplug.run.data.nocaps) where a caption test file holds a JSON object."""
from __future__ import annotations

from typing import List

from mplug.run.data.nocaps import is_nocaps_file, read_nocaps
from mplug.run.data.records import PARSERS, BadRecords, annotation_files, config_path, read_records


def read_samples(task: str, split: str, cfg: dict, bad: BadRecords) -> List[dict]:
    """Every good sample of the task's split (train_file or test_file); caption test files that hold a JSON object
    are nocaps files."""
    key = "train_file" if split == "train" else "test_file"
    files = annotation_files(cfg, key, task, split)
    if (task, split) == ("caption", "test") and all(is_nocaps_file(file) for file in files):
        root = config_path(cfg, "image_root", task, split)
        return [sample for file in files for sample in read_nocaps(file, root, bad)]
    return read_records(files, PARSERS[task](cfg, split), bad)
