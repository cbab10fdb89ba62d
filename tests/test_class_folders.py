"""Class folders: val takes train's class index, stray and truncated images, empty and unknown classes,
--class-map (issue 7)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
import validate
from conftest import REPO, load_state, make_image_folder, train_args
from mixpro.data import image_folder


@pytest.fixture
def own_data(tmp_path):
    return make_image_folder(tmp_path / 'data', classes=3, train_per_class=2, val_per_class=2, size=8)


def test_val_takes_the_train_class_index(own_data):
    shutil.rmtree(own_data / 'val' / 'class1')              # a class val does not have
    train_set = image_folder(own_data, 'train', is_training=True)
    val_set = image_folder(own_data, 'val', is_training=False, class_to_idx=train_set.reader.class_to_idx)
    labels = {Path(path).parent.name: label for path, label in val_set.reader.samples}
    assert labels == {'class0': 0, 'class2': 2}            # not shifted to 1


def test_a_stray_image_in_the_split_folder_is_no_class(own_data, capsys):
    shutil.copy(own_data / 'train' / 'class0' / '0.png', own_data / 'train' / 'stray.png')
    train_set = image_folder(own_data, 'train', is_training=True)
    assert train_set.reader.class_to_idx == {'class0': 0, 'class1': 1, 'class2': 2}
    assert len(train_set) == 6
    assert '1 image(s) directly in' in capsys.readouterr().out


@pytest.mark.parametrize('split', ['train', 'val'])
def test_an_empty_class_folder_is_an_error_before_training(own_data, tmp_path, split):
    for image in (own_data / split / 'class1').iterdir():
        image.unlink()
    with pytest.raises(SystemExit, match=f'{split}/class1 holds no images'):
        train.main(train_args(own_data, tmp_path / 'out', 'empty', 'mixpro', 1))
    assert not list((tmp_path / 'out' / 'empty').glob('*.pth.tar'))


def test_a_val_class_unknown_to_train_is_named(own_data, tmp_path):
    shutil.copytree(own_data / 'val' / 'class0', own_data / 'val' / 'class9')
    with pytest.raises(SystemExit, match='do not have: class9'):
        train.main(train_args(own_data, tmp_path / 'out', 'unknown', 'mixpro', 1))


@pytest.mark.slow
def test_class_map_file_sets_labels_and_selects_classes(own_data, tmp_path):
    (own_data / 'classes.txt').write_text('class2\nclass0\n')
    train_set = image_folder(own_data, 'train', is_training=True, class_map=str(own_data / 'classes.txt'))
    assert train_set.reader.class_to_idx == {'class2': 0, 'class0': 1}
    assert sorted({label for _, label in train_set.reader.samples}) == [0, 1] and len(train_set) == 4
    result = train.main([*train_args(own_data, tmp_path / 'out', 'mapped', 'mixup_cutmix', 1, '--batch-size', '2'),
                         '--class-map', str(own_data / 'classes.txt')])
    assert result['eval']['count'] == 4                       # class1's val images are not used
    state = load_state(tmp_path / 'out' / 'mapped' / 'last.pth.tar')
    assert state['num_classes'] == 2 and state['class_to_idx'] == {'class2': 0, 'class0': 1}
    (own_data / 'bad.txt').write_text('class7\n')
    with pytest.raises(SystemExit, match='bad.txt names 1 class') as err:
        train.main([*train_args(own_data, tmp_path / 'out', 'bad', 'mixpro', 1), '--class-map',
                    str(own_data / 'bad.txt')])
    assert '--class-map' in str(err.value) and "'class7'" in str(err.value)


def _truncate(image: Path) -> Path:
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])               # a copy that stopped half way
    return image


def test_a_truncated_image_is_named_in_the_skip_warning(own_data, caplog):
    broken = _truncate(own_data / 'train' / 'class1' / '1.png')
    train_set = image_folder(own_data, 'train', is_training=True)
    for index in range(len(train_set)):
        train_set[index]
    skips = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(skips) == 1 and str(broken) in skips[0] and 'truncated' in skips[0], skips


@pytest.mark.slow
def test_an_unreadable_val_image_is_left_out_of_the_numbers_not_counted_twice(own_data, tmp_path):
    train.main(train_args(own_data, tmp_path / 'out', 'run', 'mixpro', 1, '--batch-size', '2'))
    validate_args = ['--checkpoint', str(tmp_path / 'out' / 'run' / 'last.pth.tar'), '--data-dir', str(own_data),
                     '--workers', '0', '--device', 'cpu', '--batch-size', '4']
    broken = _truncate(own_data / 'val' / 'class1' / '0.png')
    with_broken = validate.main(validate_args)[0]                    # timm hands over class1/1.png in its place
    broken.unlink()
    without = validate.main(validate_args)[0]
    assert with_broken['unreadable'] == 1 and without['unreadable'] == 0
    assert with_broken['samples'] == without['samples'] == 5
    assert with_broken['top1'] == without['top1'] and with_broken['loss'] == pytest.approx(without['loss'], rel=1e-5)


@pytest.mark.slow
def test_a_loader_worker_names_the_truncated_image(own_data):
    """Workers start from the forkserver and unpickle the dataset: the naming must travel with it."""
    broken = _truncate(own_data / 'val' / 'class2' / '0.png')
    script = ('import torch, sys\n'
              'from mixpro.data import image_folder, _worker_options\n'
              'dataset = image_folder(sys.argv[1], "val", is_training=False)\n'
              'options = _worker_options(1, False, torch.device("cpu"))\n'
              'for _ in torch.utils.data.DataLoader(dataset, collate_fn=list, **options): pass\n')
    run = subprocess.run([sys.executable, '-c', script, str(own_data)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f'skipped unreadable image {broken}' in run.stderr, run.stderr
