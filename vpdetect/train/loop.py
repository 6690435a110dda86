"""The training loop: Adam with a step schedule, weighted focal loss, validation, DDP.

`Trainer` owns the network, optimizer, schedule and history; it reads crops
from `CropDataset`s (MSDNet) or `BoxDataset`s (whole-box classifiers) and never touches files: the caller saves checkpoints
from `Trainer.training_state()` in `on_epoch_end`. Under torchrun each
process trains on its own shard of every epoch's crop indices; gradients are
averaged by DistributedDataParallel, validation sums are all-reduced, and
only rank 0 is meant to report and save.

Reproducibility: the network is initialised from the seed, crops are a pure
function of (seed, index), and the optimizer/schedule state travels in the
checkpoint, so a resumed run continues exactly where it stopped. On the CPU
that gives the same model bit for bit; cuDNN picks its algorithms by timing
and some of them sum in a varying order, so on a GPU the same model needs
`deterministic=True` (deterministic algorithms only; slower).

Distributed runs take every stop decision together: the time limit and a
diverged loss are all-reduced, so no rank leaves while another waits in an
all-reduce (a hang).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from vpdetect.errors import VPDetectError
from vpdetect.nn.losses import IGNORE_INDEX, focal_loss
from vpdetect.nn.msdnet import MSDNet
from vpdetect.nn.precision import training_autocast_dtype
from vpdetect.train.data import CropDataset, shard_indices

# How long ranks leaving after an error wait for each other (seconds) before leaving alone.
ERROR_BARRIER_S = 30


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (stored in the checkpoint and checked on resume)."""

    stage: str = "localizer"
    width: int = 2
    depth: int = 49
    max_dilation: int = 7
    crop_size: int = 64
    batch_size: int = 4
    epochs: int = 500
    steps_per_epoch: int = 100
    lr: float = 1e-3
    lr_step: int = 80  # epochs between learning-rate drops (paper: x0.1 after 80)
    lr_factor: float = 0.1
    gamma: float = 0.0
    alpha: list[float] | None = None
    seed: int = 0
    particle_share: float = 0.5
    size_balance: float = 0.0  # particle-centred crops pick particles with weight radius^-size_balance
    structure_share: float = 0.0  # share of crops centred on non-particle structure (localizers)
    val_crops: int = 16
    workers: int = 0
    amp: bool = False
    deterministic: bool = False
    class_names: list[str] = field(default_factory=lambda: ["background", "particle"])
    # "msdnet" segments crops; the others (vpdetect.nn.classifiers) label whole boxes of crop_size.
    arch: str = "msdnet"
    width_divisor: int = 1  # box classifiers: channel widths divided by this (1 = the paper's)
    max_shift: int = 2  # box classifiers: random shift of particle boxes off the true centre
    background_share: float = 0.1  # box classifiers: share of non-particle boxes
    gain_jitter: float = 0.0  # box classifiers: random gain of training boxes in [1/(1+j), 1+j]
    background_sigma: float = 0.0  # localizers: a Gaussian background of this sigma subtracted (0: none)

    # Options that must match for --resume to continue the same schedule and data stream.
    RESUME_KEYS = (
        "stage", "width", "depth", "max_dilation", "crop_size", "batch_size", "steps_per_epoch",
        "lr", "lr_step", "lr_factor", "gamma", "alpha", "seed", "particle_share", "class_names",
        "arch", "width_divisor", "max_shift", "background_share", "gain_jitter",
        "background_sigma", "size_balance", "structure_share",
    )

    @property
    def box_classifier(self) -> bool:
        return self.arch != "msdnet"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str | None = None  # this process's device under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_device(device_spec: str, local_rank: int, cuda_available: bool,
                       gpu_count: int) -> tuple[str, str]:
    """(device, backend) of one torchrun process: GPU `local_rank` with NCCL, else the CPU with gloo.

    `cuda:N` is refused: torchrun starts one process per GPU and each must take its own
    (LOCAL_RANK); choose the GPUs with CUDA_VISIBLE_DEVICES instead.
    """
    spec = (device_spec or "auto").strip().lower()
    if spec.startswith("cuda:"):
        raise VPDetectError(
            f"--device {device_spec} under torchrun would put every process on one GPU; "
            "pass --device cuda (each process takes GPU LOCAL_RANK) and pick GPUs with CUDA_VISIBLE_DEVICES"
        )
    if spec == "cpu" or (spec == "auto" and not cuda_available):
        return "cpu", "gloo"
    if spec not in ("auto", "cuda"):
        raise VPDetectError(f"unknown device {device_spec!r}: use cpu, cuda, cuda:N or auto")
    if not cuda_available:
        raise VPDetectError(f"device {device_spec} requested but CUDA is not available on this machine")
    if local_rank >= gpu_count:
        raise VPDetectError(
            f"torchrun process with LOCAL_RANK {local_rank} has no GPU of its own ({gpu_count} visible); "
            "start at most one process per GPU"
        )
    return f"cuda:{local_rank}", "nccl"


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    available = torch.cuda.is_available()
    device, backend = distributed_device(
        device_spec, local_rank, available, torch.cuda.device_count() if available else 0
    )
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def current_dist_info() -> DistInfo:
    """This process's place in the process group it has joined (a lone process: rank 0 of 1)."""
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(info: DistInfo, finished: bool) -> None:
    """Leave the process group: after a barrier when every rank finished, at once after an error
    (the other ranks fail the same way: stop decisions are shared)."""
    if info.world <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    elif dist.get_backend() == "gloo":
        # The ranks reach here together (stop decisions are shared); leaving one by one let a
        # rank tear its connections down while a peer's gloo thread still read them, which
        # aborted that peer ("terminate called without an active exception"). A bounded
        # barrier keeps the exit orderly and cannot hang on a rank that is gone.
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=ERROR_BARRIER_S))
        except RuntimeError:
            pass  # a rank died: leave anyway
    dist.destroy_process_group()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Deterministic kernels only (and no cuDNN autotuning) inside the block, when `enabled`."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    # cuBLAS reads this when it starts; the CLI sets it before any CUDA work.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def hardware_description(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return f"{world} x {name}" if world > 1 else name


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Network, optimizer and schedule for one run; `fit` drives it epoch by epoch."""

    def __init__(
        self,
        config: TrainConfig,
        train_data: CropDataset,
        val_data: CropDataset | None,
        device: torch.device | str = "cpu",
        dist_info: DistInfo | None = None,
    ) -> None:
        self.config = config
        self.train_data = train_data
        self.val_data = val_data
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()
        torch.manual_seed(config.seed)
        self.model = build_network(config)
        self.model.to(self.device)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.net = self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_step, gamma=config.lr_factor
        )
        # bfloat16 where the GPU has it natively, else float16 (vpdetect.nn.precision).
        self.amp_dtype = training_autocast_dtype(self.device) if config.amp else None
        # Loss scaling is only needed for float16; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.alpha = (
            torch.tensor(config.alpha, dtype=torch.float32, device=self.device) if config.alpha else None
        )
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.best: dict | None = None

    # -- pieces

    def _loader(self, data: CropDataset, indices: list[int]):
        return torch.utils.data.DataLoader(
            data,
            batch_size=self.config.batch_size,
            sampler=indices,
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def _all_reduce(self, values: list[float] | np.ndarray) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if self.dist.world <= 1:
            return array
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.as_tensor(array, device=backend_device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def _stop_flags(self, deadline: float | None, loss: torch.Tensor | None = None) -> tuple[bool, bool]:
        """(past the deadline, loss not finite) on any rank."""
        over = deadline is not None and time.monotonic() > deadline
        diverged = loss is not None and not bool(torch.isfinite(loss.detach()))
        if self.dist.world > 1:
            over, diverged = (bool(v > 0) for v in self._all_reduce([float(over), float(diverged)]))
        return over, diverged

    def past_deadline(self, deadline: float | None) -> bool:
        """Whether any rank is past `deadline` (all ranks take part when distributed)."""
        if deadline is None:
            return False
        return self._stop_flags(deadline)[0]

    def crops_per_epoch(self) -> int:
        return self.config.steps_per_epoch * self.config.batch_size * self.dist.world

    def train_epoch(
        self, on_step: Callable[[int, float], None] | None = None, deadline: float | None = None
    ) -> float | None:
        """One epoch; the mean training loss over all processes, or None if `deadline` cut it short.

        A cut-short epoch is not counted: resuming repeats it from its start.
        """
        cfg = self.config
        n = self.crops_per_epoch()
        indices = shard_indices(self.epoch * n, n, self.dist.rank, self.dist.world)
        self.net.train()
        total, steps = 0.0, 0
        for images, targets in self._loader(self.train_data, indices):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.net(images)
            loss = focal_loss(logits, targets, self.alpha, cfg.gamma)
            # Decided by all ranks together (one all-reduce): a rank that stops alone would
            # leave the others waiting in DDP's gradient all-reduce.
            over, diverged = self._stop_flags(deadline, loss)
            if diverged:
                raise VPDetectError(
                    f"training diverged (loss {loss.item()} on rank {self.dist.rank}) in epoch "
                    f"{self.epoch + 1}; lower --lr"
                    if not math.isfinite(loss.item()) else
                    f"training diverged on another process in epoch {self.epoch + 1}; lower --lr"
                )
            if over:
                return None
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            steps += 1
            total += float(loss.detach())
            if on_step is not None:
                on_step(steps, total / steps)
        self.scheduler.step()
        self.epoch += 1
        summed = self._all_reduce([total, steps])
        return float(summed[0] / max(summed[1], 1))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Focal loss and VA / MVA / MIoU over the fixed validation crops (all processes).

        For box classifiers: loss, accuracy, per-class F1 and their mean (macro F1) over the boxes.
        """
        from vpdetect.evaluate.segmentation import confusion_matrix, segmentation_metrics

        if self.val_data is None or self.config.val_crops < 1:
            return {}
        if self.config.box_classifier:
            return self._validate_boxes()
        n_classes = len(self.config.class_names)
        indices = shard_indices(0, self.config.val_crops, self.dist.rank, self.dist.world)
        self.model.eval()
        cm = np.zeros((n_classes, n_classes), dtype=np.float64)
        loss_sum = 0.0
        count = 0.0
        for images, targets in self._loader(self.val_data, indices):
            images = images.to(self.device)
            targets = targets.to(self.device)
            with self._autocast():
                logits = self.model(images)
            loss_sum += float(focal_loss(logits, targets, self.alpha, self.config.gamma, reduction="sum"))
            valid = targets != IGNORE_INDEX
            count += float(valid.sum())
            pred = logits.argmax(dim=1)
            cm += confusion_matrix(pred[valid].cpu().numpy(), targets[valid].cpu().numpy(), n_classes)
        summed = self._all_reduce(np.concatenate([[loss_sum, count], cm.ravel()]))
        cm = summed[2:].reshape(n_classes, n_classes)
        metrics = segmentation_metrics(cm)
        return {"val_loss": float(summed[0] / max(summed[1], 1.0)), **metrics}

    def _validate_boxes(self) -> dict:
        from vpdetect.evaluate.segmentation import confusion_matrix

        n_classes = len(self.config.class_names)
        indices = shard_indices(0, self.config.val_crops, self.dist.rank, self.dist.world)
        self.model.eval()
        cm = np.zeros((n_classes, n_classes), dtype=np.float64)
        loss_sum = 0.0
        for images, labels in self._loader(self.val_data, indices):
            images, labels = images.to(self.device), labels.to(self.device)
            with self._autocast():
                logits = self.model(images)
            loss_sum += float(focal_loss(logits, labels, self.alpha, self.config.gamma, reduction="sum"))
            cm += confusion_matrix(logits.argmax(dim=1).cpu().numpy(), labels.cpu().numpy(), n_classes)
        summed = self._all_reduce(np.concatenate([[loss_sum], cm.ravel()]))
        return {"val_loss": float(summed[0] / max(self.config.val_crops, 1)),
                **box_metrics(summed[1:].reshape(n_classes, n_classes))}

    # -- state

    def training_state(self) -> dict:
        """Everything --resume needs besides the weights (tensors and plain types only)."""
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best": self.best,
        }

    def load_training_state(self, state: dict, state_dict: dict) -> None:
        """Restore a run saved by `training_state` (plus the model's weights)."""
        saved = state.get("config", {})
        for key in TrainConfig.RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.config, key):
                raise VPDetectError(
                    f"cannot resume: {key.replace('_', ' ')} was {saved[key]!r}, now {getattr(self.config, key)!r}"
                )
        self.model.load_state_dict(state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.best = state.get("best")


def build_network(config: TrainConfig):
    """The untrained network a config describes (an MSDNet or a whole-box classifier)."""
    if not config.box_classifier:
        return MSDNet(1, len(config.class_names), config.width, config.depth, config.max_dilation)
    from vpdetect.nn.classifiers import build_box_classifier

    try:
        return build_box_classifier(config.arch, 1, len(config.class_names), config.crop_size, config.width_divisor)
    except ValueError as exc:
        raise VPDetectError(str(exc)) from None


def box_metrics(cm: np.ndarray) -> dict:
    """Accuracy, per-class F1 (classes with validation boxes; absent ones NaN) and macro F1.

    `cm[true, predicted]` counts boxes.
    """
    tp = np.diag(cm)
    n_true, n_pred = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(n_true > 0, 2 * tp / (n_true + n_pred), np.nan)
    present = f1[~np.isnan(f1)]
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1.0)),
        "macro_F1": float(present.mean()) if present.size else 0.0,
        "class_F1": [None if np.isnan(v) else round(float(v), 4) for v in f1],
    }


def is_better(metrics: dict, best: dict | None) -> bool:
    """Higher validation macro F1 (box classifiers) or MIoU wins; without validation, lower training loss."""
    if best is None:
        return True
    if "macro_F1" in metrics and "macro_F1" in best:
        return metrics["macro_F1"] > best["macro_F1"]
    if "MIoU" in metrics and "MIoU" in best:
        return metrics["MIoU"] > best["MIoU"]
    return metrics["train_loss"] < best["train_loss"]


def fit(
    trainer: Trainer,
    on_epoch_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch_end: Callable[[dict, bool], None] | None = None,
    time_limit_s: float | None = None,
) -> str:
    """Train until `config.epochs` epochs are done ("done") or the time limit ("time limit").

    Every rank takes the time-limit decision together (`Trainer.past_deadline`).
    """
    with deterministic_algorithms(trainer.config.deterministic):
        return _fit(trainer, on_epoch_start, on_step, on_epoch_end, time_limit_s)


def _fit(trainer, on_epoch_start, on_step, on_epoch_end, time_limit_s) -> str:
    started = time.monotonic()
    deadline = started + time_limit_s if time_limit_s else None
    while trainer.epoch < trainer.config.epochs:
        if on_epoch_start is not None:
            on_epoch_start(trainer.epoch + 1)
        lr = trainer.optimizer.param_groups[0]["lr"]
        t0 = time.monotonic()
        loss = trainer.train_epoch(on_step=on_step, deadline=deadline)
        if loss is None:
            return "time limit"
        record = {"epoch": trainer.epoch, "lr": lr, "train_loss": loss}
        record.update(trainer.validate())
        record["seconds"] = time.monotonic() - t0
        improved = is_better(record, trainer.best)
        if improved:
            trainer.best = dict(record)
        trainer.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, improved)
        if trainer.past_deadline(deadline):
            return "time limit"
    return "done"


def history_csv(history: list[dict]) -> str:
    """The per-epoch log as CSV text (a fixed column order, blank where a value is missing)."""
    columns = ["epoch", "lr", "train_loss", "val_loss", "VA", "MVA", "MIoU", "seconds"]
    if any("macro_F1" in row for row in history):  # box classifiers
        columns = ["epoch", "lr", "train_loss", "val_loss", "accuracy", "macro_F1", "seconds"]
    lines = [",".join(columns)]
    for row in history:
        cells = []
        for c in columns:
            v = row.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif c == "epoch":
                cells.append(str(int(v)))
            else:
                cells.append(f"{float(v):.6g}")
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def curves_figure(history: list[dict], title: str = ""):
    """Loss (left) and validation metrics (right) against epoch, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_metric = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    if any("val_loss" in r for r in history):
        ax_loss.plot(epochs, [r.get("val_loss", np.nan) for r in history], label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("focal loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    for key in ("VA", "MVA", "MIoU", "accuracy", "macro_F1"):
        if any(key in r for r in history):
            ax_metric.plot(epochs, [r.get(key, np.nan) for r in history], label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("validation metric")
    ax_metric.set_ylim(0, 1)
    if ax_metric.lines:
        ax_metric.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
