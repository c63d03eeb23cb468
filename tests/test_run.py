"""The run folder (files.run_folder): where a run's files are, and that only readers look for a run above a model
folder."""
import json

from timm_ensembles.files.run_folder import RunFolder


def _finished(folder, results=None):
    folder.mkdir(parents=True)
    (folder / RunFolder.CONFIG).write_text(json.dumps(dict(architecture='test_resnet')))
    (folder / RunFolder.WEIGHTS).write_bytes(b'')
    if results is not None:
        (folder / RunFolder.RESULTS).write_text(json.dumps(results))


def test_a_model_exported_inside_a_run_is_described_by_the_run(tmp_path):
    _finished(tmp_path / 'run', results=dict(final_epoch=dict(acc=90.0)))
    _finished(tmp_path / 'run' / 'exported')
    view = RunFolder.of_model(tmp_path / 'run' / 'exported')
    assert view.exported_from == tmp_path / 'run'
    assert view.read()['results'] == dict(final_epoch=dict(acc=90.0))
    assert RunFolder.of_model(tmp_path / 'run').exported_from is None


def test_the_trainer_writes_into_its_own_folder_even_inside_a_finished_run(tmp_path):
    # a run killed between its final export and results.json, inside another run's folder: its resume must not
    # write args, results or metrics into the outer run
    _finished(tmp_path / 'outer', results=dict(final_epoch=dict(acc=1.0)))
    _finished(tmp_path / 'outer' / 'inner')
    run = RunFolder(tmp_path / 'outer' / 'inner')
    run.write_results(dict(final_epoch=dict(acc=2.0)))
    run.append_metrics(dict(epoch=0))
    run.append_metrics(dict(epoch=1))
    run.truncate_metrics(1)
    assert json.loads((tmp_path / 'outer' / 'inner' / RunFolder.RESULTS).read_text()) == dict(final_epoch=dict(acc=2.0))
    assert json.loads((tmp_path / 'outer' / RunFolder.RESULTS).read_text()) == dict(final_epoch=dict(acc=1.0))
    assert run.metrics() == [dict(epoch=0)] and not (tmp_path / 'outer' / RunFolder.METRICS).exists()


def test_metrics_skip_a_line_cut_short_by_a_crash(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / RunFolder.METRICS).write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    assert run.metrics() == [dict(epoch=0), dict(epoch=1)] and run.last_logged_epoch() == 1
