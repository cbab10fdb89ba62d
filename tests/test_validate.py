"""validate.py on a train.py checkpoint: its precision, and bad options as one line (issue 7)."""
import math

import pytest

import train
import validate
from conftest import load_state, train_args

pytestmark = pytest.mark.slow   # subprocesses or several training runs: seconds each


def test_validate_uses_the_checkpoint_precision_unless_told(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'bf16', 'maskmix', 1, '--amp', '--amp-dtype', 'bfloat16'))
    path = tmp_path / 'bf16' / 'last.pth.tar'
    state = load_state(path)
    capsys.readouterr()
    own = validate.main(['--checkpoint', str(path), '--workers', '0', '--device', 'cpu'])[0]
    out = capsys.readouterr().out
    assert 'precision: bfloat16 autocast' in out and 'from the checkpoint' in out
    assert own['precision'] == 'bfloat16' and own['loss'] == pytest.approx(state['eval_metrics']['eval']['loss'])
    fp32 = validate.main(['--checkpoint', str(path), '--workers', '0', '--device', 'cpu', '--no-amp'])[0]
    assert 'precision: float32 (as asked)' in capsys.readouterr().out and fp32['precision'] == 'float32'
    train.main(train_args(data_dir, tmp_path, 'fp32', 'maskmix', 1))
    fp16 = validate.main(['--checkpoint', str(tmp_path / 'fp32' / 'last.pth.tar'), '--workers', '0', '--device', 'cpu',
                          '--amp-dtype', 'float16'])[0]                # a dtype alone asks for autocast
    assert 'precision: float16 autocast (as asked)' in capsys.readouterr().out and fp16['precision'] == 'float16'
    with pytest.raises(SystemExit, match='--model-kwargs with .*its own model'):
        validate.main(['--checkpoint', str(path), '--workers', '0', '--model-kwargs', 'depth=3'])


def test_validate_with_another_model_or_a_bad_results_file_is_one_line(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1))
    path = str(tmp_path / 'run' / 'last.pth.tar')
    with pytest.raises(SystemExit, match="does not fit model 'resnet18'"):
        validate.main(['--checkpoint', path, '--workers', '0', '--model', 'resnet18'])
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit, match='--results-file .*create its folder'):
        validate.main(['--checkpoint', path, '--workers', '0', '--results-file', str(tmp_path / 'file' / 'x.json')])
    assert math.isfinite(load_state(path)['metric'])
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'four.txt').write_text('class0\nclass1\nclass2\nclass3\n')
    for extra, message in ((['--results-file', str(tmp_path / 'folder')], 'is a folder: name a .json or .csv file'),
                           (['--class-map', str(tmp_path / 'four.txt')], 'names 4 classes.*3 outputs'),
                           (['--occlusion', '0.9'], '--occlusion 0.9 drops none.*16x16'),
                           (['--crop-pct', '0'], r'--crop-pct must be in \(0, 1\]')):
        with pytest.raises(SystemExit, match=message):   # each before anything is evaluated
            validate.main(['--checkpoint', path, '--workers', '0', *extra])
