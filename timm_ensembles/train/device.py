"""The defaults train.py resolves from the kind of device a run is on, in one place.

Each of them changes how fast a run trains, not what it computes (bf16 autocast changes the arithmetic's precision):
on a CUDA GPU the members' strategy is ``auto``, the model is in channels_last memory format, the optimizer takes
torch's fused kernel where it has one (but SGD's under fp16, see ``FUSED_UNSAFE_FP16``), autocast is bf16 where the
GPU computes it natively, and the loaders pin host memory; on a CPU (and other accelerators) none of it. A flag given
explicitly wins over its default.

``DeviceDefaults.settings(args)`` gives the :class:`DeviceSettings` a run uses (the trainer reads them there; its
argparse namespace keeps the flags as given). ``DeviceDefaults.for_device('cuda', ...)`` answers what a GPU run would
get on any machine, so that a test can give a CPU run the GPU's defaults through the same code path (``train.py``
calls :func:`device_defaults` for the device it is on). Accelerate runs ``mixed_precision='fp16'`` on a CPU in fp32
(no autocast, no grad scaler); :class:`CpuFp16Accelerator` gives such a run the GPU's fp16 path (float16 autocast and
a loss-scaling GradScaler, both of which torch has for the CPU), for the tests and the device check.
"""
import dataclasses
import os
from argparse import Namespace

import torch
from accelerate import Accelerator

__all__ = ['DeviceDefaults', 'DeviceSettings', 'device_defaults', 'CpuFp16Accelerator', 'FUSED_OPTS',
           'FUSED_UNSAFE_FP16', 'FUSED_UNSHARDABLE']

# timm optimizer names that map to torch optimizers with a fused kernel (torch.optim.SGD, Adam, AdamW)
FUSED_OPTS = ('sgd', 'nesterov', 'momentum', 'adam', 'adamw')
# those whose fused kernel must not meet fp16's grad scaler: torch's fused SGD (2.14) creates its momentum buffers
# with torch.empty_like on its first step and leaves them unwritten when the scaler skips that step (found_inf), as
# it does whenever the initial loss scale overflows; the next step then applies uninitialised memory (seen here as
# NaN or 1e9 weights after two steps, on the CPU; the CUDA path is the same Python code). Fused Adam and AdamW
# initialise their state and honour the skip.
FUSED_UNSAFE_FP16 = ('sgd', 'nesterov', 'momentum')
# those whose fused kernel cannot step sharded parameters: DTensor has no sharding rule for aten._fused_sgd_ (torch
# 2.14; Adam's and AdamW's it has), so an FSDP run would stop at its first step
FUSED_UNSHARDABLE = ('sgd', 'nesterov', 'momentum')


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
                   mixed_precision: str | None = None, sharded: bool = False) -> 'DeviceDefaults':
        """The defaults on a device of this kind.

        Args:
            device_type: ``'cuda'``, ``'cpu'``, ...
            opt: The timm optimizer name (``--opt``): whether a fused kernel exists.
            bf16: Whether the device computes bf16 natively (autocast to it then).
            mixed_precision: The precision the run is given (``--mixed-precision``, or Accelerate's config), if any:
                the fused kernel's default depends on it.
            sharded: The model is sharded (FSDP): its members run one by one (the fused strategies read their
                weights stacked, which sharding splits), SGD is not fused (``FUSED_UNSHARDABLE``), and the model
                stays in the default memory format (FSDP2 cannot shard channels_last, non-contiguous, parameters).
        """
        gpu, opt = device_type == 'cuda', opt.lower()
        precision = 'bf16' if gpu and bf16 else None
        fp16 = (mixed_precision or precision) == 'fp16'
        return cls(device_type=device_type, member_strategy='auto' if gpu and not sharded else 'loop',
                   channels_last=gpu and not sharded,
                   fused_opt=gpu and opt in FUSED_OPTS and not (fp16 and opt in FUSED_UNSAFE_FP16)
                   and not (sharded and opt in FUSED_UNSHARDABLE),
                   mixed_precision=precision, pin_memory=gpu)

    def settings(self, args: Namespace) -> 'DeviceSettings':
        """What a run given ``args`` uses: each device-dependent flag as given, or this default where it is unset
        (None)."""
        given = {name: getattr(args, name) for name in self.FLAGS}
        chosen = {name: getattr(self, name) if value is None else value for name, value in given.items()}
        return DeviceSettings(**chosen, pin_memory=self.pin_memory)

    def resolve(self, args: Namespace) -> Namespace:
        """A copy of ``args`` with its device-dependent flags as the run uses them (``settings``): the flags as
        args.yaml records them. ``args`` itself is left as given."""
        return Namespace(**{**vars(args), **self.settings(args).flags()})


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    """The device-dependent settings of one run, as it uses them: each flag as given, else its device default
    (``DeviceDefaults.settings``). The trainer reads them here, not from its flags, which keep what was given.

    Attributes:
        member_strategy: How an ensemble's members run.
        channels_last: The model in channels_last memory format.
        fused_opt: torch's fused optimizer kernel.
        mixed_precision: The precision given to Accelerate (None: Accelerate's config decides).
        pin_memory: The data loaders pin host memory.
    """
    member_strategy: str
    channels_last: bool
    fused_opt: bool
    mixed_precision: str | None
    pin_memory: bool

    def flags(self) -> dict:
        """The settings that are flags (``DeviceDefaults.FLAGS``), by their names in the argparse namespace."""
        return {name: getattr(self, name) for name in DeviceDefaults.FLAGS}


def device_defaults(device_type: str, opt: str, mixed_precision: str | None = None,
                    sharded: bool = False) -> DeviceDefaults:
    """The defaults on the device this process runs on, of kind ``device_type`` (``torch.device.type``), for a run
    given ``mixed_precision`` (None: bf16 where the GPU has it, else what ``accelerate launch`` or its config set),
    its model ``sharded`` (FSDP) or not."""
    bf16 = device_type == 'cuda' and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if mixed_precision is None and not bf16:
        # neither a flag nor the bf16 default: Accelerate's config decides, through the variable that `accelerate
        # launch` sets from its --mixed_precision or its config file
        mixed_precision = os.environ.get('ACCELERATE_MIXED_PRECISION')
    return DeviceDefaults.for_device(device_type, opt, bf16=bf16, mixed_precision=mixed_precision,
                                     sharded=sharded)


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
