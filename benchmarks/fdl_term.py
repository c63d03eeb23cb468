"""The FDL term alone, forward and backward: the pairwise sum against the O(N) centred form, by member count.

    python benchmarks/fdl_term.py

Features: the stage outputs of a resnet18 at 32 px, batch 64, perturbed per member. Prints the minimum over 7
interleaved rounds, in ms, for each form; ``timm_ensembles.losses.feature_difference_loss`` picks the pairwise
form up to 3 members and the centred form from 4 on, after this measurement.
"""
import itertools

import timm
import torch
from _common import clear_grads, make_term_step, run_rounds

from timm_ensembles.losses import feature_difference


def pairwise(feats):
    n = len(feats)
    return torch.stack([torch.stack([feature_difference(a, b) for a, b in zip(feats[i], feats[j])]).mean()
                        for i, j in itertools.combinations(range(n), 2)]).mean()


def centred(feats):
    n = len(feats)
    layers = []
    for layer in zip(*feats):
        s = torch.stack([f.float() for f in layer])
        c = s - s.mean(0, keepdim=True)
        layers.append(c.pow(2).mean(tuple(range(1, c.ndim))).sum() * (2.0 / (n - 1)))
    return torch.stack(layers).mean()


def main():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10)
    with torch.no_grad():
        _, inter = model.forward_intermediates(torch.randn(64, 3, 32, 32))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    print('| members | pairwise (ms) | centred (ms) | centred / pairwise |\n|---:|---:|---:|---:|')
    for n in (2, 3, 4, 5, 6, 8):
        feats = [[(f + 0.1 * torch.randn_like(f)).requires_grad_() for f in inter] for _ in range(n)]
        forms = {'pairwise': pairwise, 'centred': centred}
        steps = {name: make_term_step(form, feats) for name, form in forms.items()}
        before = {name: lambda feats=feats: clear_grads(feats) for name in forms}
        times = run_rounds(steps, rounds=7, warmup=0, before=before)
        p, c = min(times['pairwise']) * 1e3, min(times['centred']) * 1e3
        print(f'| {n} | {p:.1f} | {c:.1f} | {c / p:.2f} |')


if __name__ == '__main__':
    main()
