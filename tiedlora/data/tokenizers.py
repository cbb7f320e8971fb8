"""Tokenizers: one small interface over SentencePiece and Hugging Face.

The recipe only needs five things from a tokenizer::

    encode(text) -> list[int]     # no BOS/EOS added; the dataset adds them explicitly
    decode(ids)  -> str           # special/control tokens are dropped
    vocab_size, eos_id, bos_id (None when the model has none), pad_id

``pad_id`` falls back to ``eos_id`` when the tokenizer defines no pad token (LLaMA-2,
GPT-2B-001): padded positions always carry ``loss_mask == 0`` and sit after the real
tokens (right padding under a causal mask), so the id only has to be a valid row of
the embedding table.

Megatron pads the embedding table to a multiple of 128 rows, so a model can emit ids
``>= vocab_size``; ``decode`` drops them instead of failing.

``train_sentencepiece`` builds the tokenizer of the tiny embedded CPU base model. It is
deterministic: one thread, every input sentence used in order (no sampling, no
shuffling), fixed special ids ``pad=0, unk=1, bos=2, eos=3``, byte fallback (no text is
ever mapped to ``<unk>``) and split digits (each digit is one token, which helps
arithmetic). The same texts and options give a byte-identical ``.model`` file.
"""
from __future__ import annotations

import abc
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from tiedlora.files import atomic_write_bytes

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "train_sentencepiece",
    "TOKENIZER_KINDS",
]

TOKENIZER_KINDS = ("sentencepiece", "huggingface")

# Special ids written into every model trained by ``train_sentencepiece``.
SPM_PAD_ID, SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID = 0, 1, 2, 3


class Tokenizer(abc.ABC):
    """What the data pipeline and the generation loop need from a tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens and ids outside the vocabulary are dropped."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (GPT-2B-001, LLaMA-2, the tiny CPU base)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {self.model_file}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {self.model_file} defines no EOS token (eos_id=-1); "
                "the SFT data appends EOS to every answer"
            )

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        i = self._sp.bos_id()
        return None if i < 0 else i

    @property
    def pad_id(self) -> int:
        i = self._sp.pad_id()
        return self.eos_id if i < 0 else i

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (``AutoTokenizer.from_pretrained``); needs ``transformers``."""

    def __init__(self, name_or_path: str | os.PathLike, **kwargs):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - exercised by a monkeypatched test
            from tiedlora.errors import MissingPackageError

            raise MissingPackageError(
                f"HFTokenizer({str(name_or_path)!r}) needs the 'transformers' package, "
                "which is not installed; install it with `pip install 'tiedlora[hf]'` "
                "or use tokenizer kind 'sentencepiece' with a .model file"
            ) from e
        self.name_or_path = str(name_or_path)
        self._tok = AutoTokenizer.from_pretrained(self.name_or_path, **kwargs)
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"Hugging Face tokenizer {self.name_or_path!r} defines no EOS token; "
                "the SFT data appends EOS to every answer"
            )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        i = self._tok.bos_token_id
        return None if i is None else int(i)

    @property
    def pad_id(self) -> int:
        i = self._tok.pad_token_id
        return self.eos_id if i is None else int(i)


def build_tokenizer(kind: str, path: str | os.PathLike) -> Tokenizer:
    """``kind`` is ``"sentencepiece"`` (``path`` = a ``.model`` file) or ``"huggingface"``
    (``path`` = a local folder or a hub name)."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "huggingface":
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {list(TOKENIZER_KINDS)}")


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on ``texts`` and write ``<model_prefix>.model``
    (and a human-readable ``<model_prefix>.vocab``), atomically.

    ``model_type`` is ``"bpe"`` or ``"unigram"``. ``vocab_size`` counts everything: the
    4 special tokens and the 256 byte-fallback pieces included, so it must exceed 260.
    Same ``texts`` and arguments -> byte-identical ``.model`` file.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}; expected 'bpe' or 'unigram'")
    n_reserved = 4 + 256  # pad/unk/bos/eos + byte fallback pieces
    if vocab_size <= n_reserved:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: 4 special tokens "
            f"and 256 byte-fallback pieces already take {n_reserved}"
        )
    lines = [t for t in texts if t.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            pad_id=SPM_PAD_ID,
            unk_id=SPM_UNK_ID,
            bos_id=SPM_BOS_ID,
            eos_id=SPM_EOS_ID,
            # Determinism: one thread, every sentence, in the given order.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size} on {len(lines)} lines "
            "(vocab_size must hold the 4 special tokens, the 256 bytes and every distinct "
            f"character of the text, and the text must be rich enough to fill it): {e}"
        ) from e

    model_path = prefix.with_name(prefix.name + ".model")
    atomic_write_bytes(model_path, buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write_bytes(prefix.with_name(prefix.name + ".vocab"), vocab.encode("utf-8"))
    return SentencePieceTokenizer(model_path)
