"""One record (a mapping of column -> value) to one document's text.

Structured inputs (JSON, Parquet, HF, TFDS) share this, so a missing column or
a bad template reads the same whatever the format.
"""
import string


class RecordFormatter:
  """Picks `text_column`, or renders `template` ("{title}\\n\\n{text}") over named columns."""

  def __init__(self, text_column: str = 'text', template: str | None = None, errors: str = 'strict'):
    self.text_column, self.template, self.errors = text_column, template, errors
    if template is None:
      self.columns = (text_column,)
    else:
      self.columns = _template_fields(template)

  def check_columns(self, available, source):
    """Raises naming the first column `source` lacks; `available` is its column names."""
    available = list(available)
    for column in self.columns:
      if column not in available:
        raise ValueError(f'column {column!r} is not in {source} (it has: {", ".join(map(str, available))})')

  def __call__(self, record, source) -> str:
    if self.template is None:
      return self._text(record, self.text_column, source)
    return self.template.format_map({c: self._text(record, c, source) for c in self.columns})

  def _text(self, record, column, source) -> str:
    try:
      value = record[column]
    except KeyError:
      self.check_columns(record.keys(), source)
      raise
    if value is None:
      return ''  # a null text is an empty document: skipped and counted, not fatal
    if isinstance(value, bytes):  # TFDS Text features come back as bytes
      return decode_utf8(value, source, 0, self.errors)
    return value if isinstance(value, str) else str(value)


def _template_fields(template: str) -> tuple[str, ...]:
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as error:
    raise ValueError(f'template {template!r} is malformed: {error}') from None
  fields = []
  for _, field, _, _ in parsed:
    if field is None:
      continue
    # '{0}', '{meta[title]}' or '{x.y}' would index into a value; only column names are supported.
    if not field or field.isdigit() or any(c in field for c in '.[]'):
      raise ValueError(f'template field {{{field}}} must be a column name')
    if field not in fields:
      fields.append(field)
  if not fields:
    raise ValueError(f'template {template!r} names no column')
  return tuple(fields)


def decode_utf8(data: bytes, source, offset: int, errors: str) -> str:
  """UTF-8 text of `data`, which starts at byte `offset` of `source`; a one-line error when invalid."""
  try:
    return data.decode('utf-8', errors=errors)
  except UnicodeDecodeError as error:
    raise ValueError(f'{source}: invalid UTF-8 at byte {offset + error.start} '
                     '(pass --errors replace to substitute U+FFFD)') from None
