"""The report's sections (``--sections``): uncertainty, ood, shift, landscape and samplers, each alone and all
together, their bad input, and the streamed Gram matrix of the snapshot weight cosine.

The models are tiny test_resnets with random convolutions and a linear head fitted to digits (a linear probe), so
that they are right most of the time and temperature scaling, OOD detection and corruptions have something to
measure; the snapshots are synthetic (the probe's weights plus noise growing with the epoch)."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import timm_ensembles  # noqa: F401  (registers the ensembles with timm)
from timm_ensembles import data as te_data
from timm_ensembles import metrics
from timm_ensembles.analysis import (
    AnalysisError,
    DataOptions,
    LandscapeOptions,
    OODOptions,
    OutputOptions,
    SamplerOptions,
    ShiftOptions,
    SnapshotOptions,
    _compute,
    analyze_runs,
    main,
)
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.train.snapshots import read_snapshots

pytestmark = pytest.mark.usefixtures('one_torch_thread')
NUM_CLASSES = 10
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
EPOCHS = (-1, 0, 1, 2, 3)
# small everywhere: this CPU is shared
FAST = dict(data=DataOptions(dataset='digits', val_subset=30, batch_size=30, bn_batches=1),
            output=OutputOptions(plots=False, verbose=False))


def _fit_head(model, x, y):
    """A linear probe: the BatchNorm statistics of 200 digits (as training leaves them), then the classifier fitted
    (logistic regression) on the random features of those digits."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of this one batch
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    mean, std = features.mean(0), features.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=1000).fit(((features - mean) / std).numpy(), y.numpy())
    weight = torch.from_numpy(clf.coef_).float() / std
    with torch.no_grad():
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(torch.from_numpy(clf.intercept_).float() - weight @ mean)


def _make_run(folder, model, model_args=None):
    export_folder(model, folder, data_config=DATA_CONFIG, model_args=model_args)
    name = model.pretrained_cfg.get('architecture', 'model')
    (folder / 'args.yaml').write_text(yaml.safe_dump(dict(model=name, dataset='digits', img_size=32)))
    (folder / 'results.json').write_text(json.dumps(dict(model=name, dataset='digits', epochs=len(EPOCHS) - 1)))
    return folder


def _write_snapshots(folder, model, num_samples=20, seed=0):
    """Snapshots of epochs -1 (the initialisation) to 3: each member's weights plus noise growing with the epoch."""
    g = torch.Generator().manual_seed(seed)
    snap = folder / 'snapshots'
    snap.mkdir(parents=True, exist_ok=True)
    num_members = len(model.members)
    for e in EPOCHS:
        tag = 'init' if e == -1 else f'{e:03d}'
        meta = dict(epoch=str(e), model='ens', dataset='digits', num_classes=str(NUM_CLASSES),
                    num_members=str(num_members))
        logits = torch.randn(num_samples, num_members, NUM_CLASSES, generator=g)
        save_file(dict(logits=logits, targets=torch.arange(num_samples) % NUM_CLASSES,
                       indices=torch.arange(num_samples) * 4), str(snap / f'epoch_{tag}.safetensors'), metadata=meta)
        state = {f'member{m}.{n}': (p.detach() + 0.01 * (e + 2) * torch.randn(p.shape, generator=g)).contiguous()
                 for m, member in enumerate(model.members) for n, p in member.named_parameters()}
        save_file(state, str(snap / f'epoch_{tag}.weights.safetensors'))


def _write_idx(folder, side=28, num=40, seed=0):
    """An IDX folder of uniform noise images, side x side grey: out-of-distribution for digits."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for stem, n in (('train', 10), ('t10k', num)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
        header = (0x803).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in images.shape)
        (folder / f'{stem}-images-idx3-ubyte').write_bytes(header + images.tobytes())
        (folder / f'{stem}-labels-idx1-ubyte').write_bytes((0x801).to_bytes(4, 'big') + n.to_bytes(4, 'big')
                                                           + labels.tobytes())
    return folder


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('sections')
    torch.manual_seed(0)
    train_ds, _, _ = te_data.create_datasets('digits', train_subset=200)
    x, y = next(iter(te_data.create_eval_loader(train_ds, DATA_CONFIG, 200, 0)))
    ens = timm.create_model('ens', base_model='test_resnet', num_members=3, num_classes=NUM_CLASSES, drop_rate=0.1)
    for member in ens.members:
        _fit_head(member, x, y)
    plain = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    _fit_head(plain, x, y)
    ens.set_temperature(1.5)  # as train.py --calibrate leaves it: its own prediction only
    out = dict(root=root, ens=_make_run(root / 'ens', ens, model_args=dict(drop_rate=0.1, temperature=1.5)),
               plain=_make_run(root / 'plain', plain),
               effnet=_make_run(root / 'effnet', timm.create_model('test_efficientnet', num_classes=NUM_CLASSES)),
               noise=_write_idx(root / 'noise'))
    _write_snapshots(out['ens'], ens)
    return out


def _saved(out_dir):
    return json.loads((out_dir / 'summary.json').read_text()), load_file(str(out_dir / 'logits.safetensors'))


def _entropy(probs):
    return -(probs * probs.log()).sum(-1)


# ---------------------------------------------------------------------------------------------------------------


def test_bad_options_are_refused_before_any_evaluation(runs, tmp_path):
    src = [str(runs['plain'])]
    with pytest.raises(AnalysisError, match=r"Unknown section\(s\) landscpe.*valid ones are members, between, "
                                            r"trajectories, uncertainty, ood, shift, landscape, samplers"):
        analyze_runs(src, sections='uncertainty,landscpe', out_dir=tmp_path)
    with pytest.raises(SystemExit, match=r'The ood section needs --ood-dataset NAME'):
        main(src + ['--sections', 'ood', '--out', str(tmp_path)])
    with pytest.raises(AnalysisError, match=r'Unknown --shift name\(s\) fog: valid ones are gaussian_noise'):
        analyze_runs(src, sections='shift', shift=ShiftOptions(corruptions='fog,rotation'), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match=r'--severities must be integers in 1\.\.5.*got \[2, 7\]'):
        analyze_runs(src, sections='shift', shift=ShiftOptions(severities=[2, 7]), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match=r'Unknown --samplers name\(s\) swag'):
        analyze_runs(src, sections='samplers', samplers=SamplerOptions(names='random,swag'), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match=r'--snapshot-epochs selects the snapshots of the trajectories and'):
        analyze_runs(src, sections='landscape', snapshots=SnapshotOptions(epochs=[1]), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match='--landscape-plane needs the landscape section'):
        analyze_runs(src, landscape=LandscapeOptions(plane=True), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match='--random-scale must be a finite number > 0'):
        analyze_runs(src, sections='samplers', samplers=SamplerOptions(random_scale=0.0), out_dir=tmp_path)
    with pytest.raises(AnalysisError, match='--landscape-points must be an integer >= 2'):
        analyze_runs(src, sections='landscape', landscape=LandscapeOptions(points=1), out_dir=tmp_path)
    assert not (tmp_path / 'summary.json').exists()


def test_uncertainty_alone(runs, tmp_path):
    report = analyze_runs([str(runs['ens']), str(runs['plain'])], sections='uncertainty', out_dir=tmp_path, **FAST)
    summary, saved = _saved(tmp_path)
    assert summary['sections'] == ['uncertainty'] and report['sections'] == ['uncertainty']
    # nothing of the other sections: no between-source matrices, no trajectories, no feature pass
    assert 'between' not in summary and 'trajectories' not in summary and 'landscape' not in summary
    assert summary['sources']['ens']['feature_distance'] is None and summary['sources']['ens']['disagreement'] is None
    targets = saved['targets']
    for label in ('ens', 'plain'):
        logits, u = saved[f'{label}.logits'].double(), summary['uncertainty']['sources'][label]
        member_probs = logits.softmax(-1)
        probs = member_probs.mean(1)
        entropy, expected = _entropy(probs), _entropy(member_probs).mean(1)
        assert u['entropy'] == pytest.approx(float(entropy.mean()), abs=1e-12)
        assert u['expected_entropy'] == pytest.approx(float(expected.mean()), abs=1e-12)
        assert u['mutual_information'] == pytest.approx(float((entropy - expected).mean()), abs=1e-12)
        # AURC: the mean over k of the error rate of the k most confident images
        order = probs.max(-1).values.sort(descending=True, stable=True).indices
        wrong = (probs.argmax(-1) != targets)[order].double()
        assert u['aurc'] == pytest.approx(float((wrong.cumsum(0) / torch.arange(1, 31)).mean()), abs=1e-12)
        # temperature: fitted on the first half of a seed-0 permutation, measured on the other half
        t = u['temperature']
        perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
        fit, held = perm[:15], perm[15:]
        assert (t['fit_samples'], t['eval_samples'], t['seed']) == (15, 15, 0)
        log_probs = probs.log()

        def nll(temp, idx, log_probs=log_probs):
            return float(F.cross_entropy(log_probs[idx] / temp, targets[idx]))

        temp = t['temperature']
        # the fitted T minimises the NLL on the fit half (convex in 1 / T): a step either way is worse
        assert nll(temp, fit) <= min(nll(temp * 1.02, fit), nll(temp / 1.02, fit))
        assert t['before']['nll'] == pytest.approx(nll(1.0, held), abs=1e-9)
        assert t['after']['nll'] == pytest.approx(nll(temp, held), abs=1e-9)
        # the probes are underconfident (a strongly regularised head): scaling sharpens them
        assert temp < 1
    ens = summary['uncertainty']['sources']['ens']
    assert u['num_members'] == 1 and ens['num_members'] == 3
    # the calibrated model's temperature is reported, and said not to apply to the members' probabilities
    assert (ens['model_temperature'], u['model_temperature']) == (1.5, 1.0)
    assert any('calibrated with temperature 1.5' in n for n in ens['notes']) and not u['notes']
    md = (tmp_path / 'summary.md').read_text()
    assert '## Uncertainty' in md and 'What it shows' in md
    assert 'fixed random half of the evaluation set (15 images' in md
    assert '## Between sources' not in md and '## Trajectories' not in md


def test_ood_alone(runs, tmp_path):
    analyze_runs([str(runs['ens']), str(runs['plain'])], sections='ood',
                 ood=OODOptions(dataset=f"idx:{runs['noise']}", subset=25), out_dir=tmp_path, **FAST)
    summary, saved = _saved(tmp_path)
    ood = summary['ood']
    assert ood['num_samples'] == 25 and ood['dataset'] == f"idx:{runs['noise']}" and 'uncertainty' not in summary
    # the 28 x 28 grey noise goes through each source's own eval transform: read as RGB, resized to 32 px
    assert any('ens\'s eval transform adapts the OOD images: read as RGB (1 -> 3 channels), resized and centre-cropped'
               ' from 28x28 to 32x32 px' in n for n in ood['notes'])
    for label, num_members in (('ens', 3), ('plain', 1)):
        logits_in, logits_out = saved[f'{label}.logits'].double(), saved[f'{label}.ood_logits'].double()
        assert logits_out.shape == (25, num_members, NUM_CLASSES)
        o = ood['sources'][label]
        is_out = np.r_[np.zeros(30), np.ones(25)]
        for name, score in (('neg_max_prob', lambda lg: -lg.softmax(-1).mean(1).max(-1).values),
                            ('entropy', lambda lg: _entropy(lg.softmax(-1).mean(1)))):
            scores = torch.cat([score(logits_in), score(logits_out)]).numpy()
            assert o['scores'][name]['auroc'] == pytest.approx(roc_auc_score(is_out, scores), abs=1e-6)
        # a single network: its expected entropy is its entropy, its mutual information 0: left out
        assert set(o['scores']) == ({'neg_max_prob', 'entropy', 'expected_entropy', 'mutual_information'}
                                    if num_members > 1 else {'neg_max_prob', 'entropy'})
        assert (o['member0'] is None) == (num_members == 1)
    md = (tmp_path / 'summary.md').read_text()
    assert '## Out-of-distribution detection' in md and '| ens:m0 | entropy |' in md


def test_ood_images_a_transform_cannot_adapt_are_refused(runs, tmp_path, monkeypatch):
    class GreyOnly(torch.utils.data.Dataset):
        """Grey PIL images that cannot be read in another mode (no img_mode to set)."""
        transform = None

        def __len__(self):
            return 4

        def __getitem__(self, i):
            from PIL import Image
            img = Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8))
            return (self.transform(img) if self.transform else img), 0

    create = te_data.create_datasets
    info = te_data.DatasetInfo('grey-only', -1, None, None, 0.0)
    monkeypatch.setattr(te_data, 'create_datasets',
                        lambda name, **kw: (None, GreyOnly(), info) if name == 'grey-only' else create(name, **kw))
    with pytest.raises(AnalysisError, match=r'OOD dataset grey-only holds 1-channel images and source plain takes 3'
                                            r" channels.*GreyOnly cannot be set to read its images as 'RGB'"):
        analyze_runs([str(runs['plain'])], sections='ood', ood=OODOptions(dataset='grey-only'), out_dir=tmp_path,
                     **FAST)
    with pytest.raises(AnalysisError, match='is the evaluation dataset'):
        analyze_runs([str(runs['plain'])], sections='ood', ood=OODOptions(dataset='digits'), out_dir=tmp_path,
                     **FAST)


def test_shift_alone(runs, tmp_path):
    analyze_runs([str(runs['ens'])], sections='shift',
                 shift=ShiftOptions(corruptions='gaussian_noise, contrast', severities=[5, 2]), out_dir=tmp_path,
                 **FAST)
    summary, saved = _saved(tmp_path)
    sh = summary['shift']
    assert sh['severities'] == [0, 2, 5] and sh['corruptions'] == ['gaussian_noise', 'contrast']
    ens, m0 = sh['sources']['ens']['ensemble'], sh['sources']['ens']['member0']
    logits, targets = saved['ens.logits'], saved['targets']
    # severity 0 is the clean evaluation
    assert ens['accuracy']['contrast'][0] == pytest.approx(metrics.ensemble_accuracy(logits, targets))
    assert m0['ece']['gaussian_noise'][0] == pytest.approx(
        metrics.expected_calibration_error(logits[:, 0].softmax(-1), targets, 15))
    # contrast 0.15 (severity 5) recomputed here: the images corrupted in pixel space, the members' mean probability
    model = timm.create_model(f"local-dir:{runs['ens']}", pretrained=True).eval()
    _, val_ds, _ = te_data.create_datasets('digits', val_subset=30)
    x, y = next(iter(te_data.create_eval_loader(val_ds, DATA_CONFIG, 30, 0)))
    pixels = (x * 0.5 + 0.5).clamp(0, 1)
    grey = pixels.mean(1, keepdim=True)  # equal channels: the grey level is any channel
    corrupted = ((0.15 * pixels + 0.85 * grey.mean((2, 3), keepdim=True)).clamp(0, 1) - 0.5) / 0.5
    with torch.no_grad():
        members = model.forward_members(corrupted)
    expected = 100.0 * float((members.softmax(-1).mean(1).argmax(-1) == y).double().mean())
    assert ens['accuracy']['contrast'][2] == pytest.approx(expected)
    assert ens['accuracy_mean'] == pytest.approx([(a + b) / 2 for a, b in zip(ens['accuracy']['gaussian_noise'],
                                                                             ens['accuracy']['contrast'])])
    md = (tmp_path / 'summary.md').read_text()
    assert '## Dataset shift' in md and '| ens:m0 | accuracy |' in md


def test_landscape_between_members_and_plane(runs, tmp_path):
    report = analyze_runs([str(runs['ens'])], sections='landscape',
                          landscape=LandscapeOptions(points=3, plane=True, plane_epoch=1, plane_grid=2),
                          out_dir=tmp_path, **FAST)
    ls = report['landscape']
    assert [(p['a'], p['b']) for p in ls['pairs']] == [('ens:m0', 'ens:m1'), ('ens:m0', 'ens:m2')]
    assert (ls['bn_batches'], ls['bn_images']) == (1, 30)
    model = timm.create_model(f"local-dir:{runs['ens']}", pretrained=True)
    train_ds, val_ds, _ = te_data.create_datasets('digits', val_subset=30)
    bn_loader = te_data.create_eval_loader(te_data.subset_dataset(train_ds, 30, seed=0), DATA_CONFIG, 30, 0)
    xv, yv = next(iter(te_data.create_eval_loader(val_ds, DATA_CONFIG, 30, 0)))
    for pair, other in zip(ls['pairs'], (1, 2)):
        t, loss = pair['t'], pair['loss']
        assert t == [0.0, 0.5, 1.0]
        # the barrier: the midpoint's rise above the straight line between the endpoints' losses
        assert pair['barrier_loss'] == pytest.approx(max(0.0, loss[1] - (loss[0] + loss[2]) / 2), abs=1e-12)
        err = [100 - a for a in pair['accuracy']]
        assert pair['barrier_error'] == pytest.approx(max(0.0, err[1] - (err[0] + err[2]) / 2), abs=1e-12)
        a, b = model.members[0], model.members[other]
        flat = [torch.cat([p.detach().reshape(-1) for _, p in sorted(m.named_parameters())]).double() for m in (a, b)]
        assert pair['distance'] == pytest.approx(float((flat[1] - flat[0]).norm()), rel=1e-9)
    # t = 0 is member 0 with its BatchNorm statistics re-estimated on the first training batch (a cumulative
    # average over one batch: that batch's mean and unbiased variance)
    member = model.members[0]
    member.train()
    for m in member.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        member(next(iter(bn_loader))[0])
        member.eval()
        expected = float(F.cross_entropy(member(xv).double(), yv))
    assert ls['pairs'][0]['loss'][0] == pytest.approx(expected, rel=1e-5)
    # the plane holds the solutions exactly: their points have the line's endpoint losses
    plane = ls['plane']
    assert (plane['a'], plane['b'], plane['c'], plane['epoch']) == ('ens:m0', 'ens:m1', 'ens:m0@epoch1', 1)
    x, y = plane['x'], plane['y']
    ia, ib = x.index(0.0), x.index(plane['points']['b'][0])
    assert plane['loss'][y.index(0.0)][ia] == ls['pairs'][0]['loss'][0]
    assert plane['loss'][y.index(0.0)][ib] == ls['pairs'][0]['loss'][-1]
    assert plane['points']['b'][0] == pytest.approx(ls['pairs'][0]['distance'], rel=1e-9)
    md = (tmp_path / 'summary.md').read_text()
    assert '## Loss landscape' in md
    assert 'recomputed at every point on 1 batches (30 images) of the training split' in md


def test_landscape_needs_two_networks_of_one_architecture(runs, tmp_path):
    with pytest.raises(AnalysisError, match=r'landscape between ens:m0 and effnet:m0 needs networks of one'
                                            r" architecture: .*parameter '.*' is in the second network only"):
        analyze_runs([str(runs['ens']), str(runs['effnet'])], sections='landscape', out_dir=tmp_path, **FAST)
    with pytest.raises(AnalysisError, match='landscape section needs two networks: source plain has one'):
        analyze_runs([str(runs['plain'])], sections='landscape', out_dir=tmp_path, **FAST)
    with pytest.raises(AnalysisError, match='--landscape-plane needs the snapshot weights of plain:m0'):
        analyze_runs([str(runs['plain']), str(runs['ens'])], sections='landscape',
                     landscape=LandscapeOptions(plane=True), out_dir=tmp_path, **FAST)
    with pytest.raises(AnalysisError, match=r'--plane-epoch 9: source ens has snapshot weights of epochs'
                                            r' \[-1, 0, 1, 2, 3\] only'):
        analyze_runs([str(runs['ens'])], sections='landscape', landscape=LandscapeOptions(plane=True, plane_epoch=9),
                     out_dir=tmp_path, **FAST)


def test_samplers_alone(runs, tmp_path):
    report = analyze_runs([str(runs['ens']), str(runs['plain'])], sections='samplers',
                          samplers=SamplerOptions(num_samples=2), out_dir=tmp_path, **FAST)
    summary, saved = _saved(tmp_path)
    sm = summary['samplers']
    ens, plain = sm['sources']['ens'], sm['sources']['plain']
    # default samplers: each that can run; the plain model has no dropout and no snapshots
    assert list(ens['samplers']) == ['random', 'dropout', 'diag', 'lowrank'] and list(plain['samplers']) == ['random']
    notes = ' '.join(sm['notes'])
    assert 'sampler dropout left out for plain: ResNet has no dropout' in notes
    assert 'sampler diag left out for plain: no snapshot weights of its trajectory' in notes
    # the Gaussians: the later half of the trajectory, epochs 2 and 3 (never the initialisation); rank <= E - 1
    assert ens['samplers']['diag']['epochs'] == [2, 3] and ens['samplers']['lowrank']['rank'] == 1
    logits, targets = saved['ens.logits'], saved['targets']
    ind = ens['independent']
    assert ind['num_networks'] == 3 and ind['ensemble_acc'] == pytest.approx(metrics.ensemble_accuracy(logits, targets))
    assert ind['network_acc'] == pytest.approx(metrics.member_accuracy(logits, targets).tolist())
    # the plane against m0: m0 itself differs nowhere; normalised disagreement = differ / own errors
    assert ind['plane']['disagreement'][0] == 0.0
    for numbers in [ind, *ens['samplers'].values()]:
        plane = numbers['plane']
        for acc, dis, norm in zip(plane['accuracy'], plane['disagreement'], plane['normalized_disagreement']):
            assert norm == pytest.approx(dis / (1 - acc / 100), rel=1e-12)
        assert numbers['ensemble_acc'] is not None and len(plane['accuracy']) == numbers['num_networks']
    assert [v['num_networks'] for v in ens['samplers'].values()] == [2, 2, 2, 2]
    # one single network and no other: nothing independent to compare with
    assert plain['independent'] is None and 'no independent ensemble' in plain['independent_of']
    assert report['samplers']['random_scale'] == 0.1
    md = (tmp_path / 'summary.md').read_text()
    assert '## Subspace samplers' in md and '| ens | independent | 3 |' in md and '| ens | lowrank | 2 |' in md


def test_samplers_asked_for_by_name_that_cannot_run(runs, tmp_path):
    with pytest.raises(AnalysisError, match=r'--samplers diag cannot run on any source: plain: no snapshot weights'):
        analyze_runs([str(runs['plain'])], sections='samplers', samplers=SamplerOptions(names='random,diag'),
                     out_dir=tmp_path, **FAST)
    with pytest.raises(SystemExit, match=r'--samplers dropout cannot run on any source: plain: ResNet has no dropout'):
        main([str(runs['plain']), '--dataset', 'digits', '--sections', 'samplers', '--samplers', 'dropout', '--out',
              str(tmp_path)])


def test_every_section_together(runs, tmp_path, capsys):
    out = tmp_path / 'all'
    assert main([str(runs['ens']), str(runs['plain']), '--dataset', 'digits', '--out', str(out), '--val-subset', '20',
                 '--batch-size', '20', '--sections', 'all', '--ood-dataset', f"idx:{runs['noise']}", '--ood-subset',
                 '20', '--shift', 'rotation', '--severities', '5', '--landscape-points', '3', '--landscape-batches',
                 '1', '--landscape-plane', '--plane-grid', '2', '--samplers', 'random,diag', '--num-samples', '2',
                 '--feature-taps', 'none']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['sections'] == ['members', 'between', 'trajectories', 'uncertainty', 'ood', 'shift', 'landscape',
                                   'samplers']
    new = ('risk_coverage', 'shift', 'landscape', 'landscape_plane', 'samplers')
    assert set(new) <= set(summary['files'])
    for name in summary['files']:
        assert (out / f'{name}.png').stat().st_size > 10_000, name
    md = (out / 'summary.md').read_text()
    for heading in ('## Uncertainty', '## Out-of-distribution detection', '## Dataset shift', '## Loss landscape',
                    '## Subspace samplers', '## Trajectories', '## Between sources'):
        assert heading in md
    assert md.count('What it shows:') == 5
    # the trajectories' weight cosine, streamed from the snapshot files, is the cosine of the stacked vectors
    traj = summary['trajectories']
    snaps = read_snapshots(runs['ens'], weights=True)
    vectors = torch.stack([snaps.weights[snaps.epochs.index(p['epoch']), p['member']] for p in traj['weight_points']])
    assert len(traj['weight_points']) == 3 * len(EPOCHS) and traj['epochs'] == {'ens': list(EPOCHS)}
    torch.testing.assert_close(torch.tensor(traj['weight_cosine'], dtype=torch.float64),
                               metrics.cosine_similarity_matrix(vectors), rtol=0, atol=1e-12)
    printed = capsys.readouterr().out
    for key in ('landscape, ens:m0 -> plain:m0: loss barrier', 'OOD (idx:', 'shift, ens: accuracy clean',
                'at severity 5', 'samplers, ens (around ens:m0, 2 samples): ensemble acc random',
                '| independent ensemble'):
        assert key in printed, key


# ---------------------------------------------------------------------------------------------------------------
# the snapshot weight cosine, streamed


def _old_cosine(paths_members):
    """The computation before streaming: every vector stacked (read_snapshots' layout), then the cosine matrix."""
    vectors = []
    for path, m in paths_members:
        tensors = load_file(str(path))
        names = sorted(k for k in tensors if k.startswith(f'member{m}.'))
        vectors.append(torch.cat([tensors[k].float().reshape(-1) for k in names]))
    return metrics.cosine_similarity_matrix(torch.stack(vectors))


def test_streaming_gram_equals_stacking(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    shapes = {'conv.weight': (5, 3, 2, 2), 'bn.bias': (5,), 'scale': (), 'fc.weight': (4, 7)}
    paths = []
    for e in range(3):
        state = {f'member{m}.{n}': torch.randn(s, generator=g) + m for m in range(2) for n, s in shapes.items()}
        save_file(state, str(tmp_path / f'epoch_{e:03d}.weights.safetensors'))
        paths.append(tmp_path / f'epoch_{e:03d}.weights.safetensors')
    layout = _compute._weight_layout(paths, 2)
    assert layout == sorted((n, s) for n, s in shapes.items())
    entries = [(p, m) for m in range(2) for p in paths]
    stacked = torch.stack([torch.cat([load_file(str(p))[f'member{m}.{n}'].reshape(-1) for n, _ in layout])
                           for p, m in entries]).double()
    for block in (1 << 24, 7):  # whole tensors, and blocks of a row or two (the slicing path)
        monkeypatch.setattr(_compute, '_GRAM_BLOCK', block)
        gram = _compute._streaming_gram(entries, layout)
        torch.testing.assert_close(gram, stacked @ stacked.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_compute._gram_cosine(gram), _old_cosine(entries), rtol=0, atol=1e-12)
    # a member with other parameters is refused, naming the file
    save_file({'member0.a': torch.ones(2), 'member1.b': torch.ones(2)}, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(ValueError, match=r"member 1 in '.*bad.safetensors' has other parameters"):
        _compute._weight_layout([tmp_path / 'bad.safetensors'], 2)
