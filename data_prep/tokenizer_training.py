"""train-tokenizer: a SentencePiece model trained on a streamed corpus.

The model round-trips any UTF-8 text exactly: byte fallback covers characters
outside the vocabulary, and the identity normalizer keeps whitespace and
Unicode forms as written. Special ids are fixed (unk 0, bos 1, eos 2, pad 3),
so `prepare` can always add BOS/EOS.
"""
import os
import pathlib
from typing import Iterator

from data_prep.readers import open_corpus

MODEL_TYPES = ('bpe', 'unigram')
SPECIAL_IDS = {'unk_id': 0, 'bos_id': 1, 'eos_id': 2, 'pad_id': 3}
# SentencePiece trains on "sentences" and silently drops ones over max_sentence_length bytes;
# lines cut to this many characters (at most 4 bytes each) always fit.
_MAX_LINE_CHARS = 4096


def train_tokenizer(inputs, output_prefix, *, model_type: str = 'bpe', vocab_size: int = 32000,
                    max_documents: int | None = None, input_sentence_size: int = 1_000_000,
                    character_coverage: float = 0.9995, num_threads: int | None = None,
                    overwrite: bool = False, **read_options) -> dict:
  """Writes `<output_prefix>.model` and `.vocab`; read_options as for `readers.open_corpus`.

  Each non-blank line of each document is one training sentence; SentencePiece keeps a
  random sample of `input_sentence_size` of them, so memory stays bounded.
  """
  import sentencepiece
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r} is not one of {MODEL_TYPES}')
  paths = {ext: pathlib.Path(f'{output_prefix}.{ext}') for ext in ('model', 'vocab')}
  for path in paths.values():
    if path.exists() and not overwrite:
      raise FileExistsError(f'{path} exists: pass --overwrite to replace it')
  corpus = open_corpus(inputs, **read_options)
  stats = {'documents': 0, 'sentences': 0}
  staging = pathlib.Path(f'{output_prefix}.tmp-{os.getpid()}')
  staged = {ext: pathlib.Path(f'{staging}.{ext}') for ext in paths}
  staging.parent.mkdir(parents=True, exist_ok=True)
  try:
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=_sentences(corpus.documents, max_documents, stats),
          model_prefix=str(staging), model_type=model_type, vocab_size=vocab_size,
          character_coverage=character_coverage, byte_fallback=True,
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
          max_sentence_length=4 * _MAX_LINE_CHARS, num_threads=num_threads or os.cpu_count() or 1,
          minloglevel=2, **SPECIAL_IDS)
    except RuntimeError as error:
      if not stats['sentences']:
        raise ValueError(f'empty dataset: {", ".join(corpus.source["inputs"])} gave no non-empty line') from None
      raise ValueError(f'SentencePiece training failed: {" ".join(str(error).split())}') from None
    for ext, path in paths.items():  # written next to the destination, moved in only when complete
      staged[ext].replace(path)
  finally:
    for path in staged.values():
      path.unlink(missing_ok=True)
  return {'model': str(paths['model']), 'vocab': str(paths['vocab']), **stats}


def _sentences(documents: Iterator[str], max_documents: int | None, stats: dict) -> Iterator[str]:
  for text in documents:
    if max_documents is not None and stats['documents'] >= max_documents:
      return
    stats['documents'] += 1
    for line in text.splitlines():
      if line.strip():
        stats['sentences'] += 1
        yield line[:_MAX_LINE_CHARS]
