"""python -m data_prep {prepare,train-tokenizer,inspect} ...: flags, dispatch, one-line errors."""
import argparse
import os
import sys

from data_prep.readers import ERRORS, FORMATS, SPLIT_BY
from maxlite.data.tokenizers import TOKENIZER_KINDS

# Subcommands are imported when run: spawned tokenizer workers re-import this module.
_SUFFIXES = {'k': 10**3, 'm': 10**6, 'b': 10**9, 'g': 10**9, 't': 10**12}


def count(value: str) -> int:
  """An integer, optionally with a K/M/B/T suffix: '500M' -> 500_000_000."""
  text = value.strip().lower().replace('_', '')
  scale = _SUFFIXES.get(text[-1:], 1)
  try:
    return int(float(text[:-1] if scale > 1 else text) * scale)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{value!r} is not a count like 1000, 20K or 500M') from None


def _flag_pair(parser, name: str, help: str):
  """--NAME / --no_NAME, default on (argparse's BooleanOptionalAction would spell it --no-NAME)."""
  parser.add_argument(f'--{name}', dest=name, action='store_true', default=True, help=f'{help} (default)')
  parser.add_argument(f'--no_{name}', dest=name, action='store_false', help=f'do not {help[0].lower()}{help[1:]}')


def _add_reader_arguments(parser):
  group = parser.add_argument_group('input')
  group.add_argument('--input', nargs='+', required=True, metavar='PATH',
                     help='files, globs or folders (recursive, sorted, hidden files skipped); '
                          'a folder for hf/hf_disk; a dataset name for tfds')
  group.add_argument('--format', default='auto', choices=FORMATS + ('nanogpt_bin',),
                     help='auto: by extension (.jsonl/.json/.parquet, otherwise text; a saved '
                          'HF dataset folder is hf_disk); nanogpt_bin: pre-tokenized .bin files '
                          'of nanoGPT, modded-nanogpt or NeMo (prepare only)')
  group.add_argument('--split_by', default='file', choices=SPLIT_BY,
                     help='text inputs: one document per file, per non-blank line, or per '
                          'blank-line separated paragraph')
  group.add_argument('--text_column', default='text', help='field holding the text (structured inputs)')
  group.add_argument('--template', default=None,
                     help=r'builds each document from several columns, e.g. "{title}\n\n{text}" '
                          r'(\n and \t are unescaped)')
  group.add_argument('--split', default='train', help='split of an hf, hf_disk or tfds dataset')
  group.add_argument('--hf_builder', default=None,
                     help='`datasets` builder for --format hf data files (json, csv, parquet, text, '
                          'arrow); inferred from the extension when omitted')
  group.add_argument('--tfds_data_dir', default=None, help='folder holding the prepared TFDS dataset')
  group.add_argument('--errors', default='strict', choices=ERRORS,
                     help='invalid UTF-8: stop with an error naming the file, or replace with U+FFFD')


def _read_options(args) -> dict:
  template = args.template
  if template is not None:
    template = template.replace('\\n', '\n').replace('\\t', '\t')
  return dict(format=args.format, split_by=args.split_by, text_column=args.text_column,
              template=template, split=args.split, hf_builder=args.hf_builder,
              tfds_data_dir=args.tfds_data_dir, errors=args.errors)


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m data_prep',
      description='Tokenize corpora into ArrayRecord shards, train SentencePiece tokenizers, '
                  'inspect prepared datasets. `SUBCOMMAND --help` for each one\'s flags.')
  commands = parser.add_subparsers(dest='command', required=True)

  prep = commands.add_parser(
      'prepare', help='tokenize a corpus into ArrayRecord shards + metadata.json',
      description='Tokenizes documents into <output>/{train,validation}-NNNNN.array_record (one record '
                  'per document) and metadata.json. Validation gets the first --val_documents documents, '
                  'or else each document whose text hashes below --val_fraction (duplicates stay '
                  'together); if that picks none and there are 2+ documents, the last one. Empty '
                  'documents are skipped and counted. The output is the same for any --workers.')
  _add_reader_arguments(prep)
  group = prep.add_argument_group('tokenizer')
  group.add_argument('--tokenizer', default='byte', choices=TOKENIZER_KINDS,
                     help='byte: UTF-8 bytes, no file (default)')
  group.add_argument('--tokenizer_file', default=None,
                     help='SentencePiece .model or HF tokenizer.json; copied into the output')
  group.add_argument('--bos_token', default='', help='hf: BOS token name (default: a known spelling)')
  group.add_argument('--eos_token', default='', help='hf: EOS token name (default: a known spelling)')
  group.add_argument('--vocab_size', type=int, default=None,
                     help='nanogpt_bin without --tokenizer_file: the ids\' vocabulary size')
  group.add_argument('--eot_id', type=int, default=None,
                     help='nanogpt_bin: the id that separates documents (default: the tokenizer\'s '
                          'EOS for nanoGPT files, BOS for the others; 50256 without a tokenizer)')
  _flag_pair(group, 'add_bos', 'Prepend BOS to each document')
  _flag_pair(group, 'add_eos', 'Append EOS to each document')
  group = prep.add_argument_group('output')
  group.add_argument('--output', required=True, help='dataset folder to create')
  group.add_argument('--overwrite', action='store_true',
                     help='replace an existing dataset folder (swapped in only once the new one is complete)')
  held_out = group.add_mutually_exclusive_group()
  held_out.add_argument('--val_fraction', type=float, default=None,
                        help='fraction of documents held out, chosen by a hash of their text (default 0.005)')
  held_out.add_argument('--val_documents', type=count, default=None,
                        help='hold out the first N documents instead')
  group.add_argument('--max_tokens', type=count, default=None,
                     help='stop once this many tokens are written (e.g. 500M); the last document is whole')
  group.add_argument('--docs_per_shard', type=count, default=100_000, help='records per shard file (default 100K)')
  group.add_argument('--workers', type=int, default=os.cpu_count(),
                     help='tokenizer processes (default: all cores)')
  prep.set_defaults(run=_prepare)

  train = commands.add_parser(
      'train-tokenizer', help='train a SentencePiece model on a corpus',
      description='Trains a SentencePiece model (byte fallback, identity normalization: exact round '
                  'trip of any UTF-8; unk=0 bos=1 eos=2 pad=3) on the non-blank lines of the documents.')
  _add_reader_arguments(train)
  group = train.add_argument_group('model')
  group.add_argument('--output', required=True, metavar='PREFIX', help='writes PREFIX.model and PREFIX.vocab')
  group.add_argument('--model_type', default='bpe', choices=('bpe', 'unigram'), help='default bpe')
  group.add_argument('--vocab_size', type=count, default=32000,
                     help='pieces, including 256 bytes and 4 specials (default 32K)')
  group.add_argument('--character_coverage', type=float, default=0.9995,
                     help='share of characters given their own piece; the rest fall back to bytes')
  group.add_argument('--max_documents', type=count, default=None, help='read at most this many documents')
  group.add_argument('--input_sentence_size', type=count, default=1_000_000,
                     help='lines SentencePiece samples (uniformly) to train on (default 1M)')
  group.add_argument('--overwrite', action='store_true', help='replace existing PREFIX.model/.vocab')
  train.set_defaults(run=_train_tokenizer)

  show = commands.add_parser('inspect', help='print a dataset\'s metadata and decode a few documents',
                             description='Prints metadata.json readably and decodes documents back to text.')
  show.add_argument('dataset', help='folder written by prepare')
  show.add_argument('--split', default='train', help='train or validation (default train)')
  show.add_argument('--num_documents', type=int, default=3, help='documents to decode (default 3)')
  show.add_argument('--max_chars', type=int, default=500, help='truncate each decoded document (default 500)')
  show.set_defaults(run=_inspect)
  return parser


def _prepare(args):
  if args.format == 'nanogpt_bin':
    meta = _prepare_bin(args)
  else:
    meta = _prepare_text(args)
  splits = meta['splits']
  print(f'wrote {args.output}: ' + ', '.join(
      f'{name} {s["documents"]:,} documents / {s["tokens"]:,} tokens' for name, s in splits.items()) +
      f'; skipped {meta["skipped"]["empty_documents"]:,} empty')


def _prepare_bin(args):
  from data_prep.nanogpt_bin import prepare_bin
  return prepare_bin(args.input, args.output, tokenizer_file=args.tokenizer_file,
                     vocab_size=args.vocab_size, eot_id=args.eot_id, bos_token=args.bos_token,
                     eos_token=args.eos_token, val_fraction=args.val_fraction,
                     val_documents=args.val_documents, max_tokens=args.max_tokens,
                     docs_per_shard=args.docs_per_shard, overwrite=args.overwrite,
                     command=['python', '-m', 'data_prep', *sys.argv[1:]])


def _prepare_text(args):
  from data_prep.prepare import prepare
  return prepare(args.input, args.output, tokenizer=args.tokenizer, tokenizer_file=args.tokenizer_file,
                 bos_token=args.bos_token, eos_token=args.eos_token, add_bos=args.add_bos,
                 add_eos=args.add_eos, val_fraction=args.val_fraction, val_documents=args.val_documents,
                 max_tokens=args.max_tokens, docs_per_shard=args.docs_per_shard, workers=args.workers,
                 overwrite=args.overwrite, command=['python', '-m', 'data_prep', *sys.argv[1:]],
                 **_read_options(args))


def _train_tokenizer(args):
  from data_prep.tokenizer_training import train_tokenizer
  result = train_tokenizer(args.input, args.output, model_type=args.model_type, vocab_size=args.vocab_size,
                           max_documents=args.max_documents, input_sentence_size=args.input_sentence_size,
                           character_coverage=args.character_coverage, overwrite=args.overwrite,
                           **_read_options(args))
  print(f'wrote {result["model"]} and {result["vocab"]} from {result["documents"]:,} documents '
        f'({result["sentences"]:,} lines)')


def _inspect(args):
  from data_prep.inspect_dataset import describe_dataset
  print(describe_dataset(args.dataset, args.split, args.num_documents, args.max_chars))


def main(argv=None) -> int:
  args = _build_parser().parse_args(argv)
  try:
    args.run(args)
  except (ValueError, OSError) as error:  # user mistakes: one line naming the file or field
    print(f'error: {" ".join(str(error).split())}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('error: interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
