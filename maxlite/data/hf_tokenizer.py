"""Hugging Face tokenizer files for maxlite's tokenizers, written beside an exported model.

byte           an exact tokenizer.json (needs the `tokenizers` package)
sentencepiece  tokenizer.model for HF's LlamaTokenizer (BPE models only)
hf             the tokenizer.json itself
"""
import json
import pathlib
import shutil

from maxlite.data import tokenizers

# Special tokens of the byte tokenizer's tokenizer.json, in id order from 256.
BYTE_SPECIALS = ('<pad>', '<s>', '</s>')


def _byte_to_char() -> dict[int, str]:
  """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest
  are shifted to code points from 256 so that every byte is a visible character."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  chars, shifted = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + shifted)
      shifted += 1
  return chars


def byte_tokenizer_json(add_bos: bool = True) -> str | None:
  """maxlite's ByteTokenizer as an HF tokenizer.json (None without `tokenizers`).

  A BPE with no merges over the 256 byte-level characters gives id = byte; no
  regex split, so nothing but the bytes decides the ids. Encoding with special
  tokens prepends BOS when the training documents began with it (add_bos).
  """
  try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  except ImportError:
    return None
  chars = _byte_to_char()
  tokenizer = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(list(BYTE_SPECIALS))
  byte = tokenizers.ByteTokenizer
  assert [tokenizer.token_to_id(t) for t in BYTE_SPECIALS] == [byte.pad_id, byte.bos_id, byte.eos_id]
  if add_bos:
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', byte.bos_id)])
  return tokenizer.to_str()


def write_files(tokenizer, folder: pathlib.Path, max_seq_len: int, add_bos: bool = True) -> str | None:
  """Writes HF tokenizer files for a maxlite tokenizer; returns why none were written, if so.

  add_bos: whether the training documents began with BOS, so that HF encodes
  as the model was trained (an HF tokenizer.json is copied as it is).
  """
  common = {'model_max_length': max_seq_len, 'clean_up_tokenization_spaces': False}
  if tokenizer.kind == 'byte':
    text = byte_tokenizer_json(add_bos)
    if text is None:
      return 'the byte tokenizer needs the `tokenizers` package for its tokenizer.json'
    (folder / 'tokenizer.json').write_text(text)
    specials = dict(zip(('pad_token', 'bos_token', 'eos_token'), BYTE_SPECIALS))
    # Text that happens to spell '<s>' stays bytes, as in maxlite's encoder.
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **specials, 'split_special_tokens': True}
  elif tokenizer.kind == 'sentencepiece':
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.path.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
      # HF's LlamaTokenizer rebuilds a BPE from tokenizer.model: other kinds would get wrong ids.
      return 'HF has no Llama tokenizer for a non-BPE SentencePiece model'
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path))
    shutil.copyfile(tokenizer.path, folder / 'tokenizer.model')
    specials = {f'{name}_token': sp.id_to_piece(i) for name, i in
                (('unk', sp.unk_id()), ('bos', sp.bos_id()), ('eos', sp.eos_id()), ('pad', sp.pad_id()))
                if i >= 0}
    # legacy: a '▁' before every text, as SentencePiece's add_dummy_prefix does.
    config = {'tokenizer_class': 'LlamaTokenizer', **specials, 'add_bos_token': add_bos,
              'add_eos_token': False, 'legacy': True}
  else:
    shutil.copyfile(tokenizer.path, folder / 'tokenizer.json')
    specials = {f'{name}_token': token for name in ('bos', 'eos', 'pad')
                if (token := getattr(tokenizer, f'{name}_token', None))}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **specials}
  (folder / 'tokenizer_config.json').write_text(json.dumps({**config, **common}, indent=2) + '\n')
  (folder / 'special_tokens_map.json').write_text(json.dumps(specials, indent=2) + '\n')
  return None
