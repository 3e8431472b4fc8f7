"""utils.py: MTT's names call into the package and give what the package gives."""
import argparse

import torch

import utils
from networks import get_network
from trajmatch.augment import DSAParams, dsa
from trajmatch.data import load_dataset


def test_diffaugment_is_dsa_with_mtts_seed_convention():
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(utils.DiffAugment(x, seed=3), dsa(x, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(utils.DiffAugment(x, 'flip', seed=1, param=utils.ParamDiffAug(prob_flip=1.0)), x.flip(3))
    torch.manual_seed(5)
    a = utils.DiffAugment(x)  # seed -1: torch's global generator
    torch.manual_seed(5)
    assert torch.equal(a, dsa(x))
    p = utils.ParamDiffAug()
    assert isinstance(p, DSAParams) and p.aug_mode == 'S' and p.ratio_scale == DSAParams().ratio_scale


def test_get_dataset_returns_mtts_twelve_values():
    out = utils.get_dataset('Digits', 'data')
    assert len(out) == 12
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader, _, cmap, cinv = out
    d = load_dataset('Digits', 'data')
    assert (channel, tuple(im_size), num_classes) == (d.channel, tuple(d.im_size), d.num_classes)
    assert torch.equal(dst_train.tensors[0], d.images_train) and len(dst_test) == len(d.labels_test)
    assert sum(len(y) for _, y in testloader) == len(d.labels_test) and cmap == cinv == {c: c for c in range(10)}


def test_evaluate_synset_trains_the_given_network_and_tests_it():
    *_, dst_train, dst_test, testloader, _, _, _ = utils.get_dataset('Digits', 'data')
    x, y = dst_train.tensors[0][:100], dst_train.tensors[1][:100]
    torch.manual_seed(0)
    net = get_network('ConvNetD2', 1, 10, (8, 8))
    args = argparse.Namespace(lr_net=0.01, epoch_eval_train=20, batch_train=256, dsa=True)
    before = [p.detach().clone() for p in net.parameters()]
    out_net, acc_train, acc_test = utils.evaluate_synset(0, net, x, y, testloader, args)
    assert out_net is net and len(acc_train) == 21
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert 0.3 < acc_test <= 1.0  # 100 real digits, 21 epochs: far above chance (0.1)
