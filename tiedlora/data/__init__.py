"""Data side of the fine-tuning recipe.

- :mod:`tiedlora.data.tokenizers` -- one small ``Tokenizer`` interface over SentencePiece
  and Hugging Face tokenizers, plus deterministic SentencePiece training.
- :mod:`tiedlora.data.sft` -- NeMo's SFT JSONL format (``{"input": ..., "output": ...}``
  a line), prompt templates, answer-only-loss tokenisation, padding/collation and the
  global/micro/data-parallel batch scheme with a resumable sampler.
- :mod:`tiedlora.data.mini_tasks` -- the embedded CPU default: a tiny generated world,
  its pretraining text and miniature versions of the paper's five tasks.
"""
from tiedlora.data.sft import (
    DataError,
    MicroBatchSampler,
    PromptTemplate,
    SFTDataset,
    collate,
    num_micro_batches,
    read_jsonl,
)
from tiedlora.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "DataError",
    "HFTokenizer",
    "MicroBatchSampler",
    "PromptTemplate",
    "SFTDataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "collate",
    "num_micro_batches",
    "read_jsonl",
    "train_sentencepiece",
]
