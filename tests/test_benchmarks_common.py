"""benchmarks/_common.py: the flags, checks, timing rounds and ratio rows every benchmark script shares."""
import argparse
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / 'benchmarks' / '_common.py'
_spec = importlib.util.spec_from_file_location('benchmarks_common', _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='bench')
    common.add_model_args(parser, members=[2, 4])
    common.add_timing_args(parser)
    return parser


def test_ratio_row_takes_the_median_of_round_ratios_and_the_ratio_of_minima():
    # per round 2/(2*1), 4/(2*2), 9/(2*3) = 1, 1, 1.5; minima 2 / (2 * 1)
    assert common.ratio_row('a', [2, 4, 9], [1, 2, 3], scale=2) == '| a | 1.000 | 1.000 |'
    # two denominators add up round by round (3/2, 6/3) and minimum by minimum (3 / (1 + 1))
    assert common.ratio_row('b', [3, 6], [1, 2], [1, 1]) == '| b | 1.750 | 1.500 |'


def test_run_rounds_warms_up_each_configuration_then_interleaves_the_rounds():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b')}
    times = common.run_rounds(steps, rounds=3, warmup=2, before={'b': lambda: calls.append('before b')})
    assert calls == ['a', 'a', 'before b', 'b', 'before b', 'b'] + ['a', 'before b', 'b'] * 3
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}


def test_common_flags_keep_their_defaults():
    args = _parser().parse_args([])
    assert (args.base, args.img_size, args.batch_size, args.members) == ('resnet18', 32, 64, [2, 4])
    assert (args.rounds, args.warmup, args.device, args.threads) == (7, 2, 'cpu', None)


@pytest.mark.parametrize('argv, message', [
    (['--members', '2', '1'], '--members: an ensemble needs at least 2 members.'),
    (['--rounds', '0'], '--rounds must be >= 1 and --warmup >= 0.'),
    (['--batch-size', '0'], '--batch-size and --img-size must be >= 1.'),
    (['--threads', '0'], "--threads must be >= 1 (leave it out for torch's default)."),
])
def test_check_args_refuses_bad_values_in_one_line(argv, message, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        common.check_args(parser, parser.parse_args(argv))
    assert capsys.readouterr().err.splitlines()[-1] == f'bench: error: {message}'
