"""Tokenizers: byte-level (no file), SentencePiece model files, HF tokenizer.json.

All three expose the same small surface: `encode(text) -> int32 ids` without
specials, `decode(ids) -> str`, and `vocab_size`, `bos_id`, `eos_id`, `pad_id`.
A prepared dataset records which one it used (`describe()`) and ships the file,
so the trainer and the generator rebuild exactly the same tokenizer.
"""
import hashlib
import json
import pathlib
import shutil

import numpy as np


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class ByteTokenizer:
  """UTF-8 bytes as ids 0-255; specials follow; vocab padded to 264 (a multiple of 8)."""
  kind = 'byte'
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 264
  path = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')

  def describe(self) -> dict:
    return {'kind': self.kind, 'file': None, 'sha256': None, 'vocab_size': self.vocab_size,
            'bos_id': self.bos_id, 'eos_id': self.eos_id, 'pad_id': self.pad_id}


class SentencePieceTokenizer:
  """A SentencePiece `.model` file; its own BOS/EOS/PAD ids (-1 when it has none)."""
  kind = 'sentencepiece'

  def __init__(self, path):
    import sentencepiece
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f'tokenizer file {self.path} does not exist')
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
    except (RuntimeError, OSError) as error:
      raise ValueError(f'tokenizer file {self.path} is not a SentencePiece model: '
                       f'{" ".join(str(error).split())}') from None
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def describe(self) -> dict:
    return {'kind': self.kind, 'file': self.path.name, 'sha256': file_sha256(self.path),
            'vocab_size': self.vocab_size, 'bos_id': self.bos_id, 'eos_id': self.eos_id,
            'pad_id': self.pad_id}


# Special-token spellings tried, in order, when an HF tokenizer.json is given no names.
_HF_BOS = ('<|begin_of_text|>', '<s>', '<|endoftext|>', '<bos>')
_HF_EOS = ('<|end_of_text|>', '</s>', '<|endoftext|>', '<eos>')
_HF_PAD = ('<pad>', '<|pad|>', '[PAD]')


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, through the `tokenizers` package."""
  kind = 'hf'

  def __init__(self, path, bos_token: str = '', eos_token: str = '', pad_token: str = ''):
    try:
      import tokenizers
    except ImportError:
      raise ValueError('an HF tokenizer.json needs the `tokenizers` package: pip install tokenizers') from None
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f'tokenizer file {self.path} does not exist')
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(self.path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f'tokenizer file {self.path} is not an HF tokenizer.json: '
                       f'{" ".join(str(error).split())}') from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_token = self._special(bos_token, _HF_BOS, 'bos_token')
    self.eos_token = self._special(eos_token, _HF_EOS, 'eos_token')
    self.pad_token = self._special(pad_token, _HF_PAD, 'pad_token')
    self.bos_id, self.eos_id, self.pad_id = (
        -1 if t is None else self._tok.token_to_id(t)
        for t in (self.bos_token, self.eos_token, self.pad_token))

  def _special(self, name: str, candidates, field: str):
    if name:
      if self._tok.token_to_id(name) is None:
        raise ValueError(f'{field}={name!r} is not in the vocabulary of {self.path}')
      return name
    return next((c for c in candidates if self._tok.token_to_id(c) is not None), None)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def describe(self) -> dict:
    return {'kind': self.kind, 'file': self.path.name, 'sha256': file_sha256(self.path),
            'vocab_size': self.vocab_size, 'bos_id': self.bos_id, 'eos_id': self.eos_id,
            'pad_id': self.pad_id, 'bos_token': self.bos_token, 'eos_token': self.eos_token,
            'pad_token': self.pad_token}


class IdsTokenizer:
  """Token ids without a tokenizer: a dataset prepared from pre-tokenized ids
  (data_prep --format nanogpt_bin without --tokenizer_file). It trains; text
  in or out (generation, lm-eval, HF export) needs the matching tokenizer."""
  kind = 'ids'
  path = None

  def __init__(self, vocab_size: int, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1):
    self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, bos_id, eos_id, pad_id

  def encode(self, text: str) -> np.ndarray:
    raise ValueError('the data was prepared from token ids without a tokenizer file: there is no '
                     'text tokenizer (prepare it with --tokenizer_file to generate or evaluate)')

  decode = encode

  def describe(self) -> dict:
    return {'kind': self.kind, 'file': None, 'sha256': None, 'vocab_size': self.vocab_size,
            'bos_id': self.bos_id, 'eos_id': self.eos_id, 'pad_id': self.pad_id}


TOKENIZER_KINDS = ('byte', 'sentencepiece', 'hf')


def load_tokenizer(kind: str, path=None, **special_tokens):
  """kind is one of TOKENIZER_KINDS; path is the model file for the file-backed kinds."""
  if kind == 'byte':
    return ByteTokenizer()
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f'tokenizer kind {kind!r} is not one of {TOKENIZER_KINDS}')
  if not path:
    raise ValueError(f'a {kind} tokenizer needs its model file')
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(path)
  return HFTokenizer(path, **special_tokens)


def from_description(description: dict, folder) -> 'ByteTokenizer | SentencePieceTokenizer | HFTokenizer':
  """Rebuilds the tokenizer a dataset recorded, from the file it shipped in `folder`;
  the file's hash must match what was recorded."""
  kind = description['kind']
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'ids':
    return IdsTokenizer(description['vocab_size'], description['bos_id'], description['eos_id'],
                        description['pad_id'])
  path = pathlib.Path(folder) / description['file']
  if not path.is_file():
    raise FileNotFoundError(f'tokenizer file {path}, recorded in {folder}, is missing')
  if file_sha256(path) != description['sha256']:
    raise ValueError(f'tokenizer file {path} does not match the sha256 recorded beside it')
  if kind == 'hf':
    return HFTokenizer(path, description.get('bos_token') or '', description.get('eos_token') or '',
                       description.get('pad_token') or '')
  return load_tokenizer(kind, path)


DESCRIPTION_FILE = 'tokenizer_description.json'
# Beside the tokenizer's own description, a run records what its data added to
# every document (metadata.json's fields of the same names), so that
# generation begins a prompt as training began a document.
DOCUMENT_KEYS = ('add_bos', 'add_eos')


def save_tokenizer(tokenizer, folder, *, add_bos: bool | None = None,
                   add_eos: bool | None = None) -> dict:
  """Writes the tokenizer's description and file into `folder` (a run's tokenizer/),
  with the data's add_bos/add_eos when given."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  description = tokenizer.describe()
  for key, value in zip(DOCUMENT_KEYS, (add_bos, add_eos)):
    if value is not None:
      description[key] = bool(value)
  if tokenizer.path is not None and tokenizer.path.resolve() != (folder / tokenizer.path.name).resolve():
    shutil.copyfile(tokenizer.path, folder / tokenizer.path.name)
  (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + '\n')
  return description


def read_saved_description(folder) -> dict:
  """What `save_tokenizer` wrote into `folder`, as a dict."""
  description_file = pathlib.Path(folder) / DESCRIPTION_FILE
  if not description_file.is_file():
    raise FileNotFoundError(f'{description_file} does not exist')
  try:
    return json.loads(description_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{description_file} is not valid JSON: {error}') from None


def tokenizer_part(description: dict) -> dict:
  """A saved description without the data's DOCUMENT_KEYS: what `describe()` gives."""
  return {k: v for k, v in description.items() if k not in DOCUMENT_KEYS}


def load_saved_tokenizer(folder):
  """The tokenizer `save_tokenizer` wrote into `folder`."""
  return from_description(read_saved_description(folder), folder)


def saved_document_specials(folder) -> tuple[bool, bool]:
  """(add_bos, add_eos): whether the run's training documents began with BOS and
  ended with EOS. Runs saved before this was recorded say nothing; their
  generation prepended BOS, and still does."""
  description = read_saved_description(folder)
  return tuple(bool(description.get(key, True)) for key in DOCUMENT_KEYS)
