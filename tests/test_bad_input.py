"""train.py's bad input is one line naming it, not a traceback; odd but valid input is a note (issue 7)."""
import pytest

import train
from conftest import train_args


@pytest.mark.parametrize('extra,message', [
    (['--model-kwargs', 'dept=4'], "model 'deit_tiny_patch16_224' cannot be built with model_kwargs"),
    (['--mask-cell', '16'], '--mask-cell 16 covers the whole 16-px image'),
    (['--img-size', '18', '--mask-cell', '4'], 'image size 18 px is not a multiple of the 4-px tokens'),
    (['--batch-size', '64'], 'has 36 images, fewer than one batch of 64'),
    (['--num-classes', '2'], '--num-classes 2: the training data has labels up to 2 (3 classes)'),
    (['--sched', 'wsd'], '--sched wsd: wsd schedule requires 0 < decay_epochs'),   # 90 decay epochs in 1
])
def test_bad_input_is_one_line_naming_it(data_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message.replace('(', r'\(').replace(')', r'\)')):
        train.main(train_args(data_dir, tmp_path, 'bad', 'mixpro', 1, *extra))


def test_an_image_size_off_the_token_grid_is_pointed_out_where_it_is_not_refused(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'off_grid', 'mixup_cutmix', 1, '--img-size', '18'))
    assert "note: image size 18 px is not a multiple of the model's 4-px patches: the last 2 px" in \
        capsys.readouterr().out


def test_an_lr_below_min_lr_is_pointed_out(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'low', 'mixup_cutmix', 1, '--lr', '1e-6', '--min-lr', '1e-5'))
    assert 'note: lr 1.000e-06 is below --min-lr 1.000e-05' in capsys.readouterr().out
    train.main(train_args(data_dir, tmp_path, 'fine', 'mixup_cutmix', 1))
    assert 'is below --min-lr' not in capsys.readouterr().out
