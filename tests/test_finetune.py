"""Fine-tuning: a new run from --initial-checkpoint / --pretrained weights (CPU, no network)."""
import shutil

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import mixpro.finetune
import train
from conftest import make_image_folder, train_args
from mixpro.config import ConfigError, parse_train_args
from mixpro.finetune import load_initial_weights, read_weights
from mixpro.build import create_model, model_options

BODY = 'blocks.0.attn.qkv.weight'


@pytest.fixture(scope='module')
def source(data_dir, tmp_path_factory):
    """A finished 3-class, 16-px run's last checkpoint."""
    out = tmp_path_factory.mktemp('source')
    train.main(train_args(data_dir, out, 'src', 'mixpro', 1))
    return out / 'src' / 'last.pth.tar'


@pytest.fixture(scope='module')
def four_classes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('four'), classes=4)


def finetune_args(data, out, init, experiment='ft', epochs=1, *extra):
    """4 classes at 24 px (6x6 tokens of 4 px; 8-px mask cells: 3x3) from a 3-class 16-px run."""
    return train_args(data, out, experiment, 'mixpro', epochs, '--img-size', '24', '--initial-checkpoint',
                      str(init), *extra)


@pytest.mark.slow
def test_new_head_and_resized_pos_embed_keep_the_body_weights(source, four_classes, tmp_path, capsys):
    args = parse_train_args(finetune_args(four_classes, tmp_path, source))
    src = torch.load(source, weights_only=True)['state_dict']
    model = create_model(args.model, 4, **model_options(args))
    fresh_head = model.head.weight.clone()
    line = load_initial_weights(model, args)
    assert capsys.readouterr().out.strip() == line
    assert 'pos_embed resized 4x4 -> 6x6' in line
    assert 'head.weight/head.bias re-initialised' in line and '3 -> 4 classes' in line and '0 missing' in line
    assert torch.equal(model.state_dict()[BODY], src[BODY])
    assert torch.equal(model.head.weight, fresh_head)            # the new head keeps its fresh init
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(model.pos_embed[:, :1], src['pos_embed'][:, :1])   # the class token's slot is kept

    result = train.main(finetune_args(four_classes, tmp_path, source))
    out = capsys.readouterr().out
    assert f'initial weights from {source}: ' in out and 'pos_embed resized 4x4 -> 6x6' in out
    assert result['epoch'] == 0 and result['eval']['count'] == 24


def test_state_dict_safetensors_and_wrapped_files_read_the_same(source, tmp_path):
    weights = torch.load(source, weights_only=True)['state_dict']
    torch.save(weights, tmp_path / 'plain.pth')
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / 'w.safetensors')
    torch.save({'model': weights, 'epoch': 3}, tmp_path / 'deit_style.pth')               # DeiT's release files
    torch.save({'state_dict': {f'module.{k}': v for k, v in weights.items()}}, tmp_path / 'ddp.pth')
    for name in ('plain.pth', 'w.safetensors', 'deit_style.pth', 'ddp.pth'):
        read = read_weights(tmp_path / name)
        assert read.keys() == weights.keys(), name
        assert all(torch.equal(read[k], weights[k]) for k in weights), name


def test_a_train_checkpoint_uses_the_plain_weights_not_the_ema(source, tmp_path):
    state = torch.load(source, weights_only=True)
    state['state_dict_ema'] = {k: torch.zeros_like(v) for k, v in state['state_dict'].items()}
    torch.save(state, tmp_path / 'with_ema.pth.tar')
    assert torch.equal(read_weights(tmp_path / 'with_ema.pth.tar')[BODY], state['state_dict'][BODY])


def test_pretrained_without_network_is_one_line_naming_the_model(data_dir, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):   # what huggingface_hub raises offline with nothing in its cache
        raise LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub and we '
                                      'cannot find the requested files in the local cache.')
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_hf', offline)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(mixpro.finetune, '_in_hub_cache', lambda hub_id: False)   # whatever this machine cached
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(data_dir, tmp_path, 'pre', 'mixpro', 1, '--pretrained'))
    message = str(exc.value)
    assert message.startswith('error: --pretrained: ') and '\n' not in message
    assert 'deit_tiny_patch16_224' in message and '--initial-checkpoint' in message
    # the wait for the hub's retries is explained before it starts (nothing cached here)
    out = capsys.readouterr().out
    assert "fetching timm's weights" in out and 'Hugging Face Hub' in out


@pytest.mark.slow
def test_pretrained_weights_are_fitted_like_a_file(monkeypatch):
    published = timm.create_model('deit_tiny_patch16_224').state_dict()   # stands in for the hub's file
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_hf', lambda *a, **k: dict(published))
    args = parse_train_args(['--model', 'deit_tiny_patch16_224', '--img-size', '32', '--pretrained'])
    model = create_model(args.model, 4, **model_options(args))
    line = load_initial_weights(model, args)
    assert line.startswith('initial weights') and "timm's pretrained" in line and '.fb_in1k' in line
    assert 'pos_embed resized 14x14 -> 2x2' in line and 're-initialised (1000 -> 4 classes)' in line
    assert torch.equal(model.state_dict()[BODY], published[BODY])


def test_weights_of_another_architecture_are_an_error_naming_the_file(data_dir, tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(timm.create_model('resnet18', num_classes=3).state_dict(), path)
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(data_dir, tmp_path, 'other', 'mixpro', 1, '--initial-checkpoint', str(path)))
    message = str(exc.value)
    assert message.startswith(f'error: {path} ') and '\n' not in message
    assert 'does not fit model deit_tiny_patch16_224' in message and 'only 0 of' in message


def test_missing_file_and_both_options_are_errors(data_dir, tmp_path):
    missing = str(tmp_path / 'nowhere.pth')
    with pytest.raises(SystemExit, match='error: --initial-checkpoint .*nowhere.pth') as err:
        train.main(train_args(data_dir, tmp_path, 'a', 'mixpro', 1, '--initial-checkpoint', missing))
    assert 'does not exist' in str(err.value)
    args = parse_train_args(['--pretrained', '--initial-checkpoint', 'x.pth'])
    with pytest.raises(ConfigError, match='choose one'):
        load_initial_weights(None, args)


@pytest.mark.slow
def test_resuming_a_finetuned_run_does_not_load_the_initial_weights_again(source, four_classes, tmp_path,
                                                                          capsys):
    init = tmp_path / 'init.pth.tar'
    shutil.copyfile(source, init)
    train.main(finetune_args(four_classes, tmp_path, init, 'ft', 1))
    assert 'initial weights from' in capsys.readouterr().out
    init.unlink()   # the run's own checkpoint has the weights now
    result = train.main(finetune_args(four_classes, tmp_path, init, 'ft', 2))
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'initial weights from' not in out
    assert result['epoch'] == 1
