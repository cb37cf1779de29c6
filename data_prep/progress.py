"""A progress bar on stderr: documents/s, tokens/s and, when the total is known, an ETA.

The bar counts tokens against --max_tokens when there is one (that is when the
run ends), otherwise documents against the reader's count. It shows only on a
terminal, so logs and error output stay clean, and is silent without tqdm.
"""
import sys
import time


class Progress:

  def __init__(self, total_documents: int | None, max_tokens: int | None, enabled: bool = True):
    self.documents = self.tokens = 0
    self._start = time.monotonic()
    self._by_tokens = bool(max_tokens)
    self._bar = None
    if not enabled:
      return
    try:
      from tqdm import tqdm
    except ImportError:
      return
    total, unit = (max_tokens, 'tok') if self._by_tokens else (total_documents, 'doc')
    self._bar = tqdm(total=total, unit=unit, unit_scale=self._by_tokens, file=sys.stderr, disable=None,
                     dynamic_ncols=True, smoothing=0.1)
    self._format = tqdm.format_sizeof

  def update(self, documents: int, tokens: int):
    self.documents += documents
    self.tokens += tokens
    if self._bar is None:
      return
    elapsed = max(time.monotonic() - self._start, 1e-9)
    other = (f'{self._format(self.documents / elapsed)}doc/s' if self._by_tokens
             else f'{self._format(self.tokens / elapsed)}tok/s')
    self._bar.set_postfix_str(other, refresh=False)
    self._bar.update(tokens if self._by_tokens else documents)

  def close(self):
    if self._bar is not None:
      self._bar.close()
