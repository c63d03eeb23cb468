"""One small model of every family this package publishes, as the Hub tests push and pull them.

Imported by the tests and by the client subprocesses they start (which must import huggingface_hub with their own
``HF_ENDPOINT``), so it builds everything from seeds and tiny timm bases, with no network.
"""
import json
import shutil
from pathlib import Path

import timm
import torch
from torch import nn

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder

IMG = 32
NUM_CLASSES = 5
DATA_CONFIG = dict(input_size=(3, IMG, IMG), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, interpolation='bilinear')
# what a pushed repo may hold; a checkpoint (discriminators, optimiser state) or a pickle never
ALLOWED_FILES = {'config.json', 'model.safetensors', 'README.md', '.gitattributes', 'results.json', 'metrics.jsonl',
                 'args.yaml'}


def probe() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def write_run(model: nn.Module, folder: Path, trained_as: str, final: dict | None = None) -> Path:
    """A folder as train.py leaves it: the export, the run files and a checkpoint that must never be pushed."""
    export_folder(model, folder, data_config=DATA_CONFIG)
    final = final or dict(acc=81.25, loss=0.5, num_samples=160)
    (folder / 'results.json').write_text(json.dumps(dict(model=trained_as, dataset='digits', epochs=3, seed=7,
                                                         world_size=1, final_epoch=final)))
    (folder / 'metrics.jsonl').write_text(json.dumps(dict(epoch=0, val=final)) + '\n')
    (folder / 'args.yaml').write_text(f'model: {trained_as}\ndataset: digits\nepochs: 3\nseed: 7\n')
    torch.save({'task': {'discriminators.0.weight': torch.ones(1)}}, folder / 'checkpoint.pt')
    return folder


def _student_task(method: str, **task_kwargs):
    student = timm_ensembles.create_model(f'{method}_test_resnet', num_classes=NUM_CLASSES)
    teacher = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    return timm_ensembles.create_task(student, teachers=[teacher], **task_kwargs)


def families(root: Path) -> dict[str, nn.Module | Path]:
    """``{family: what to push}``: a train.py-like folder, a model, or a task (its export is pushed)."""
    root = Path(root)
    torch.manual_seed(0)
    out: dict[str, nn.Module | Path] = {}
    member_acc = dict(acc=81.25, loss=0.5, num_samples=160, member_acc=[80.0, 78.75], member_acc_mean=79.375,
                      mean_probs_acc=81.25, disagreement=0.125)
    fdl = timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    with torch.no_grad():  # a trained head, not the mean it starts as
        fdl.head.fc.weight.add_(0.01 * torch.randn_like(fdl.head.fc.weight))
    out['fdl'] = write_run(fdl, root / 'fdl', 'fdl_test_resnetx2', member_acc)
    out['ens'] = timm.create_model('ens', base_model='test_resnet', num_members=3, num_classes=NUM_CLASSES)
    collab = timm.create_model('collab', base_model='test_resnet', num_heads=2, num_classes=NUM_CLASSES)
    out['collab'] = write_run(collab, root / 'collab', 'collab_test_resnetx2', member_acc)
    export_folder(collab.export_head(), root / 'collab' / 'exported', data_config=DATA_CONFIG)
    out['collab-head'] = root / 'collab' / 'exported'
    out['ban'] = _student_task('ban')
    out['meal'] = _student_task('meal')  # V1: discriminators in the task, which must stay out of the repo
    gens = [export_folder(timm.create_model('test_resnet', num_classes=NUM_CLASSES), root / f'gen{k}',
                          data_config=DATA_CONFIG) for k in range(2)]
    out['bane'] = timm_ensembles.create_bane(gens)
    return out


def exported(obj: nn.Module | Path) -> nn.Module:
    """The model a push of ``obj`` publishes, in eval mode."""
    if isinstance(obj, Path):
        return timm.create_model(f'local-dir:{obj}', pretrained=True).eval()
    return (obj.export_model() if hasattr(obj, 'export_model') else obj).eval()


def fill_cache(cache: Path, repo_id: str, folder: Path, commit: str = 'a' * 40) -> None:
    """Lay out ``folder``'s files as huggingface_hub's cache holds a repo downloaded before (for HF_HUB_OFFLINE=1)."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
