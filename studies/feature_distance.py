#!/usr/bin/env python3
"""The members' feature distances of trained ensembles on a fixed 2,000-image subset of Fashion-MNIST's test set: the
FDL paper's mse L_FDL and its scale-free form (losses.feature_difference_loss, 'relative'), at the stage outputs
after their final activation ('stages') and before it ('preact', the default taps since), and the members'
disagreement. The FDL step sweep's distances (studies/runs/fmnist-sweep) were read with it (after the activation):

    python studies/feature_distance.py output/sweep/ens_x2-s0 output/sweep/fdl_rel_lr1e-1-s0 ...
"""
import json
import sys

import timm
import torch
from timm.data import resolve_data_config

import timm_ensembles  # noqa: F401  (registers the ensembles with timm)
from timm_ensembles.data import create_datasets, create_eval_loader
from timm_ensembles.losses import feature_difference_loss


def main(folders: list[str]) -> int:
    _, test, _ = create_datasets('fashion-mnist', val_subset=2000, img_mode='L')
    for folder in folders:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        loader = create_eval_loader(test, resolve_data_config(model=model), 250, 0)
        sums = dict.fromkeys(('mse', 'relative', 'mse_preact', 'relative_preact'), 0.0)
        differ = total = 0.0
        with torch.no_grad():
            for x, y in loader:
                for taps, suffix in (('stages', ''), ('preact', '_preact')):
                    logits, features = model.forward_members_with_features(x, taps)
                    for distance in ('mse', 'relative'):
                        sums[distance + suffix] += float(feature_difference_loss(features, distance)) * len(y)
                top = logits.argmax(-1)
                differ += float((top[:, 0] != top[:, 1]).sum())
                total += len(y)
        print(json.dumps(dict(folder=folder, **{k: v / total for k, v in sums.items()}, disagreement=differ / total)))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
