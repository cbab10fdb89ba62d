"""BatchNorm over processes (XCiT's patch embedding and LPI have it): --dist-bn, --sync-bn."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import validate
from conftest import xcit_train_args
from mixpro.build import create_model, model_options, use_sync_bn

REPO = Path(__file__).resolve().parents[1]


def xcit_args(data_dir, out, experiment, *extra):
    return xcit_train_args(data_dir, out, experiment, 'mixpro', 1, *extra)


@pytest.mark.slow
def test_two_process_evaluation_scores_the_saved_model_of_a_batchnorm_network(data_dir, tmp_path):
    """Each rank's last training forward moves its own BatchNorm statistics; the evaluation, sharded over
    the ranks, must score the one model the checkpoint holds, raw and EMA."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    subprocess.run([*launch, str(REPO / 'train.py'),
                    *xcit_args(data_dir, tmp_path, 'ddp', '--batch-size', '4', '--model-ema',
                               '--model-ema-decay', '0.5')],
                   check=True, cwd=REPO, env=env, timeout=300)
    checkpoint = str(tmp_path / 'ddp' / 'last.pth.tar')
    state = torch.load(checkpoint, weights_only=True)
    assert any('running_var' in key for key in state['state_dict'])
    common = ['--checkpoint', checkpoint, '--data-dir', str(data_dir), '--workers', '0', '--device', 'cpu']
    raw = validate.main(common)[0]
    ema = validate.main([*common, '--use-ema'])[0]
    assert raw['loss'] == pytest.approx(state['eval_metrics']['eval']['loss'], abs=1e-5)
    assert ema['loss'] == pytest.approx(state['eval_metrics']['eval_ema']['loss'], abs=1e-5)


def test_sync_bn_is_refused_without_cuda_in_one_line(data_dir, tmp_path):
    with pytest.raises(SystemExit, match='--sync-bn needs CUDA'):
        train.main(xcit_args(data_dir, tmp_path, 'r', '--sync-bn'))
    assert not (tmp_path / 'r').exists()
    with pytest.raises(SystemExit):   # argparse names the choices
        train.main(xcit_args(data_dir, tmp_path, 'r', '--dist-bn', 'mean'))


def test_sync_bn_converts_batchnorm_only_where_processes_share_it(data_dir, tmp_path, capsys):
    args = train.parse_train_args(xcit_args(data_dir, tmp_path, 'r'))

    def build_model():
        return create_model(args.model, 3, **model_options(args))
    model = use_sync_bn(build_model(), distributed=True)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert model.load_state_dict(build_model().state_dict()) is not None   # the same keys as BatchNorm

    alone = use_sync_bn(build_model(), distributed=False)
    assert torch.nn.SyncBatchNorm not in {type(m) for m in alone.modules()}
    assert 'the run has one process' in capsys.readouterr().out
    args.model, args.model_kwargs = 'deit_tiny_patch16_224', {'depth': 1}
    use_sync_bn(build_model(), distributed=True)
    out = capsys.readouterr().out
    assert "'deit_tiny_patch16_224'" in out and 'no BatchNorm' in out
