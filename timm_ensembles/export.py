"""One graph out of Python: a model of this package (or of timm) as one ONNX or ``torch.export`` file.

    import timm_ensembles
    timm_ensembles.export(model, 'fdl.onnx')                          # a model, a task, a folder or a Hub name
    timm_ensembles.export('output/train/fdl-run', 'fdl.pt2', format='torch.export', members=True)

    timm-ensembles-export --model hf-hub:<org>/<name> --output model.onnx --members

(also ``python -m timm_ensembles.export``). The graph computes what the model's ``forward`` computes in eval mode:

- an ensemble (``ens``, ``fdl``, ``bane``, ``ensemble``): every member and the combine rule (the linear head, the
  averaged probabilities or logits, the vote) inside the graph; ``members=True`` adds the members' logits
  ``[B, M, C]`` as a second output, for uncertainty (``timm_ensembles.analysis.uncertainty`` reads them);
- a collaborative net: its designated head as a plain network of the base architecture (``export_head()``, what
  ``train.py`` ships in ``exported/``); all heads where ``forward`` averages them or with ``members=True``;
- a student (born-again, MEAL): the bare student; a task: its ``export_model()``, as ``train.py`` exports it;
- a plain timm model as it is. A calibration temperature (``uncertainty.calibrate``) stays in the graph.

The batch size is dynamic, the image size fixed (the model's data config, or ``input_size``). Both formats come from
one trace, ``torch.export.export`` (non-strict), with the batch a ``torch.export.Dim``: its constraint solver refuses a
model that fixes the batch size instead of exporting one size silently. ONNX is that program translated by torch's
own ONNX exporter (the ``torch.export``-based one, torch's default since 2.9; the TorchScript-based one with
``dynamic_axes`` is deprecated). Given the program rather than the model, that exporter does not fall back to its
other capture strategies (strict tracing, draft export), which could export a graph other than the traced one. The
file is written beside its destination, checked against the model (eager) at batch sizes 2 and 3 (``verify``: ONNX
in onnxruntime, ``torch.export`` loaded back), and only then put in place.

Member strategies: ``torch.export`` traces neither vmap's batching rules nor the grouped fusion (``auto`` picks one
of them), so the export runs the members one after another, the loop that those strategies are checked against when
they are set, and says so in a log line; the model keeps its strategy.
"""
import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config
from torch import nn

from .models.distill import StudentModel
from .models.strategies import LoopStrategy, MemberStrategy
from .task import Task
from .utils.extras import MissingExtraError, require

__all__ = ['export', 'ExportError', 'FORMATS', 'get_args_parser', 'main']

_logger = logging.getLogger('timm_ensembles.export')  # also when run as __main__

FORMATS = ('onnx', 'torch.export')
INPUT_NAME = 'input'
OUTPUT_NAMES = ('logits', 'member_logits')
# the batch sizes the written file is checked at: two, so that a graph with the example's batch size fixed is caught
VERIFY_BATCHES = (2, 3)
# largest difference from the model allowed in the check, relative to the outputs' scale (at least 1)
VERIFY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """A model that cannot be exported as asked, or a destination that cannot be written; the message says why."""


class _WithMembers(nn.Module):
    """The model's prediction and its members' logits, from one pass of the members."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.model.forward_members(x)
        logits = self.model.combine(members)
        tempered = getattr(self.model, '_tempered', None)
        return (logits if tempered is None else tempered(logits)), members


class _Members(nn.Module):
    """The members' logits alone: traced when the whole model fails, to tell the members from the combine rule."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_members(x)


def _has_members(model: nn.Module) -> bool:
    return callable(getattr(model, 'forward_members', None)) and callable(getattr(model, 'combine', None))


def _graph_module(model: nn.Module, members: bool = False) -> nn.Module:
    """The module whose ``forward`` is exported for ``model`` (a model or a task; see the module's docstring).

    Raises:
        ExportError: ``members=True`` for a model without members.
    """
    if isinstance(model, Task):
        model = model.export_model()
    if members:
        if not _has_members(model):
            raise ExportError(f'members=True: {type(model).__name__} is one network, it has no members whose logits'
                              f' could be a second output; export it without members (--members).')
        return _WithMembers(model)
    plain = getattr(model, 'temperature', 1.0) == 1.0  # a temperature lives in the wrapper's forward: keep it
    if plain and getattr(model, 'combine_mode', None) == 'head' and callable(getattr(model, 'export_head', None)):
        return model.export_head()
    if plain and isinstance(model, StudentModel):
        return model.student
    return model


def _what(model: nn.Module, module: nn.Module) -> str:
    """The exported graph in words, for the log."""
    name = type(model).__name__
    if isinstance(module, _WithMembers):
        return f'{name} with its members\' logits as a second output'
    if module is not model and isinstance(model, StudentModel):
        return f'the student of {name}, a plain {type(module).__name__}'
    if module is not model and callable(getattr(model, 'export_head', None)):
        return f'the designated head of {name} (export_head), a plain {type(module).__name__}'
    if _has_members(model):
        mode = getattr(model, 'combine_mode', None)
        size = getattr(model, 'num_members', None) or getattr(model, 'num_heads', None) or 'its'
        return f'{name} ({size} members{f", combine {mode!r}" if mode else ""})'
    return name


@contextlib.contextmanager
def _members_in_a_loop(module: nn.Module) -> Iterator[None]:
    """Every ensemble inside ``module`` runs its members in a loop for the duration (see the module's docstring)."""
    swapped = []
    for m in module.modules():
        strategy = m.__dict__.get('_member_strategy')
        if isinstance(strategy, MemberStrategy) and strategy.name != 'loop':
            _logger.info(f"{type(m).__name__}: the export runs the members one after another (loop), not with member"
                         f" strategy {m.member_strategy!r}, which torch.export cannot trace; the loop is the reference"
                         f" that strategy is checked against (the same outputs), and the model keeps its strategy")
            swapped.append((m, strategy))
            m._member_strategy = LoopStrategy(m.members, getattr(m, 'base_model', ''))
    try:
        yield
    finally:
        for m, strategy in swapped:
            m._member_strategy = strategy


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _example(module: nn.Module, input_size: Sequence[int], batch: int) -> torch.Tensor:
    ref = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch))
    return x if ref is None else x.to(ref.device, ref.dtype)


def _first_line(error: BaseException) -> str:
    text = ' '.join(str(error).strip().splitlines()[:1]) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + ' ...'


def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim('batch', min=1)}


def _trace(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, (x,), dynamic_shapes=(_batch_dim(),), strict=False)
    except Exception as e:  # noqa: BLE001  (whatever torch.export refuses is said in one line, with the part)
        raise ExportError(_untraceable(module, model, x, e)) from e


def _untraceable(module: nn.Module, model: nn.Module, x: torch.Tensor, error: Exception) -> str:
    """The one line for a model that torch.export cannot trace: the part that fails, and what to choose instead."""
    name = type(model).__name__
    target = module.model if isinstance(module, _WithMembers) else module
    if _has_members(target):
        try:
            torch.export.export(_Members(target), (x,), dynamic_shapes=(_batch_dim(),), strict=False)
        except Exception as e:  # noqa: BLE001
            base = getattr(target, 'base_model', None) or ', '.join(
                sorted({type(m).__name__ for m in getattr(target, 'members', ())})) or 'its members'
            return (f"{name}: torch.export cannot trace its members' forward ({base}: {_first_line(e)}). Their"
                    f" forward must have no Python branch on tensor values and no fixed batch size (timm's own"
                    f' models export): choose a base model that torch.export traces.')
        mode = getattr(target, 'combine_mode', 'its own')
        return (f'{name}: torch.export cannot trace its combine rule {mode!r} ({_first_line(error)}); the members'
                f" trace. Choose combine='mean_probs' or 'mean_logits', which export (EnsembleModel.set_combine, or"
                f' the combine= argument of the model).')
    return (f"{name}: torch.export cannot trace its forward ({_first_line(error)}). It must have no Python branch on"
            f" tensor values and no fixed batch size (timm's own models export).")


def check_destination(path: str | os.PathLike, format: str = 'onnx') -> Path:
    """Refuse, in one line, an unknown format or a destination that cannot be written (a folder, a missing folder,
    no permission), before anything is built or written.

    Raises:
        ExportError: What is wrong and what would be right.
    """
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}: expected one of {', '.join(map(repr, FORMATS))}.")
    path = Path(path).expanduser()
    suffix = '.onnx' if format == 'onnx' else '.pt2'
    if path.is_dir():
        raise ExportError(f"'{path}' is a folder: give the file to write, e.g. '{path / f'model{suffix}'}'.")
    if not path.parent.is_dir():
        raise ExportError(f"Cannot write '{path}': the folder '{path.parent}' "
                          f"{'is a file' if path.parent.exists() else 'does not exist'}.")
    try:  # the file is staged beside its destination: whether that can be written is asked of the file system
        tempfile.TemporaryDirectory(prefix='.timm-ensembles-export-', dir=path.parent).cleanup()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"'{path}' is read-only")
    except OSError as e:
        raise ExportError(f"Cannot write '{path}' ({e.strerror or e}): give a path in a folder you can write to.") \
            from None
    return path


def _load(source: str | os.PathLike, trust_member_repos: bool) -> nn.Module:
    from .models.hub import load_from_hub

    name = str(source)
    if not (name.startswith(('hf-hub:', 'local-dir:')) or Path(name).is_dir()):
        what = 'a file' if Path(name).exists() else 'not a folder here'
        raise ExportError(f"'{name}' is {what}: give a model, a train.py output folder, 'local-dir:<folder>' or"
                          f" 'hf-hub:<org>/<name>'.")
    return load_from_hub(name, trust_member_repos=trust_member_repos)


def _outputs(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _verify(module: nn.Module, staged: Path, format: str, input_size: Sequence[int]) -> str:
    """Run the written file at ``VERIFY_BATCHES`` against the model; returns what was checked, for the log."""
    ref = _example(module, input_size, 1)
    if format == 'onnx':
        if ref.device.type != 'cpu' or ref.dtype != torch.float32:
            return (f'not checked: the model is {ref.dtype} on {ref.device}, onnxruntime runs float32 on the CPU here'
                    f' (export a float32 copy on the CPU to check it)')
        ort = require('onnxruntime', 'checking the ONNX file against the model (verify=False, --no-verify skip it)')
        session = ort.InferenceSession(str(staged), providers=['CPUExecutionProvider'])

        def run(x):
            return [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()})]
        where = f'onnxruntime {ort.__version__}'
    else:
        loaded = torch.export.load(staged).module()

        def run(x):
            return _outputs(loaded(x))
        where = 'the loaded program'
    worst = 0.0
    for batch in VERIFY_BATCHES:
        x = _example(module, input_size, batch)
        with torch.no_grad():
            want, got = _outputs(module(x)), run(x)
        for w, g in zip(want, got):
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(f'The exported graph gives an output of shape {tuple(g.shape)} at batch {batch}'
                                  f' where the model gives {tuple(w.shape)}: not written.')
            scale = max(1.0, float(w.abs().max()))
            worst = max(worst, float((g.to(w) - w).abs().max()) / scale)
    if worst > VERIFY_TOLERANCE:
        raise ExportError(f'The exported graph differs from the model by up to {worst:.2g} (relative to the outputs\''
                          f' scale) in {where}, more than {VERIFY_TOLERANCE:g}: not written. verify=False (--no-verify)'
                          f' writes it anyway.')
    return f"matches the model in {where} at batch sizes {' and '.join(map(str, VERIFY_BATCHES))} (largest" \
           f' difference {worst:.1g} of the outputs\' scale)'


def export(
        model: nn.Module | str | os.PathLike,
        path: str | os.PathLike,
        format: str = 'onnx',
        *,
        members: bool = False,
        input_size: Sequence[int] | None = None,
        opset_version: int | None = None,
        verify: bool = True,
        trust_member_repos: bool = False,
) -> Path:
    """Write a model as one graph: an ONNX file or a ``torch.export`` program (``.pt2``), with a dynamic batch size.

    Input ``'input'`` ``[batch, C, H, W]``, preprocessed as the model's data config says; output ``'logits'``
    ``[batch, classes]`` and with ``members`` ``'member_logits'`` ``[batch, members, classes]``. A ``.pt2`` file loads
    with ``torch.export.load(path).module()``; an ONNX file runs in onnxruntime.

    Args:
        model: A model (this package's or any timm model), a task (its ``export_model()``), a ``train.py`` output
            folder, ``local-dir:<folder>`` or ``hf-hub:<org>/<name>`` (loaded with ``hub.load_from_hub``).
        path: The file to write (its folder must exist); an existing file is replaced.
        format: ``'onnx'`` or ``'torch.export'``.
        members: Also output the members' logits (ensembles, collaborative nets).
        input_size: ``(C, H, W)`` of the graph's input; default: the model's data config.
        opset_version: The ONNX opset; default: torch's.
        verify: Check the file against the model at batch sizes 2 and 3 before putting it in place (ONNX: in
            onnxruntime, for a float32 model on the CPU).
        trust_member_repos: For a folder or Hub name: load members that its config names in other repos.

    Returns:
        The path written.

    Raises:
        ExportError: An unknown format, a destination that cannot be written, ``members`` for a model without members,
            a forward that torch.export cannot trace (naming the part: the members or the combine rule), or a file that
            does not match the model. Nothing is written then.
        MissingExtraError: ONNX without the ``export`` extra (onnx, onnxscript, onnxruntime).
    """
    path = check_destination(path, format)
    if format == 'onnx':
        for package in ('onnx', 'onnxscript'):
            require(package, 'ONNX export (timm_ensembles.export)')
    if not isinstance(model, nn.Module):
        model = _load(model, trust_member_repos)
    source = model.export_model() if isinstance(model, Task) else model
    module = _graph_module(source, members)
    if input_size is None:
        input_size = resolve_data_config(model=source)['input_size']
    input_size = tuple(int(s) for s in input_size)
    size = ', '.join(map(str, input_size))
    _logger.info(f'exporting {_what(source, module)} to {path} ({format}, input [batch, {size}]'
                 f'{", outputs logits and member_logits" if members else ""})')
    with _in_eval_mode(module), _members_in_a_loop(module):
        program = _trace(module, source, _example(module, input_size, 2))
        staging = Path(tempfile.mkdtemp(prefix='.timm-ensembles-export-', dir=path.parent))
        try:
            if format == 'torch.export':
                staged = staging / 'program.pt2'  # torch.export.load reads a .pt2 name only
                torch.export.save(program, staged)
            else:
                staged = staging / path.name  # an external data file would be named after it
                names = list(OUTPUT_NAMES[:2 if members else 1])
                # dynamo=True: the default since torch 2.9, said for older ones; the 'batch' string names the axis
                onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False, opset_version=opset_version,
                                                 input_names=[INPUT_NAME], output_names=names,
                                                 dynamic_shapes=({0: 'batch'},))
                onnx_program.save(staged)  # weights beside it (<name>.data) only past ONNX's 2 GB limit
            checked = _verify(module, staged, format, input_size) if verify else 'not checked (verify=False)'
            beside = [f for f in staging.iterdir() if f != staged]
            for f in beside:
                os.replace(f, path.parent / f.name)
            os.replace(staged, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    weights = f', weights in {beside[0].name}' if beside else ''
    _logger.info(f'wrote {path} ({path.stat().st_size / 1e6:.1f} MB{weights}); {checked}')
    return path


# ---------------------------------------------------------------------------------------------------------------
# the command line


def get_args_parser() -> argparse.ArgumentParser:
    from .inference import add_model_args
    from .train.cli import ArgumentParser

    parser = ArgumentParser(prog='timm-ensembles-export', description=__doc__.split('\n\n')[0],
                            epilog='Also: python -m timm_ensembles.export. What the graph computes for each kind of'
                                   ' model: the module docstring (docs/export.md).')
    add_model_args(parser)
    parser.add_argument('-o', '--output', required=True, metavar='FILE',
                        help='the file to write (its folder must exist): .onnx, or .pt2 for torch.export')
    parser.add_argument('--format', choices=FORMATS, default=None,
                        help='onnx or torch.export (default: torch.export for a .pt2 output, else onnx)')
    parser.add_argument('--members', action='store_true',
                        help="also output the members' logits [batch, members, classes] (ensembles, collaborative"
                             ' nets), for uncertainty')
    parser.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help="the graph's input size (default: the model's data config)")
    parser.add_argument('--opset', type=int, default=None, help="the ONNX opset (default: torch's)")
    parser.add_argument('--no-verify', action='store_true',
                        help='write the file without checking it against the model at batch sizes 2 and 3')
    return parser


def main(argv=None) -> int:
    from .inference import fail, import_modules, load_model

    logging.basicConfig(format='%(message)s')
    logging.getLogger('timm_ensembles').setLevel(logging.INFO)  # this package's lines, not the ONNX optimiser's
    args = get_args_parser().parse_args(argv)
    fmt = args.format or ('torch.export' if Path(args.output).suffix == '.pt2' else 'onnx')
    try:
        check_destination(args.output, fmt)  # before a model is loaded (or downloaded)
    except ExportError as e:
        fail(f'--output {args.output}: {e}')
    import_modules(args)
    model = load_model(args)
    try:
        export(model, args.output, format=fmt, members=args.members, input_size=args.input_size,
               opset_version=args.opset, verify=not args.no_verify)
    except (ValueError, OSError, MissingExtraError) as e:
        fail(e)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
