"""MTT's names, for code ported from the MTT repository (its utils.py), each a thin call into trajmatch.

    from utils import get_network, get_dataset, evaluate_synset, DiffAugment, ParamDiffAug

The arguments and return values are MTT's; the work is ours (README, "Coming from MTT or AST").
"""
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from networks import get_network  # noqa: F401  (MTT's get_network(model, channel, num_classes, im_size))
from trajmatch.augment import DSA_STRATEGY, DSAParams, dsa
from trajmatch.data import load_dataset
from trajmatch.evaluation import eval_schedule
from trajmatch.training import accuracy, net_group, train_scheduled


@dataclass
class ParamDiffAug(DSAParams):
    """MTT's ParamDiffAug: the DSA magnitudes (trajmatch.augment.DSAParams) and MTT's bookkeeping fields."""
    aug_mode: str = 'S'      # one group per call: the only mode MTT's distillation uses
    ratio_noise: float = 0.05
    batchmode: bool = False
    latestseed: int = -1


def DiffAugment(x: torch.Tensor, strategy: str = DSA_STRATEGY, seed: int = -1,
                param: DSAParams | None = None) -> torch.Tensor:
    """MTT's DiffAugment: seed -1 draws from torch's global generator, any other seed from its own."""
    generator = None if seed == -1 else torch.Generator().manual_seed(seed)
    return dsa(x, strategy, param, generator)


def get_dataset(dataset: str, data_path: str, batch_size: int = 1, subset: str = 'imagenette', args=None):
    """MTT's 12 values: channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test,
    testloader, loader_train_dict, class_map, class_map_inv (loader_train_dict: None, as MTT's default)."""
    d = load_dataset(dataset, data_path, subset=subset, zca=bool(getattr(args, 'zca', False)))
    dst_train = TensorDataset(d.images_train, d.labels_train)
    dst_test = TensorDataset(d.images_test, d.labels_test)
    testloader = DataLoader(dst_test, batch_size=128, shuffle=False, num_workers=0)
    class_map = {c: c for c in range(d.num_classes)}
    return (d.channel, d.im_size, d.num_classes, d.class_names, d.mean, d.std, dst_train, dst_test, testloader,
            None, class_map, dict(class_map))


def evaluate_synset(it_eval: int, net: torch.nn.Module, images_train: torch.Tensor, labels_train: torch.Tensor,
                    testloader, args, return_loss: bool = False, texture: bool = False):
    """MTT's evaluate_synset: train `net` on the set for args.epoch_eval_train + 1 epochs at args.lr_net
    (lr x0.1 after epoch E//2 + 1, MTT's schedule), then test it. Returns (net, acc_train_list, acc_test);
    with return_loss, (net, acc_train_list, acc_test, loss_train_list). Data order and augmentation are
    seeded from it_eval."""
    device = next(net.parameters()).device
    images, labels = images_train.to(device), labels_train.to(device)
    group = net_group([net])
    schedule = eval_schedule('mtt', float(args.lr_net), int(args.epoch_eval_train))
    acc_train, loss_train = [], []
    for _, (loss, acc) in train_scheduled(group, images, labels, schedule, batch_size=int(args.batch_train),
                                          generators=[torch.Generator().manual_seed(it_eval)],
                                          use_dsa=bool(getattr(args, 'dsa', True))):
        acc_train.append(float(acc[0]))
        loss_train.append(float(loss[0]))
    test_x, test_y = (torch.cat(t) for t in zip(*testloader))
    acc_test = accuracy(net, test_x.to(device), test_y.to(device))
    return (net, acc_train, acc_test, loss_train) if return_loss else (net, acc_train, acc_test)
