"""An IDX copy of a dataset with symmetric label noise in its training labels (the collaborative-learning paper's
robustness setting): each training label is replaced, with probability ``rate``, by one of the other classes drawn
uniformly; the test labels and every image file stay as they are (linked, not copied).

    python studies/noisy_labels.py /usr/share/datasets/fashion-mnist output/study/data/fashion-mnist-noise40 --rate 0.4
"""
import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

_LABELS = 'train-labels-idx1-ubyte'
_HEADER = 8  # magic (4 bytes) and count (4 bytes) of an IDX1 file


def _read(path: Path) -> bytes:
    return (gzip.open if path.suffix == '.gz' else open)(path, 'rb').read()


def noisy_copy(src: Path, dst: Path, rate: float, seed: int = 0) -> float:
    """Write the noisy copy of ``src`` into ``dst`` (nothing is written when ``dst`` holds it already) and return the
    share of training labels that differ from the originals."""
    src, dst = Path(src), Path(dst)
    labels_out = dst / _LABELS
    original = next(p for p in (src / _LABELS, src / f'{_LABELS}.gz') if p.exists())
    raw = _read(original)
    clean = np.frombuffer(raw, dtype=np.uint8, offset=_HEADER)
    if not labels_out.exists():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if not f.name.startswith(_LABELS) and not (dst / f.name).exists():
                (dst / f.name).symlink_to(f.resolve())
        rng = np.random.default_rng(seed)
        num_classes = int(clean.max()) + 1
        flip = rng.random(clean.size) < rate
        # an offset of 1..C-1 classes: a flipped label is never its own class, and every other class equally likely
        noisy = np.where(flip, (clean + rng.integers(1, num_classes, clean.size)) % num_classes, clean)
        tmp = labels_out.with_suffix('.tmp')
        tmp.write_bytes(raw[:_HEADER] + noisy.astype(np.uint8).tobytes())
        tmp.replace(labels_out)
    noisy = np.frombuffer(labels_out.read_bytes(), dtype=np.uint8, offset=_HEADER)
    return float((noisy != clean).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='an IDX folder (train-/t10k- images and labels, raw or .gz)')
    parser.add_argument('dst', help='the folder to write')
    parser.add_argument('--rate', type=float, default=0.4, help='probability that a training label is replaced')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(f'{noisy_copy(Path(args.src), Path(args.dst), args.rate, args.seed):.4f} of the training labels changed')
    return 0


if __name__ == '__main__':
    sys.exit(main())
