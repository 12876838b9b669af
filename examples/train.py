#!/usr/bin/env python
"""Train any vitattn model on synthetic data or an ImageFolder directory, on one or many processes.

Single process:   python examples/train.py --model rmt_t --data synthetic --epochs 1
Data parallel:    torchrun --nproc_per_node 4 examples/train.py --model rmt_t --data /path/imagenet --amp bf16

DistributedDataParallel over gloo (CPU) or NCCL (GPU), AMP (bf16 autocast on CPU; fp16 with a
GradScaler or bf16 on GPU), ``--attn-backend`` for the vitattn ops, and checkpoints that resume
exactly: model, optimizer, scaler, epoch/step, every rank's RNG states and the position inside
the epoch are saved, so a run stopped after k steps and resumed ends with the same parameters,
bit for bit, as one that never stopped (same world size, batch size and device kind).
See examples/README.md.

Determinism comes from three choices: the data order is a pure function of (seed, epoch) (a
DistributedSampler that can start mid-epoch); every sample's augmentation is drawn from its own
generator seeded by (seed, epoch, index), so it does not depend on workers or on the global RNG;
and the global RNGs (dropout, stochastic depth, SReT's token permutations) are saved per rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import vitattn.models as vm

try:  # PIL decodes jpg/png; without it ImageFolder reads .npy images only
    from PIL import Image
except ImportError:  # pragma: no cover - depends on the environment
    Image = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NPY_EXTENSIONS = (".npy",)
PIL_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CHECKPOINT_FORMAT = 1
ATTN_BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
# FSDP shards these submodules one by one (then the root gets the rest): the repeated blocks of
# each family. SReT shares a block between recursive applications, so its unit is the stage.
FSDP_UNITS = ("RetBlock", "SReTStage", "DynaMixerLayer", "SeTBlock")


# ---------------------------------------------------------------- data


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one sample of one epoch: augmentation then depends neither on the
    number of DataLoader workers nor on the global RNG state, which is what makes resume exact."""
    key = f"{seed}:{epoch}:{index}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)


def normalize(img: Tensor) -> Tensor:
    """(C, H, W) in [0, 1] -> ImageNet-normalized (grey and RGBA inputs are made RGB first)."""
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] == 4:
        img = img[:3]
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype).view(3, 1, 1)
    return (img - mean) / std


def resize(img: Tensor, size: Tuple[int, int]) -> Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def random_resized_crop(img: Tensor, size: int, gen: torch.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """Inception-style crop (area fraction in ``scale``, log-uniform aspect ``ratio``) resized to size^2;
    falls back to the central crop after 10 failed draws, as the usual implementation does."""
    _, H, W = img.shape
    area = H * W
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, W - w + 1, (1,), generator=gen))
            return resize(img[:, top:top + h, left:left + w], (size, size))
    return center_crop(img, size, crop_pct=1.0)


def center_crop(img: Tensor, size: int, crop_pct: float = 0.875) -> Tensor:
    """Resize the shorter side to size / crop_pct, then take the central size x size square."""
    _, H, W = img.shape
    short = max(size, int(math.floor(size / crop_pct)))
    h, w = (short, max(size, round(W * short / H))) if H <= W else (max(size, round(H * short / W)), short)
    img = resize(img, (h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


class SyntheticImages(Dataset):
    """A learnable, deterministic stand-in for ImageNet generated on the fly.

    Sample ``i`` is a function of (seed, i) only: its label is drawn from the sample's own
    generator and its image is that class's smooth random template plus noise, so a model
    can fit it and the loss goes down. Nothing is stored but the (classes, 3, 8, 8) templates.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int, in_chans: int = 3, offset: int = 0):
        self.size, self.num_classes, self.img_size, self.seed = size, num_classes, img_size, seed
        self.offset = offset  # sample i is global sample offset + i (the val split follows the train one)
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(num_classes, in_chans, 8, 8, generator=g)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Tuple[Tensor, int]:
        g = sample_generator(self.seed, -1, self.offset + index)  # epoch -1: the sample itself never changes
        label = int(torch.randint(0, self.num_classes, (1,), generator=g))
        template = resize(self.templates[label], (self.img_size, self.img_size))
        img = template + 0.5 * torch.randn(template.shape, generator=g)
        return img, label


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (classes sorted by name, as torchvision's ImageFolder does).

    Reads .npy arrays always ((H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; uint8 scaled
    by 1/255, floats taken as [0, 1]) and common image formats when PIL is installed.
    """

    def __init__(self, root: str, img_size: int):
        if not os.path.isdir(root):
            raise ValueError(f"--data: {root!r} is not a directory")
        self.root, self.img_size = root, img_size
        exts = NPY_EXTENSIONS + (PIL_EXTENSIONS if Image is not None else ())
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"--data: {root!r} has no class subdirectories (expected root/<class>/<image>)")
        self.samples: List[Tuple[str, int]] = []
        skipped = 0
        for label, cls in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames.sort()  # os.walk order is the filesystem's; sorting makes the index stable
                for name in sorted(filenames):
                    if name.lower().endswith(exts):
                        self.samples.append((os.path.join(dirpath, name), label))
                    elif name.lower().endswith(PIL_EXTENSIONS):
                        skipped += 1
        if skipped:
            warnings.warn(f"--data: skipped {skipped} image files under {root!r}: PIL is not installed "
                          f"(install Pillow, or convert them to .npy)")
        if not self.samples:
            raise ValueError(f"--data: no images with extensions {exts} under {root!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Tensor, int]:
        path, label = self.samples[index]
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        return _to_chw(arr, path), label


def _to_chw(arr: np.ndarray, path: str) -> Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"--data: image {path!r} has shape {arr.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"--data: image {path!r} has shape {arr.shape}; expected 1, 3 or 4 channels")
    if arr.dtype == np.uint8:
        img = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        img = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise ValueError(f"--data: image {path!r} has dtype {arr.dtype}; expected uint8 or float")
    return img.permute(2, 0, 1)


class Augmented(Dataset):
    """Indexed by (index, epoch) keys from :class:`ResumableSampler`; applies the train or eval
    transform with the sample's private generator and normalizes."""

    def __init__(self, base, img_size: int, train: bool, seed: int, synthetic: bool):
        self.base, self.img_size, self.train, self.seed, self.synthetic = base, img_size, train, seed, synthetic

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, int]:
        index, epoch = key
        img, label = self.base.load(index)
        if self.train:
            g = sample_generator(self.seed, epoch, index)
            if not self.synthetic:
                img = random_resized_crop(img, self.img_size, g)
            if bool(torch.rand((), generator=g) < 0.5):
                img = img.flip(-1)
        elif not self.synthetic:
            img = center_crop(img, self.img_size)
        if not self.synthetic:
            img = normalize(img)
        return img.contiguous(), label


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle, set_epoch, padding to equal shards) that yields
    (index, epoch) keys and can start ``start`` samples into the epoch: resuming mid-epoch
    replays exactly the order the interrupted run would have used."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_data(args):
    """(train dataset, val dataset or None, number of classes)."""
    if args.data == "synthetic":
        train = SyntheticImages(args.synthetic_train_size, args.num_classes, args.img_size, args.seed)
        # same templates (same task), other samples
        val = SyntheticImages(args.synthetic_val_size, args.num_classes, args.img_size, args.seed,
                              offset=args.synthetic_train_size)
        n_cls = args.num_classes
    else:
        root = args.data
        tdir = os.path.join(root, "train")
        train = ImageFolder(tdir if os.path.isdir(tdir) else root, args.img_size)
        vdir = os.path.join(root, "val")
        val = ImageFolder(vdir, args.img_size) if os.path.isdir(vdir) and os.path.isdir(tdir) else None
        if val is not None and val.classes != train.classes:
            raise ValueError(f"--data: {vdir!r} and {tdir!r} have different class directories")
        n_cls = len(train.classes)
    synthetic = args.data == "synthetic"
    train = Augmented(train, args.img_size, True, args.seed, synthetic)
    val = Augmented(val, args.img_size, False, args.seed, synthetic) if val is not None else None
    return train, val, n_cls


# ---------------------------------------------------------------- model, optimizer, schedule


def create_model(args, num_classes: int) -> nn.Module:
    kwargs = dict(json.loads(args.model_kwargs)) if args.model_kwargs else {}
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("attn_backend", args.attn_backend)
    if "img_size" in kwargs:
        return vm.create_model(args.model, **kwargs)
    # SReT and DynaMixer size their position embeddings / token mixers from img_size; RMT and
    # SeTformer take any size and have no such argument, so offer it and drop it if refused
    try:
        return vm.create_model(args.model, img_size=args.img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return vm.create_model(args.model, **kwargs)


def param_groups(model: nn.Module, weight_decay: float):
    """No weight decay on biases, norms (1-D parameters) and what the model names in no_weight_decay*()."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    skip_kw = tuple(getattr(model, "no_weight_decay_keywords", lambda: ())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(k in name for k in skip_kw):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine from lr down to min_lr: a pure function
    of the step, so nothing about the schedule needs saving."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, total - args.warmup_steps)
    t = min(1.0, (step - args.warmup_steps) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------- distributed helpers


class Dist:
    """World size, rank and device of this process; init_process_group only under a launcher."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device: cuda requested but torch.cuda.is_available() is False")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        backend = args.dist_backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("--dist-backend: nccl needs CUDA devices; use gloo on CPU")
        self.backend = backend
        self.initialized_here = False
        if self.world > 1 and not dist.is_initialized():
            kw = {"device_id": self.device} if backend == "nccl" else {}
            dist.init_process_group(backend, **kw)
            self.initialized_here = True
        if self.world > 1 and dist.get_world_size() != self.world:
            raise RuntimeError(f"WORLD_SIZE={self.world} but the process group has {dist.get_world_size()} ranks")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> List[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialized_here:
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: every FSDP_UNITS submodule, then the root (stem, downsampling, head). Parameters
    become DTensor shards; forward/backward all-gather a unit's weights just before use."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in model.modules() if type(m).__name__ in FSDP_UNITS]
    if not units:
        warnings.warn(f"--fsdp: {type(model).__name__} has none of {FSDP_UNITS}; sharding it as one unit")
    for m in units:
        fully_shard(m)
    fully_shard(model)
    return model


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart between DDP's
    per-forward broadcasts), so evaluation agrees with the checkpoint rank 0 writes."""
    if d.world > 1:
        for b in unwrap(model).buffers():
            dist.broadcast(b, src=0)


def param_digest(named_params) -> str:
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- RNG and checkpoints


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as tensors and plain numbers, so that torch.load(weights_only=True) accepts it
        "numpy": {"key": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str, model, optimizer, scaler, *, epoch: int, step_in_epoch: int, global_step: int,
                    args, d: Dist) -> None:
    """Every rank contributes its RNG states; rank 0 writes atomically (tmp file + rename), then all wait.

    The model is saved whole and unprefixed (loadable by vitattn's load_pretrained) also under
    FSDP, where the shards are gathered to rank 0; FSDP's optimizer state is keyed by parameter
    name (torch.distributed.checkpoint's full optimizer state dict) instead of by index.
    """
    rngs = d.gather_objects(rng_state(d.device))
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer, options=_full_state_options())  # collective
    elif d.main:
        model_sd, optim_sd = unwrap(model).state_dict(), optimizer.state_dict()
    if d.main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "fsdp": bool(args.fsdp),
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": d.world,
            "batch_size": args.batch_size,
            "rng": rngs,
            "args": {k: v for k, v in vars(args).items()},
        }
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
    d.barrier()


def load_checkpoint(path: str) -> dict:
    # weights_only: a checkpoint is data, never code
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume: {path!r} is not a checkpoint written by examples/train.py")
    return state


def resume_path(args) -> Optional[str]:
    if args.resume is None:
        return None
    if args.resume == "auto":
        p = os.path.join(args.output, "last.pt")
        return p if os.path.isfile(p) else None
    return args.resume


# ---------------------------------------------------------------- train / eval


def autocast_dtype(args) -> Optional[torch.dtype]:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


@torch.no_grad()
def evaluate(model, loader, d: Dist, amp_dtype, n_valid: int) -> Dict[str, float]:
    """Each rank scores its own shard; only the first n_valid samples of it count (FSDP shards
    are padded so that every rank runs the same number of forwards, which all-gather weights)."""
    net = unwrap(model)  # DDP: the bare module, no collectives in eval
    was_training = net.training
    net.eval()
    loss_sum, correct, count, seen = 0.0, 0.0, 0.0, 0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(x)
        keep = max(0, min(len(y), n_valid - seen))
        seen += len(y)
        logits, y = logits[:keep], y[:keep]
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        count += y.numel()
    net.train(was_training)
    loss_sum, correct, count = d.all_sum([loss_sum, correct, count])
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / max(count, 1), "val_count": int(count)}


class _StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C forwarded by torchrun) asks for a checkpoint at the next step."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag:  # a second signal: the user means it, do not wait for the step to end
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Logger:
    """Rank 0 prints JSON lines and appends them to <output>/metrics.jsonl."""

    def __init__(self, path: str, main: bool, keep_until: Optional[int]):
        self.path, self.main = path, main
        if main and keep_until is not None and os.path.isfile(path):
            # steps logged after the checkpoint we resume from are replayed: drop them
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            with open(path, "w") as f:
                for r in rows:
                    if r.get("step", 0) <= keep_until and r.get("kind") != "final":
                        f.write(json.dumps(r) + "\n")
        elif main and os.path.isfile(path):
            os.remove(path)

    def __call__(self, row: dict, echo: bool = True) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if echo:
            print(json.dumps(row), flush=True)


def run(args) -> dict:
    d = Dist(args)
    try:
        return _run(args, d)
    finally:
        d.close()


def _run(args, d: Dist) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    amp_dtype = autocast_dtype(args)
    os.makedirs(args.output, exist_ok=True)

    # the same seed on every rank for the model init (DDP also broadcasts rank 0's weights)
    torch.manual_seed(args.seed)
    train_set, val_set, num_classes = build_data(args)
    model = create_model(args, num_classes)

    sampler = ResumableSampler(train_set, d.world, d.rank, args.seed, shuffle=True)
    steps_per_epoch = sampler.num_samples // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size: {args.batch_size} exceeds the {sampler.num_samples} training samples "
                         f"each of the {d.world} ranks gets")
    total_steps = steps_per_epoch * args.epochs

    start_epoch, start_step, global_step = 0, 0, 0
    ckpt_path = resume_path(args)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:
        if ckpt["fsdp"] != bool(args.fsdp):
            raise ValueError(f"--fsdp: {ckpt_path!r} was written {'with' if ckpt['fsdp'] else 'without'} --fsdp; "
                             f"resume it the same way (its optimizer state is keyed differently)")
        model.load_state_dict(ckpt["model"])  # whole weights, before any sharding
    model = model.to(d.device)
    if args.fsdp:
        if d.world < 2:
            raise ValueError("--fsdp: needs a process group of 2 or more ranks (launch with torchrun)")
        model = shard_model(model)
    elif d.world > 1:
        ddp_kw = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
        model = DDP(model, find_unused_parameters=args.find_unused_parameters, **ddp_kw)
    # after wrapping: under FSDP the optimizer must hold the sharded parameters
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(d.device.type) if args.amp == "fp16" else None
    if ckpt is not None:
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=_full_state_options())
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        exact = ckpt["world_size"] == d.world and ckpt["batch_size"] == args.batch_size
        if not exact:
            # the position is kept in samples; the RNG streams and batches cannot be the same
            warnings.warn(f"resuming {ckpt_path!r} written with world_size={ckpt['world_size']}, "
                          f"batch_size={ckpt['batch_size']} on world_size={d.world}, batch_size={args.batch_size}: "
                          f"training continues but will not match an uninterrupted run")
            seen = start_step * ckpt["batch_size"] * ckpt["world_size"]
            start_step = seen // (args.batch_size * d.world)
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
    # the training-time randomness (drop path, dropout, SReT permutations) differs per rank
    if ckpt is not None and d.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][d.rank], d.device)
    else:
        torch.manual_seed(args.seed + 1 + d.rank)
        random.seed(args.seed + 1 + d.rank)
        np.random.seed((args.seed + 1 + d.rank) % 2**32)
    del ckpt

    log = Logger(os.path.join(args.output, "metrics.jsonl"), d.main, global_step if ckpt_path else None)
    log({"kind": "start", "step": global_step, "model": args.model, "world_size": d.world, "device": str(d.device),
         "dist_backend": d.backend if d.world > 1 else None,
         "parallel": "fsdp" if args.fsdp else ("ddp" if d.world > 1 else None),
         "amp": args.amp, "attn_backend": args.attn_backend,
         "resumed_from": ckpt_path, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
         "params": sum(p.numel() for p in model.parameters())})

    # a dedicated generator: DataLoader draws its worker base seed from it, not from the global RNG
    loader_gen = torch.Generator()
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=True, pin_memory=d.device.type == "cuda", generator=loader_gen)
    val_loader = None
    if val_set is not None and not args.no_eval:
        mine = list(range(d.rank, len(val_set), d.world))  # every sample scored once
        n_valid = len(mine)
        if args.fsdp:  # same number of forwards on every rank; the repeats are not scored
            per_rank = -(-len(val_set) // d.world)
            mine += [mine[0] if mine else 0] * (per_rank - len(mine))
        # its own generator too: creating a loader iterator draws a seed, which must not come
        # from the global RNG (evaluating would then shift the training randomness after it)
        val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=[(i, 0) for i in mine],
                                num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))

    def checkpoint(epoch, step_in_epoch):
        path = os.path.join(args.output, "last.pt")
        save_checkpoint(path, model, optimizer, scaler, epoch=epoch, step_in_epoch=step_in_epoch,
                        global_step=global_step, args=args, d=d)
        if args.keep_checkpoints and d.main:
            shutil.copyfile(path, os.path.join(args.output, f"ckpt_step{global_step:08d}.pt"))

    model.train()
    result = {"stopped_early": False}
    t_last, n_last = time.perf_counter(), 0
    with _StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=first * args.batch_size)
            loader_gen.manual_seed(args.seed + epoch)
            for i, (x, y) in enumerate(loader, start=first):
                lr = lr_at(global_step, total_steps, args)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if args.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    scaler.step(optimizer)  # skips the step (and lowers the scale) on inf/nan grads
                    scaler.update()
                else:
                    loss.backward()
                    if args.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    optimizer.step()
                global_step += 1
                n_last += x.shape[0]
                # one collective: the mean loss for the log and whether any rank was asked to stop
                loss_sum, stops = d.all_sum([float(loss.detach()), float(stop.flag)])
                mean_loss = loss_sum / d.world
                if not math.isfinite(mean_loss) and scaler is None:
                    raise FloatingPointError(
                        f"loss is {mean_loss} at step {global_step}; lower --lr or use --clip-grad")
                row = {"kind": "train", "step": global_step, "epoch": epoch, "loss": mean_loss, "lr": lr}
                echo = global_step % args.log_every == 0 or global_step == total_steps
                if echo:
                    now = time.perf_counter()
                    row["img_per_s"] = n_last * d.world / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                log(row, echo=echo)
                interrupted = stops > 0 or (args.stop_after is not None and global_step >= args.stop_after)
                if interrupted or (args.save_every and global_step % args.save_every == 0):
                    checkpoint(epoch, i + 1)
                if interrupted:
                    log({"kind": "stopped", "step": global_step, "reason": "signal" if stops > 0 else "--stop-after"})
                    result["stopped_early"] = True
                    result["global_step"] = global_step
                    return result
            if val_loader is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                broadcast_buffers(model, d)
                scores = evaluate(model, val_loader, d, amp_dtype, n_valid)
                log({"kind": "eval", "step": global_step, "epoch": epoch, **scores})
            checkpoint(epoch + 1, 0)

    if args.fsdp:
        # each rank holds shards: digest the gathered weights (rank 0), nothing to compare
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_state_options())
        names = [n for n, _ in model.named_parameters()]
        digest, in_sync = (param_digest((n, full[n]) for n in names) if d.main else None), None
    else:
        # DDP keeps replicas identical; a mismatch here would be a bug worth failing loudly on
        digests = d.gather_objects(param_digest(unwrap(model).named_parameters()))
        digest, in_sync = digests[0], all(x == digests[0] for x in digests)
        if not in_sync:
            raise RuntimeError(f"parameters differ between ranks after training: {digests}")
    log({"kind": "final", "step": global_step, "param_sha256": digest, "ranks_in_sync": in_sync})
    result.update(global_step=global_step, param_sha256=digest)
    return result


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a name from vitattn.models.list_models()")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON object of constructor overrides, e.g. \'{"depths": [1, 1], "embed_dims": [32, 64]}\'')
    p.add_argument("--attn-backend", default="auto", help=f"backend of the vitattn ops: one of {ATTN_BACKENDS}")
    p.add_argument("--data", default="synthetic", help="'synthetic', or an ImageFolder root (with train/ and val/, "
                                                       "or class directories directly)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data")
    p.add_argument("--synthetic-train-size", type=int, default=1024)
    p.add_argument("--synthetic-val-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=None, help="max global grad norm")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype; fp16 (CUDA only) adds a GradScaler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--find-unused-parameters", action="store_true", help="for DDP")
    p.add_argument("--fsdp", action="store_true",
                   help=f"shard parameters, gradients and optimizer state with FSDP2 (fully_shard) per "
                        f"{'/'.join(FSDP_UNITS)} instead of replicating with DDP")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--output", default="runs/train", help="checkpoints and metrics.jsonl")
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'auto' for <output>/last.pt if present")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a ckpt_stepN.pt copy of every checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after this many steps in total (an interruption on purpose)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--no-eval", action="store_true")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    models = vm.list_models()
    if args.model not in models:
        p.error(f"--model: unknown model {args.model!r}; available: {', '.join(models)}")
    if args.model_kwargs is not None:
        try:
            kw = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            p.error(f"--model-kwargs: not valid JSON ({exc})")
        if not isinstance(kw, dict):
            p.error(f"--model-kwargs: must be a JSON object, got {type(kw).__name__}")
    if args.attn_backend not in ATTN_BACKENDS:
        p.error(f"--attn-backend: must be one of {ATTN_BACKENDS}, got {args.attn_backend!r}")
    for name in ("img_size", "num_classes", "synthetic_train_size", "synthetic_val_size", "epochs", "batch_size",
                 "log_every", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "workers", "threads", "save_every", "weight_decay", "min_lr"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr: must be > 0, got {args.lr}")
    if not 0.0 <= args.smoothing < 1.0:
        p.error(f"--smoothing: must lie in [0, 1), got {args.smoothing}")
    if args.clip_grad is not None and not args.clip_grad > 0:
        p.error(f"--clip-grad: must be > 0, got {args.clip_grad}")
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after: must be >= 1, got {args.stop_after}")
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.amp == "fp16" and on_cpu:
        p.error("--amp: fp16 (with a GradScaler) is for CUDA; use --amp bf16 on CPU")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        p.error(f"--resume: {args.resume!r} is not a file (use 'auto' to resume from <output>/last.pt when present)")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        p.error(f"--data: {args.data!r} is neither 'synthetic' nor a directory")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
