"""The report command: ``python -m timm_ensembles.analysis`` on tiny untrained models and synthetic snapshots."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

import timm_ensembles  # noqa: F401  (registers the ensembles with timm)
from timm_ensembles import data as te_data
from timm_ensembles import metrics
from timm_ensembles.analysis import AnalysisError, DataOptions, OutputOptions, analyze_runs, main
from timm_ensembles.analysis._sources import _short_labels
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.train.snapshots import read_snapshots

pytestmark = pytest.mark.usefixtures('one_torch_thread')
ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
VAL_SUBSET = 60
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
EPOCHS = (0, 1, 2, 3)
# the default sections' plots
PNGS = ('disagreement', 'weight_cosine', 'feature_distance', 'ensemble_size', 'reliability',
        'trajectory_disagreement', 'trajectory_cosine', 'tsne', 'risk_coverage')


def _assert_close(saved, expected):
    """A matrix read back from summary.json equals the metric's tensor."""
    torch.testing.assert_close(torch.tensor(saved, dtype=torch.float64), torch.as_tensor(expected).double())


def _make_run(folder, model, dataset='digits', seed=0):
    """A folder as train.py writes it, for a model built here without training."""
    export_folder(model, folder, data_config=DATA_CONFIG)
    name = model.pretrained_cfg.get('architecture', 'model')
    (folder / 'args.yaml').write_text(yaml.safe_dump(dict(model=name, dataset=dataset, img_size=32, seed=seed)))
    (folder / 'results.json').write_text(json.dumps(dict(model=name, dataset=dataset, epochs=len(EPOCHS), seed=seed)))
    return folder


def _write_snapshots(folder, model, indices, epochs=EPOCHS, seed=0, weights=True):
    """Synthetic snapshots: each member drifts from its own start towards the labels, its weights likewise."""
    g = torch.Generator().manual_seed(seed)
    num_members = len(model.members)
    targets = torch.arange(len(indices)) % NUM_CLASSES
    start = 2.0 * torch.randn(len(indices), num_members, NUM_CLASSES, generator=g)
    snap = folder / 'snapshots'
    snap.mkdir(parents=True, exist_ok=True)
    for e in epochs:
        logits = start + e * 1.5 * torch.nn.functional.one_hot(targets, NUM_CLASSES)[:, None] \
            + 0.5 * torch.randn(start.shape, generator=g)
        meta = dict(epoch=str(e), model='ens', dataset='digits', num_classes=str(NUM_CLASSES),
                    num_members=str(num_members))
        save_file(dict(logits=logits.float().contiguous(), targets=targets, indices=torch.as_tensor(indices)),
                  str(snap / f'epoch_{e:03d}.safetensors'), metadata=meta)
        if weights:
            state = {f'member{m}.{n}': (p.detach() + 0.01 * e * torch.randn(p.shape, generator=g)).contiguous()
                     for m, member in enumerate(model.members) for n, p in member.named_parameters()}
            save_file(state, str(snap / f'epoch_{e:03d}.weights.safetensors'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    torch.manual_seed(0)
    ens = timm.create_model('ens', base_model='test_resnet', num_members=3, num_classes=NUM_CLASSES)
    fdl = timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    plain = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    out = dict(ens=_make_run(root / 'ens', ens), fdl=_make_run(root / 'fdl', fdl, seed=1),
               plain=_make_run(root / 'plain', plain))
    indices = list(range(0, 80, 4))
    _write_snapshots(out['ens'], ens, indices, seed=0)
    _write_snapshots(out['fdl'], fdl, indices, seed=1)
    out['root'] = root
    return out


@pytest.fixture(scope='module')
def report(runs):
    out = runs['root'] / 'analysis'
    assert main([str(runs['ens']), str(runs['fdl']), '--labels', 'ens', 'fdl', '--dataset', 'digits',
                 '--val-subset', str(VAL_SUBSET), '--out', str(out)]) == 0
    return out


def test_two_sources_write_every_file(report):
    for name in PNGS:
        assert (report / f'{name}.png').stat().st_size > 10_000, name
    summary = json.loads((report / 'summary.json').read_text())
    assert set(summary['files']) == set(PNGS)
    md = (report / 'summary.md').read_text()
    for name in PNGS:
        assert f'({name}.png)' in md
    assert '| ens |' in md and '| fdl |' in md and '## Between sources' in md and '## Trajectories' in md
    assert '## Uncertainty' in md and summary['sections'] == ['members', 'between', 'trajectories', 'uncertainty']


def test_summary_numbers_equal_the_metrics(report, runs):
    summary = json.loads((report / 'summary.json').read_text())
    saved = load_file(str(report / 'logits.safetensors'))
    targets = saved['targets']
    assert summary['num_samples'] == VAL_SUBSET
    for label, num_members in (('ens', 3), ('fdl', 2)):
        logits, s = saved[f'{label}.logits'], summary['sources'][label]
        assert logits.shape == (VAL_SUBSET, num_members, NUM_CLASSES)
        assert s['ensemble_acc'] == pytest.approx(metrics.ensemble_accuracy(logits, targets))
        assert s['member_acc'] == pytest.approx(metrics.member_accuracy(logits, targets).tolist())
        dis = metrics.pairwise_disagreement(logits)
        _assert_close(s['disagreement'], dis)
        assert s['disagreement_mean'] == pytest.approx(metrics.mean_offdiag(dis))
        cal = metrics.calibration(metrics.ensemble_probs(logits), targets, n_bins=15)
        assert s['calibration'] == pytest.approx(cal)
        member_cal = metrics.calibration(logits[:, 1].softmax(-1), targets, n_bins=15)
        assert s['member_calibration'][1] == pytest.approx(member_cal)
        curve = metrics.ensemble_size_curve(logits, targets)
        assert [c['acc_mean'] for c in s['ensemble_size']] == pytest.approx([c['acc_mean'] for c in curve])
        assert [c['brier_std'] for c in s['ensemble_size']] == pytest.approx([c['brier_std'] for c in curve])
        assert len(s['feature_distance']) == num_members and s['feature_distance_mean'] is not None
        assert len(s['weight_cosine']) == num_members
    # the stored logits are the members' outputs on the evaluation images, preprocessed as the run was
    model = timm.create_model(f"local-dir:{runs['ens']}", pretrained=True).eval()
    train_ds, val_ds, _ = te_data.create_datasets('digits', val_subset=VAL_SUBSET)
    _, loader = te_data.create_loaders(train_ds, val_ds, resolve_data_config(model=model), batch_size=32, workers=0,
                                       train_transform=False)
    with torch.no_grad():
        expected = torch.cat([model.forward_members(x) for x, _ in loader])
    torch.testing.assert_close(saved['ens.logits'], expected, rtol=1e-4, atol=1e-4)
    # between sources: one matrix over the 5 members, its blocks the per-source matrices
    between = summary['between']
    big = metrics.pairwise_disagreement(torch.cat([saved['ens.logits'], saved['fdl.logits']], dim=1))
    _assert_close(between['disagreement'], big)
    assert between['member_labels'] == ['ens:m0', 'ens:m1', 'ens:m2', 'fdl:m0', 'fdl:m1']
    assert between['block_mean'][0][1] == pytest.approx(float(big[:3, 3:].mean()))
    assert summary['between_weights']['cosine'][0][0] == pytest.approx(1.0)


def test_trajectory_numbers(report, runs):
    traj = json.loads((report / 'summary.json').read_text())['trajectories']
    assert len(traj['points']) == (3 + 2) * len(EPOCHS)
    # recompute from the snapshot files: points ordered source, member, epoch
    logits = []
    for label in ('ens', 'fdl'):
        snaps = [load_file(str(runs[label] / 'snapshots' / f'epoch_{e:03d}.safetensors'))['logits'] for e in EPOCHS]
        logits += [snaps[e][:, m] for m in range(snaps[0].shape[1]) for e in range(len(EPOCHS))]
    dis = metrics.pairwise_disagreement(torch.stack(logits, dim=1))
    _assert_close(traj['disagreement'], dis)
    consecutive = [float(dis[t * 4 + e, t * 4 + e + 1]) for t in range(5) for e in range(3)]
    assert traj['disagreement_stats']['within_consecutive'] == pytest.approx(sum(consecutive) / len(consecutive))
    last = [float(dis[i * 4 + 3, j * 4 + 3]) for i in range(5) for j in range(i + 1, 5)]
    assert traj['disagreement_stats']['between_last_epoch'] == pytest.approx(sum(last) / len(last))
    # the synthetic members converge to the labels from their own starts: along a trajectory they agree more
    stats = traj['disagreement_stats']
    assert stats['within_consecutive'] < stats['between_same_epoch']
    assert traj['weight_cosine_stats']['within_consecutive'] > traj['weight_cosine_stats']['between_same_epoch']
    # the weight cosine, streamed parameter by parameter from the files, is the cosine of the stacked vectors
    stacked = []
    for label in ('ens', 'fdl'):
        snap = read_snapshots(runs[label], weights=True)
        stacked += [snap.weights[e, m] for m in range(snap.weights.shape[1]) for e in range(len(EPOCHS))]
    torch.testing.assert_close(torch.tensor(traj['weight_cosine'], dtype=torch.float64),
                               metrics.cosine_similarity_matrix(torch.stack(stacked)), rtol=0, atol=1e-12)
    assert len(traj['tsne']) == len(traj['points'])


def test_mixed_class_counts_refused(runs, tmp_path):
    five = _make_run(tmp_path / 'five', timm.create_model('ens', base_model='test_resnet', num_members=2,
                                                          num_classes=5))
    with pytest.raises(AnalysisError, match=r'different numbers of classes.*ens .*10 classes.*five .*5 classes'):
        analyze_runs([str(runs['ens']), str(five)], data=DataOptions(dataset='digits'), out_dir=tmp_path / 'out',
                     output=OutputOptions(plots=False))


def test_mixed_datasets_refused(runs, tmp_path):
    other = tmp_path / 'other'
    _make_run(other, timm.create_model('test_resnet', num_classes=NUM_CLASSES), dataset='idx:/data/fashion-mnist')
    with pytest.raises(SystemExit, match=r'another dataset than --dataset \(digits\).*other .*idx:/data/fashion-mnist'):
        main([str(runs['ens']), str(other), '--dataset', 'digits', '--out', str(tmp_path / 'out')])
    # without --dataset the runs' own datasets must agree
    with pytest.raises(AnalysisError, match='Pass --dataset: the sources record different datasets'):
        analyze_runs([str(runs['ens']), str(other)], out_dir=tmp_path / 'out')


def test_missing_snapshot_epochs(runs, tmp_path, capsys):
    args = [str(runs['ens']), '--dataset', 'digits', '--val-subset', '20', '--no-plots', '--out', str(tmp_path)]
    with pytest.raises(SystemExit, match=r'Snapshots of source ens .*cannot be read.*--allow-missing-snapshots'):
        main(args + ['--snapshot-epochs', '1', '3', '7'])
    assert main(args + ['--snapshot-epochs', '1', '3', '7', '--allow-missing-snapshots']) == 0
    printed = capsys.readouterr().out
    assert 'ens: averaged probabilities acc' in printed
    assert "trajectories, disagreement: within a member's trajectory" in printed
    assert json.loads((tmp_path / 'summary.json').read_text())['trajectories']['epochs'] == {'ens': [1, 3]}
    # asking for snapshots of a run that has none is an error too
    with pytest.raises(SystemExit, match='plain .*has no snapshots folder'):
        main([str(runs['plain'])] + args + ['--snapshot-epochs', '1'])


def test_single_member_model(runs, tmp_path):
    report = analyze_runs([str(runs['plain']), str(runs['ens'])], data=DataOptions(dataset='digits', val_subset=20),
                          out_dir=tmp_path, output=OutputOptions(verbose=False))
    plain = report['sources']['plain']
    assert plain['num_members'] == 1 and plain['disagreement_mean'] is None and plain['weight_cosine'] is None
    assert any('single-member' in n for n in plain['notes'])
    assert plain['ensemble_acc'] == pytest.approx(plain['member_acc'][0])
    # it still enters the comparison between sources, and its weights compare with the ensemble's members
    assert report['between']['block_mean'][0][0] is None and report['between']['block_mean'][0][1] is not None
    assert len(report['between_weights']['cosine']) == 4
    assert 'single-member' in (tmp_path / 'summary.md').read_text()
    assert 'plain: no snapshots' in ' '.join(report['trajectories']['notes'])


def test_preprocessing(tmp_path):
    # a folder without args.yaml (a Hub model, an export): its saved data config, or the size given here
    folder = tmp_path / 'export'
    export_folder(timm.create_model('test_resnet', num_classes=NUM_CLASSES), folder, data_config=DATA_CONFIG)
    kwargs = dict(out_dir=tmp_path / 'out', output=OutputOptions(plots=False, verbose=False))
    data = DataOptions(dataset='digits', val_subset=10)
    assert analyze_runs([str(folder)], data=data, **kwargs)['sources']['export']['input_size'] == [3, 32, 32]
    report = analyze_runs([f'local-dir:{folder}'], data=replace(data, img_size=48), labels=['big'], **kwargs)
    assert report['sources']['big']['input_size'] == [3, 48, 48]
    with pytest.raises(AnalysisError, match=r'Cannot evaluate source gray: .*input size \(1, 48, 48\)'):
        analyze_runs([str(folder)], data=replace(data, img_size=48, in_chans=1), labels=['gray'], **kwargs)


def test_shared_layer_heads(tmp_path):
    collab = timm.create_model('collab', base_model='test_resnet', num_heads=2, num_classes=NUM_CLASSES)
    folder = _make_run(tmp_path / 'collab', collab)
    report = analyze_runs([f'local-dir:{folder}'], data=DataOptions(dataset='digits', val_subset=20),
                          out_dir=tmp_path / 'out', output=OutputOptions(plots=False, verbose=False))
    s = report['sources']['collab']
    assert s['num_members'] == 2 and s['disagreement_mean'] is not None
    # heads on shared layers have no weight vectors of their own, and this model exposes no member features
    assert s['weight_cosine'] is None and s['feature_distance'] is None
    assert any('no weight cosine' in n for n in s['notes']) and any('no feature distance' in n for n in s['notes'])


def test_different_snapshot_subsets_refused(runs, tmp_path):
    other = _make_run(tmp_path / 'other', timm.create_model('ens', base_model='test_resnet', num_members=2,
                                                            num_classes=NUM_CLASSES))
    _write_snapshots(other, timm.create_model('ens', base_model='test_resnet', num_members=2,
                                              num_classes=NUM_CLASSES), list(range(1, 81, 4)), weights=False)
    with pytest.raises(AnalysisError, match=r'Snapshot subsets differ between sources \(ens: 20 samples.*other'):
        analyze_runs([str(runs['ens']), str(other)], data=DataOptions(dataset='digits'), out_dir=tmp_path / 'out',
                     output=OutputOptions(plots=False))


def test_bad_sources(tmp_path):
    with pytest.raises(SystemExit, match='neither an existing folder'):
        main([str(tmp_path / 'nope'), '--dataset', 'digits'])
    with pytest.raises(AnalysisError, match='2 labels for 1 sources'):
        analyze_runs([str(tmp_path)], labels=['a', 'b'])


def test_hub_sources_are_read_with_their_run_files(runs, tmp_path, monkeypatch):
    from _hub_families import fill_cache

    # two repos as push_to_hub leaves them (weights, config, run files), served from an offline cache (conftest sets
    # HF_HUB_OFFLINE=1)
    fill_cache(tmp_path / 'cache', 'org/ens', runs['ens'])
    other = tmp_path / 'other'
    _make_run(other, timm.create_model('test_resnet', num_classes=NUM_CLASSES), dataset='fashion-mnist')
    fill_cache(tmp_path / 'cache', 'org/other', other)
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'cache'))
    report = analyze_runs(['hf-hub:org/ens'], data=DataOptions(dataset='digits', val_subset=20),
                          out_dir=tmp_path / 'out', output=OutputOptions(verbose=False))
    assert report['sources']['ens']['num_members'] == 3
    with pytest.raises(AnalysisError, match=r'another dataset than --dataset \(digits\).*other'):
        analyze_runs(['hf-hub:org/ens', 'hf-hub:org/other'], data=DataOptions(dataset='digits', val_subset=20),
                     out_dir=tmp_path / 'out', output=OutputOptions(verbose=False))


def test_printed_accuracies_name_their_rule(tmp_path, capsys):
    """The printed line names both rules, with training's numbers for the same images: the model's own rule (FDL's
    trained head) is the run's val acc, the averaged probabilities its mean-probs accuracy."""
    # train.py's default folder name: the report labels it without the time stamp
    run = tmp_path / '20261207-103844-fdl_test_resnetx2'
    subprocess.run([sys.executable, str(ROOT / 'train.py'), '--model', 'fdl_test_resnetx2', '--epochs', '2',
                    '--train-subset', '320', '--val-subset', '100', '--batch-size', '32', '--workers', '0',
                    '--no-progress', '--img-size', '32', '--output', str(run)],
                   check=True, capture_output=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    final = json.loads((run / 'results.json').read_text())['final_epoch']
    assert final['acc'] != final['mean_probs_acc']  # this run's two rules differ: the line must not swap them
    assert main([str(run), '--val-subset', '100', '--sections', 'members', '--no-plots', '--out',
                 str(tmp_path / 'report')]) == 0
    printed = capsys.readouterr().out
    assert f"\nfdl_test_resnetx2: averaged probabilities acc {final['mean_probs_acc']:.2f}, the model's own rule" \
           f" (linear) {final['acc']:.2f} | member acc mean" in printed
    s = json.loads((tmp_path / 'report' / 'summary.json').read_text())['sources']['fdl_test_resnetx2']
    assert s['model_rule'] == 'linear'
    assert s['model_acc'] == pytest.approx(final['acc']) and s['ensemble_acc'] == pytest.approx(final['mean_probs_acc'])
    assert s['member_acc'] == pytest.approx(final['member_acc'])


def test_one_run_heatmaps_fit_their_figure(tmp_path, monkeypatch):
    """At default labels (train.py's folder names), the one-run heatmaps' titles and tick labels stay inside the
    figure and every cell label inside its cell; cells too small for a readable number get none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from timm_ensembles.analysis import _plots

    figures = []
    save = _plots._save
    monkeypatch.setattr(_plots, '_save', lambda fig, path: (figures.append(fig), save(fig, path)))
    g = torch.Generator().manual_seed(0)

    def source(num_members):
        m = torch.rand(num_members, num_members, generator=g) * 0.05
        return dict(num_members=num_members, disagreement=((m + m.T) / 2).fill_diagonal_(0).tolist())

    long = '20261207-103844-fdl_resnet18x4-lr0.05-wd5e-4-a-long-name'
    assert _plots._plot_disagreement(tmp_path / 'one.png', {long: source(4)}, None)
    assert _plots._plot_disagreement(tmp_path / 'two.png', {long: source(4), 'x16': source(16)}, None)
    texts = {}
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)  # the layout as saved
        inside = fig.bbox.padded(1)
        for ax in [ax for ax in fig.axes if ax.images]:  # each heatmap, not its colour bar
            labels = [ax.title] + ax.get_xticklabels() + ax.get_yticklabels()
            assert all(inside.contains(*t.get_window_extent(renderer).min) and
                       inside.contains(*t.get_window_extent(renderer).max) for t in labels)
            for t in ax.texts:
                j, i = t.get_position()
                (x0, y0), (x1, y1) = ax.transData.transform([(j - 0.5, i + 0.5), (j + 0.5, i - 0.5)])
                box = t.get_window_extent(renderer)
                assert x0 < box.x0 and box.x1 < x1 and y0 < box.y0 and box.y1 < y1, t.get_text()
            texts.setdefault(len(fig.axes), []).append(len(ax.texts))
    # on one line the title would not fit: the label below, its middle elided to the panel's width
    what, label = figures[0].axes[0].get_title().split('\n')
    assert what == 'member disagreement' and label.startswith('20261207-1038') and label.endswith('long-name')
    assert '…' in label and len(label) < len(long)
    assert texts == {2: [16], 4: [16, 0]}  # 4 x 4 cells labelled; 16 x 16 cells too small at 7 inches
    assert _short_labels(['20261207-103844-fdl_resnet18x4', 'ens']) == ['fdl_resnet18x4', 'ens']
    assert _short_labels(['20261207-103844-ens', '20261208-090000-ens']) == ['20261207-103844-ens',
                                                                          '20261208-090000-ens']
