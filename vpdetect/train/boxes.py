"""Training boxes for the whole-subtomogram classifiers: one box, one label.

Particle boxes are centred on a true coordinate plus a small random shift (the
error stage 1 makes), class-balanced: a class is drawn uniformly, then one of
its particles. Non-particle boxes (label 0) are centred on a background voxel
whose 5x5x5 neighbourhood holds no target particle, so stage 2 learns to reject
stage 1's false positives (noise, vesicle membranes, ...). Like `CropDataset`,
a box is a pure function of (seed, stream, index).

Augmentation keeps the missing wedge where it is: only flips of z, y and x,
each with probability 1/2. A single-axis tilt series about y leaves a wedge
that every mirror maps onto itself, whereas a 90-degree turn about z would
swap x and y and move the tilt axis where real data never has it. A random
gain (`gain_jitter`) scales each normalised box: the particles' contrast
against the noise differs between tomograms (with their crowding, ice and
dose), and a classifier that reads size from contrast confuses neighbouring
sizes on a tomogram whose contrast it has not seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.preprocess import normalise
from vpdetect.train.data import TrainingVolume, cut_crop

NON_PARTICLE = 0
# A background box centre needs this many voxels of background around it on every axis.
CLEAR_RADIUS = 2
_BACKGROUND_TRIES = 100


def flip_box(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip each of z, y and x with probability 1/2 (the missing wedge maps onto itself)."""
    axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
    return np.ascontiguousarray(np.flip(image, axes)) if axes else image


class BoxDataset:
    """Boxes (1, B, B, B) float32 and labels (int64 scalar): 0 = non-particle, k = target class k.

    `exhaustive=False` (training): index i draws a random box, a share
    `background_share` of them non-particle; with `augment`, flipped and, if
    `gain_jitter` j > 0, multiplied by a gain drawn log-uniformly in [1/(1+j), 1+j]. `exhaustive=True` (validation):
    the first indices are every particle of every volume in order (shifted
    like training boxes), then `n_background` non-particle boxes; `len()`
    counts them.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        box_size: int,
        seed: int,
        max_shift: int = 2,
        background_share: float = 0.1,
        augment: bool = True,
        stream: int = 0,
        exhaustive: bool = False,
        n_background: int = 0,
        gain_jitter: float = 0.0,
    ) -> None:
        if not volumes:
            raise VPDetectError("no training volumes")
        if box_size < 4:
            raise VPDetectError(f"box size must be at least 4, got {box_size}")
        if max_shift < 0:
            raise VPDetectError(f"maximum shift must be >= 0, got {max_shift}")
        if not 0.0 <= gain_jitter < 1.0:
            raise VPDetectError(f"gain jitter must lie in [0, 1), got {gain_jitter}")
        if not 0.0 <= background_share <= 1.0:
            raise VPDetectError(f"non-particle share must lie in [0, 1], got {background_share}")
        self.volumes = list(volumes)
        self.box_size = int(box_size)
        self.seed = int(seed)
        self.max_shift = int(max_shift)
        self.background_share = float(background_share)
        self.augment = augment
        self.gain_jitter = float(gain_jitter)
        self.stream = int(stream)
        self.exhaustive = exhaustive
        self.n_background = int(n_background)
        pairs = [(v, p) for v, tv in enumerate(self.volumes) for p in range(len(tv.centre_classes))]
        self.particles = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        if len(self.particles) == 0:
            raise VPDetectError("no particles of the selected classes in the training data")
        classes = np.array([self.volumes[v].centre_classes[p] for v, p in self.particles], dtype=np.int64)
        self.particle_classes = classes
        self.by_class = {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}
        self.classes_with_particles = sorted(self.by_class)
        sizes = np.array([tv.targets.size for tv in self.volumes], dtype=np.float64)
        self.volume_weights = sizes / sizes.sum()

    def __len__(self) -> int:
        if not self.exhaustive:
            raise TypeError("a training BoxDataset is unbounded")
        return len(self.particles) + self.n_background

    def _background_centre(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        r = CLEAR_RADIUS
        for _ in range(_BACKGROUND_TRIES):
            v = int(rng.choice(len(self.volumes), p=self.volume_weights))
            targets = self.volumes[v].targets
            centre = np.array([int(rng.integers(0, n)) for n in targets.shape], dtype=np.int64)
            window = targets[tuple(slice(max(c - r, 0), c + r + 1) for c in centre)]
            if not np.any(window > 0):  # ignored (negative) voxels do not make a particle
                return v, centre
        raise VPDetectError("could not find background for non-particle boxes: the tomograms are full of particles")

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[int, np.ndarray, int]:
        """(volume, centre [z, y, x], label) of box `index`."""
        if self.exhaustive:
            row = index if index < len(self.particles) else None
        elif rng.random() < self.background_share:
            row = None
        else:
            cls = self.classes_with_particles[int(rng.integers(len(self.classes_with_particles)))]
            members = self.by_class[cls]
            row = int(members[int(rng.integers(len(members)))])
        if row is None:
            v, centre = self._background_centre(rng)
            return v, centre, NON_PARTICLE
        v, p = (int(i) for i in self.particles[row])
        tv = self.volumes[v]
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=3)
        return v, tv.centres_zyx[p] + shift, int(tv.centre_classes[p])

    def box(self, index: int) -> tuple[np.ndarray, int]:
        """Box `index` as a numpy array (B, B, B) and its label."""
        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        v, centre, label = self._pick(int(index), rng)
        tv = self.volumes[v]
        corner = centre - self.box_size // 2  # the centre voxel sits at box // 2, as in extract_boxes
        image = normalise(cut_crop(tv.volume, corner, self.box_size, fill=tv.mean), tv.mean, tv.std)
        if self.augment:
            image = flip_box(image, rng)
            if self.gain_jitter > 0:
                # Log-uniform in [1 / (1 + j), 1 + j]: as likely to dim as to brighten.
                bound = np.log1p(self.gain_jitter)
                image = image * np.float32(np.exp(rng.uniform(-bound, bound)))
        return image, label

    def __getitem__(self, index: int):
        import torch

        image, label = self.box(index)
        return torch.from_numpy(image[None]), torch.tensor(label, dtype=torch.int64)
