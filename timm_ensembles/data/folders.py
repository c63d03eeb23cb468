"""Image folders read strictly: the split folders must exist, hold the same classes and neither contain the other."""
import os

from timm.data import create_dataset, get_img_extensions

from .datasets import _ACCEPTED

# timm's split synonyms (timm.data.dataset_factory): a split folder may be named by any of its group
_FOLDER_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def _has_images(folder: str) -> bool:
    """Whether ``folder`` holds an image timm's folder reader would read, at any depth (stops at the first)."""
    types = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in types for f in files):
            return True
    return False


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _holds_images_directly(folder: str) -> bool:
    """Whether ``folder`` itself holds images (not only in subfolders): a class folder, not a split folder."""
    types = get_img_extensions(as_set=True)
    return any(os.path.splitext(e.name)[1].lower() in types for e in os.scandir(folder) if e.is_file())


def _split_folder(root: str, split: str) -> str | None:
    """The folder of ``split`` under ``root``: ``root/<split>``, else a folder named by one of its timm synonyms
    (``val`` for ``validation``, ...); None when there is none. timm's ``create_dataset`` falls back to ``root``
    itself, which would validate on the training images."""
    name = split.split('[')[0]
    candidates = [name] + [s for group in _FOLDER_SYNONYMS if name in group for s in group if s != name]
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if candidate and os.path.isdir(path):
            return path
    return None


def _check_image_folder(root: str, label: str) -> None:
    """A folder given as an image dataset exists, is not empty and holds images, or one line says which it is not."""
    if not os.path.exists(root):
        raise FileNotFoundError(f'{label} does not exist.')
    if not os.path.isdir(root):
        raise ValueError(f'{label} is a file; expected a folder. {_ACCEPTED}')
    if not os.listdir(root):
        raise ValueError(f'{label} is empty: an image folder holds <split>/<class>/<image> files (e.g.'
                         f' train/cat/1.png and validation/cat/2.png).')
    if not _has_images(root):
        raise ValueError(f"{label} holds no images (timm reads {', '.join(get_img_extensions())}) and no"
                         f' MNIST-format IDX files. {_ACCEPTED}')


def _class_folders(split_path: str, split: str, split_arg: str) -> set[str]:
    """The class folders of one split folder, each holding images; an empty one, or images outside any, are
    refused (timm would drop the class, or make a class named ''). A hidden folder (``.ipynb_checkpoints``) counts
    only when it holds images, as timm then makes it a class."""
    if _holds_images_directly(split_path):
        raise ValueError(f'{split_arg} {split!r}: {split_path} holds images directly; put each class\'s images in'
                         f' a subfolder named after the class ({split_path}/<class>/<image>).')
    classes, empty = set(), []
    for name in _subfolders(split_path):
        if _has_images(os.path.join(split_path, name)):
            classes.add(name)
        elif not name.startswith('.'):
            empty.append(name)
    if empty:
        raise ValueError(f'{split_arg} {split!r}: the class folder{"s" if len(empty) > 1 else ""}'
                         f' {", ".join(os.path.join(split_path, e) for e in empty)} hold{"" if len(empty) > 1 else "s"}'
                         f' no images: fill {"them" if len(empty) > 1 else "it"} or remove'
                         f' {"them" if len(empty) > 1 else "it"} (from every split).')
    return classes


def _create_image_folder(root: str, train_split: str, val_split: str, img_mode: str, label: str):
    """The training and validation sets of an image folder (``root/<split>/<class>/<image>``), read by timm's
    ``create_dataset`` as timm's train.py reads ``--data-dir``, but strictly: each split folder must exist (timm
    falls back to ``root``), neither may contain the other, both hold the same two or more classes, none empty."""
    if os.path.isfile(root) and root.endswith('.tar'):  # a tar of class folders: no split folders to tell apart
        raise ValueError(f'{root} is one tar file of images: training and validation would read the same images;'
                         f' give a folder with {train_split}/ and {val_split}/ split folders.')
    _check_image_folder(root, label)
    paths = {}
    for split, arg in ((train_split, '--train-split'), (val_split, '--val-split')):
        path = _split_folder(root, split)
        if path is None:
            folders = [f for f in _subfolders(root) if not f.startswith('.')]
            if folders and all(_holds_images_directly(os.path.join(root, f)) for f in folders):
                hint = (f'its folders ({", ".join(folders)}) are class folders, and class folders alone have no'
                        f' validation split: make {root}/{train_split}/<class> and {root}/{val_split}/<class>')
            else:
                there = f'the folders there are {", ".join(folders)}' if folders else 'it has no subfolders'
                hint = f'{there}: name the split folders with --train-split and --val-split'
            raise ValueError(f'{arg} {split!r}: {root} has no {split!r} folder; {hint} (timm would read the whole'
                             f' folder in its place, training images included).')
        paths[arg] = os.path.realpath(path)
    train_path, val_path = paths['--train-split'], paths['--val-split']
    if train_path == val_path:
        raise ValueError(f'--train-split {train_split!r} and --val-split {val_split!r} are the same folder'
                         f' ({train_path}): validation would measure the training images.')
    for inner, outer, what in ((train_path, val_path, 'the validation folder contains the training folder'),
                               (val_path, train_path, 'the training folder contains the validation folder')):
        if inner.startswith(outer + os.sep):
            raise ValueError(f'--train-split {train_split!r} ({train_path}) and --val-split {val_split!r}'
                             f' ({val_path}): {what}, so both would read the same images; give two separate folders.')
    train_classes = _class_folders(train_path, train_split, '--train-split')
    val_classes = _class_folders(val_path, val_split, '--val-split')
    if len(train_classes) < 2:
        found = f'one class only ({next(iter(train_classes))!r})' if train_classes else 'no class folders'
        raise ValueError(f'{label}: {train_path} holds {found}: a classifier needs two or more class'
                         f' folders in each split.')
    if train_classes != val_classes:
        missing, extra = sorted(train_classes - val_classes), sorted(val_classes - train_classes)
        parts = ([f'{val_path} has no class folder {", ".join(map(repr, missing))}'] if missing else []) + \
                ([f'{train_path} has no class folder {", ".join(map(repr, extra))}'] if extra else [])
        raise ValueError(f'{label}: the splits hold different classes: {"; ".join(parts)}. Training and'
                         f' validation need the same class folders.')
    kwargs = dict(search_split=False, input_img_mode=img_mode)
    train_ds = create_dataset('', root=train_path, split=train_split, is_training=True, **kwargs)
    # the same label for the same class folder in both splits
    val_ds = create_dataset('', root=val_path, split=val_split, class_map=dict(train_ds.reader.class_to_idx),
                            **kwargs)
    return train_ds, val_ds, (train_path, val_path)
