"""Tokenizers. The byte tokenizer needs no file: ids 0-255 are bytes, specials follow."""
import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as ids; vocab padded to 264 (a multiple of 8) for even sharding."""
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 264

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')
