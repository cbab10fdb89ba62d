"""timm's training knobs wired through train.py: --model-ema-warmup, --layer-decay, --opt-kwargs,
--sched-on-updates, --bce-loss. Each test shows the knob's effect, so a knob that is silently dropped fails."""
import re
import signal

import pytest
import timm
import torch
import torch.nn.functional as F

import mixpro.models  # noqa: F401  (registers PVT and CA-Swin)
import train
from conftest import read_summary, signal_during_mixer_call, train_args
from mixpro import build, training
from mixpro.build import create_model, create_optimizer, wrap_for_training
from mixpro.config import ConfigError
from mixpro.mixer import Mixer

STEPS = 4   # 3 classes x 12 train images, batch 8, drop_last


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _capture_optimizer(monkeypatch) -> dict:
    """Keep the model and the optimizer that run() builds."""
    built = {}
    real = training.create_optimizer

    def building(model, **options):
        built['model'], built['optimizer'] = model, real(model, **options)
        return built['optimizer']
    monkeypatch.setattr(training, 'create_optimizer', building)
    return built


# ---- --model-ema-warmup -------------------------------------------------------------------------
@pytest.mark.slow
def test_ema_warmup_follows_the_model_where_plain_decay_stays_behind(data_dir, tmp_path):
    def ema_lag(name, *extra):
        train.main(train_args(data_dir, tmp_path, name, 'mixup_cutmix', 2, '--model-ema', '--log-interval', '0',
                              *extra))
        state = _load(tmp_path / name / 'last.pth.tar')
        return sum((state['state_dict'][k].float() - state['state_dict_ema'][k].float()).square().sum()
                   for k in state['state_dict']).sqrt().item()
    plain = ema_lag('plain')                         # decay 0.99996 from step 2: the EMA stays near step 1
    warm = ema_lag('warm', '--model-ema-warmup')     # decay 1 - (1 + step)^(-2/3): 0.37, 0.52, ... 0.75
    assert warm < 0.6 * plain, (warm, plain)


# ---- --layer-decay ------------------------------------------------------------------------------
def test_layer_decay_scales_the_lr_of_each_layer(data_dir, tmp_path, monkeypatch):
    built = _capture_optimizer(monkeypatch)
    train.main(train_args(data_dir, tmp_path, 'ld', 'mixup_cutmix', 1, '--layer-decay', '0.5'))
    model, optimizer = built['model'], built['optimizer']
    scale_of = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    scale = {name: scale_of[id(p)] for name, p in model.named_parameters()}
    # depth 2: stem, block 0, block 1, head -> 0.5^3, 0.5^2, 0.5, 1
    assert scale['patch_embed.proj.weight'] == scale['cls_token'] == 0.125
    assert scale['blocks.0.attn.qkv.weight'] == 0.25 and scale['blocks.1.mlp.fc1.weight'] == 0.5
    assert scale['head.weight'] == 1.0
    top = max(g['lr'] for g in optimizer.param_groups)
    for group in optimizer.param_groups:                  # the scheduler applies the scale to every group
        assert group['lr'] == pytest.approx(top * group['lr_scale'])
    saved = _load(tmp_path / 'ld' / 'last.pth.tar')['optimizer']['param_groups']
    assert sorted({g['lr_scale'] for g in saved}) == [0.125, 0.25, 0.5, 1.0]


SMALL = {   # the real layer structure with few blocks: group_matcher decides the layers
    'deit_tiny_patch16_224': dict(depth=3, embed_dim=32, num_heads=2),
    'xcit_nano_12_p16_224': dict(depth=3, cls_attn_layers=1),
    'cait_xxs24_224': dict(depth=3, depth_token_only=1, embed_dim=32, num_heads=2),
    'pvt_tiny': dict(depths=(1, 1, 1, 1)),
    'ca_swin_tiny': dict(depths=(1, 1, 1, 1)),
}


@pytest.mark.parametrize('name', list(SMALL))
def test_layer_decay_groups_every_model_family_by_depth(name):
    model = timm.create_model(name, num_classes=5, **SMALL[name])
    optimizer = create_optimizer(model, opt='adamw', lr=1e-3, weight_decay=0.05, momentum=0.9, opt_eps=1e-8,
                                 layer_decay=0.75)
    scale_of = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    scales = {n: scale_of[id(p)] for n, p in model.named_parameters()}
    head = [n for n in scales if n.startswith('head')]
    stem = next(n for n in scales if 'patch_embed' in n)
    assert head and all(scales[n] == 1.0 for n in head)
    assert scales[stem] == min(scales.values()) < 0.75 ** 3       # the stem is the deepest-decayed layer
    assert len(set(scales.values())) >= 5, sorted(set(scales.values()))


# ---- --opt-kwargs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_opt_kwargs_reach_the_optimizer(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'ams', 'mixup_cutmix', 1, '--opt-kwargs', 'amsgrad=True',
                          '--opt-betas', '0.8', '0.99'))
    saved = _load(tmp_path / 'ams' / 'last.pth.tar')['optimizer']
    assert all(g['amsgrad'] for g in saved['param_groups'])
    assert all(tuple(g['betas']) == (0.8, 0.99) for g in saved['param_groups'])
    assert all('max_exp_avg_sq' in s for s in saved['state'].values())     # AMSGrad's own state


@pytest.mark.parametrize('extra,phrases', [
    (['--opt-kwargs', 'foo=1'], ('--opt-kwargs foo=1', "'adamw' has no argument 'foo'")),
    (['--opt', 'sgd', '--opt-kwargs', 'amsgrad=True'], ('--opt-kwargs amsgrad=True', "'sgd' has no argument")),
    (['--opt-kwargs', 'betas=(2,0.9)'], ('--opt-kwargs betas=(2, 0.9)', "'adamw' refused", 'Invalid beta')),
    (['--opt-kwargs', 'lr=0.1'], ('lr has its own option', 'use --lr')),
    (['--opt-kwargs', 'betas=(0.9,0.95)', '--opt-betas', '0.9', '0.99'], ('both set the betas',)),
    (['--opt', 'nope'], ('--opt nope', 'Optimizer nope not found')),
])
def test_a_bad_optimizer_argument_is_one_line_naming_it(data_dir, tmp_path, extra, phrases):
    with pytest.raises(SystemExit) as failed:
        train.main(train_args(data_dir, tmp_path, 'bad', 'mixup_cutmix', 1, *extra))
    text = str(failed.value.code)
    assert text.startswith('error: ') and all(p in text for p in phrases) and '\n' not in text, text
    assert not list((tmp_path / 'bad').glob('*.pth.tar'))


# ---- --sched-on-updates -------------------------------------------------------------------------
def _step_lrs(out: str) -> list:
    """(epoch, step, lr) of every per-step log line (the lr after that step's scheduler update)."""
    return [(int(e), int(s), float(lr)) for e, s, lr in re.findall(r'^epoch (\d+) \[\s*(\d+)/\d+.* lr (\S+) ', out,
                                                                   re.M)]


@pytest.mark.slow
def test_sched_on_updates_moves_the_lr_within_the_first_epoch(data_dir, tmp_path, capsys):
    extra = ('--log-interval', '1', '--warmup-epochs', '1')
    train.main(train_args(data_dir, tmp_path, 'epochs', 'mixup_cutmix', 2, *extra))
    per_epoch = [lr for e, _, lr in _step_lrs(capsys.readouterr().out) if e == 0]
    assert per_epoch == [1e-6] * STEPS                    # the whole first epoch at warmup_lr
    train.main(train_args(data_dir, tmp_path, 'updates', 'mixup_cutmix', 2, '--sched-on-updates', *extra))
    lrs = _step_lrs(capsys.readouterr().out)
    first = [lr for e, _, lr in lrs if e == 0]   # the lr of steps 2, 3, 4 (warmup) and of epoch 1's first step
    assert len(first) == STEPS and all(a < b for a, b in zip(first[:-1], first[1:-1]))   # warming up step by step
    assert first[0] == pytest.approx(1e-6 + (1e-3 - 1e-6) / STEPS, rel=1e-3)
    assert first[-1] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-3)       # warmed up: cosine at half way
    second = [lr for e, _, lr in lrs if e == 1]
    assert all(a > b for a, b in zip(second, second[1:]))                        # cosine, step by step
    assert second[-1] == pytest.approx(1e-5, rel=1e-3)                           # min_lr at the last update


@pytest.mark.slow
@pytest.mark.parametrize('stop_call', [STEPS + 2, 2 * STEPS], ids=['mid-epoch', 'epoch-end'])
def test_a_resumed_per_update_schedule_gives_the_uninterrupted_lrs(data_dir, tmp_path, monkeypatch, capsys,
                                                                   stop_call):
    extra = ('--sched-on-updates', '--warmup-epochs', '2', '--log-interval', '1', '--model-ema',
             '--model-ema-warmup')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 3, *extra))
    straight = _step_lrs(capsys.readouterr().out)

    args = train_args(data_dir, tmp_path, 'stopped', 'mixpro', 3, *extra)
    signal_during_mixer_call(monkeypatch, stop_call, signal.SIGTERM)     # epoch 1, step 2 or 4 of 4
    with pytest.raises(SystemExit):
        train.main(args)
    before = _step_lrs(capsys.readouterr().out)
    monkeypatch.undo()
    train.main(args)
    out = capsys.readouterr().out
    assert 'resumed from' in out
    assert before + _step_lrs(out) == straight            # every step's lr, across the stop
    assert len(straight) == 3 * STEPS and len({lr for *_, lr in straight}) > 2 * STEPS
    run_dir = tmp_path / 'stopped'
    assert read_summary(run_dir) == read_summary(tmp_path / 'straight')
    resumed, reference = _load(run_dir / 'last.pth.tar'), _load(tmp_path / 'straight' / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in reference[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the resume'
    assert resumed['scheduler'] == reference['scheduler']


# ---- --bce-loss ---------------------------------------------------------------------------------
def test_bce_loss_trains_on_the_attention_relabelled_target(data_dir, tmp_path, monkeypatch):
    relabelled, calls = [], []
    real_relabel = Mixer.relabel

    def relabel(self, logits, attention=None):
        target = real_relabel(self, logits, attention)
        relabelled.append((self.last.area_target.detach().clone(), target))
        return target
    monkeypatch.setattr(Mixer, 'relabel', relabel)

    class RecordingBCE(training.BinaryCrossEntropy):
        def forward(self, x, target):
            loss = super().forward(x, target)
            calls.append((x.detach().clone(), target, loss.detach().clone(), self.smoothing))
            return loss
    monkeypatch.setattr(training, 'BinaryCrossEntropy', RecordingBCE)

    train.main(train_args(data_dir, tmp_path, 'bce', 'mixpro', 2, '--bce-loss', '--maskmix-prob', '1.0'))
    assert len(calls) == len(relabelled) == 2 * STEPS
    for (logits, target, loss, smoothing), (area, given) in zip(calls, relabelled):
        assert target is given and smoothing == 0.0      # the mixer's target, not smoothed a second time
        assert loss == pytest.approx(F.binary_cross_entropy_with_logits(logits, target.detach()).item(), rel=1e-5)
        assert target.sum(1).detach() == pytest.approx(torch.ones(len(target)))
    assert any(not torch.allclose(area, target.detach()) for (_, target, *_), (area, _) in zip(calls, relabelled)), \
        'PAL never moved the target away from the area label'
    rows = read_summary(tmp_path / 'bce')
    assert float(rows[0]['train_loss']) == pytest.approx(sum(c[2].item() for c in calls[:STEPS]) / STEPS, rel=1e-5)
    assert len(rows) == 2



# ---- --grad-checkpointing -----------------------------------------------------------------------
def _small_model(name, grad_checkpointing=False):
    return create_model(name, 5, model_kwargs=SMALL[name], grad_checkpointing=grad_checkpointing)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(SMALL))
def test_grad_checkpointing_gives_the_same_gradients_in_every_family(name):
    torch.manual_seed(0)
    plain = _small_model(name).train()
    recomputed = _small_model(name, grad_checkpointing=True).train()
    recomputed.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 3])
    grads = []
    for model in (plain, recomputed):
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    flags = [m.grad_checkpointing for m in recomputed.modules() if hasattr(m, 'grad_checkpointing')]
    assert flags and all(flags) and not any(m.grad_checkpointing for m in plain.modules()
                                            if hasattr(m, 'grad_checkpointing'))


@pytest.mark.slow
def test_grad_checkpointing_reads_the_attention_once_per_step(data_dir, tmp_path, monkeypatch):
    """The backward's recompute runs the label layer's hook again: the engine switches the probe off after
    the forward, so the attention is computed once per step, and training gives the same weights."""
    from mixpro import probe as probe_module
    calls = {'n': 0}
    real = probe_module.cls_attention

    def counting(*args, **kwargs):
        calls['n'] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(probe_module, 'cls_attention', counting)
    weights, counts = [], []
    for name, extra in (('plain', ()), ('recomputed', ('--grad-checkpointing',))):
        calls['n'] = 0
        train.main(train_args(data_dir, tmp_path, name, 'mixpro', 1, '--drop-path', '0', '--log-interval', '0',
                              '--image-grid-interval', '0', *extra))
        counts.append(calls['n'])
        weights.append(_load(tmp_path / name / 'last.pth.tar')['state_dict'])
    assert counts[0] > 0 and counts[1] == counts[0], counts
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), key


def test_grad_checkpointing_on_a_model_without_it_is_one_line(monkeypatch):
    model = torch.nn.Linear(3, 3)
    monkeypatch.setattr(build.timm, 'create_model', lambda *a, **k: model)
    with pytest.raises(ConfigError, match="--grad-checkpointing: model 'linear'") as err:
        create_model('linear', 3, grad_checkpointing=True)
    assert 'cannot recompute' in str(err.value)


@pytest.mark.slow
def test_grad_checkpointing_under_torch_compile_keeps_one_graph_and_reads_the_attention(monkeypatch):
    """The probe's hook sits inside a checkpointed block: compiled as train.py compiles (wrap_for_training),
    the forward stays one graph on steps that read the attention, and the attention is captured."""
    from torch._dynamo.utils import counters
    from mixpro import AttentionProbe
    monkeypatch.setattr(torch._dynamo.config, 'skip_fwd_side_effects_in_bwd_under_checkpoint', False)
    torch._dynamo.reset()
    counters.clear()
    model = _small_model('deit_tiny_patch16_224', grad_checkpointing=True).train()
    probe = AttentionProbe(model)
    compiled, _ = wrap_for_training(model, device='cpu', torchcompile='aot_eager', grad_checkpointing=True)
    x = torch.randn(2, 3, 224, 224)
    for _ in range(2):
        probe.enabled = True
        logits = compiled(x)
        probe.enabled = False            # as the engine does before the backward
        assert probe.attention is not None and probe.attention.shape == (2, 196)
        logits.sum().backward()
        probe.attention = None
    assert sum(counters['graph_break'].values()) == 0, dict(counters['graph_break'])
    torch._dynamo.reset()


def test_torchcompile_mode_reaches_torch_compile_and_a_bad_one_is_named(monkeypatch):
    model = torch.nn.Linear(2, 2)
    seen = {}
    real_compile = torch.compile

    def recording_compile(module, **kwargs):
        seen.update(kwargs)
        return real_compile(module, **kwargs)
    monkeypatch.setattr(torch, 'compile', recording_compile)
    wrap_for_training(model, device='cpu', torchcompile='inductor', torchcompile_mode='max-autotune')
    assert seen == {'backend': 'inductor', 'mode': 'max-autotune'}
    with pytest.raises(ConfigError, match='--torchcompile-mode fastest') as err:
        wrap_for_training(model, device='cpu', torchcompile='inductor', torchcompile_mode='fastest')
    assert 'mode=fastest' in str(err.value)
