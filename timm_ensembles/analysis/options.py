"""The options of ``analyze_runs``, one object per part of the report, as the command line groups its flags.

Every field's default is the flag's default; a field is checked, with the flag's name in the message, when
``analyze_runs`` starts (before anything is evaluated), not when the object is made.
"""
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ['DataOptions', 'MetricOptions', 'SnapshotOptions', 'OODOptions', 'ShiftOptions', 'LandscapeOptions',
           'SamplerOptions', 'OutputOptions']


@dataclass
class DataOptions:
    """The evaluation data and how the sources read it.

    Attributes:
        dataset: Dataset name as for ``train.py --dataset``; None: the one every source's run recorded.
        data_dir: Root folder for timm dataset names.
        val_split: Split to evaluate on; None: the runs' own ``--val-split`` when they agree, else 'validation'.
        val_subset: Evaluate on a fixed stratified subset of this many images (as ``train.py --val-subset``).
        img_size: Input size of sources without a ``train.py`` args.yaml (Hub models); default their saved data
            config. A run is always evaluated with its own flags and saved config.
        in_chans: Input channels, likewise.
        crop_pct: Evaluation centre-crop fraction, likewise.
        batch_size: Evaluation batch size.
        workers: Data loader processes.
        device: Torch device; default CUDA when available.
        bn_batches: Training batches (of ``batch_size``) the BatchNorm statistics are recomputed on at every point
            of the landscape and for every sampled network (``--landscape-batches``).
    """
    dataset: str | None = None
    data_dir: str | None = None
    val_split: str | None = None
    val_subset: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    crop_pct: float | None = None
    batch_size: int = 128
    workers: int = 0
    device: str | None = None
    bn_batches: int = 10


@dataclass
class MetricOptions:
    """How every source's numbers are computed (sections members, between, uncertainty, ood, shift).

    Attributes:
        n_bins: Confidence bins of the ECE and reliability diagram (``--bins``).
        max_subsets: At most this many random k-subsets per ensemble size (None: all of them).
        feature_taps: Features of the feature-distance matrix, as ``forward_members_with_features`` takes them
            ('preact', 'stages' or 'convs'); None to skip it.
        include_buffers: Include BatchNorm buffers in the weight vectors.
    """
    n_bins: int = 15
    max_subsets: int | None = None
    feature_taps: str | None = 'preact'
    include_buffers: bool = False


@dataclass
class SnapshotOptions:
    """The snapshots of the trajectories and samplers sections.

    Attributes:
        epochs: Epochs of the snapshots to compare (and to fit the samplers' Gaussians to); None: every snapshot
            each run wrote. When given with the trajectories section, every source must have snapshots
            (``--snapshot-epochs``).
        allow_missing: Skip requested snapshot epochs a run did not write instead of failing
            (``--allow-missing-snapshots``).
    """
    epochs: list[int] | None = None
    allow_missing: bool = False


@dataclass
class OODOptions:
    """The out-of-distribution images of the ood section.

    Attributes:
        dataset: A ``train.py --dataset`` name (its validation split); each source reads it through its own eval
            transform. The ood section needs it.
        data_dir: Its root folder (as ``DataOptions.data_dir``).
        subset: At most this many OOD images (a fixed stratified subset).
    """
    dataset: str | None = None
    data_dir: str | None = None
    subset: int | None = None


@dataclass
class ShiftOptions:
    """The corruptions of the shift section.

    Attributes:
        corruptions: Names of ``shift.CORRUPTIONS`` (a list, or one comma-separated string); None: all of them
            (``--shift``).
        severities: Their severities, in 1..5 (severity 0, the clean set, is always shown).
    """
    corruptions: str | Sequence[str] | None = None
    severities: Sequence[int] = (1, 2, 3, 4, 5)


@dataclass
class LandscapeOptions:
    """The lines and the plane of the landscape section.

    Attributes:
        points: Points of every line of the landscape (and per axis of its plane) (``--landscape-points``).
        plane: Also draw the plane through the first two networks and a snapshot of the first one's trajectory (it
            needs that source's snapshot weights) (``--landscape-plane``).
        plane_epoch: The snapshot epoch of that plane (-1: the initialisation); None: the middle of the trajectory.
        plane_grid: Evenly spaced values per axis of the plane (the three solutions' coordinates are added).
    """
    points: int = 11
    plane: bool = False
    plane_epoch: int | None = None
    plane_grid: int = 11


@dataclass
class SamplerOptions:
    """The samplers section.

    Attributes:
        names: The samplers (``SAMPLERS``; a list, or one comma-separated string); None: every one that can run,
            with a note for the others. One named here that can run on no source is an error (``--samplers``).
        num_samples: Networks per sampled ensemble; None: the source's member count (4 for a single network).
        random_scale: Radius of the random sampler, relative to every filter's norm.
    """
    names: str | Sequence[str] | None = None
    num_samples: int | None = None
    random_scale: float = 0.1


@dataclass
class OutputOptions:
    """What is written and printed besides the numbers.

    Attributes:
        plots: Write the PNG plots (``--no-plots``: False).
        verbose: Print the key numbers (and the progress of the slow sections).
        progress: Progress bars on stderr over the evaluation of every source and the plots, when stderr is a
            terminal (``--no-progress``: False).
    """
    plots: bool = True
    verbose: bool = True
    progress: bool = True
