"""The GPU check's one table, from the JSON lines its parts wrote (benchmarks/gpu_check.sh).

    python benchmarks/gpu_summary.py RESULTS.jsonl

One row per result: the flash-attention check's worst relative error per
length and document count, each attention backend's time and TFLOP/s, and
each train step's tokens/s, ms/step, MFU (PaLM and causal-halved), peak
memory and step-1 loss, with maxlite's speed over the peer's.
"""
import argparse
import json
import pathlib


def rows(results: list[dict]) -> list[tuple[str, str, str]]:
  """(part, case, result) for every result."""
  out = []
  flash = {}
  for r in (r for r in results if r.get('check') == 'flash'):
    worst = flash.setdefault((r['length'], r['documents']), r)
    if not r['ok'] or r['relative'] > worst['relative']:
      flash[r['length'], r['documents']] = r
  for (length, documents), r in sorted(flash.items()):
    verdict = 'ok' if all(x['ok'] for x in results if x.get('check') == 'flash'
                          and (x['length'], x['documents']) == (length, documents)) else 'FAIL'
    out.append(('flash vs reference', f'T={length} docs={documents}',
                f'{verdict}: worst {r["tensor"]} {r["relative"]:.2e} of max |ref|'
                + (f' ({r["error"]})' if 'error' in r else '')))
  for r in (r for r in results if r.get('check') == 'attention'):
    case = f'{r["backend"]} h{r["head_dim"]} T={r["length"]} docs={r["documents"]} {r["pass"]}'
    value = r['note'] if r['ms'] == '-' else f'{r["ms"]:.2f} ms, {r["tflops"]:.1f} TFLOP/s'
    out.append(('attention', case, value))
  steps = [r for r in results if 'impl' in r]
  peer = next((r for r in steps if r['impl'] == 'torch' and 'error' not in r), None)
  for r in steps:
    case = f'{r["impl"]} {r["attention"]} {r.get("shape", "")}'.strip()
    if 'error' in r:
      out.append(('train step', case, r['error']))
      continue
    mfu = ' / '.join('-' if m is None else f'{100 * m:.1f}%' for m in (r['mfu'], r['mfu_causal']))
    value = (f'{r["tokens_per_second"]:,.0f} tok/s, {1e3 * r["seconds_per_step"]:.1f} ms/step, '
             f'MFU {mfu}, peak {r["peak_bytes"] / 2**30:.1f} GiB, loss {r["first_loss"]:.4f}')
    if peer and r is not peer:
      value += f', x{peer["seconds_per_step"] / r["seconds_per_step"]:.2f} the peer'
    out.append(('train step', case, value))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results', help='the JSON lines that the parts appended')
  path = pathlib.Path(parser.parse_args().results)
  results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  table = rows(results)
  widths = [max([len(row[i]) for row in table] + [len(name)])
            for i, name in enumerate(('part', 'case', 'result'))]
  print(' | '.join(name.ljust(w) for name, w in zip(('part', 'case', 'result'), widths)))
  print('-|-'.join('-' * w for w in widths))
  for row in table:
    print(' | '.join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == '__main__':
  main()
