"""End to end on Digits: buffer.py -> distill.py -> eval.py, resume, NaN safety, wandb offline, input errors."""
import glob
import json
import os
import struct
import time

import pytest
import torch

import distill
import eval as eval_script
from trajmatch import matching
from conftest import kill_at_unroll, tiny_buffers

MODEL = 'ConvNetW32'
TINY = ['--model', MODEL, '--ipc', '2', '--syn_steps', '3', '--expert_epochs', '1', '--max_start_epoch', '2',
        '--num_eval', '1', '--epoch_eval_train', '3', '--lr_img', '10', '--seed', '0']


@pytest.fixture(scope='module')
def buffers(tmp_path_factory):
    return tiny_buffers(tmp_path_factory, 2, MODEL)


def run_distill(buffers, runs, *extra):
    return distill.main(TINY + ['--buffer_path', buffers, '--run_dir', str(runs), *extra])


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def wandb_records(path):
    """Decode an offline .wandb file (leveldb-log framing of protobuf Records) into Records."""
    from wandb.proto import wandb_internal_pb2
    raw, i, block, buf, records = open(path, 'rb').read(), 7, 32768, b'', []
    assert raw[:4] == b':W&B'
    while i + 7 <= len(raw):
        if block - i % block < 7:  # block trailer padding
            i += block - i % block
            continue
        _, n, kind = struct.unpack('<IHB', raw[i:i + 7])
        if i + 7 + n > len(raw):  # a chunk still being written
            break
        buf, i = buf + raw[i + 7:i + 7 + n], i + 7 + n
        if kind in (1, 4):  # FULL or LAST chunk
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b''
    return records


def wandb_history(run_dir, timeout_s=120):
    """History rows of the run's offline file, once wandb-core has written its exit record.

    run.finish() can return before the separate wandb-core process has written the file (measured: under
    CPU load the file still held only its 7-byte header right after finish()), so wait for the exit record."""
    # a file that never gets its exit record ends in an assertion on the rows, not here
    pattern = os.path.join(run_dir, 'wandb', 'offline-run-*', 'run-*.wandb')
    deadline = time.monotonic() + timeout_s
    while True:
        paths = glob.glob(pattern)
        records = wandb_records(paths[0]) if paths else []
        if any(r.WhichOneof('record_type') == 'exit' for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{(it.key or '/'.join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
            for r in records if r.WhichOneof('record_type') == 'history']


def test_end_to_end_buffer_distill_eval_with_wandb_offline(buffers, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    run_dir = run_distill(buffers, tmp_path / 'runs', '--Iteration', '4', '--eval_it', '2', '--wandb', 'auto')
    assert os.path.basename(run_dir) == '000-Digits-ipc2-ConvNetW32'
    for name in ('args.json', 'metrics.jsonl', 'images_best.pt', 'labels_best.pt', 'lr_best.pt',
                 'synthetic_images.png', 'checkpoint.pt', 'final.json'):
        assert os.path.exists(os.path.join(run_dir, name)), name
    images = torch.load(os.path.join(run_dir, 'images_best.pt'), weights_only=True)
    labels = torch.load(os.path.join(run_dir, 'labels_best.pt'), weights_only=True)
    assert images.shape == (20, 1, 8, 8) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert open(os.path.join(run_dir, 'synthetic_images.png'), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    assert json.load(open(os.path.join(run_dir, 'args.json')))['ipc'] == 2
    rows = metrics(run_dir)
    losses = {r['it']: r['loss'] for r in rows if 'loss' in r}
    assert sorted(losses) == [0, 1, 2, 3] and all(v > 0 for v in losses.values())
    assert sorted(r['it'] for r in rows if 'eval/ConvNetW32_mean' in r) == [0, 2, 4]
    # what wandb wrote offline holds the same numbers
    history = wandb_history(run_dir)
    logged = {h['_step']: h['loss'] for h in history if 'loss' in h}
    assert logged == pytest.approx(losses)
    assert any('eval/ConvNetW32_mean' in h for h in history)
    # a second run gets the next number
    assert os.path.basename(run_distill(buffers, tmp_path / 'runs', '--Iteration', '1', '--eval_it', '5',
                                        '--wandb', 'disabled')).startswith('001-')
    # eval.py scores the saved set on two architectures and writes JSON
    out = tmp_path / 'eval.json'
    eval_script.main(['--run', run_dir, '--eval_mode', MODEL, 'ConvNetD2', '--num_eval', '2',
                      '--epoch_eval_train', '2', '--out', str(out)])
    result = json.load(open(out))
    assert set(result['results']) == {MODEL, 'ConvNetD2'}
    assert all(len(r['accs']) == 2 and 0 <= r['mean'] <= 1 for r in result['results'].values())
    # the final set by default (before issue 26: images_best.pt, the set selected on the test set)
    assert result['lr'] == pytest.approx(torch.load(os.path.join(run_dir, 'lr_final.pt'), weights_only=True).item())


def test_final_set_is_saved_and_eval_scores_it_by_default(buffers, tmp_path):
    """Every finished run keeps its final set (images_final.pt, labels_final.pt, lr_final.pt: the checkpoint's
    last set); eval.py --run scores it by default, and --which best scores MTT's set, named as such."""
    run_dir = run_distill(buffers, tmp_path / 'runs', '--Iteration', '3', '--eval_it', '1', '--wandb', 'disabled',
                          '--lr_img', '1000')
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    final = {n: torch.load(os.path.join(run_dir, f'{n}_final.pt'), weights_only=True) for n in ('images', 'labels', 'lr')}
    assert torch.equal(final['images'], ckpt['images']) and torch.equal(final['labels'], ckpt['labels'])
    assert torch.equal(final['lr'], ckpt['syn_lr'])
    summary = json.load(open(os.path.join(run_dir, 'final.json')))
    last = [r for r in metrics(run_dir) if f'eval/{MODEL}_mean' in r][-1]
    assert last['it'] == 3 and summary['final_mean'] == last[f'eval/{MODEL}_mean']
    assert 'best_mean_selected_on_test' in summary
    flags = ['--num_eval', '1', '--epoch_eval_train', '2']
    eval_script.main(['--run', run_dir, *flags])
    scored = json.load(open(os.path.join(run_dir, 'eval.json')))
    assert scored['which'] == 'final' and scored['source'].endswith('final set')
    assert scored['lr'] == pytest.approx(final['lr'].item())
    eval_script.main(['--run', run_dir, '--which', 'best', *flags])
    best = json.load(open(os.path.join(run_dir, 'eval_best.json')))
    assert best['which'] == 'best' and "selected on the test set: MTT's statistic" in best['source']
    assert best['lr'] == pytest.approx(torch.load(os.path.join(run_dir, 'lr_best.pt'), weights_only=True).item())


def test_a_run_left_open_by_a_crash_does_not_capture_the_next_one(tmp_path, monkeypatch):
    from trajmatch.runlog import RunLog
    monkeypatch.setenv('WANDB_MODE', 'offline')
    crashed = RunLog(str(tmp_path / 'crashed'), {'n': 1}, wandb_mode='auto')  # never finished, as after a raise
    crashed.log(0, loss=1.0)
    later = RunLog(str(tmp_path / 'later'), {'n': 2}, wandb_mode='auto')
    later.log(0, loss=2.0)
    later.finish()
    assert later.wandb_id != crashed.wandb_id
    assert [h['loss'] for h in wandb_history(str(tmp_path / 'later'))] == [2.0]
    assert [h['loss'] for h in wandb_history(str(tmp_path / 'crashed'))] == [1.0]


def test_eval_baselines(tmp_path):
    out = tmp_path / 'r.json'
    eval_script.main(['--baseline', 'random', '--ipc', '3', '--eval_mode', MODEL, '--num_eval', '2',
                      '--epoch_eval_train', '2', '--out', str(out)])
    r = json.load(open(out))
    assert r['num_images'] == 30 and len(r['results'][MODEL]['accs']) == 2
    eval_script.main(['--baseline', 'full', '--eval_mode', 'ConvNetD2', '--num_eval', '1', '--epoch_eval_train', '3',
                      '--lr', '0.05', '--out', str(out)])
    r = json.load(open(out))
    assert r['num_images'] == 1437 and r['results']['ConvNetD2']['mean'] > 0.6  # 3 epochs on all data: ~89%


def test_resume_continues_to_the_same_result(buffers, tmp_path, monkeypatch):
    common = ['--Iteration', '6', '--eval_it', '3', '--save_every', '2', '--wandb', 'disabled']
    straight = run_distill(buffers, tmp_path / 'a', *common)

    real = kill_at_unroll(monkeypatch, 5)  # as if the job were killed during iteration 4
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path / 'b', *common)
    interrupted = glob.glob(str(tmp_path / 'b' / '000-*'))[0]
    assert torch.load(os.path.join(interrupted, 'checkpoint.pt'), weights_only=True)['state']['it'] == 4
    monkeypatch.setattr(distill, 'match_and_backward', real)
    distill.main(['--resume', 'latest', '--run_dir', str(tmp_path / 'b')])

    a = torch.load(os.path.join(straight, 'checkpoint.pt'), weights_only=True)
    b = torch.load(os.path.join(interrupted, 'checkpoint.pt'), weights_only=True)
    assert a['state']['it'] == b['state']['it'] == 6
    torch.testing.assert_close(b['images'], a['images'], rtol=0, atol=1e-6)
    torch.testing.assert_close(b['syn_lr'], a['syn_lr'], rtol=0, atol=1e-9)
    assert [r['it'] for r in metrics(interrupted)] == [r['it'] for r in metrics(straight)]


def test_non_finite_loss_never_reaches_the_images(buffers, tmp_path, monkeypatch):
    real = matching.match_and_backward

    def poisoned(*a, **k):  # NaN in both the loss and the image gradient
        loss, info = real(*a, **k)
        a[1].grad.mul_(float('nan'))
        return loss * float('nan'), info

    monkeypatch.setattr(distill, 'match_and_backward', poisoned)
    with pytest.raises(SystemExit) as stop:
        run_distill(buffers, tmp_path, '--Iteration', '10', '--eval_it', '100', '--max_skips', '3',
                    '--wandb', 'disabled')
    assert stop.value.code == 3
    run_dir = glob.glob(str(tmp_path / '000-*'))[0]
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    initial = torch.load(os.path.join(run_dir, 'images_best.pt'), weights_only=True)  # saved by the it-0 eval
    assert ckpt['state']['skipped'] == 3 and ckpt['state']['it'] == 3
    assert torch.equal(ckpt['images'], initial)
    assert ckpt['syn_lr'].item() == pytest.approx(0.01)


def test_one_nan_step_is_skipped_and_the_run_goes_on(buffers, tmp_path, monkeypatch):
    real, calls = matching.match_and_backward, {'n': 0}

    def nan_once(*a, **k):  # a finite loss whose image gradient is NaN, once
        calls['n'] += 1
        loss, info = real(*a, **k)
        if calls['n'] == 2:
            a[1].grad.mul_(float('nan'))
        return loss, info

    monkeypatch.setattr(distill, 'match_and_backward', nan_once)
    run_dir = run_distill(buffers, tmp_path, '--Iteration', '3', '--eval_it', '100', '--wandb', 'disabled')
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert ckpt['state']['skipped'] == 1 and torch.isfinite(ckpt['images']).all()
    assert [r['skipped'] for r in metrics(run_dir) if 'loss' in r] == [0, 1, 1]


@pytest.mark.parametrize('flags, message', [
    (['--ipc', '500'], 'larger than the smallest class'),
    (['--max_start_epoch', '3'], 'past the end of the expert trajectories'),
    (['--model', 'ConvNetW64'], 'no expert buffers'),
])
def test_bad_input_fails_fast_with_one_line(buffers, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        run_distill(buffers, tmp_path, '--wandb', 'disabled', *flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / '000-Digits-ipc2-ConvNetW32')  # failed before creating a run


def test_every_ast_att_component_runs_together_in_both_unroll_modes(buffers, tmp_path):
    """All AST flags + ATT + student momentum: recompute gives the same images as bptt after 2 iterations."""
    flags = ['--Iteration', '2', '--eval_it', '100', '--wandb', 'disabled', '--pix_init', 'kmeans',
             '--balance_loss', '--agg_middle_loss', '--adaptive_middle_loss', '--weight_perturb', '--syn_mom', '0.9',
             '--auto_steps', '--expert_epochs', '2', '--max_start_epoch', '1']
    runs, starts = {}, {}
    for mode in ('bptt', 'recompute'):
        run_dir = run_distill(buffers, tmp_path / mode, *flags, '--unroll', mode)
        runs[mode] = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
        starts[mode] = torch.load(os.path.join(run_dir, 'images_best.pt'), weights_only=True)  # best at it 0
        rows = [r for r in metrics(run_dir) if 'loss' in r]
        assert all('loss_mid1' in r and 'nu' in r and 1 <= r['n_final'] <= 3 for r in rows)
    assert torch.equal(starts['bptt'], starts['recompute'])
    # the two steps the images took agree to float rounding, which lr_img = 100 magnifies elementwise
    # (a 1-thread CPU differs from a 2-thread one by 1e-4 in single pixels): compare the whole update.
    # float32 through distill.py; measured 5.6e-6 (AVX-512) to 1.4e-5 (scalar kernels), bound 1e-3
    moved = {mode: runs[mode]['images'] - starts[mode] for mode in runs}
    assert moved['bptt'].norm() > 0
    assert (moved['recompute'] - moved['bptt']).norm() / moved['bptt'].norm() < 1e-3
    assert runs['bptt']['state']['skipped'] == 0


def test_valid_split_runs_end_to_end_and_reports_validation_accuracy(tmp_path_factory, tmp_path):
    """Experts, distillation and eval.py on the same --valid split: every evaluation also scores the held-out
    images, which the experts never saw."""
    buffers_valid = tiny_buffers(tmp_path_factory, 1, MODEL, '--valid', '200')
    meta = json.load(open(os.path.join(buffers_valid, 'Digits_NO_ZCA', MODEL, 'replay_buffer_0.json')))
    assert meta['valid'] == 200
    run_dir = run_distill(buffers_valid, tmp_path, '--valid', '200', '--wandb', 'disabled', '--max_experts', '1')
    evals = [r for r in metrics(run_dir) if f'eval/{MODEL}_mean' in r]
    assert len(evals) >= 2 and all(0 <= r[f'eval/{MODEL}_val_mean'] <= 1 for r in evals)
    # the best set is selected on the validation split, and named so
    assert all('eval/best_mean_selected_on_test' not in r for r in evals)
    assert [r['eval/best_mean_selected_on_val'] for r in evals] == \
        [max(e[f'eval/{MODEL}_val_mean'] for e in evals[:k + 1]) for k in range(len(evals))]
    assert 'best_mean_selected_on_val' in json.load(open(os.path.join(run_dir, 'final.json')))
    import eval as eval_script
    out = tmp_path / 'eval.json'
    eval_script.main(['--run', run_dir, '--num_eval', '1', '--epoch_eval_train', '5', '--out', str(out)])
    scored = json.load(open(out))['results'][MODEL]
    assert len(scored['val_accs']) == 1 and 0 <= scored['val_mean'] <= 1
    eval_script.main(['--run', run_dir, '--which', 'best', '--num_eval', '1', '--epoch_eval_train', '2', '--out', str(out)])
    assert 'selected on the validation split' in json.load(open(out))['source']


def test_mct_run_samples_real_valued_start_epochs(buffers, tmp_path):
    import compress_buffers
    stats = compress_buffers.main(['--buffer_path', buffers, '--dataset', 'Digits', '--model', MODEL, '--k', '3'])
    assert stats['files'] == 2 and stats['ratio'] < 1
    run_dir = run_distill(buffers, tmp_path, '--mct', '--mct_k', '3', '--Iteration', '3', '--eval_it', '100',
                          '--wandb', 'disabled')
    starts = [r['start_epoch'] for r in metrics(run_dir) if 'loss' in r]
    assert len(starts) == 3 and all(0 <= s < 2 for s in starts) and any(s != int(s) for s in starts)


def test_adaptive_middle_loss_alone_switches_intermediate_matching_on(buffers, tmp_path):
    """As in the authors' code: --adaptive_middle_loss without --agg_middle_loss still adds the terms."""
    common = ['--Iteration', '1', '--eval_it', '100', '--wandb', 'disabled', '--expert_epochs', '2',
              '--max_start_epoch', '1', '--weight_perturb', '--perturb_variant', 'code']
    with_flag = run_distill(buffers, tmp_path / 'a', *common, '--adaptive_middle_loss')
    without = run_distill(buffers, tmp_path / 'b', *common)
    assert all('loss_mid1' in r for r in metrics(with_flag) if 'loss' in r)
    assert not any('loss_mid1' in r for r in metrics(without))


def test_ast_evaluation_logs_its_test_selected_maximum_beside_the_final_accuracy(buffers, tmp_path):
    run_dir = run_distill(buffers, tmp_path, '--Iteration', '1', '--eval_it', '100', '--wandb', 'disabled',
                          '--lr_decay', 'ast', '--epoch_eval_train', '21')
    evals = [r for r in metrics(run_dir) if f'eval/{MODEL}_mean' in r]
    assert evals and all(f'eval/{MODEL}_max_selected_on_test' in r for r in evals)
    out = tmp_path / 'eval.json'
    eval_script.main(['--run', run_dir, '--num_eval', '1', '--epoch_eval_train', '21', '--lr_decay', 'ast',
                      '--eval_mode', MODEL, '--out', str(out)])
    res = json.load(open(out))['results'][MODEL]
    assert len(res['max_acc_selected_on_test']) == 1 and len(res['accs']) == 1
