"""Device placement without a GPU: the forward paths that run on the run's device, under FakeTensorMode
with device 'cuda' on this CPU-only machine.

A fake CUDA tensor mixed with a CPU tensor in one op raises ("Expected all tensors to be on the same
device"), so each path here fails if it leaves one of its inputs on the CPU. What the fake mode cannot run,
and how each test stops before it:
- values are fake: code that reads one (``.item()``, ``int(t)``, ``.numpy()``) stops there. K-Means stops
  at its numpy step (the features are already computed on the device by then); DSA's draws read the
  group index, so a step's plan is drawn outside the mode on the CPU generator, as the real code draws
  it, and moved to the device inside;
- autograd's backward needs a CUDA context: only forwards run (the inner step's loss, the evaluation
  and expert networks' batch loss), not the gradient steps after them;
- ``nn.Module.to`` cannot swap parameters that were created as fake tensors (a torch limitation), so
  networks are built outside the mode (``real_builds`` patches the builder the path calls) and moved to
  the device inside it by the code under test;
- cuDNN's grid sampler (DSA's scale and rotate on CUDA) has no fake kernel: the inner step runs with
  cuDNN off, which takes ATen's grid sampler, the same placement rules;
- the memory plan's probe always runs on the CPU (memplan._probe_batches builds its student there),
  not on the run's device, so it has no device path to check.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

import buffer
from networks import get_network
from reparam_module import ReparamModule
from trajmatch import evaluation
from trajmatch.ast_components import _features, _pick_nearest_distinct, kmeans_init
from trajmatch.data import load_dataset
from trajmatch.matching import inner_loss, plan_steps
from trajmatch.augment import to_device
from trajmatch.synthetic import SyntheticSet, init_synthetic
from trajmatch.training import net_group

MODEL = 'ConvNetD2'
CUDA = torch.device('cuda')


@pytest.fixture(scope='module')
def digits():
    return load_dataset('Digits', 'data')


def fake_cuda():
    return FakeTensorMode(allow_non_fake_inputs=True)


def on_fake_cuda(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == 'cuda'


def real_builds(fn):
    """fn, run outside the fake mode: a network with real CPU parameters, for the code to move."""
    def build(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return build


def test_a_mixed_op_raises_under_the_fake_mode():
    """The check is live: a CUDA network on a CPU batch raises, on a CUDA batch it runs."""
    net = get_network(MODEL, 1, 10, (8, 8))
    with fake_cuda():
        net = net.to(CUDA)
        with pytest.raises(RuntimeError, match='same device'):
            net(torch.zeros(2, 1, 8, 8))
        assert on_fake_cuda(net(torch.zeros(2, 1, 8, 8, device=CUDA)))


# ---------------------------------------------------------------- synthetic-set initialisation

@pytest.mark.parametrize('pix_init', ['real', 'noise'])
def test_initialisation_then_the_set_on_the_device(digits, pix_init):
    """distill.setup's path: init_synthetic on the CPU data, then the set moved to the run's device."""
    digits.check_ipc(2)  # as distill.prepare: the class index is built (on the host) before the set
    with fake_cuda():
        images, labels = init_synthetic(digits, 2, pix_init, torch.Generator().manual_seed(0))
        syn = SyntheticSet(images.to(CUDA), labels.to(CUDA), 0.01, lr_img=100, lr_lr=1e-5)
        assert on_fake_cuda(syn.images) and on_fake_cuda(syn.labels) and on_fake_cuda(syn.lr)


@pytest.mark.parametrize('pix_init', ['kmeans', 'avg'])
def test_kmeans_features_run_where_the_expert_is(digits, pix_init):
    """The expert is on the device, the training images on the CPU (where the dataset keeps them):
    the features are computed on the device, and K-Means stops only at its numpy step (fake values).
    Before the fix this raised the device mismatch instead."""
    net = get_network(MODEL, digits.channel, digits.num_classes, digits.im_size).eval()
    digits.check_ipc(2)  # as distill.prepare: the class index is built (on the host) before the set
    with fake_cuda():
        expert = net.to(CUDA)
        with pytest.raises(RuntimeError, match='numpy'):
            init_synthetic(digits, 2, pix_init, torch.Generator().manual_seed(0), expert_net=expert)
        feats = expert.embed(digits.images_train[:4].to(next(expert.parameters()).device))
        assert on_fake_cuda(feats)


def test_kmeans_selection_is_the_same_whatever_the_feature_batches(digits):
    """Features batch by batch on the network's device select the same images as one pass over the
    images in place (the network brought to the images), on the CPU."""
    torch.manual_seed(0)
    net = get_network(MODEL, digits.channel, digits.num_classes, digits.im_size).eval()
    x, y = kmeans_init(net, digits.images_train, digits.labels_train, digits.num_classes, 3, seed=1, batch_size=7)
    from sklearn.cluster import KMeans
    picks = []
    for c in range(digits.num_classes):
        idx = torch.nonzero(digits.labels_train == c).flatten()
        with torch.no_grad():
            feats = net.embed(digits.images_train[idx]).flatten(1).double().numpy()
        km = KMeans(n_clusters=3, n_init=10, random_state=1).fit(feats)
        picks.append(idx[_pick_nearest_distinct(feats, km.cluster_centers_, [1, 1, 1])])
    assert torch.equal(x, digits.images_train[torch.cat(picks)])
    assert torch.equal(y, torch.arange(digits.num_classes).repeat_interleave(3))
    assert (_features(net, digits.images_train[:20], 7) == _features(net, digits.images_train[:20], 512)).all()


# ---------------------------------------------------------------- the student's inner step

@pytest.mark.parametrize('use_dsa', [True, False])
def test_inner_step_forward_with_dsa_on_the_device(digits, use_dsa):
    """One iteration's plan (batches and augmentations, drawn on the CPU generator) moved to the device in
    one copy, then the student's inner loss on a batch of the synthetic set there."""
    student = ReparamModule(get_network(MODEL, digits.channel, digits.num_classes, digits.im_size))
    images = torch.randn(20, digits.channel, *digits.im_size)
    labels = torch.arange(10).repeat_interleave(2)
    cpu_plan = plan_steps(images, 8, 3, torch.Generator().manual_seed(0), use_dsa)
    assert all(not b.is_cuda for b in cpu_plan.batches)
    with fake_cuda(), torch.backends.cudnn.flags(enabled=False):
        student = student.to(CUDA)
        syn, lab = images.to(CUDA).requires_grad_(True), labels.to(CUDA)
        augs, batches = to_device(cpu_plan.augs, CUDA, cpu_plan.batches)
        assert all(on_fake_cuda(b) for b in batches)
        assert all(on_fake_cuda(v) for a in augs for v in a.values.values())
        w = student.flat_param().detach().requires_grad_(True)
        for idx, aug in zip(batches, augs):
            loss = inner_loss(student, w, syn[idx], lab[idx], aug=aug)
            assert on_fake_cuda(loss)


# ---------------------------------------------------------------- evaluation and expert networks

@pytest.mark.parametrize('k', [1, 3])
def test_evaluation_networks_forward_on_the_device(digits, monkeypatch, k):
    """evaluation.fresh_network puts each network where the set is; one network (OneNet) and a stack of
    k (NetStack) run their training batch's forward there."""
    monkeypatch.setattr(evaluation, 'get_network', real_builds(get_network))
    shape = (digits.channel, digits.num_classes, digits.im_size)
    with fake_cuda():
        x = torch.randn(6, digits.channel, *digits.im_size).to(CUDA)
        y = torch.arange(6).to(CUDA)
        group = net_group([evaluation.fresh_network(MODEL, shape, s, x.device) for s in range(k)])
        loss, losses, hits = group.batch_loss([x] * k, [x] * k, [y] * k, loss_scale=1.0, extra_loss=None,
                                              accel=evaluation.FP32)
        assert on_fake_cuda(loss) and on_fake_cuda(losses) and on_fake_cuda(hits)


def test_expert_training_step_forward_on_the_device(digits, monkeypatch):
    """buffer.expert_network puts the expert on the run's device; its batch loss runs there."""
    monkeypatch.setattr(buffer, 'get_network', real_builds(get_network))
    with fake_cuda():
        net = buffer.expert_network(MODEL, digits, 0, CUDA)
        x = digits.images_train[:8].to(CUDA)
        y = digits.labels_train[:8].to(CUDA)
        loss, _, _ = net_group([net]).batch_loss([x], [x], [y], loss_scale=0.5, extra_loss=None,
                                                 accel=evaluation.FP32)
        assert on_fake_cuda(loss)


# ---------------------------------------------------------------- one copy per iteration, the same numbers

def test_planned_unroll_is_the_per_step_unroll_bit_for_bit(digits):
    """Drawing an iteration's batches and augmentations up front (one host-to-device copy) takes the same
    steps as drawing each step's augmentation when the step runs (MTT's order: the batches, then step
    by step), and leaves the generator in the same state."""
    from trajmatch.augment import dsa
    from trajmatch.matching import syn_batches, unroll
    import torch.nn.functional as F
    torch.manual_seed(0)
    student = ReparamModule(get_network(MODEL, digits.channel, digits.num_classes, digits.im_size))
    images = torch.randn(20, digits.channel, *digits.im_size).requires_grad_(True)
    labels = torch.arange(10).repeat_interleave(2)
    lr = torch.tensor(0.01, requires_grad=True)
    w0 = student.flat_param().detach()
    for seed in range(4):
        g_new, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ws = unroll(student, images, labels, lr, w0, syn_steps=5, batch_syn=8, generator=g_new, syn_mom=0.5)
        w, b = w0.clone().requires_grad_(True), None
        for idx in syn_batches(20, 8, 5, g_ref):
            loss = F.cross_entropy(student(dsa(images[idx], generator=g_ref), w), labels[idx])
            g = torch.autograd.grad(loss, w, create_graph=True)[0]
            b = g if b is None else 0.5 * b + g
            w = w - lr * b
        assert torch.equal(ws[-1], w)
        assert torch.equal(g_new.get_state(), g_ref.get_state())
