"""Sample quality without a pretrained Inception net: Fréchet distance on the features of a small
classifier trained on the same data, and that classifier's accuracy on generated samples.

Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):

    FD = ‖μ_1 − μ_2‖² + Tr(Σ_1 + Σ_2 − 2 (Σ_1 Σ_2)^{1/2})

computed in float64 as Tr((Σ_1 Σ_2)^{1/2}) = Σ_i √λ_i(Σ_1^{1/2} Σ_2 Σ_1^{1/2}) (a symmetric PSD matrix,
so ``eigvalsh`` is exact and stable). Generated samples are compared with held-out real images the
generator's teacher never saw: a teacher that memorised its training set must not win by copying.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..config import OptimConfig, TrainConfig, positive
from ..data.batches import ShuffledBatches
from ..engine import Engine, Method
from ..runner import StageContext
from .diffusion import sample_in_batches
from ..report import plt


@dataclass
class ClassifierConfig:
    hidden: int = 256
    features: int = 128  # FD feature dimension (the penultimate layer)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    input_noise: float = 0.1  # Gaussian noise added to training images: features stay sane on imperfect samples

    def validate(self) -> None:
        for key in ("hidden", "features", "steps", "batch_size", "lr"):
            positive(getattr(self, key), f"classifier.{key}")
        positive(self.input_noise, "classifier.input_noise", allow_zero=True)


class FeatureClassifier(ModelMixin, ConfigMixin):
    """MLP image classifier; ``features(x)`` is its penultimate layer."""

    @register_to_config
    def __init__(self, image_shape: tuple = (1, 8, 8), num_classes: int = 10, hidden: int = 256, features: int = 128):
        super().__init__()
        pixels = int(torch.tensor(image_shape).prod())
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.SiLU(), nn.Dropout(0.1),
                                  nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


class ClassifierTraining(Method):
    def __init__(self, cfg: ClassifierConfig, image_shape, num_classes: int, held_out: dict):
        self.cfg, self.image_shape, self.num_classes, self.held_out = cfg, image_shape, num_classes, held_out

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        optim = OptimConfig(lr=self.cfg.lr, weight_decay=0.01, warmup_steps=50, schedule="cosine")
        model = FeatureClassifier(tuple(self.image_shape), self.num_classes, self.cfg.hidden, self.cfg.features)
        self.model = engine.register("classifier", model, optim=optim, max_steps=self.cfg.steps,
                                     batch_size=self.cfg.batch_size)

    def train_step(self, batch: dict) -> dict:
        images = batch["images"] + self.cfg.input_noise * torch.randn_like(batch["images"])
        logits = self.model(images)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.engine.optimize("classifier", loss)
        return {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def evaluate(self) -> dict:
        model = self.engine.unwrap("classifier")
        logits = model(self.held_out["images"].to(self.engine.device))
        return {"accuracy": (logits.argmax(-1).cpu() == self.held_out["labels"]).float().mean().item()}


def train_classifier(stage_dir: Path, recipe_cfg: TrainConfig, cfg: ClassifierConfig, data) -> dict:
    """Stage: the feature classifier, trained on the training split; accuracy on the held-out split.
    Runs in ``stage_dir`` (a runner stage passes ``ctx.dir``) with ``recipe_cfg``'s run/optim/engine."""
    ctx = StageContext(cfg=recipe_cfg, root=Path(stage_dir), folder=".")
    held = {"images": data.held_out_images, "labels": data.held_out_labels}
    method = ClassifierTraining(cfg, data.image_shape, data.num_classes, held)
    engine = ctx.engine(max_steps=cfg.steps, eval_every=0)
    batches = ShuffledBatches(data.train_dict(), cfg.batch_size, recipe_cfg.run.seed + 1, engine.rank,
                              engine.world_size)
    _, final = ctx.fit(method, batches, engine=engine)
    engine.save_pretrained("classifier", ctx.dir / "model")
    return {"model": str(ctx.dir / "model"), "held_out_accuracy": final["accuracy"]}


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    vals, vecs = torch.linalg.eigh(cov1)
    sqrt1 = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)


class FrechetEvaluator:
    """Scores generated images against fixed reference images (the held-out split)."""

    def __init__(self, classifier: FeatureClassifier, reference_images: torch.Tensor):
        self.classifier = classifier.eval().requires_grad_(False)
        self.reference = gaussian_stats(self._features(reference_images))

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(chunk) for chunk in images.float().cpu().split(2000)])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        images = images.float().cpu().clamp(-1, 1)  # samples outside the data range are clipped, as when saved
        feats = self._features(images)
        predicted = self.classifier.head(feats).argmax(-1)
        return {"fd": frechet_distance(*gaussian_stats(feats), *self.reference),
                "class_acc": (predicted == labels.cpu()).float().mean().item()}


def load_evaluator(classifier_dir: str | Path, reference_images: torch.Tensor) -> FrechetEvaluator:
    return FrechetEvaluator(FeatureClassifier.from_pretrained(classifier_dir), reference_images)


def evaluate_sampler(sample_fn, evaluator: FrechetEvaluator, labels: torch.Tensor, image_shape, seeds: int,
                     device) -> tuple[dict, torch.Tensor]:
    """FD and class accuracy averaged over ``seeds`` noise seeds (with their spread); also the first
    seed's images. Every sampler gets the same noise per seed, so differences between samplers are paired."""
    scores, first = [], None
    for seed in range(seeds):
        images = sample_in_batches(sample_fn, labels, image_shape, seed, device)
        first = images if first is None else first
        scores.append(evaluator(images, labels))
    fds = torch.tensor([s["fd"] for s in scores])
    return {"fd": fds.mean().item(), "fd_std": fds.std().item() if seeds > 1 else 0.0,
            "class_acc": sum(s["class_acc"] for s in scores) / seeds}, first


def save_sample_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, per_class: int = 10,
                     title: str = "") -> Path:
    """A PNG grid: one row per class, ``per_class`` samples each (images in [-1, 1]), tiled into one
    array (one matplotlib image, not one axes per sample: that is ~100x slower)."""

    channels, height, width = images.shape[1:]
    classes = sorted(set(labels.tolist()))
    pad = 1
    canvas = torch.ones(channels, len(classes) * (height + pad), per_class * (width + pad))
    for r, c in enumerate(classes):
        for j, image in enumerate(images[labels == c][:per_class]):
            top, left = r * (height + pad), j * (width + pad)
            canvas[:, top:top + height, left:left + width] = (image.float().clamp(-1, 1) + 1) / 2
    fig, ax = plt.subplots(figsize=(max(3.0, per_class * width / 16), max(3.0, len(classes) * height / 16) + 0.3))
    ax.imshow(canvas.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
