"""train.py's bad input is one line naming it, not a traceback; odd but valid input is a note (issue 7)."""
import pytest

import train
from conftest import train_args


@pytest.mark.parametrize('extra,phrases', [
    (['--model-kwargs', 'dept=4'], ("'deit_tiny_patch16_224' cannot be built", 'model_kwargs')),
    (['--mask-cell', '16'], ('--mask-cell 16 covers', 'whole 16-px image')),
    (['--img-size', '18', '--mask-cell', '4'], ('image size 18 px is not a multiple', '4-px tokens')),
    (['--batch-size', '64'], ('has 36 images', 'one batch of 64')),
    (['--num-classes', '2'], ('--num-classes 2', 'labels up to 2 (3 classes)')),
    (['--sched', 'wsd'], ('--sched wsd', 'decay_epochs')),   # 90 decay epochs in 1
])
def test_bad_input_is_one_line_naming_it(data_dir, tmp_path, extra, phrases):
    with pytest.raises(SystemExit) as err:
        train.main(train_args(data_dir, tmp_path, 'bad', 'mixpro', 1, *extra))
    assert all(phrase in str(err.value) for phrase in phrases), str(err.value)


@pytest.mark.slow
def test_an_image_size_off_the_token_grid_is_a_note_not_a_refusal(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'off_grid', 'mixup_cutmix', 1, '--img-size', '18'))
    out = capsys.readouterr().out
    assert 'note: image size 18 px' in out and '4-px patches' in out and 'the last 2 px' in out


@pytest.mark.slow
def test_an_lr_below_min_lr_is_pointed_out(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'low', 'mixup_cutmix', 1, '--lr', '1e-6', '--min-lr', '1e-5'))
    out = capsys.readouterr().out
    assert 'lr 1.000e-06 is below --min-lr' in out and '1.000e-05' in out
    train.main(train_args(data_dir, tmp_path, 'fine', 'mixup_cutmix', 1))
    assert 'is below --min-lr' not in capsys.readouterr().out
