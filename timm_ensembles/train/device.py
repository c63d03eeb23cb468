"""The defaults train.py resolves from the kind of device a run is on, in one place.

Each of them changes how fast a run trains, not what it computes (bf16 autocast changes the arithmetic's precision):
on a CUDA GPU the members' strategy is ``auto``, the model is in channels_last memory format, the optimizer takes
torch's fused kernel where it has one (but SGD's under fp16, see ``FUSED_UNSAFE_FP16``), autocast is bf16 where the
GPU computes it natively, and the loaders pin host memory; on a CPU (and other accelerators) none of it. A flag given
explicitly wins over its default.

``DeviceDefaults.for_device('cuda', ...)`` answers what a GPU run would get on any machine, so that a test can give a
CPU run the GPU's defaults through the same code path (``train.py`` calls :func:`device_defaults` for the device it
is on). Accelerate runs ``mixed_precision='fp16'`` on a CPU in fp32 (no autocast, no grad scaler);
:class:`CpuFp16Accelerator` gives such a run the GPU's fp16 path (float16 autocast and a loss-scaling GradScaler,
both of which torch has for the CPU), for the tests and the device check.
"""
import dataclasses
import os
from argparse import Namespace

import torch
from accelerate import Accelerator

__all__ = ['DeviceDefaults', 'device_defaults', 'CpuFp16Accelerator', 'FUSED_OPTS', 'FUSED_UNSAFE_FP16']

# timm optimizer names that map to torch optimizers with a fused kernel (torch.optim.SGD, Adam, AdamW)
FUSED_OPTS = ('sgd', 'nesterov', 'momentum', 'adam', 'adamw')
# those whose fused kernel must not meet fp16's grad scaler: torch's fused SGD (2.14) creates its momentum buffers
# with torch.empty_like on its first step and leaves them unwritten when the scaler skips that step (found_inf), as
# it does whenever the initial loss scale overflows; the next step then applies uninitialised memory (seen here as
# NaN or 1e9 weights after two steps, on the CPU; the CUDA path is the same Python code). Fused Adam and AdamW
# initialise their state and honour the skip.
FUSED_UNSAFE_FP16 = ('sgd', 'nesterov', 'momentum')


@dataclasses.dataclass(frozen=True)
class DeviceDefaults:
    """The device-dependent defaults of one run.

    Attributes:
        device_type: The kind of device they are for (``torch.device.type``).
        member_strategy: How an ensemble's members run (``--member-strategy``).
        channels_last: The model in channels_last memory format (``--channels-last``).
        fused_opt: torch's fused optimizer kernel (``--fused-opt``).
        mixed_precision: ``'bf16'``, or None to leave it to Accelerate's config (``--mixed-precision``).
        pin_memory: The data loaders pin host memory.
    """
    device_type: str
    member_strategy: str
    channels_last: bool
    fused_opt: bool
    mixed_precision: str | None
    pin_memory: bool

    # the flags that take these defaults when left unset (None)
    FLAGS = ('member_strategy', 'channels_last', 'fused_opt', 'mixed_precision')

    @classmethod
    def for_device(cls, device_type: str, opt: str = 'sgd', bf16: bool = False,
                   mixed_precision: str | None = None) -> 'DeviceDefaults':
        """The defaults on a device of this kind.

        Args:
            device_type: ``'cuda'``, ``'cpu'``, ...
            opt: The timm optimizer name (``--opt``): whether a fused kernel exists.
            bf16: Whether the device computes bf16 natively (autocast to it then).
            mixed_precision: The precision the run is given (``--mixed-precision``, or Accelerate's config), if any:
                the fused kernel's default depends on it.
        """
        gpu, opt = device_type == 'cuda', opt.lower()
        precision = 'bf16' if gpu and bf16 else None
        fp16 = (mixed_precision or precision) == 'fp16'
        return cls(device_type=device_type, member_strategy='auto' if gpu else 'loop', channels_last=gpu,
                   fused_opt=gpu and opt in FUSED_OPTS and not (fp16 and opt in FUSED_UNSAFE_FP16),
                   mixed_precision=precision, pin_memory=gpu)

    def resolve(self, args: Namespace) -> Namespace:
        """Give each of ``args``' device-dependent flags left unset its default (in place, so that args.yaml records
        what ran). Returns ``args``."""
        for name in self.FLAGS:
            if getattr(args, name) is None:
                setattr(args, name, getattr(self, name))
        return args


def device_defaults(device_type: str, opt: str, mixed_precision: str | None = None) -> DeviceDefaults:
    """The defaults on the device this process runs on, of kind ``device_type`` (``torch.device.type``), for a run
    given ``mixed_precision`` (None: bf16 where the GPU has it, else what ``accelerate launch`` or its config set)."""
    bf16 = device_type == 'cuda' and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if mixed_precision is None and not bf16:
        # neither a flag nor the bf16 default: Accelerate's config decides, through the variable that `accelerate
        # launch` sets from its --mixed_precision or its config file
        mixed_precision = os.environ.get('ACCELERATE_MIXED_PRECISION')
    return DeviceDefaults.for_device(device_type, opt, bf16=bf16, mixed_precision=mixed_precision)


class CpuFp16Accelerator(Accelerator):
    """Accelerate's ``Accelerator``, but with ``mixed_precision='fp16'`` on a CPU it autocasts to float16 and scales
    the loss with ``torch.amp.GradScaler('cpu')``, as Accelerate does on a GPU (it runs such a run in fp32, with
    neither). What the model, the backward pass, gradient clipping, the optimizer step (skipped on an overflow) and
    the checkpoint's scaler state see is then the GPU's fp16 path.

    For tests and the device check on machines without a GPU; it trains nothing better (fp16 is slow on most CPUs).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mixed_precision == 'fp16' and self.device.type == 'cpu' and self.scaler is None:
            # the attributes Accelerate sets where it supports fp16: prepare() then wraps the model's forward in
            # autocast, autocast() casts, backward() scales and the prepared optimizer steps through the scaler
            self.native_amp = True
            self.scaler = torch.amp.GradScaler('cpu')
