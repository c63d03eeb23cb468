"""``auto``: times the strategies that accept the model on the actual batch and keeps the fastest."""
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .base import DEFAULT_FEATURE_TAPS, MemberStrategy, StrategyError, _synchronize
from .verify import _build, _check, _preserved_state

__all__ = ['AutoStrategy']


AUTO_CANDIDATES = ('loop', 'vmap', 'grouped', 'grouped:split', 'grouped:grouped')


class AutoStrategy(MemberStrategy):
    """Times the strategies that accept the model on the actual batch and keeps the fastest.

    The choice is made on the first call of each kind (logits, stage or conv features) for each input shape, dtype,
    device and mode (train with gradients, or not), from ``rounds`` interleaved timed passes of every eligible
    strategy after one warm-up pass (forward, and backward when gradients are enabled); the members' buffers and the
    random generators are restored afterwards. Timing is machine-dependent, so two processes (DDP) may choose
    differently; every choice computes the same function.

    The grouped strategy enters three times: with its per-layer kernel choice (``grouped``) and with one kind of
    kernel throughout (``grouped:split``, ``grouped:grouped``), because timing single layers is no sure guide to
    the whole step (measured on a CPU: per-layer choices gave a step 7 % slower than splitting every layer).

    Args:
        members: The ensemble's members.
        base_model: The base model's name, for messages.
        candidates: Strategies to consider (``grouped:<kernel>``: the grouped strategy with that ``conv_kernel``).
        rounds: Timed passes per strategy.
    """
    name = 'auto'

    def __init__(self, members: nn.ModuleList, base_model: str = '', candidates: Sequence[str] = AUTO_CANDIDATES,
                 rounds: int = 3):
        super().__init__(members, base_model)
        self.candidates = tuple(candidates)
        self.rounds = rounds
        self.strategies: dict[str, MemberStrategy] = {}
        self.refused: dict[str, str] = {}
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self.last_choice: str | None = None

    def _eligible(self, x: torch.Tensor) -> dict[str, MemberStrategy]:
        for name in self.candidates:
            if name in self.strategies or name in self.refused:
                continue
            base, _, kernel = name.partition(':')
            if base == 'vmap' and torch.is_autocast_enabled(x.device.type):
                # functorch's batching rules bypass autocast: vmap would compute in fp32, not as the loop does
                self.refused[name] = 'vmap does not apply autocast (it would run the members in fp32)'
                continue
            if base in self.refused:  # a kernel variant of a refused strategy
                self.refused[name] = self.refused[base]
                continue
            try:
                strategy = _build(base, self.members, self.base_model)
                # the check is the same for every kernel variant: once per strategy
                if base != 'loop' and not any(n.partition(':')[0] == base for n in self.strategies):
                    # the default probe (small, in float64 on the CPU) unless the model takes only inputs like x
                    _check(strategy, x.shape[1], fallback=x[:2] if x.shape[0] > 2 else x)
                if kernel:
                    strategy.set_conv_kernel(kernel)
                self.strategies[name] = strategy
            except StrategyError as e:
                self.refused[name] = str(e)
        return self.strategies

    def _choose(self, key: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> str:
        eligible = self._eligible(x)
        if len(eligible) == 1:
            self.timings[key] = {}
            return next(iter(eligible))
        params = [p for p in self.members.parameters() if p.requires_grad]
        backward = torch.is_grad_enabled() and bool(params)

        def step(strategy: MemberStrategy) -> None:
            out = call(strategy)
            tensors = [out] if isinstance(out, torch.Tensor) else [out[0]] + [f for m in out[1] for f in m]
            if backward:
                torch.autograd.grad(sum(t.float().sum() for t in tensors), params, allow_unused=True)

        times: dict[str, list[float]] = {name: [] for name in eligible}
        with _preserved_state(self.members, x.device):
            for strategy in eligible.values():
                step(strategy)
            for _ in range(self.rounds):
                for name, strategy in eligible.items():
                    _synchronize(x.device)
                    t0 = time.perf_counter()
                    step(strategy)
                    _synchronize(x.device)
                    times[name].append(time.perf_counter() - t0)
        self.timings[key] = {name: statistics.median(t) for name, t in times.items()}
        return min(self.timings[key], key=self.timings[key].get)

    def _choice(self, kind: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> str:
        key = (*kind, tuple(x.shape), x.dtype, x.device.type, self.members[0].training and torch.is_grad_enabled())
        if key not in self.choices:
            self.choices[key] = self._choose(key, x, call)
        self.last_choice = self.choices[key]
        return self.last_choice

    def _dispatch(self, kind: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> Any:
        return call(self.strategies[self._choice(kind, x, call)])

    def prepare(self, x: torch.Tensor) -> str:
        """Make the choice for ``forward_members`` on batches like ``x`` now (in the current mode), without
        running it; the members' state is left as it was."""
        return self._choice(('logits',), x, lambda s: s.forward_members(x))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch(('logits',), x, lambda s: s.forward_members(x))

    def forward_members_with_features(self, x, taps=DEFAULT_FEATURE_TAPS, indices=None):
        kind = (taps, indices if not isinstance(indices, list) else tuple(indices))
        return self._dispatch(kind, x, lambda s: s.forward_members_with_features(x, taps, indices))

    def info(self) -> dict[str, Any]:
        """What auto found: the eligible strategies, the refusals and, per kind of call, the median times (s)."""
        return dict(eligible=list(self.strategies), refused=dict(self.refused),
                    choices={str(k): v for k, v in self.choices.items()},
                    timings={str(k): v for k, v in self.timings.items()})
