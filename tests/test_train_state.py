"""TrainingState: the training progress a checkpoint carries, under the keys checkpoints have always had."""
import torch

from timm_ensembles.train.state import TrainingState

# the entries of a checkpoint as train.py wrote them before TrainingState (beside task, optimizer, scheduler, scaler,
# run, teachers and ema): after epoch 2 of 3 of a run with --model-ema and --checkpoint-hist 2
WRITTEN = dict(
    epoch=3, num_updates=42, val_metrics=dict(loss=0.5, acc=81.25), mechanism=dict(diversity=dict(value=0.25, note='')),
    best=dict(metric='acc', value=81.25, epoch=2), checkpoint_hist=[dict(epoch=2, acc=81.25), dict(epoch=0, acc=50.0)],
    ema_val_metrics=dict(loss=0.75, acc=75.0),
)


def test_state_dict_round_trip_keeps_every_value_under_the_checkpoint_keys():
    state = TrainingState(epoch=3, num_updates=42, val_metrics=dict(loss=0.5, acc=81.25),
                          mechanism=dict(diversity=dict(value=0.25, note='')),
                          best=dict(metric='acc', value=81.25, epoch=2),
                          history=[dict(epoch=2, acc=81.25), dict(epoch=0, acc=50.0)],
                          ema_metrics=dict(loss=0.75, acc=75.0))
    assert state.state_dict() == WRITTEN
    loaded = TrainingState()
    loaded.load_state_dict(state.state_dict())
    assert loaded == state


def test_a_checkpoint_written_before_the_state_object_resumes(tmp_path):
    # the old layout, through torch.save/torch.load(weights_only=True) as train.py saves and reads it
    torch.save(dict(task={}, optimizer={}, run={}, **WRITTEN), tmp_path / 'checkpoint.pt')
    state = TrainingState()
    state.load_state_dict(torch.load(tmp_path / 'checkpoint.pt', weights_only=True))
    assert (state.epoch, state.num_updates, state.best, state.history, state.ema_metrics) == (
        3, 42, dict(metric='acc', value=81.25, epoch=2), [dict(epoch=2, acc=81.25), dict(epoch=0, acc=50.0)],
        dict(loss=0.75, acc=75.0))
    assert state.state_dict() == WRITTEN  # saved again, the same entries


def test_an_older_checkpoint_without_the_optional_entries_and_a_run_without_ema():
    state = TrainingState()
    state.load_state_dict(dict(epoch=1, num_updates=7))
    assert state == TrainingState(epoch=1, num_updates=7)
    assert state.state_dict() == dict(epoch=1, num_updates=7, val_metrics={}, mechanism={}, best=None,
                                      checkpoint_hist=[])  # no ema_val_metrics without an EMA


def test_improves_is_lower_for_a_loss_higher_otherwise_and_a_tie_does_not_improve():
    assert TrainingState().improves(3.0, 'loss') and TrainingState().improves(3.0, 'acc')
    loss = TrainingState(best=dict(metric='loss', value=1.0, epoch=0))
    assert (loss.improves(0.5, 'loss'), loss.improves(1.0, 'loss'), loss.improves(2.0, 'loss')) == (True, False, False)
    acc = TrainingState(best=dict(metric='acc', value=50.0, epoch=0))
    assert (acc.improves(60.0, 'acc'), acc.improves(50.0, 'acc'), acc.improves(40.0, 'acc')) == (True, False, False)
