"""Data for the training job: text corpora, the line retrieval task, batch sampling.

Every source yields the same example dict, so the training loop does not care which one
it reads (``seq_len`` tokens)::

    input_ids   LongTensor[seq_len]
    labels      LongTensor[seq_len]   labels[t] = token to predict at position t
                                      (input_ids shifted left by one); IGNORE_INDEX = -100
                                      where there is no loss
    answer_span (start, end)          positions of the answer in input_ids, end exclusive;
                                      (0, 0) when the example has no answer
"""

from ..model import IGNORE_INDEX
from .retrieval import (
    DEFAULT_DIGITS,
    RETRIEVAL_FORMATS,
    RetrievalDataset,
    RetrievalFormat,
    retrieval_accuracy,
    retrieval_eval_grid,
)
from .sampling import collate, sample_indices
from .text import ByteTokenizer, PackedTextDataset, text_files

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "RetrievalFormat",
    "RETRIEVAL_FORMATS",
    "DEFAULT_DIGITS",
    "RetrievalDataset",
    "retrieval_eval_grid",
    "retrieval_accuracy",
    "PackedTextDataset",
    "text_files",
    "sample_indices",
    "collate",
]
