"""Summaries of interleaved benchmark rounds (benchmarks/train_step.py --rounds).

A result is a dict with 'seconds_per_step', or with 'error' where that side failed."""


def median_round(results: list[dict]) -> dict:
  """The round whose seconds per step is the median (the lower one of an even count); the
  first error instead, if any round failed."""
  failed = [r for r in results if 'error' in r]
  if failed:
    return failed[0]
  ordered = sorted(results, key=lambda r: r['seconds_per_step'])
  return ordered[(len(ordered) - 1) // 2]


def paired_ratios(results: list[dict], peers: list[dict]) -> list[float]:
  """Per round: the peer's seconds per step over this side's (> 1: this side is faster);
  rounds where either side failed are left out."""
  return [peer['seconds_per_step'] / result['seconds_per_step']
          for result, peer in zip(results, peers) if 'error' not in result and 'error' not in peer]
