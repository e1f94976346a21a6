"""Turn a folder of talking-head videos into a training-ready dataset in the clip format.

``python -m aniportrait.data.prepare input=DIR output=ROOT [key=value ...]`` (options: PrepareConfig).
Per source video: probe, decode (decord), track the face, cut into clips at scene cuts, face loss and a
maximum length, fit one fixed square crop per clip, resample to a constant frame rate, landmark every
frame in the crop, cut the audio to 16 kHz mono, write ``clips/<id>/`` atomically. Then a manifest with
train/val/test splits by identity and a QC report. Resumable and parallel; see pipeline.py.
"""

from aniportrait.data.prepare.config import PrepareConfig, parse_overrides
from aniportrait.data.prepare.pipeline import PrepareResult, find_sources, prepare_dataset, process_source
from aniportrait.data.prepare.splits import assign_splits, identity_of, read_split_file

__all__ = [
    "PrepareConfig",
    "PrepareResult",
    "parse_overrides",
    "prepare_dataset",
    "process_source",
    "find_sources",
    "assign_splits",
    "identity_of",
    "read_split_file",
]
