"""examples/train.py: DDP on 2 gloo CPU processes resumes bit-exactly; single-process resume for every
model family, AMP, ImageFolder (.npy), data order, signal stop and bad arguments.

The 2-process runs go through ``python -m torch.distributed.run`` on 127.0.0.1; the others call
the script's ``main(argv)`` in this process (much cheaper than a launch on 2 shared cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train.py")

_spec = importlib.util.spec_from_file_location("vitattn_example_train", SCRIPT)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

# Tiny configurations (a few thousand parameters, 28-32 px images) that still keep every
# stochastic part of the real models: drop path (RMT, SeTformer), SReT's training permutations.
TINY = {
    "rmt_t": (32, dict(embed_dims=[16, 32], depths=[1, 1], num_heads=[2, 2], init_values=[2, 2],
                       heads_ranges=[4, 4], mlp_ratios=[2, 2], chunkwise_recurrents=[True, False],
                       layerscales=[False, False], use_checkpoints=[False, False], projection=32,
                       drop_path_rate=0.2)),
    "sret_t": (32, dict(base_dims=[8, 8], depth=[1, 1], recursive_num=[1, 1], heads=[2, 2], groups1=[2, 1],
                        groups2=[2, 1])),
    "dynamixer_s": (28, dict(layers=[1, 1], embed_dims=[16, 32], transitions=[True, False], num_heads=[2, 2],
                             reduced_dims=[2, 2], mlp_ratios=[2, 2], drop_path_rate=0.2)),
    "setformer_mini": (32, dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], ref_sides=[2, 2],
                                drop_path_rate=0.2)),
}


def tiny_args(model, out, *extra, train_size=7, epochs=2, batch=2, classes=3, kw=None):
    img, tiny = TINY[model]
    kw = tiny if kw is None else kw
    return ["--model", model, "--model-kwargs", json.dumps(kw), "--img-size", str(img),
            "--num-classes", str(classes), "--synthetic-train-size", str(train_size), "--synthetic-val-size", "3",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "3e-3", "--warmup-steps", "2",
            "--workers", "0", "--log-every", "100", "--threads", "1", "--output", str(out), *extra]


@pytest.fixture(autouse=True)
def _restore_threads():
    # the runs use 1 intra-op thread (on 2 shared cores more threads only contend); put the
    # process's setting back for whatever test runs next in this pytest process
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out):
    return [(r["step"], r["loss"]) for r in metrics(out) if r["kind"] == "train"]


def load(out, name="last.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Bitwise: every model tensor (parameters and BatchNorm buffers) and every optimizer state tensor."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer state {i}.{k} differs"


def assert_trained(start, end):
    """Guards the exactness checks against a run that changes nothing."""
    changed = [k for k in end["model"] if end["model"][k].is_floating_point()
               and not torch.equal(start["model"][k], end["model"][k])]
    assert len(changed) > len(end["model"]) // 2, f"only {len(changed)} tensors changed"


# ---------------------------------------------------------------- 2 processes, gloo, torchrun
#
# Two launches of 2 CPU processes, the dearest part of this file (each process imports torch):
#   1. ``torchrun examples/train.py`` DDP run interrupted after 3 of its 8 steps (mid-epoch);
#   2. ``torchrun`` of this file as a driver (see __main__): in fresh processes first the DDP resume
#      of run 1, then, one after the other, the uninterrupted DDP run, and FSDP: uninterrupted,
#      interrupted after 3 steps, resumed.

# 17 samples over 2 ranks: padded to 9 per rank, 4 steps of 2 per epoch, 8 steps in 2 epochs;
# the interruption at step 3 lands mid-epoch, so the sampler position and set_epoch both matter
DIST_RUN = dict(train_size=17, epochs=2, batch=2, classes=4)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*script_and_args):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *script_and_args]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stdout[-6000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _torchrun(SCRIPT, *tiny_args("rmt_t", root / "ddp_part", "--stop-after", "3", **DIST_RUN))
    stopped = load(root / "ddp_part")
    _torchrun(os.path.abspath(__file__), "dist-driver", str(root))
    return root, stopped


def _driver(root):
    """Run under torchrun by the dist_runs fixture (2 ranks, gloo)."""
    j = lambda name: os.path.join(root, name)
    # one process group for all five runs (main() reuses one it did not create): tearing it down
    # and re-creating it on the same rendezvous store between runs can hang in gloo's connect
    torch.distributed.init_process_group("gloo")
    train.main(tiny_args("rmt_t", j("ddp_part"), "--resume", "auto", **DIST_RUN))
    train.main(tiny_args("rmt_t", j("ddp_full"), **DIST_RUN))
    train.main(tiny_args("rmt_t", j("fsdp_full"), "--fsdp", **DIST_RUN))
    train.main(tiny_args("rmt_t", j("fsdp_part"), "--fsdp", "--stop-after", "3", **DIST_RUN))
    if int(os.environ["RANK"]) == 0:
        shutil.copyfile(os.path.join(j("fsdp_part"), "last.pt"), j("fsdp_stopped.pt"))
    train.main(tiny_args("rmt_t", j("fsdp_part"), "--fsdp", "--resume", "auto", **DIST_RUN))
    torch.distributed.destroy_process_group()


def test_ddp_interrupted_and_resumed_run_is_bitwise_identical(dist_runs):
    root, stopped = dist_runs
    full, part = root / "ddp_full", root / "ddp_part"
    assert (stopped["global_step"], stopped["epoch"], stopped["step_in_epoch"]) == (3, 0, 3)
    assert stopped["world_size"] == 2 and len(stopped["rng"]) == 2 and not stopped["fsdp"]
    # each rank's training RNG is its own stream (per-rank drop path), and both were saved
    assert not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])
    a, b = load(full), load(part)
    assert a["global_step"] == 8
    assert_same_state(a, b)
    assert_trained(stopped, b)
    # the logged (rank-averaged) losses of steps 1-3 and 4-8 are those of the uninterrupted run
    la, lb = losses(full), losses(part)
    assert [s for s, _ in la] == list(range(1, 9))
    assert la == lb
    kinds = [r["kind"] for r in metrics(part)]
    assert kinds.count("stopped") == 1 and kinds.count("start") == 2
    fa, fb = metrics(full)[-1], metrics(part)[-1]
    assert fa["kind"] == fb["kind"] == "final" and fa["ranks_in_sync"] and fb["ranks_in_sync"]
    assert fa["param_sha256"] == fb["param_sha256"]
    start = [r for r in metrics(part) if r["kind"] == "start"]
    assert start[-1]["resumed_from"] == str(part / "last.pt")
    assert start[-1]["dist_backend"] == "gloo" and start[-1]["parallel"] == "ddp" and start[-1]["world_size"] == 2
    evals = [r for r in metrics(part) if r["kind"] == "eval"]
    assert len(evals) == 2 and all(r["val_count"] == 3 for r in evals)  # 3 val samples over 2 ranks, none doubled


def test_fsdp_interrupted_and_resumed_run_is_bitwise_identical(dist_runs):
    root, _ = dist_runs
    full, part = root / "fsdp_full", root / "fsdp_part"
    a, b = load(full), load(part)
    assert a["fsdp"] and b["fsdp"] and a["global_step"] == 8
    # the gathered, unprefixed weights: what a plain model loads
    net = train.create_model(train.parse_args(tiny_args("rmt_t", root, classes=4)), 4)
    net.load_state_dict(a["model"])
    # optimizer state keyed by parameter name, one entry per parameter, full (unsharded) shapes
    assert set(a["optimizer"]["state"]) == {n for n, _ in net.named_parameters()}
    for n, p in net.named_parameters():
        assert a["optimizer"]["state"][n]["exp_avg"].shape == p.shape
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    for n in a["optimizer"]["state"]:
        for k, v in a["optimizer"]["state"][n].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][n][k])), f"{n}.{k}"
    assert losses(full) == losses(part) and len(losses(full)) == 8
    assert metrics(full)[-1]["param_sha256"] == metrics(part)[-1]["param_sha256"]
    assert [r["parallel"] for r in metrics(part) if r["kind"] == "start"] == ["fsdp", "fsdp"]
    evals = [r for r in metrics(part) if r["kind"] == "eval"]
    assert len(evals) == 2 and all(r["val_count"] == 3 for r in evals)  # the padding repeats are not scored
    assert_trained(torch.load(root / "fsdp_stopped.pt", weights_only=True), b)
    # FSDP trains the same model as DDP, and with 2 ranks bit for bit: both average a gradient
    # element over the ranks as (g0 + g1) / 2 or g0 / 2 + g1 / 2, which are equal in floating
    # point (a sum of two terms has one rounding whatever the order; halving is exact)
    assert losses(full) == losses(root / "ddp_full")
    d = load(root / "ddp_full")
    for k in a["model"]:
        assert torch.equal(a["model"][k], d["model"][k]), f"FSDP and DDP differ in {k}"


# ---------------------------------------------------------------- one process, in this process


def _interrupt_and_resume(model, tmp_path, *extra, stop=2):
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(tiny_args(model, full, *extra))
    train.main(tiny_args(model, part, "--stop-after", str(stop), *extra))
    stopped = load(part)
    train.main(tiny_args(model, part, "--resume", str(part / "last.pt"), *extra))
    return full, part, stopped


@pytest.mark.parametrize("model", ["sret_t", "dynamixer_s", "setformer_mini"])
def test_resume_is_bitwise_identical_single_process(model, tmp_path):
    # 7 samples, batch 2: 3 steps per epoch (the 7th sample is dropped), 6 steps; stop mid-epoch 0
    full, part, stopped = _interrupt_and_resume(model, tmp_path)
    a, b = load(full), load(part)
    assert a["global_step"] == 6
    assert_same_state(a, b)
    assert_trained(stopped, b)
    assert losses(full) == losses(part)


def test_periodic_checkpoints_and_stop_at_an_epoch_end_resume_exactly(tmp_path):
    # --save-every 2 with copies kept: steps 2, 4, 6 and the epoch ends 3, 6
    full = tmp_path / "full"
    train.main(tiny_args("setformer_mini", full, "--save-every", "2", "--keep-checkpoints"))
    kept = sorted(p.name for p in full.glob("ckpt_step*.pt"))
    assert kept == [f"ckpt_step{s:08d}.pt" for s in (2, 3, 4, 6)]
    mid = load(full, "ckpt_step00000004.pt")
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 1, 4)
    # a periodic checkpoint from the middle of epoch 1, resumed in another directory
    other = tmp_path / "from4"
    train.main(tiny_args("setformer_mini", other, "--resume", str(full / "ckpt_step00000004.pt")))
    assert_same_state(load(full), load(other))
    assert losses(other) == losses(full)[4:]
    # interrupted on the last step of epoch 0: the resume starts epoch 1 at its first batch
    part = tmp_path / "part"
    train.main(tiny_args("setformer_mini", part, "--stop-after", "3"))
    assert (load(part)["epoch"], load(part)["step_in_epoch"]) == (0, 3)
    train.main(tiny_args("setformer_mini", part, "--resume", "auto"))
    assert_same_state(load(full), load(part))
    assert losses(part) == losses(full)
    # evaluating leaves the training untouched (it must draw nothing from the global RNG)
    train.main(tiny_args("setformer_mini", tmp_path / "noeval", "--no-eval"))
    assert_same_state(load(full), load(tmp_path / "noeval"))


def test_resume_check_catches_missing_rng_restore(tmp_path, monkeypatch):
    # the exactness checks above can fail: without the RNG restore, drop path draws other masks
    monkeypatch.setattr(train, "set_rng_state", lambda state, device: None)
    full, part, _ = _interrupt_and_resume("setformer_mini", tmp_path)
    assert losses(full)[:2] == losses(part)[:2]
    assert losses(full)[2:] != losses(part)[2:]


def test_resume_check_catches_wrong_sampler_position(tmp_path, monkeypatch):
    # ... and restarting the epoch from its first batch instead of the saved position shows too
    orig = train.ResumableSampler.set_epoch
    monkeypatch.setattr(train.ResumableSampler, "set_epoch", lambda self, epoch, start=0: orig(self, epoch, 0))
    full, part, _ = _interrupt_and_resume("dynamixer_s", tmp_path)
    assert losses(full)[2:] != losses(part)[2:]


@pytest.mark.parametrize("model", ["rmt_t", "setformer_mini"])
def test_bf16_autocast_on_cpu_trains_and_resumes_exactly(model, tmp_path):
    full, part, stopped = _interrupt_and_resume(model, tmp_path, "--amp", "bf16", stop=4)
    assert_same_state(load(full), load(part))
    assert losses(full) == losses(part)
    assert all(np.isfinite(l) for _, l in losses(full))
    # autocast did act: the fp32 run of the same data gives other losses
    train.main(tiny_args(model, tmp_path / "fp32", "--stop-after", "1"))
    assert losses(tmp_path / "fp32")[0] != losses(full)[0]
    assert load(full)["scaler"] is None  # a GradScaler only goes with fp16 on CUDA


def test_signal_stops_with_a_checkpoint_and_resume_is_exact(tmp_path):
    full, part, model = tmp_path / "full", tmp_path / "part", "dynamixer_s"
    train.main(tiny_args(model, full))
    before = signal.getsignal(signal.SIGTERM)
    calls = {"n": 0}
    orig = train.create_model

    def create_with_hook(args, num_classes):
        m = orig(args, num_classes)

        def hook(module, inputs, output):
            calls["n"] += module.training  # evaluation forwards do not count
            if calls["n"] == 4 and module.training:  # a SIGTERM (preemption) during step 4
                os.kill(os.getpid(), signal.SIGTERM)
        m.register_forward_hook(hook)
        return m

    train.create_model = create_with_hook
    try:
        res = train.main(tiny_args(model, part))
    finally:
        train.create_model = orig
    assert res["stopped_early"] and res["global_step"] == 4
    assert metrics(part)[-1] == {"kind": "stopped", "step": 4, "reason": "signal"}
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    train.main(tiny_args(model, part, "--resume", "auto"))
    assert_same_state(load(full), load(part))
    assert losses(full) == losses(part)


def test_dataloader_workers_do_not_change_the_run(tmp_path):
    train.main(tiny_args("dynamixer_s", tmp_path / "w0", epochs=1))
    train.main(tiny_args("dynamixer_s", tmp_path / "w2", "--workers", "2", epochs=1))
    assert_same_state(load(tmp_path / "w0"), load(tmp_path / "w2"))
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


def test_attn_backend_reaches_every_block(tmp_path):
    args = train.parse_args(tiny_args("rmt_t", tmp_path, "--attn-backend", "torch"))
    model = train.create_model(args, 3)
    backends = {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")}
    assert backends == {"torch"}
    res = train.main(tiny_args("rmt_t", tmp_path, "--attn-backend", "torch", epochs=1))
    assert res["global_step"] == 3 and not res["stopped_early"]


# ---------------------------------------------------------------- data


def test_sampler_shards_cover_data_and_resume_position():
    ds = list(range(11))
    shards = [train.ResumableSampler(ds, 3, r, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    keys = [list(s) for s in shards]
    assert all(len(k) == 4 and all(e == 2 for _, e in k) for k in keys)  # padded to 12 = 3 x 4
    idx = [i for k in keys for i, _ in k]
    assert set(idx) == set(range(11))
    again = train.ResumableSampler(ds, 3, 1, seed=5)
    again.set_epoch(2, start=3)
    assert list(again) == keys[1][3:] and len(again) == 1

    def order(epoch, seed=5):
        s = train.ResumableSampler(ds, 1, 0, seed=seed)
        s.set_epoch(epoch)
        return [i for i, _ in s]

    # a pure function of (seed, epoch): reshuffled every epoch, a permutation each time
    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=6)
    assert sorted(order(1)) == list(range(11))


def test_synthetic_data_is_deterministic_and_worker_independent():
    base = train.SyntheticImages(9, 4, 16, seed=3)
    again = train.SyntheticImages(9, 4, 16, seed=3)
    other = train.SyntheticImages(9, 4, 16, seed=4)
    x0, y0 = base.load(5)
    x1, y1 = again.load(5)
    assert torch.equal(x0, x1) and y0 == y1 and x0.shape == (3, 16, 16)
    assert not torch.equal(x0, other.load(5)[0])
    assert len({base.load(i)[1] for i in range(9)}) > 1
    ds = train.Augmented(base, 16, True, 3, synthetic=True)
    # augmentation depends on the epoch, not on how often or where a sample was read
    flips = [torch.equal(ds[(i, e)][0], base.load(i)[0].flip(-1)) for i in range(9) for e in range(4)]
    assert any(flips) and not all(flips)
    assert torch.equal(ds[(2, 1)][0], ds[(2, 1)][0])
    sampler = train.ResumableSampler(ds, 1, 0, seed=3)
    sampler.set_epoch(1)
    batches = lambda w: [b[0] for b in torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=w)]
    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def _write_npy_tree(root):
    rng = np.random.default_rng(0)
    shapes = [(37, 29, 3), (20, 41), (3, 33, 30), (31, 31, 4)]
    for split, n in (("train", 3), ("val", 1)):
        for c, cls in enumerate(["cat", "ant", "bee"]):  # not in sorted order on purpose
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                shape = shapes[(c + i) % len(shapes)]
                arr = rng.integers(0, 256, shape, dtype=np.uint8) if i % 2 == 0 else rng.random(shape, np.float32)
                np.save(d / f"{i}.npy", arr)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")


def test_imagefolder_npy_loading_and_transforms(tmp_path):
    _write_npy_tree(tmp_path)
    ds = train.ImageFolder(str(tmp_path / "train"), 24)
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 9
    assert [lbl for _, lbl in ds.samples] == [0] * 3 + [1] * 3 + [2] * 3
    for i in range(len(ds)):
        img, lbl = ds.load(i)
        assert img.dim() == 3 and img.shape[0] in (1, 3, 4) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    tr = train.Augmented(ds, 24, True, 0, synthetic=False)
    ev = train.Augmented(ds, 24, False, 0, synthetic=False)
    for i in range(len(ds)):
        assert tr[(i, 0)][0].shape == (3, 24, 24) and ev[(i, 0)][0].shape == (3, 24, 24)
    assert torch.equal(tr[(4, 1)][0], tr[(4, 1)][0]) and not torch.equal(tr[(4, 1)][0], tr[(4, 2)][0])
    # eval: shorter side resized to 24 / 0.875, central crop, ImageNet normalization
    img = ds.load(0)[0]
    want = train.normalize(train.center_crop(img, 24))
    assert torch.equal(ev[(0, 0)][0], want)
    flat = torch.full((3, 40, 50), 0.5)
    got = train.normalize(train.center_crop(flat, 24))
    exp = (0.5 - torch.tensor(train.IMAGENET_MEAN)) / torch.tensor(train.IMAGENET_STD)
    torch.testing.assert_close(got, exp.view(3, 1, 1).expand(3, 24, 24))


def test_imagefolder_training_run(tmp_path):
    _write_npy_tree(tmp_path / "data")
    img, kw = TINY["setformer_mini"]
    res = train.main(["--model", "setformer_mini", "--model-kwargs", json.dumps(kw), "--data", str(tmp_path / "data"),
                      "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--threads", "1",
                      "--output", str(tmp_path / "out")])
    assert res["global_step"] == 2  # 9 images, batch 4, last partial batch dropped
    rows = metrics(tmp_path / "out")
    ev = [r for r in rows if r["kind"] == "eval"]
    assert len(ev) == 1 and ev[0]["val_count"] == 3 and np.isfinite(ev[0]["val_loss"])
    ck = load(tmp_path / "out")
    assert ck["model"]["head.weight"].shape[0] == 3  # classes from the folders
    # the checkpoint is what vitattn.models' pretrained= loads (it finds the "model" entry)
    import vitattn.models as vm
    net = vm.create_model("setformer_mini", num_classes=3, pretrained=str(tmp_path / "out" / "last.pt"), **kw)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k


def test_imagefolder_bad_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data"):
        train.ImageFolder(str(tmp_path / "empty"), 16)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="--data"):
        train.ImageFolder(str(tmp_path / "noimg"), 16)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    np.save(tmp_path / "bad" / "a" / "x.npy", np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="--data"):
        train.ImageFolder(str(tmp_path / "bad"), 16).load(0)
    np.save(tmp_path / "bad" / "a" / "x.npy", np.zeros((8, 8, 3), np.int32))
    with pytest.raises(ValueError, match="--data"):
        train.ImageFolder(str(tmp_path / "bad"), 16).load(0)


@pytest.mark.skipif(train.Image is None, reason="PIL is not installed here: only the .npy path can be exercised")
def test_imagefolder_pil_formats(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    arr = np.random.default_rng(0).integers(0, 256, (19, 23, 3), dtype=np.uint8)
    train.Image.fromarray(arr).save(d / "x.png")
    img, lbl = train.ImageFolder(str(tmp_path), 16).load(0)
    assert lbl == 0 and torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


# ---------------------------------------------------------------- schedule and arguments


def test_lr_schedule():
    args = train.parse_args(["--model", "rmt_t", "--lr", "1e-3", "--min-lr", "1e-5", "--warmup-steps", "4"])
    lrs = [train.lr_at(s, 20, args) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert train.lr_at(20, 20, args) == pytest.approx(1e-5)


@pytest.mark.parametrize("argv, name", [
    (["--model", "no_such_model"], "--model"),
    (["--model", "rmt_t", "--model-kwargs", "{bad"], "--model-kwargs"),
    (["--model", "rmt_t", "--model-kwargs", "[1, 2]"], "--model-kwargs"),
    (["--model", "rmt_t", "--attn-backend", "fast"], "--attn-backend"),
    (["--model", "rmt_t", "--batch-size", "0"], "--batch-size"),
    (["--model", "rmt_t", "--epochs", "0"], "--epochs"),
    (["--model", "rmt_t", "--lr", "0"], "--lr"),
    (["--model", "rmt_t", "--smoothing", "1.0"], "--smoothing"),
    (["--model", "rmt_t", "--clip-grad", "-1"], "--clip-grad"),
    (["--model", "rmt_t", "--stop-after", "0"], "--stop-after"),
    (["--model", "rmt_t", "--resume", "/no/such/file.pt"], "--resume"),
    (["--model", "rmt_t", "--data", "/no/such/dir"], "--data"),
    (["--model", "rmt_t", "--amp", "fp8"], "--amp"),
    (["--model", "rmt_t", "--amp", "fp16", "--device", "cpu"], "--amp"),
])
def test_bad_arguments_name_the_argument(argv, name, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_runtime_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        train.main(tiny_args("dynamixer_s", tmp_path, train_size=3, batch=4))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="--resume"):
        train.main(tiny_args("dynamixer_s", tmp_path, "--resume", str(tmp_path / "junk.pt")))
    # a constructor argument the model does not have is the constructor's TypeError
    with pytest.raises(TypeError, match="no_such_kwarg"):
        train.main(tiny_args("dynamixer_s", tmp_path, kw=dict(TINY["dynamixer_s"][1], no_such_kwarg=1)))
    # FSDP needs a process group; a checkpoint is resumed the way it was written
    with pytest.raises(ValueError, match="--fsdp"):
        train.main(tiny_args("dynamixer_s", tmp_path, "--fsdp"))
    train.main(tiny_args("dynamixer_s", tmp_path, "--stop-after", "1"))
    ck = load(tmp_path)
    ck["fsdp"] = True
    torch.save(ck, tmp_path / "as_fsdp.pt")
    with pytest.raises(ValueError, match="--fsdp"):
        train.main(tiny_args("dynamixer_s", tmp_path, "--resume", str(tmp_path / "as_fsdp.pt")))


if __name__ == "__main__" and sys.argv[1:2] == ["dist-driver"]:
    _driver(sys.argv[2])
