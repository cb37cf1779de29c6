"""benchmarks/rounds.py: the median round and the paired ratios of train_step.py --rounds."""
from benchmarks.rounds import median_round, paired_ratios


def side(seconds):
  return {'seconds_per_step': seconds}


def test_the_median_round_is_a_real_round_and_an_error_wins():
  assert median_round([side(3.0), side(1.0), side(2.0)]) == side(2.0)
  assert median_round([side(4.0), side(1.0), side(3.0), side(2.0)]) == side(2.0)  # the lower
  failed = {'error': 'took more than 75 s'}
  assert median_round([side(1.0), failed, side(2.0)]) is failed


def test_ratios_pair_each_round_with_the_peer_beside_it():
  # The machine slowed down 2x in round two; paired, the ratio does not move.
  ours, peers = [side(1.0), side(2.0), side(0.5)], [side(1.5), side(3.0), side(0.5)]
  assert paired_ratios(ours, peers) == [1.5, 1.5, 1.0]
  assert paired_ratios([side(1.0), {'error': 'x'}], [side(2.0), side(2.0)]) == [2.0]
